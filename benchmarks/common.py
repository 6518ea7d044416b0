"""Shared bits of the benchmarks: a synthetic MNIST-sized dataset and the paper's MLP config."""

from __future__ import annotations

import os
import platform
import tempfile

import numpy as np
import torch

PAPER_MLP = ["model.hidden=[1000,1000]", "model.disc_hidden=[1000,1000]", "model.latent_dim=8"]


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, threads {torch.get_num_threads()}"


def mnist_like(n: int = 60_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def write_mnist_like(url: str | None = None, n: int = 60_000, shard_size: int = 10_000) -> str:
    from aae_dist.data.writer import write_dataset

    url = url or os.path.join(tempfile.mkdtemp(prefix="aae-bench-"), "mnist-like")
    x, y = mnist_like(n)
    write_dataset(url, {"train": (x, y), "test": (x[:1000], y[:1000])}, num_classes=10, source="synthetic", shard_size=shard_size, progress=False, overwrite=True)
    return url
