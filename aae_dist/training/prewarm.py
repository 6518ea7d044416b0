"""Imports a Ray Train worker will need, begun in a thread while Ray Train forms the worker group.

torch's first optimizer imports torch._dynamo (~1.1 s of CPU on this machine) and the training modules
take ~0.5 s more; started here they run while the process group forms and the controller launches the
training function, instead of after it."""

from __future__ import annotations

import threading
import time

STARTED: dict[str, float] = {}
_thread: threading.Thread | None = None


def start() -> None:
    """Return at once; the imports continue in a daemon thread (Python's import locks make a later import
    of the same module in the training thread wait for this one instead of running it twice)."""
    global _thread
    if _thread is None:
        STARTED["at"] = time.time()
        _thread = threading.Thread(target=_imports, name="aae-dist-prewarm", daemon=True)
        _thread.start()


def wait() -> None:
    """The training function's first call: from here on one thread imports (two threads importing modules
    that import each other can trip Python's import-deadlock check)."""
    if _thread is not None:
        _thread.join()


def _imports() -> None:
    try:
        from . import trainer  # noqa: F401  (the training function's own module first: Ray imports it next)

        import torch._dynamo  # noqa: F401  (torch.optim's first optimizer imports it)
    except Exception:  # noqa: BLE001 - a courtesy: the training thread imports (and reports) for itself
        pass
    STARTED["done"] = time.time()
