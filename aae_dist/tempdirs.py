"""Local scratch folders named after the process that made them, so that folders a killed process
left behind are found and removed by the next run (never a live process's)."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile


def make(prefix: str) -> str:
    """A new scratch folder `<tmp>/<prefix><pid>-XXXX`; first removes those of processes that are gone."""
    remove_orphans(prefix)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-")


def remove_orphans(prefix: str) -> int:
    removed = 0
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}*-*")):
        pid = os.path.basename(path)[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True
