"""One run plan: where a run goes, on how many workers, how many steps, its checkpoints and what each worker
asks for, computed once from the config and the training split's size.  Pre-flight, `--dry-run`, the sweep,
the workers' `Progress` and the summary all read these numbers, so they cannot disagree.

It sits beside `config` (it imports nothing above it): the data reader checks a split with `check_split`,
the one place that knows how samples divide into workers and batches."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from . import storage
from .config import Config, RunSection
from .errors import UserError


def check_split(count: int, world: int, batch_size: int, url: str, split: str = "train", *, drop_last: bool = True,
                who: str = "workers") -> None:
    """Refuse a split too small for `world` workers (ranks) of `batch_size` each: every worker needs a sample,
    and with drop_last a whole batch per epoch."""
    if count < world:
        raise UserError(f"{world} {who} but split '{split}' of {storage.redact(url)} has only {count} samples: use fewer workers")
    if drop_last and count // world < batch_size:
        raise UserError(f"{world} {who} x data.batch_size={batch_size} needs at least {world * batch_size} samples in split '{split}', "
                        f"{storage.redact(url)} has {count}: lower data.batch_size or use fewer workers")


def batches_per_epoch(count: int, world: int, batch_size: int) -> int:
    """Whole batches each worker reads per epoch (the reader drops the remainder)."""
    return (count // max(1, world)) // batch_size


def capped(total: int, max_steps: int | None) -> int:
    """A step count under train.max_steps."""
    return min(total, max_steps) if max_steps else total


def cpus_per_worker(run: RunSection) -> int:
    """Asked per Ray worker: run.cpus_per_worker, else this machine's cores shared (local Ray) or 1 (a cluster)."""
    if run.cpus_per_worker:
        return run.cpus_per_worker
    return max(1, (os.cpu_count() or 1) // max(1, run.worker_range[1])) if not run.address else 1


@dataclass(frozen=True)
class RunPlan:
    """What a run will be, as plain data (to_dict/from_dict carry it to the workers)."""

    run_url: str
    data_url: str
    workers: tuple[int, int]  # run.worker_range: (min, max); max 0 = in this process, no Ray
    train_samples: int
    batch_size: int  # per worker
    accumulate: int  # data batches per optimizer step
    epochs: int
    max_steps: int | None
    checkpoint_every: int
    keep_checkpoints: int
    resources: dict = field(default_factory=dict)  # per Ray worker: {"CPU": n, "GPU": 1?, extras}; {} in process
    threads: int | None = None  # torch threads per worker (None: torch's default)

    @classmethod
    def of(cls, cfg: Config, run_url: str, train_samples: int) -> "RunPlan":
        t, run = cfg.train, cfg.run
        ray = run.uses_ray
        cpus = cpus_per_worker(run) if ray else run.cpus_per_worker
        res = {"CPU": cpus, **({"GPU": 1} if run.gpu else {}), **run.resources_per_worker} if ray else {}
        return cls(run_url, cfg.data.path, tuple(run.worker_range), train_samples, cfg.data.batch_size, t.accumulate, t.epochs,
                   t.max_steps, t.checkpoint_every, t.keep_checkpoints, res, t.threads or cpus)

    @property
    def in_process(self) -> bool:
        return self.workers[1] == 0

    @property
    def elastic(self) -> bool:
        return self.workers[0] != self.workers[1]

    @property
    def world_size(self) -> int:
        """The largest group: the one the data divides by first."""
        return max(1, self.workers[1])

    def steps_per_epoch(self, world: int | None = None) -> int:
        """Optimizer steps per epoch on `world` workers (default: the largest group)."""
        return batches_per_epoch(self.train_samples, world or self.world_size, self.batch_size) // self.accumulate

    def total_steps(self, world: int | None = None) -> int:
        return capped(self.epochs * self.steps_per_epoch(world), self.max_steps)

    def check(self) -> None:
        """The data fits the workers: a sample each, a batch each per epoch, train.accumulate batches per step."""
        check_split(self.train_samples, self.world_size, self.batch_size, self.data_url)
        batches = batches_per_epoch(self.train_samples, self.world_size, self.batch_size)
        if batches < self.accumulate:
            raise UserError(f"train.accumulate={self.accumulate} needs that many batches per epoch per worker, there are {batches}: "
                            "lower train.accumulate or data.batch_size")

    def describe(self, replaces: bool) -> list[str]:
        """--dry-run's lines."""
        lo, hi = self.workers
        where = "in this process, no Ray" if hi == 0 else (f"{lo}..{hi} Ray workers (elastic)" if lo != hi else f"{hi} Ray worker(s)")
        res = "" if hi == 0 else f", {self.resources['CPU']} CPU{' + 1 GPU' if 'GPU' in self.resources else ''} each"
        per_epoch, steps = self.steps_per_epoch(), self.total_steps()
        return [
            f"  workers: {where}{res}",
            f"  data: {storage.redact(self.data_url)}: {self.train_samples} training samples, batch {self.batch_size} per worker, "
            f"{per_epoch} steps per epoch",
            f"  steps: {steps} ({steps / max(1, per_epoch):.1f} epochs)",
            f"  run folder: {storage.redact(self.run_url)}{' (would replace the existing run)' if replaces else ''}; "
            f"a checkpoint every {self.checkpoint_every} steps, {self.keep_checkpoints} kept",
        ]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunPlan":
        return cls(**{**d, "workers": tuple(d["workers"])})
