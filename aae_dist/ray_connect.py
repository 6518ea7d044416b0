"""Connecting to Ray: a local cluster of our own, or a running one whose address we probe first."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

from .errors import UserError

_early: "EarlyRay | None" = None  # a local Ray being started in the background (start_early)
_joined: dict = {"address": None}  # the --address this process's Ray session was joined with (None: our own local one)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Ray waits minutes on a dead address; a TCP probe answers in seconds."""
    import socket

    if address in ("auto", "local"):
        return
    host, _, port = host_port(address).rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot reach the Ray cluster at {shown(address)}: {exc} (check --address and that the head node is up)") from None


def host_port(address: str) -> str:
    """HOST:PORT of [SCHEME://][USER:PASS@]HOST:PORT[/PATH]; a password may hold '/', so user-info ends at the last '@'."""
    return address.split("://", 1)[-1].rpartition("@")[2].split("/", 1)[0]


def shown(address: str) -> str:
    """The address for a message: user-info (with or without a scheme) replaced by ***."""
    from .storage import redact

    if "://" not in address and "@" in address:
        return "***@" + address.rpartition("@")[2]
    return redact(address)


def connect_ray(address: str | None, verbose: bool = False) -> None:
    """Join `address` or start a fresh local Ray (never a stale cluster from an earlier session).

    Quiet unless verbose: workers' and Ray's own output stay in Ray's log folder (`ray_log_dir`),
    not on the console.  The local dashboard (bound to 127.0.0.1) is kept: without it Ray's State
    API is off and Ray Train's clean-up actor fails to query it every second."""
    if _early is not None and not address:
        _early.wait()
    _init(address, verbose)


def _init(address: str | None, verbose: bool) -> None:
    import logging

    import torch  # noqa: F401  -- before ray, always: a driver that joined a cluster first and loaded torch after
    # died with "Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so" (tests/test_cluster.py's submitted job)
    import ray

    if ray.is_initialized():
        if not address or address == _joined["address"]:
            return
        check_reachable(address)  # refuse a dead address before leaving the cluster this process is on
        ray.shutdown()  # another --address than the one joined: never train on the wrong cluster
    elif address:
        check_reachable(address)
    if not verbose:
        for name in ("ray", "ray.train", "ray.data", "ray.tune"):
            logging.getLogger(name).setLevel(logging.ERROR)
    options = dict(address=address or "local", log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.ERROR)
    if address:
        ray.init(**options)
    else:
        with _own_api_server() as dashboard:
            ray.init(**options, **dashboard)
    _joined["address"] = address


_API_SERVER_VAR = "RAY_API_SERVER_ADDRESS"


@contextlib.contextmanager
def _own_api_server():
    """ray.init options for a local Ray whose State API every one of its processes finds.

    Ray's processes look the State API up through the last `ray start` cluster recorded in
    /tmp/ray/ray_current_cluster, not the session they belong to.  Where that file names a cluster that
    is gone (a head node killed rather than stopped), each lookup waits ~40 s for its GCS: Ray Train's
    placement-group cleaner then holds up the end of every run by ~13 s; where it names another live
    cluster, the cleaner asks that one whether our controller is alive.  So the dashboard gets a port
    chosen here, set during ray.init in the variable Ray's State API reads first: the raylet and every
    worker it starts inherit it.  The driver's own environment gets it back as it was the moment ray.init
    returns: the variable overrides any address given to Ray's job client, and the driver's children
    (a `ray start`, a submission to another cluster) must not inherit it."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    before = os.environ.get(_API_SERVER_VAR)
    os.environ[_API_SERVER_VAR] = f"http://127.0.0.1:{port}"
    try:
        yield {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    finally:
        if before is None:
            os.environ.pop(_API_SERVER_VAR, None)
        else:
            os.environ[_API_SERVER_VAR] = before


class EarlyRay:
    """A fresh local Ray started in a thread of its own, so its ~3 s start overlaps the driver's torch-bound
    pre-flight (ray.init mostly waits on Ray's processes).  The thread lives as long as the Ray session:
    on Linux Ray's processes are killed when the *thread* that started them ends (PR_SET_PDEATHSIG)."""

    def __init__(self, verbose: bool = False):
        self.error: BaseException | None = None
        self.ready = threading.Event()
        _exit_on_sigterm()  # what ray.init does, and can do only on the main thread
        self.thread = threading.Thread(target=self._run, args=(verbose,), name="aae-dist-ray-start", daemon=True)
        self.thread.start()

    def _run(self, verbose: bool) -> None:
        import time

        import ray

        try:
            _init(None, verbose)
        except BaseException as exc:  # noqa: BLE001 - raised again by wait(), in the caller's thread
            self.error = exc
        finally:
            self.ready.set()
        while ray.is_initialized():  # keep Ray's processes alive until ray.shutdown()
            time.sleep(0.5)

    def wait(self) -> None:
        """Block until Ray is up; its start-up error, if any, is raised here."""
        global _early
        self.ready.wait()
        if _early is self:
            _early = None
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """The pre-flight refused: shut the Ray down again (after its start, which cannot be cut short)."""
        import ray

        try:
            self.wait()
        except BaseException:  # noqa: BLE001 - the refusal, not Ray's own failure, is what the user needs
            pass
        ray.shutdown()
        self.thread.join()


def start_early(verbose: bool = False) -> EarlyRay | None:
    """Begin a fresh local Ray now (connect_ray waits for it); None where one is already running."""
    global _early
    import ray

    if _early is None and not ray.is_initialized():
        _early = EarlyRay(verbose)
    return _early


def disconnect() -> None:
    """Leave Ray explicitly, before the interpreter ends: left to Ray's atexit hook, its core worker's threads can
    outlive the finalising interpreter and crash the process (a SIGSEGV, exit status 139, after a run that passed)."""
    global _early
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    for thread in [t for t in threading.enumerate() if t.name == "aae-dist-ray-start"]:
        thread.join(timeout=30)  # it ends within half a second of the shutdown, and with it Ray's local processes
    _early, _joined["address"] = None, None


def _exit_on_sigterm() -> None:
    """SIGTERM ends the driver through sys.exit, so atexit stops Ray's processes (ray.init's handler)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))


def ray_log_dir() -> str | None:
    """Where this Ray session keeps its logs (workers' output included)."""
    try:
        import ray

        return ray._private.worker._global_node.get_logs_dir_path()  # noqa: SLF001 - no public accessor in Ray 2.60
    except Exception:  # noqa: BLE001
        return None
