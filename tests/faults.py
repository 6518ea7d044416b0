"""Fault injection and tracing for the reliability tests, as trainer callbacks (train.callbacks=["faults:from_environment"],
with this folder on PYTHONPATH); inactive unless set in the workers' environment.

- `AAE_DIST_FAULT=RUN_NAME:STEP:MARKER_FILE` (RUN_NAME may be a glob) makes rank 0 of that run SIGKILL itself halfway through
  writing the checkpoint of STEP (state written, not yet reported), once (the marker file remembers).
- `AAE_DIST_STEP_LOG=FILE` makes every rank append `world rank step` to FILE after each step, so a
  test can see which steps ran, on how many workers, and which were run again after a restart.
- `AAE_DIST_STEP_DELAY=SECONDS` sleeps after each step: a test's run lasts long enough to act on it."""

from __future__ import annotations

import fnmatch
import os
import signal
import time

TESTS = os.path.dirname(os.path.abspath(__file__))
CALLBACK = "train.callbacks=[faults:from_environment]"  # a --set item


def environment(env: dict) -> dict:
    """`env` with this folder on PYTHONPATH, so workers started from it import this module."""
    paths = [TESTS] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def from_environment(event: str, **info) -> None:
    """The trainer callback: what the AAE_DIST_* variables ask for."""
    if event == "checkpoint_written":
        maybe_die_writing_checkpoint(info["run_name"], info["step"])
    elif event == "step":
        trace_step(info["world"], info["rank"], info["step"])


def maybe_die_writing_checkpoint(run_name: str, step: int) -> None:
    spec = os.environ.get("AAE_DIST_FAULT")
    if not spec:
        return
    name, at, marker = spec.split(":", 2)
    if fnmatch.fnmatch(run_name, name) and int(at) == step and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def trace_step(world: int, rank: int, step: int) -> None:
    log, delay = os.environ.get("AAE_DIST_STEP_LOG"), float(os.environ.get("AAE_DIST_STEP_DELAY", "0") or 0)
    if log:
        with open(log, "a") as fh:  # one short line per write: appends from several processes stay whole
            fh.write(f"{world} {rank} {step} {os.getpid()}\n")
    if delay:
        time.sleep(delay)


def read_step_log(path: str, pids: bool = False) -> list[tuple[int, ...]]:
    """(world, rank, step) per logged step, with the process id last if `pids`: a restarted worker is a
    new process, which tells a restart apart even when it resumes at the very next step."""
    with open(path) as fh:
        rows = [tuple(int(v) for v in line.split()) for line in fh if line.strip()]
    return rows if pids else [r[:3] for r in rows]
