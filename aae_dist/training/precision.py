"""train.precision: which dtype the forwards run in.  bf16 autocast keeps the weights, gradients, optimizer
state, losses and all-reduces in fp32 (replicas and checkpoints are as with fp32); only the matrix products
and activations are bf16.  On a CPU without native bf16 that is slower than fp32, so it is refused."""

from __future__ import annotations

import contextlib

import torch

from ..errors import UserError

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16() -> bool:
    """oneDNN's own answer (it picks the bf16 kernels), backed by the CPU's flags where /proc/cpuinfo exists."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), None)
    except OSError:
        return True  # not Linux: oneDNN said yes
    return flags is None or any(f in flags for f in _CPU_BF16_FLAGS)


def autocast_dtype(train, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this worker's device, or None (fp32); train.amp (the older switch) means bf16 on
    a GPU and nothing on a CPU; refuses bf16 on a CPU without native bf16."""
    if device.type == "cuda":
        return torch.bfloat16 if train.precision == "bf16" or train.amp else None
    if train.precision != "bf16":
        return None
    if not cpu_has_native_bf16():
        raise UserError("train.precision=bf16 needs a CPU with native bf16 (avx512_bf16 or AMX), this one has neither and would run "
                        "slower than fp32: set train.precision=fp32, or run on GPUs (--gpu)")
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The forwards' context: bf16 autocast, or nothing at all (no autocast bookkeeping in fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
