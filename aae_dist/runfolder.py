"""A run folder's safety: names that stay one folder, one owner at a time (a lease), and an
--overwrite that keeps the old run until the new one has a checkpoint.

Why here and not in the driver: `train`, `sweep` and `submit` all take a `--name`, and the lease
and the set-aside must agree on which files a run writes."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import uuid

from . import storage
from .errors import UserError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LEASE = "lock.json"
ASIDE = ".replaced"  # the old run while an --overwrite is under way
CHECKPOINT_PREFIX = "checkpoint_"  # = checkpoint.PREFIX (not imported: checkpoint imports torch-side code)
# everything a run writes at its top level (Ray Train adds its storage marker); --overwrite removes only these
RUN_FILES = {"config.json", "summary.json", "tensorboard", "STOP", LEASE, ASIDE,
             "vat_radius.npz", "baseline_autoencoder.pt",  # the adaptive VAT radius, the clustering baseline's autoencoder
             ".validate_storage_marker", "checkpoint_manager_snapshot.json"}  # Ray Train's own
HEARTBEAT_S = 10.0
STALE_S = 60.0


def check_name(name, flag: str = "--name") -> str:
    """Run names are one path component: a name like '.', '..' or 'a/b' would point outside the storage folder."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        shown = repr(name if not isinstance(name, str) or len(name) <= 40 else name[:40] + "...")
        raise UserError(f"{flag} {shown} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit (one folder name, no '/')")
    return name


def is_run_file(name: str) -> bool:
    base = name.split(".tmp-", 1)[0]  # an atomic write's leftover temp file belongs to its file
    return base in RUN_FILES or base.startswith(CHECKPOINT_PREFIX)


def check_storage(storage_url: str) -> None:
    """A local --storage must be a folder we can write to, an object store's bucket must exist: found
    before anything is written (--dry-run included)."""
    if not storage.is_local(storage_url):
        storage.check_bucket(storage_url)
        return
    path = storage.filesystem(storage_url)[1]
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe.rstrip("/")) or "/"
        if probe == "/":
            break
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise UserError(f"--storage {storage.redact(storage_url)}: {probe} is a file, not a folder: choose a folder for the runs")


def check_overwritable(run_url: str) -> None:
    """--overwrite deletes only what a run writes: a folder holding anything else is not a run to replace."""
    foreign = [n for n in storage.listdir(run_url) if not is_run_file(n)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"--overwrite: {storage.redact(run_url)} holds files aae-dist did not write ({shown}): "
                        "move them away or choose another --name")


# ---- the lease ----------------------------------------------------------------------------------

def _create_exclusive(url: str, data: bytes) -> bool:
    """Create URL only if it does not exist yet: O_EXCL locally, a conditional PUT on S3, else check-then-write
    (the caller reads the lease back, so a lost race is still noticed)."""
    fs, path = storage.filesystem(url)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "file" in protocols:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.link(tmp, path)  # fails if the lease exists; readers never see a half-written one
        except FileExistsError:
            return False
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True
    if storage.exists(url):
        return False
    if "s3" in protocols or "s3a" in protocols:
        try:
            storage.with_retries("creating", url, lambda: fs.pipe_file(path, data, IfNoneMatch="*"))
        except Exception as exc:  # noqa: BLE001 - a failed precondition means someone else created it first
            if "PreconditionFailed" in str(exc) or "412" in str(exc) or "ConditionalRequestConflict" in str(exc):
                return False
            raise
        return True
    storage.write_bytes_atomic(url, data)
    return True


