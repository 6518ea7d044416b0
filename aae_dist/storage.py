"""fsspec access to any storage URL, with errors that name the URL and never the credentials."""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Callable, TypeVar

import fsspec

from .errors import UserError

T = TypeVar("T")
_SECRET_IN_URL = re.compile(r"(//)([^/@:]+):([^/@]+)@")


def redact(url: str) -> str:
    """Drop user:password@ from a URL before it reaches a message or a log."""
    return _SECRET_IN_URL.sub(r"\1***@", str(url))


_S3_CREDENTIALS = re.compile(r"^(s3a?)://([^/@:]+):([^/@]+)@(.*)$")


# Retries happen in one place, with_retries below: counted (summary.json), logged, and tuned by
# AAE_STORAGE_RETRIES.  s3fs and botocore would otherwise retry silently for ~11 s per request first.
_S3_OPTIONS = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


def _one_retry_policy(fs):
    fs.retries = 1
    return fs


def has_credentials(url: str) -> bool:
    return _SECRET_IN_URL.search(str(url)) is not None


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path for URL; an unknown protocol is a user error.  s3://KEY:SECRET@bucket/...
    is accepted (s3fs alone would read 'KEY:SECRET@bucket' as the bucket): the credentials go to the
    filesystem object, never into a path, a message or a log."""
    creds = _S3_CREDENTIALS.match(str(url))
    try:
        if creds:
            proto, key, secret, rest = creds.groups()
            return _one_retry_policy(fsspec.filesystem("s3", key=key, secret=secret, **_S3_OPTIONS)), rest.rstrip("/") or rest
        s3 = str(url).split("://", 1)[0] in ("s3", "s3a")
        fs, path = fsspec.core.url_to_fs(str(url), **(_S3_OPTIONS if s3 else {}))
        if s3:
            _one_retry_policy(fs)
    except (ImportError, ValueError) as exc:
        raise UserError(f"cannot open storage URL {redact(url)}: {exc} (install the extra, e.g. pip install 'aae-dist[s3]')")
    return fs, path.rstrip("/") if path not in ("/", "") else path


def join(url: str, *parts: str) -> str:
    return "/".join([str(url).rstrip("/")] + [p.strip("/") for p in parts])


def is_local(url: str) -> bool:
    fs, _ = filesystem(url)
    return "file" in _protocols(fs)


def _protocols(fs) -> tuple:
    proto = fs.protocol
    return tuple(proto) if isinstance(proto, (tuple, list)) else (proto,)


TRANSIENT = (ConnectionError, TimeoutError)


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UserError)):
        return False
    name = type(exc).__name__
    return isinstance(exc, TRANSIENT) or any(k in name for k in ("Connection", "Timeout", "Endpoint", "ServerError", "Throttl", "SlowDown",
                                                                 "Disconnect", "IncompleteRead", "HTTPClientError", "PayloadError",
                                                                 "ResponseParserError", "ServiceUnavailable", "InternalError"))


def _is_refusal(exc: BaseException) -> bool:
    """The store answered, and the answer is about the request (bad bucket name, access denied): the user's to fix."""
    name = type(exc).__name__
    return isinstance(exc, PermissionError) or any(k in name for k in ("ParamValidation", "InvalidBucket", "AccessDenied", "NoSuchBucket"))


def is_redacted(url: str) -> bool:
    """A URL whose credentials were dropped when it was saved (redact) cannot be opened again."""
    return "//***@" in str(url)


_RETRIES = {"count": 0}  # retries in this process (summary.json sums them over the ranks)
_RETRY_CAP_S = 8.0


def retries() -> int:
    return _RETRIES["count"]


def with_retries(what: str, url: str, fn: Callable[[], T], attempts: int | None = None, base_delay: float = 0.5) -> T:
    """Run fn, retrying transient storage errors with exponential backoff (capped at 8 s per wait).

    Storage that stays unreachable becomes a one-line UserError naming the URL.  AAE_STORAGE_RETRIES
    sets the attempts (default 10: about 47 s of waiting), so an outage of several seconds is ridden out."""
    attempts = attempts or max(1, int(os.environ.get("AAE_STORAGE_RETRIES", "10")))
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if _is_refusal(exc):
                raise UserError(f"storage refused {what} {redact(url)}: {type(exc).__name__}: {_short(exc)} "
                                "(check the URL, the bucket name and the credentials)") from None
            if not _is_transient(exc):
                raise
            if attempt == attempts - 1:
                raise UserError(
                    f"storage unreachable while {what} {redact(url)}: {type(exc).__name__}: {_short(exc)} "
                    "(check the URL, the endpoint (AWS_ENDPOINT_URL) and the network)"
                ) from None
            _RETRIES["count"] += 1
            time.sleep(min(_RETRY_CAP_S, base_delay * (2**attempt)))
    raise AssertionError("unreachable")


def _short(exc: BaseException) -> str:
    return redact(" ".join(str(exc).split()))[:200]


def read_bytes(url: str, start: int | None = None, end: int | None = None) -> bytes:
    fs, path = filesystem(url)

    def go():
        if start is None:
            return fs.cat_file(path)
        return fs.cat_file(path, start=start, end=end)

    try:
        return with_retries("reading", url, go)
    except FileNotFoundError:
        raise UserError(f"missing file {redact(url)}: check the dataset/run URL or re-create it") from None


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return with_retries("checking", url, lambda: fs.exists(path))


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write so that readers see the old file or the whole new one, never half of it.

    Object stores make a single PUT atomic; local paths get a temp file and rename."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""

    def go():
        if parent:
            fs.makedirs(parent, exist_ok=True)
        if "file" in _protocols(fs):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        else:
            fs.pipe_file(path, data)

    with_retries("writing", url, go)


def remove(url: str, recursive: bool = True) -> None:
    fs, path = filesystem(url)
    if with_retries("checking", url, lambda: fs.exists(path)):
        with_retries("deleting", url, lambda: fs.rm(path, recursive=recursive))


def listdir(url: str) -> list[str]:
    fs, path = filesystem(url)
    try:
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in with_retries("listing", url, lambda: fs.ls(path, detail=False)))
    except FileNotFoundError:
        return []


def upload_dir(local_dir: str, url: str) -> None:
    """Copy a local folder's files to URL (used for TensorBoard event files)."""
    fs, path = filesystem(url)
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        dest = path if rel == "." else f"{path}/{rel}"
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                data = fh.read()
            write_bytes_atomic(_unsplit(fs, f"{dest}/{name}"), data)


def _unsplit(fs, path: str) -> str:
    return fs.unstrip_protocol(path)
