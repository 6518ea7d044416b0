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


class HandWrittenAAE:
    """The textbook AAE step written by hand (paper MLP 784-1000-1000-8, Adam): the reference the
    framework is measured against, in one process or, with `wrap` (e.g. DDP), in several."""

    def __init__(self, wrap=None, fused: bool = False, bf16: bool = False):
        def mlp(sizes):
            layers = []
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
                layers += [torch.nn.Linear(a, b)] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
            return torch.nn.Sequential(*layers)

        torch.manual_seed(0)
        self.wrapped = wrap is not None
        self.enc, self.dec, self.disc = ((wrap or (lambda m: m))(mlp(s)) for s in ([784, 1000, 1000, 8], [8, 1000, 1000, 784], [8, 1000, 1000, 1]))
        kw = {"fused": True} if fused else {}
        self.opt_ae = torch.optim.Adam(list(self.enc.parameters()) + list(self.dec.parameters()), lr=1e-3, betas=(0.9, 0.999), **kw)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=2e-4, betas=(0.5, 0.999), **kw)
        self.opt_g = torch.optim.Adam(self.enc.parameters(), lr=2e-4, betas=(0.5, 0.999), **kw)
        self.bf16 = bf16

    def _amp(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def fake_codes(self, x: torch.Tensor) -> torch.Tensor:
        if not self.wrapped:
            return self.enc(x).detach()
        with torch.no_grad():  # DDP cannot run a forward whose graph is then dropped: its plain module, without gradients
            return self.enc.module(x)

    def step(self, x: torch.Tensor) -> None:
        """Reconstruction, D on prior samples vs codes, the encoder as generator."""
        import torch.nn.functional as F

        b = len(x)
        self.opt_ae.zero_grad()
        with self._amp():
            out = self.dec(self.enc(x))
        F.binary_cross_entropy_with_logits(out.float(), x).backward()
        self.opt_ae.step()
        self.opt_d.zero_grad()
        with self._amp():
            logits = self.disc(torch.cat([torch.randn(b, 8), self.fake_codes(x).float()])).squeeze(1)
        F.binary_cross_entropy_with_logits(logits.float(), torch.cat([torch.ones(b), torch.zeros(b)])).backward()
        self.opt_d.step()
        self.opt_g.zero_grad()
        with self._amp():
            logits = self.disc(self.enc(x)).squeeze(1)
        F.binary_cross_entropy_with_logits(logits.float(), torch.ones(b)).backward()
        self.opt_g.step()
