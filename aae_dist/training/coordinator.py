"""The coordinator owns the phase schedule so every worker runs the same phases in the same order.

Decisions that depend on training (skip D while it wins, stop at a target loss, a NaN
seen anywhere) are taken only every `sync_every` steps from statistics all-reduced over
the workers in ONE small collective, so every rank reaches the same decision by
construction and no step pays a remote call.  Its state is checkpointed."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from ..config import Config
from .distributed import distributed
from .phases import Phase


class Coordinator:
    def __init__(self, cfg: Config, phases: list[Phase], steps_per_epoch: int, device: torch.device, stop_probe=None,
                 world_size: int = 1):
        self.cfg, self.phases, self.steps_per_epoch = cfg, phases, steps_per_epoch
        self.world_size = world_size
        self._epoch, self._batch = 0, 0  # data position, kept explicitly so it survives a change of world size
        self.sync_every = cfg.train.sync_every
        self.slots: dict[str, int] = {}
        for ph in phases:
            for s in ph.stat_names:
                self.slots[f"{ph.name}/{s}"] = len(self.slots)
        n = len(self.slots)
        # per slot: sum and count; one "non-finite seen" flag per phase; one "stop requested" flag
        self.buffer = torch.zeros(2 * n + len(phases) + 1, device=device, dtype=torch.float64)
        self.stop_probe = stop_probe
        self.step = 0
        self.skip: dict[str, bool] = {}
        self.stop_reason: str | None = None
        self.nonfinite_steps = 0
        self.skipped_updates = 0
        self.last_means: dict[str, float] = {}
        self.sync_seconds = 0.0
        self.syncs = 0

    # ---- schedule -----------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batch_in_epoch(self) -> int:
        return self._batch

    @property
    def epochs_done(self) -> float:
        return self._epoch + self._batch / self.steps_per_epoch

    def phases_now(self) -> list[Phase]:
        return [ph for ph in self.phases if ph.runs_at(self.step) and not self.skip.get(ph.name, False)]

    def total_steps(self) -> int:
        remaining = (self.cfg.train.epochs - self._epoch) * self.steps_per_epoch - self._batch
        total = self.step + max(0, remaining)
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    def done(self) -> bool:
        max_steps = self.cfg.train.max_steps
        return (self.stop_reason is not None or self._epoch >= self.cfg.train.epochs
                or (max_steps is not None and self.step >= max_steps))

    # ---- statistics (no host sync) -----------------------------------------------------------
    def record(self, phase: Phase, stats: dict[str, torch.Tensor]) -> None:
        n = len(self.slots)
        for name, value in stats.items():
            i = self.slots[f"{phase.name}/{name}"]
            self.buffer[i] += value.detach().to(torch.float64)
            self.buffer[n + i] += 1

    def flag_nonfinite(self, phase: Phase, loss: torch.Tensor) -> None:
        i = 2 * len(self.slots) + self.phases.index(phase)
        self.buffer[i] += (~torch.isfinite(loss.detach())).to(torch.float64)

    def end_step(self) -> dict[str, float] | None:
        """Advance; on sync steps reduce the statistics and decide. Returns the reduced means then."""
        self.step += 1
        self._batch += 1
        if self._batch >= self.steps_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        ckpt = self.step % self.cfg.train.checkpoint_every == 0  # empty buffer at checkpoints: exact resume
        if self.step % self.sync_every and not ckpt and not self.done():
            return None
        return self.sync()

    def sync(self) -> dict[str, float]:
        t0 = time.perf_counter()
        buf = self.buffer
        if self.stop_probe is not None and self.stop_probe():
            buf[-1] = 1.0
        if distributed():
            dist.all_reduce(buf)
        values = buf.tolist()
        self.sync_seconds += time.perf_counter() - t0
        self.syncs += 1
        buf.zero_()
        n = len(self.slots)
        means = {k: values[i] / values[n + i] for k, i in self.slots.items() if values[n + i] > 0}
        self.last_means = means
        self._decide(means, values[2 * n : -1])
        if values[-1] > 0 and self.stop_reason is None:
            self.stop_reason = "interrupted"
        return means

    def _decide(self, means: dict[str, float], nonfinite: list[float]) -> None:
        for ph, bad in zip(self.phases, nonfinite):
            if bad > 0:
                self.nonfinite_steps += int(bad)
                self.nonfinite_phase = ph.name
        d = self.cfg.phases.discriminator
        if d.skip_above_accuracy is not None and "discriminator/acc_prior" in means:
            acc = 0.5 * (means["discriminator/acc_prior"] + means["discriminator/acc_codes"])
            self.skip["discriminator"] = acc > d.skip_above_accuracy
        elif d.skip_above_accuracy is not None and self.skip.get("discriminator"):
            self.skip["discriminator"] = False  # D was skipped all interval: let it run again to measure
        target = self.cfg.train.target_recon_loss
        if target is not None and means.get("reconstruction/loss", float("inf")) < target:
            self.stop_reason = f"reconstruction loss {means['reconstruction/loss']:.4f} reached train.target_recon_loss={target}"

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "epoch": self._epoch,
            "batch": self._batch,
            "world_size": self.world_size,
            "batch_size": self.cfg.data.batch_size,
            "skip": dict(self.skip),
            "stop_reason": self.stop_reason,
            "nonfinite_steps": self.nonfinite_steps,
            "skipped_updates": self.skipped_updates,
            "buffer": self.buffer.detach().cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
        old = int(state["world_size"]) * int(state["batch_size"])
        new = self.world_size * self.cfg.data.batch_size
        if old != new:  # elastic resize: same samples consumed in this epoch, re-partitioned over the new group
            self._batch = min(self._batch * old // new, self.steps_per_epoch - 1)
        self.skip = {str(k): bool(v) for k, v in state["skip"].items()}
        self.stop_reason = None if state["stop_reason"] == "interrupted" else state["stop_reason"]
        self.nonfinite_steps = int(state["nonfinite_steps"])
        self.skipped_updates = int(state.get("skipped_updates", 0))
        self.buffer.copy_(state["buffer"].to(self.buffer.device))
