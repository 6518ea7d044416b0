"""Two settings of the same training step, A and B, timed against each other in one process: two Trainers
built side by side (paper MLP 784-1000-1000-8, batch 128), blocks of steps alternating A B / B A, the median
ms per step of each and the ratio.  On a VM whose speed drifts from minute to minute (this one: the same loop
at 656-998 samples/s within ten minutes) a switch worth 5% shows only this way, never as two separate runs.

    python benchmarks/bench_step_ab.py                                     # train.share_codes on (A) / off (B)
    python benchmarks/bench_step_ab.py --variant clustering --rounds 12
    python benchmarks/bench_step_ab.py --a train.fused=true --b train.fused=false
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import PAPER_MLP, machine, write_mnist_like  # noqa: E402

from aae_dist.config import load_config  # noqa: E402
from aae_dist.training.session import LocalSession  # noqa: E402
from aae_dist.training.trainer import Trainer  # noqa: E402


def build(data: str, variant: str, batch: int, sets: list[str]) -> Trainer:
    cfg = load_config(None, PAPER_MLP + [f"data.path={data}", f"data.batch_size={batch}", f"model.variant={variant}",
                                         "train.max_steps=1000000", "train.progress=false", "train.parzen_samples=0", *sets])
    return Trainer(cfg, LocalSession(tempfile.mkdtemp(prefix="aae-bench-ab-"), 1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", nargs="*", default=["train.share_codes=true"], help="--set values of A")
    ap.add_argument("--b", nargs="*", default=["train.share_codes=false"], help="--set values of B")
    ap.add_argument("--variant", default="basic")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=16, help="pairs of blocks (A B, then B A, ...)")
    ap.add_argument("--block", type=int, default=10, help="steps per block")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; variant {args.variant}, batch {args.batch}")
    data = write_mnist_like(n=20 * args.batch, shard_size=10 * args.batch)
    trainers = {"A": build(data, args.variant, args.batch, args.a), "B": build(data, args.variant, args.batch, args.b)}
    rng = np.random.default_rng(0)
    batches = [(trainers["A"].aae.normalise(torch.from_numpy(rng.integers(0, 256, (args.batch, 1, 28, 28), dtype=np.uint8))),
                torch.from_numpy(rng.integers(0, 10, args.batch))) for _ in range(args.block)]
    for t in trainers.values():  # warm-up: allocator, kernels, the optimizers' state
        for b in batches[:5]:
            t.train_step([b])
    ms = {k: [] for k in trainers}
    for r in range(args.rounds):
        for k in ("A", "B") if r % 2 == 0 else ("B", "A"):
            t0 = time.perf_counter()
            for b in batches:
                trainers[k].train_step([b])
            ms[k].append((time.perf_counter() - t0) / len(batches) * 1000)
    med = {k: statistics.median(v) for k, v in ms.items()}
    faster = sum(a < b for a, b in zip(ms["A"], ms["B"]))
    for k, sets in (("A", args.a), ("B", args.b)):
        print(f"{k} ({' '.join(sets) or 'defaults'}): {med[k]:.1f} ms/step median of {args.rounds} blocks of {args.block} "
              f"({args.batch * 1000 / med[k]:,.0f} samples/s); blocks: {' '.join(f'{v:.0f}' for v in ms[k])}")
    print(f"B / A = {med['B'] / med['A']:.3f} (A faster in {faster} of {args.rounds} pairs)")


if __name__ == "__main__":
    main()
