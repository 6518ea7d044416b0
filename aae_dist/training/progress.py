"""Where training stands (step, epoch, batch in epoch): one owner, checkpointed.  A run resumed with a
different world size mid-epoch (elastic resize) finishes that epoch as a new stage over exactly the
samples the old group had not used (ShardStream.iter_epoch(stages=...))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..plan import RunPlan, capped


@dataclass
class Progress:
    steps_per_epoch: int
    epochs: int
    max_steps: int | None
    world_size: int
    stage_length: Callable[[int, tuple], int] | None = None  # (epoch, stages) -> steps of the current stage (the data's plan)
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of this epoch's current stage already consumed
    stages: tuple = ()  # earlier worker groups of this epoch: ((world_size, batches), ...), after an elastic resize
    stage_steps: int = 0  # steps in the current stage: steps_per_epoch unless the epoch was resized
    micro_batches: int = 1  # data batches per step (train.accumulate): stages record data batches

    def __post_init__(self):
        self.stage_steps = self.steps_per_epoch

    @classmethod
    def planned(cls, plan: RunPlan, world_size: int, stage_length: Callable[[int, tuple], int] | None = None) -> "Progress":
        """Where a run of this plan starts, on a group of `world_size` workers (elastic: not always the plan's largest)."""
        return cls(plan.steps_per_epoch(world_size), plan.epochs, plan.max_steps, world_size, stage_length, micro_batches=plan.accumulate)

    def advance(self) -> None:
        self.step += 1
        self.batch += 1
        if self.batch >= self.stage_steps:
            self.epoch, self.batch, self.stages, self.stage_steps = self.epoch + 1, 0, (), self.steps_per_epoch

    @property
    def epochs_done(self) -> float:
        done = sum(world * batches for world, batches in self.stages) / self.world_size / self.micro_batches + self.batch
        return self.epoch + min(1.0, done / self.steps_per_epoch)

    def total_steps(self) -> int:
        """The plan's total (RunPlan.total_steps) as this group sees it: after an elastic resize, the steps
        taken so far plus what the current stage and the epochs left give."""
        remaining = (self.stage_steps - self.batch) + (self.epochs - self.epoch - 1) * self.steps_per_epoch if self.epoch < self.epochs else 0
        return capped(self.step + max(0, remaining), self.max_steps)

    def finished(self) -> bool:
        return self.epoch >= self.epochs or (self.max_steps is not None and self.step >= self.max_steps)

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "world_size": self.world_size,
                "stages": [list(st) for st in self.stages]}

    def load_state_dict(self, state: dict) -> None:
        """A different world size mid-epoch (elastic resize) starts a new stage of that epoch: the old
        group's batches are recorded, and the data plan gives the new group only what it left."""
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])
        self.stages = tuple((int(w), int(b)) for w, b in state.get("stages", ()))
        old_world = int(state.get("world_size", self.world_size))
        if old_world != self.world_size and self.batch > 0:
            self.stages, self.batch = self.stages + ((old_world, self.batch * self.micro_batches),), 0
        self.stage_steps = (self.stage_length(self.epoch, self.stages) // self.micro_batches if self.stages and self.stage_length
                            else self.steps_per_epoch)
