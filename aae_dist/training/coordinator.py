"""The coordinator owns the phase schedule so every worker runs the same phases in the same order.

Statistics are reported by name and summed locally; every `sync_every` steps they are reduced
over the workers in ONE small collective, and the decisions (skip D while it wins, stop at a
target loss, a NaN seen anywhere, a polite stop) are plain functions of the reduced values, so
every rank reaches the same decision by construction and no step pays a remote call."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import TrainConfig
from ..distributed import all_reduce_
from .phases import Phase
from .progress import Progress

STOP = "stop_requested"


class Stats:
    """Named running sums (value and count) in one buffer, so one all-reduce carries them all.  The names
    the phases' terms declared have slots from the start; a name reported without one gets a slot when it
    first appears (every rank runs the same terms, so every rank adds it at the same place)."""

    def __init__(self, names: list[str], device: torch.device):
        self.slot = {n: i for i, n in enumerate(dict.fromkeys(names))}
        self.buffer = torch.zeros(2, len(self.slot), device=device, dtype=torch.float64)

    def add(self, name: str, value: torch.Tensor | float) -> None:
        i = self.slot.get(name)
        if i is None:
            i = self.slot[name] = len(self.slot)
            self.buffer = torch.cat([self.buffer, self.buffer.new_zeros(2, 1)], 1)
        self.buffer[0, i] += value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else value
        self.buffer[1, i] += 1

    def reduce(self) -> tuple[dict[str, float], dict[str, float]]:
        """(means, sums) over all workers of everything reported since the last reduce; then reset."""
        values = all_reduce_(self.buffer).tolist()
        self.buffer.zero_()
        sums = {n: values[0][i] for n, i in self.slot.items()}
        means = {n: values[0][i] / values[1][i] for n, i in self.slot.items() if values[1][i] > 0}
        return means, sums

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.detach().cpu(), "stat_names": list(self.slot)}

    def load_state_dict(self, state: dict) -> None:
        """By name; a checkpoint from before the names were saved holds an empty buffer (checkpoints
        are written right after a reduction), which is what starting from zeros gives."""
        saved = state["buffer"].to(self.buffer.device)
        names = state.get("stat_names")
        if names is None:
            if saved.shape == self.buffer.shape:
                self.buffer.copy_(saved)
            return
        for i, n in enumerate(names):
            if n not in self.slot:
                self.add(n, 0.0)
                self.buffer[1, self.slot[n]] = 0
            self.buffer[:, self.slot[n]] = saved[:, i]


@dataclass
class Decision:
    skip: dict[str, bool] = field(default_factory=dict)
    stop_reason: str | None = None
    nonfinite: dict[str, int] = field(default_factory=dict)  # phase -> non-finite losses seen


def decide(phases: list[Phase], means: dict[str, float], sums: dict[str, float], skipping: dict[str, bool]) -> Decision:
    """What every rank does next, from the reduced statistics alone: each phase's own policies decide."""
    out = Decision(skip=dict(skipping))
    out.nonfinite = {k.split("/")[0]: int(v) for k, v in sums.items() if k.endswith("/nonfinite") and v > 0}
    for ph in phases:
        if ph.skip_policy is not None:
            out.skip[ph.name] = ph.skip_policy.skip(ph.name, means, skipping.get(ph.name, False))
        if ph.stop_policy is not None and out.stop_reason is None:
            out.stop_reason = ph.stop_policy.stop(ph.name, means)
    if sums.get(STOP, 0) > 0:
        out.stop_reason = out.stop_reason or "interrupted"
    return out


class Coordinator:
    def __init__(self, train: TrainConfig, phases: list[Phase], steps_per_epoch: int, device: torch.device, stop_probe=None,
                 world_size: int = 1, stage_length=None):
        self.phases, self.checkpoint_every = phases, train.checkpoint_every
        t = train
        self.progress = Progress(steps_per_epoch, t.epochs, t.max_steps, world_size, stage_length, micro_batches=t.accumulate)
        self.sync_every = t.sync_every
        names = [f"{ph.name}/{s}" for ph in phases for s in ph.stat_names] + [f"{ph.name}/nonfinite" for ph in phases] + [STOP]
        self.stats = Stats(names, device)
        self.stop_probe = stop_probe
        self.skip: dict[str, bool] = {}
        self.stop_reason: str | None = None
        self.nonfinite_steps = 0
        self.nonfinite_phase: str | None = None
        self.skipped_updates = 0
        self.last_means: dict[str, float] = {}
        self.sync_seconds = 0.0
        self.syncs = 0

    # ---- schedule -----------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def epoch(self) -> int:
        return self.progress.epoch

    @property
    def batch_in_epoch(self) -> int:
        return self.progress.batch

    @property
    def epochs_done(self) -> float:
        return self.progress.epochs_done

    def phases_now(self) -> list[Phase]:
        return [ph for ph in self.phases if ph.runs_at(self.step) and not self.skip.get(ph.name, False)]

    def total_steps(self) -> int:
        return self.progress.total_steps()

    def done(self) -> bool:
        return self.stop_reason is not None or self.progress.finished()

    # ---- what the step reports (no host sync) ----------------------------------------------
    def record(self, phase: Phase, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            self.stats.add(f"{phase.name}/{name}", value)

    def flag_nonfinite(self, phase: Phase, loss: torch.Tensor) -> None:
        self.stats.add(f"{phase.name}/nonfinite", (~torch.isfinite(loss.detach())).to(torch.float64))

    def skipped_update(self) -> None:
        self.skipped_updates += 1

    def end_step(self) -> dict[str, float] | None:
        """Advance; on sync steps reduce the statistics and decide. Returns the reduced means then."""
        self.progress.advance()
        ckpt = self.step % self.checkpoint_every == 0  # empty buffer at checkpoints: exact resume
        if self.step % self.sync_every and not ckpt and not self.done():
            return None
        return self.sync()

    def sync(self) -> dict[str, float]:
        t0 = time.perf_counter()
        if self.stop_probe is not None and self.stop_probe():
            self.stats.add(STOP, 1.0)
        means, sums = self.stats.reduce()
        self.sync_seconds += time.perf_counter() - t0
        self.syncs += 1
        means = {k: v for k, v in means.items() if not k.endswith("/nonfinite") and k != STOP}
        self.last_means = means
        d = decide(self.phases, means, sums, self.skip)
        self.skip = d.skip
        for phase, count in d.nonfinite.items():  # in phase order: the first phase of a step is named
            self.nonfinite_steps += count
            self.nonfinite_phase = self.nonfinite_phase or phase
        if self.stop_reason is None:
            self.stop_reason = d.stop_reason
        return means

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            **self.progress.state_dict(),
            "skip": dict(self.skip),
            "stop_reason": self.stop_reason,
            "nonfinite_steps": self.nonfinite_steps,
            "skipped_updates": self.skipped_updates,
            **self.stats.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.progress.load_state_dict(state)
        self.skip = {str(k): bool(v) for k, v in state["skip"].items()}
        self.stop_reason = None if state["stop_reason"] == "interrupted" else state["stop_reason"]
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.stats.load_state_dict(state)
