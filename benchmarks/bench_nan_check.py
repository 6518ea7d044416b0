"""What nan_policy=stop costs: every phase checks its all-reduced gradients before the update (one fused
norm and one host sync per phase) so a non-finite step is stopped inside that step.  Measured against the
same loop with the check switched off, alternating in one process (paper MLP 784-1000-1000-8).

    python benchmarks/bench_nan_check.py [--steps 200] [--batch 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import PAPER_MLP, machine, write_mnist_like  # noqa: E402

from aae_dist.config import load_config  # noqa: E402
from aae_dist.training import trainer  # noqa: E402


def run(data: str, batch: int, steps: int, check: bool) -> float:
    cfg = load_config(None, PAPER_MLP + [f"data.path={data}", f"data.batch_size={batch}", f"train.max_steps={steps}",
                                        "train.progress=false", "train.parzen_samples=0", "train.checkpoint_every=100000", "train.image_every=100000",
                                        "train.nan_policy=stop"])
    real = trainer.Trainer._grads_finite
    if not check:
        trainer.Trainer._grads_finite = lambda self, ph: True
    try:
        return trainer.train_in_process(cfg, tempfile.mkdtemp(prefix="aae-bench-nan-"))["samples_per_s"]
    finally:
        trainer.Trainer._grads_finite = real


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    data = write_mnist_like(n=20_000)
    print(f"machine: {machine()}; paper MLP, batch {a.batch}, {a.steps} steps per run, in-process, 1 worker")
    off, on = [], []
    for _ in range(a.rounds):  # alternate, so drift in the machine's speed hits both alike
        off.append(run(data, a.batch, a.steps, check=False))
        on.append(run(data, a.batch, a.steps, check=True))
    print("| check | samples/s per run | best | ratio to off |\n|---|---|---|---|")
    print(f"| off | {', '.join(f'{v:.0f}' for v in off)} | {max(off):.0f} | 1.000 |")
    print(f"| nan_policy=stop (every gradient, every phase) | {', '.join(f'{v:.0f}' for v in on)} | {max(on):.0f} | {max(on) / max(off):.3f} |")


if __name__ == "__main__":
    main()
