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
# A URL's user-info, whatever it holds (AWS secret keys hold '/' and '+'; a password may hold '@').  After
# SCHEME:// it is either USER:SECRET@ (USER without '/', ':' or '@'; SECRET anything but whitespace and
# quotes, up to the LAST '@' of that word) or, without a ':' first, everything up to the last '@' before
# the first '/' (USER@, TOKEN@).  So s3://bucket/dir/with@at and s3://bucket/a:b@c hold none, while
# http://host:8265/x@y reads as user-info: hiding too much of such a rare path is safe, too little is not.
_URL_CHAR = r"[^\s'\"<>]"
_USER_INFO = re.compile(rf"([A-Za-z][A-Za-z0-9+.-]*://)(?:[^\s'\"<>/@:]+:{_URL_CHAR}*|[^\s'\"<>/]*)@")
_REDACTED = "***"


def redact(url: str) -> str:
    """Replace every URL's user-info with *** before the text reaches a message, a log or a saved file."""
    return _USER_INFO.sub(rf"\1{_REDACTED}@", str(url))


# s3://KEY:SECRET@bucket/path: the secret ends at the first '@' followed by a bucket name and '/' or the
# end (AWS secrets hold no '@', so s3://K:S@bucket/file@2x.png is bucket 'bucket', key 'file@2x.png').
_S3_CREDENTIALS = re.compile(r"^(s3a?)://([^/@:\s]+):(.+?)@([A-Za-z0-9._-]+(?:/.*)?)$")


# Retries happen in one place, with_retries below: counted (summary.json), logged, and tuned by
# AAE_STORAGE_RETRIES.  s3fs and botocore would otherwise retry silently for ~11 s per request first.
_S3_OPTIONS = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
# Reads whose bytes the caller checks against its own digests (shard blocks, XXH3 at ~40 GB/s) skip botocore's
# response CRC32 (~2 GB/s in Python's zlib: ~0.4 s of CPU per million 28x28 samples, on cores the server shares).
_S3_CHECKED_BY_CALLER = {"config_kwargs": {**_S3_OPTIONS["config_kwargs"], "response_checksum_validation": "when_required"}}


def _one_retry_policy(fs):
    fs.retries = 1
    return fs


def scrub(text: str, *urls: str) -> str:
    """redact(text), and also any piece of the urls' user-info that a library quoted on its own (urllib3
    says "'admin:pa' is not a valid host" for http://admin:pa/ss@host: the password cut at its '/')."""
    text = redact(text)
    for url in urls:
        for m in _USER_INFO.finditer(str(url)):
            info = m.group(0)[len(m.group(1)):-1]
            starts = [0] + [i + 1 for i, c in enumerate(info) if c in ":/@"]
            ends = [i for i, c in enumerate(info) if c in ":/@"] + [len(info)]
            for piece in sorted({info[a:b] for a in starts for b in ends if b - a >= 3}, key=len, reverse=True):
                text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(piece)}(?![A-Za-z0-9])", _REDACTED, text)
    return text


def has_credentials(url: str) -> bool:
    """Whether the text holds a URL with user-info (one already redacted does not count)."""
    return any(m.group(0) != f"{m.group(1)}{_REDACTED}@" for m in _USER_INFO.finditer(str(url)))


def filesystem(url: str, checked_by_caller: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path for URL; an unknown protocol is a user error.  s3://KEY:SECRET@bucket/...
    is accepted (s3fs alone would read 'KEY:SECRET@bucket' as the bucket): the credentials go to the
    filesystem object, never into a path, a message or a log.  S3 filesystems never create a bucket.
    checked_by_caller: the bytes read will be checked against the caller's own digests (S3: no SDK CRC32)."""
    try:
        if str(url).split("://", 1)[0] in ("s3", "s3a"):
            fs, path = _s3_filesystem(str(url), _S3_CHECKED_BY_CALLER if checked_by_caller else _S3_OPTIONS)
        else:
            fs, path = fsspec.core.url_to_fs(str(url))
    except (ImportError, ValueError) as exc:
        raise UserError(f"cannot open storage URL {redact(url)}: {scrub(str(exc), url)} (install the extra, e.g. pip install 'aae-dist[s3]')")
    return fs, path.rstrip("/") if path not in ("/", "") else path


def _s3_filesystem(url: str, settings: dict):
    """s3fs's own filesystem would create a missing bucket on the first makedirs (see buckets.py)."""
    from .buckets import ExistingBucketsOnly

    creds = _S3_CREDENTIALS.match(url)
    if creds:
        _, key, secret, path = creds.groups()
        return _one_retry_policy(ExistingBucketsOnly(key=key, secret=secret, **settings)), path
    options = {**settings, **ExistingBucketsOnly._get_kwargs_from_urls(url)}
    return _one_retry_policy(ExistingBucketsOnly(**options)), ExistingBucketsOnly._strip_protocol(url)


def check_bucket(url: str) -> None:
    """Refuse a missing bucket up front (e.g. in --dry-run), as the first write would; local paths pass."""
    fs, path = filesystem(url)
    if hasattr(fs, "require_bucket"):
        with_retries("checking", url, lambda: fs.require_bucket(path.split("/", 1)[0]))


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


def read_bytes(url: str, start: int | None = None, end: int | None = None, checked_by_caller: bool = False) -> bytes:
    """The file's bytes [start, end); checked_by_caller: see filesystem()."""
    fs, path = filesystem(url, checked_by_caller)

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
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            finally:  # a full disk or a failed rename leaves no temp file behind
                if os.path.exists(tmp):
                    os.unlink(tmp)
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
