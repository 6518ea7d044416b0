"""Fault injection for the reliability tests; inactive unless AAE_DIST_FAULT is set in the workers'
environment: `RUN_NAME:STEP:MARKER_FILE` makes rank 0 of that run SIGKILL itself halfway through
writing the checkpoint of STEP (state written, not yet reported), once (the marker file remembers)."""

from __future__ import annotations

import os
import signal


def maybe_die_writing_checkpoint(run_name: str, step: int) -> None:
    spec = os.environ.get("AAE_DIST_FAULT")
    if not spec:
        return
    name, at, marker = spec.split(":", 2)
    if name == run_name and int(at) == step and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