def _alive_here(info: dict) -> bool | None:
    """Whether the lease's owner process still runs (None: on another host, cannot tell)."""
    if info.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(info.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


class Lease:
    """The run folder's owner: lock.json with owner token, host, pid and a heartbeat renewed every
    HEARTBEAT_S by a thread of the driver, which lives as long as the run (Ray restarts of workers keep it).
    A lease whose process is gone (same host) or not renewed for STALE_S is taken over, with a message."""

    def __init__(self, run_url: str, name: str):
        self.url, self.name = storage.join(run_url, LEASE), name
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": self.started, "heartbeat": time.time()}).encode()

    def _read(self) -> dict | None:
        try:
            info = json.loads(storage.read_bytes(self.url))
        except UserError:  # gone in between
            return None
        except ValueError:
            return {}
        return info if isinstance(info, dict) else {}

    def acquire(self) -> "Lease":
        for _ in range(3):
            if self._try_create():
                self._thread = threading.Thread(target=self._renew_loop, name="aae-lease", daemon=True)
                self._thread.start()
                return self
            info = self._read()
            if info is None:
                continue
            self._take_over_if_stale(info)
        raise UserError(f"run '{self.name}' is being claimed by another process at the same moment: try again")

    def _try_create(self) -> bool:
        try:
            created = _create_exclusive(self.url, self._body())
        except (PermissionError, OSError) as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"cannot write the run folder {storage.redact(self.url.rsplit('/', 1)[0])} "
                            f"({type(exc).__name__}: {exc.strerror or exc}): choose a writable --storage") from None
        if not created:
            return False
        info = self._read()  # read back: a store without conditional writes may have let a second writer in
        return bool(info) and info.get("owner") == self.token

    def _take_over_if_stale(self, info: dict) -> None:
        age = time.time() - float(info.get("heartbeat", 0) or 0)
        alive = _alive_here(info)
        who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
        if alive is False or (alive is None and age > STALE_S) or not info:
            why = "that process is gone" if alive is False else f"not renewed for {age:.0f} s"
            print(f"aae-dist: taking over the lease of run '{self.name}' from {who} ({why})", file=sys.stderr)
            if self._read() == info:
                storage.remove(self.url, recursive=False)
            return
        raise UserError(f"run '{self.name}' is in use by {who} (its lease {LEASE} was renewed {max(0, age):.0f} s ago): "
                        f"wait for that run to end or stop it (a lease not renewed for {STALE_S:.0f} s is taken over)")

    def _renew_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                info = self._read()
                if info and info.get("owner") != self.token:
                    print(f"aae-dist: warning: the lease of run '{self.name}' was taken over by pid {info.get('pid')} "
                          f"on {info.get('host')}", file=sys.stderr)
                    return
                storage.write_bytes_atomic(self.url, self._body())
            except Exception:  # noqa: BLE001 - a missed heartbeat is retried at the next one
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            info = self._read()
            if info is not None and info.get("owner") == self.token:
                storage.remove(self.url, recursive=False)
        except Exception:  # noqa: BLE001 - an unreleased lease is taken over later (pid gone / stale)
            pass


# ---- --overwrite: set the old run aside, put it back if the new one fails before a checkpoint ---

def _move(fs, src: str, dst: str) -> None:
    storage.with_retries("moving", src, lambda: fs.mv(src, dst, recursive=True))


def set_aside(run_url: str) -> None:
    """Move the old run's files into run_url/.replaced (a rename locally, copies on object storage)."""
    fs, path = storage.filesystem(run_url)
    storage.with_retries("creating", run_url, lambda: fs.makedirs(f"{path}/{ASIDE}", exist_ok=True))  # a file is moved into it first
    for name in storage.listdir(run_url):
        if is_run_file(name) and name not in (LEASE, ASIDE):
            _move(fs, f"{path}/{name}", f"{path}/{ASIDE}/{name}")


def has_checkpoint(run_url: str) -> bool:
    return any(n.startswith(CHECKPOINT_PREFIX) and storage.exists(storage.join(run_url, n, "meta.json"))
               for n in storage.listdir(run_url))


def settle_aside(run_url: str) -> str | None:
    """After an --overwrite (or a killed one): keep the new run if it has a checkpoint, else put the old one back.
    Returns what was done, for a message."""
    if ASIDE not in storage.listdir(run_url):
        return None
    fs, path = storage.filesystem(run_url)
    if has_checkpoint(run_url):
        storage.remove(storage.join(run_url, ASIDE))
        return "replaced"
    for name in storage.listdir(run_url):
        if is_run_file(name) and name not in (LEASE, ASIDE):
            storage.remove(storage.join(run_url, name))
    for name in storage.listdir(storage.join(run_url, ASIDE)):
        _move(fs, f"{path}/{ASIDE}/{name}", f"{path}/{name}")
    storage.remove(storage.join(run_url, ASIDE))
    return "restored"


def clear_temp_files(run_url: str) -> int:
    """Remove the temp files of atomic writes a killed process left in the run folder (its top level and
    checkpoint folders); only the lease holder calls this, so no live write is touched."""
    removed = 0
    for name in storage.listdir(run_url):
        url = storage.join(run_url, name)
        if ".tmp-" in name:
            storage.remove(url, recursive=False)
            removed += 1
        elif name.startswith(CHECKPOINT_PREFIX):
            for inner in storage.listdir(url):
                if ".tmp-" in inner:
                    storage.remove(storage.join(url, inner), recursive=False)
                    removed += 1
    return removed
