"""How gradients travel, and what each phase all-reduces: a DDP communication hook per network, tagged
with the running phase.  Per network: plain all-reduce, fp16/bf16 (half the bytes) or PowerSGD
(low-rank, with error feedback: torch's hook).

PowerSGD chains three all-reduces per bucket, the later ones issued from completion callbacks; with
several buckets and networks in flight the ranks issued them in different orders and gloo aborted on
the mismatch.  So a PowerSGD bucket is reduced to completion before its hook returns: every rank then
issues the same collectives in the same order (the backward's), at the cost of overlapping that
network's communication with its backward pass."""

from __future__ import annotations

from collections import defaultdict

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as powersgd


class CommStats:
    def __init__(self, compression="none", powersgd_rank: int = 2):
        self.compression, self.powersgd_rank = compression, powersgd_rank
        self.powersgd_states: dict[str, powersgd.PowerSGDState] = {}
        self.phase = "-"
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.networks: dict[str, set] = defaultdict(set)

    def method(self, network: str) -> str:
        c = self.compression
        return c.get(network, "none") if isinstance(c, dict) else c

    def attach(self, name: str, ddp_module) -> None:
        if self.method(name) == "powersgd":
            # one state per network (its error feedback and warm start); low rank from the second step on
            self.powersgd_states[name] = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=self.powersgd_rank,
                                                                start_powerSGD_iter=2, min_compression_rate=2)
        ddp_module.register_comm_hook(state=(self, name), hook=_counting_allreduce)

    def sent_elements(self, name: str, bucket) -> int:
        """Elements this bucket puts on the wire: what PowerSGD sends for a matrix it compresses is
        (rows + cols) x rank; everything else goes whole."""
        if self.method(name) != "powersgd" or self.powersgd_states[name].iter < 2:
            return bucket.buffer().numel()
        r, total = self.powersgd_rank, 0
        for g in bucket.gradients():
            if g.ndimension() > 1:
                rows, cols = g.shape[0], g.numel() // g.shape[0]
                if rows * cols >= (rows + cols) * r * 2:  # the hook's own rule (min_compression_rate=2)
                    total += (rows + cols) * r
                    continue
            total += g.numel()
        return total

    def count(self, sent_bytes: int) -> None:
        """Bytes sent outside DDP's hooks (local SGD's parameter averages), under the current phase."""
        if sent_bytes:
            self.calls[self.phase] += 1
            self.bytes[self.phase] += sent_bytes

    def per_step(self, steps: int) -> dict:
        steps = max(1, steps)
        return {
            p: {"allreduce_calls": self.calls[p] / steps, "bytes": self.bytes[p] / steps, "networks": sorted(self.networks[p])}
            for p in self.calls
        }


def _counting_allreduce(state, bucket):
    stats, name = state
    buf = bucket.buffer()
    method = stats.method(name)
    stats.calls[stats.phase] += 1
    stats.networks[stats.phase].add(name)
    stats.bytes[stats.phase] += stats.sent_elements(name, bucket) * (2 if method in ("fp16", "bf16") else buf.element_size())
    if method == "powersgd":
        fut = powersgd.powerSGD_hook(stats.powersgd_states[name], bucket)
        fut.wait()  # see the module's docstring: the same collective order on every rank
        return fut
    if method == "bf16":
        return default_hooks.bf16_compress_hook(dist.group.WORLD, bucket)
    if method == "fp16":
        return default_hooks.fp16_compress_hook(dist.group.WORLD, bucket)
    return default_hooks.allreduce_hook(dist.group.WORLD, bucket)
