"""How gradients travel, and what each phase all-reduces: a DDP communication hook per network, tagged
with the running phase.  Per network: plain all-reduce or fp16/bf16 (half the bytes).  (PowerSGD was
tried: on gloo its chained all-reduces, issued from completion callbacks, interleaved differently on the
two ranks across buckets and networks and gloo aborted on the mismatch; left out.)"""

from __future__ import annotations

from collections import defaultdict

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

class CommStats:
    def __init__(self, compression="none"):
        self.compression = compression
        self.phase = "-"
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.networks: dict[str, set] = defaultdict(set)

    def method(self, network: str) -> str:
        c = self.compression
        return c.get(network, "none") if isinstance(c, dict) else c

    def attach(self, name: str, ddp_module) -> None:
        ddp_module.register_comm_hook(state=(self, name), hook=_counting_allreduce)

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
    stats.bytes[stats.phase] += buf.numel() * (2 if method in ("fp16", "bf16") else buf.element_size())
    if method == "bf16":
        return default_hooks.bf16_compress_hook(dist.group.WORLD, bucket)
    if method == "fp16":
        return default_hooks.fp16_compress_hook(dist.group.WORLD, bucket)
    return default_hooks.allreduce_hook(dist.group.WORLD, bucket)
