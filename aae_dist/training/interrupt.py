"""A polite stop: the first SIGINT/SIGTERM asks training to checkpoint and end at the next
coordinator sync (the same step on every rank); a second one stops at once."""

from __future__ import annotations

import signal

from .. import storage

STOP_MARKER = "STOP"
_requested = False


def requested() -> bool:
    return _requested


def reset() -> None:
    global _requested
    _requested = False


def install(run_url: str | None = None):
    """Handle SIGINT/SIGTERM in the driver; with run_url, also leave a marker Ray workers can see.
    Returns a function that puts the previous handlers back."""

    def handler(signum, frame):
        global _requested
        if _requested:
            raise KeyboardInterrupt
        _requested = True
        print(f"aae-dist: {signal.Signals(signum).name} received: checkpointing at the next sync step (again to stop now)", flush=True)
        if run_url:
            try:
                storage.write_bytes_atomic(storage.join(run_url, STOP_MARKER), b"stop requested\n")
            except Exception:  # noqa: BLE001 - best effort; the second signal still stops
                pass

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(sig, h) for sig, h in old.items()]


def clear_marker(run_url: str) -> None:
    storage.remove(storage.join(run_url, STOP_MARKER), recursive=False)
