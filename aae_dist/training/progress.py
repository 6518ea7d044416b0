"""Where training stands (step, epoch, batch in epoch): one owner, checkpointed, and re-partitioned
when a resumed run has a different world size (elastic resize)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    steps_per_epoch: int
    epochs: int
    max_steps: int | None
    samples_per_step: int  # world size x per-worker batch: what one step consumes
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of this epoch already consumed

    def advance(self) -> None:
        self.step += 1
        self.batch += 1
        if self.batch >= self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.batch / self.steps_per_epoch

    def total_steps(self) -> int:
        remaining = (self.epochs - self.epoch) * self.steps_per_epoch - self.batch
        total = self.step + max(0, remaining)
        return min(total, self.max_steps) if self.max_steps else total

    def finished(self) -> bool:
        return self.epoch >= self.epochs or (self.max_steps is not None and self.step >= self.max_steps)

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "samples_per_step": self.samples_per_step}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batch = int(state["step"]), int(state["epoch"]), int(state["batch"])
        old = int(state["samples_per_step"])
        if old != self.samples_per_step:  # elastic resize: same samples consumed this epoch, re-partitioned
            self.batch = min(self.batch * old // self.samples_per_step, self.steps_per_epoch - 1)
