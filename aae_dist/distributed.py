"""Torch distributed without ceremony: are we distributed, sum or gather over workers, one DDP per network."""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

_DDP_ARGS = inspect.signature(DDP.__init__).parameters


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Each network gets its own DDP so a phase all-reduces exactly the networks it trains.

    Buffers are not synced on each forward: two forwards before one backward (as the
    adversarial phases do) would otherwise fail on CUDA with an in-place error."""
    kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS else {"broadcast_buffers": False}
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, gradient_as_bucket_view=True, **kw)


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) over the workers in place (a no-op in one process)."""
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def all_gather(obj) -> list:
    """Every rank's `obj`, in rank order (just [obj] in one process)."""
    if not distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def average_buffers(modules) -> int:
    """Make floating buffers (batch-norm running statistics) the mean over the workers, so every
    replica holds the same state; DDP leaves buffers alone (broadcast_buffers=False)."""
    return average_([b for m in modules for b in m.buffers() if b.is_floating_point()])


def average_(tensors: list[torch.Tensor]) -> int:
    """Replace each tensor, in place, by its mean over the workers, in ONE all-reduce; returns the bytes
    sent.  In place (torch's model_averaging.utils.average_parameters rebinds `p.data` to views of a
    temporary buffer instead): parameters keep their storage for optimizers and DDP's buckets."""
    if not distributed() or not tensors:
        return 0
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return flat.numel() * flat.element_size()
