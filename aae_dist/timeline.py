"""Start-up timeline of a run: when each stage ended, on the driver and on rank 0 (wall clock), so
`summary.json` can say where the seconds before the first step went."""

from __future__ import annotations

import time

# stage that ends at each mark, in run order (driver, then the worker)
STAGES = (
    ("start", "command start"),
    ("checked", "imports, config, data and storage checks"),
    ("ray_started", "Ray start / connect"),
    ("fit_called", "run setup on the driver (progress actor, trainer)"),
    ("worker_started", "Ray Train controller, worker group, process group, worker imports"),
    ("data_opened", "dataset open (manifest, label subset)"),
    ("models_ready", "networks, DDP wrap, optimizers, checkpoint restore"),
    ("first_step", "TensorBoard writer, first batch read"),
)

_marks: dict[str, float] = {}


def mark(name: str, at: float | None = None) -> None:
    """Record the first time `name` is reached in this process."""
    _marks.setdefault(name, time.time() if at is None else at)


def update(points: dict[str, float]) -> None:
    """Take another process's marks (the driver's, on a worker); marks of this process win."""
    for k, v in points.items():
        mark(k, v)


def marks() -> dict[str, float]:
    return dict(_marks)


def reset(since: float | None = None) -> None:
    """Forget every mark (or those older than `since`: an earlier run in the same process)."""
    for k in [k for k, v in _marks.items() if since is None or v < since]:
        del _marks[k]


def breakdown(points: dict[str, float]) -> dict[str, float]:
    """Seconds per stage, for the stages whose start and end were both recorded (in-process runs have no Ray stages)."""
    out, last = {}, None
    for key, label in STAGES:
        if key not in points:
            continue
        if last is not None:
            out[label] = round(points[key] - points[last], 3)
        last = key
    return out
