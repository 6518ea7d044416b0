"""The paper's experiments on the embedded 5,000 digits, within a CPU time budget per run, beside the
paper's full-MNIST figures.  Not a test: it prints a table.

    python benchmarks/paper.py [--minutes 10] [--only mnist_semisupervised_100 mnist_clustering_16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import machine  # noqa: E402

from aae_dist.config import load_config  # noqa: E402
from aae_dist.launch import ensure_default_data  # noqa: E402
from aae_dist.training.trainer import train_in_process  # noqa: E402

JOBS = os.path.join(os.path.dirname(__file__), "..", "jobs")
# metric, the paper's full-MNIST figure (Makhzani et al. 2015, Tables 1-3), lower-is-better
EXPERIMENTS = {
    "mnist_aae": ("parzen_ll", "340 +- 2 nats", False),
    "mnist_semisupervised_100": ("classify_error", "1.90% (100 labels)", True),
    "mnist_clustering_16": ("cluster_error", "9.55% (16 clusters)", True),
    "mnist_mixture2d": ("prior_match", "(figure only)", True),
    "mnist_supervised": ("recon_loss", "(figure only)", True),
    "mnist_dimreduction_2d": ("cluster_error", "(figure only)", True),
}


def run(name: str, minutes: float, data: str) -> dict:
    path = os.path.join(JOBS, name + ".yaml")
    probe = load_config(path, [f"data.path={data}", "train.max_steps=20", "train.progress=false", "train.parzen_samples=0"])
    s = train_in_process(probe, tempfile.mkdtemp(prefix="aae-paper-probe-"))
    per_step = s["train_s"] / s["steps"]
    steps = max(20, int(minutes * 60 * 0.9 / per_step))  # 10% kept for the final evaluation
    cfg = load_config(path, [f"data.path={data}", f"train.max_steps={steps}", "train.progress=false", "train.epochs=100000",
                             "train.checkpoint_every=100000"])
    t0 = time.perf_counter()
    s = train_in_process(cfg, tempfile.mkdtemp(prefix=f"aae-paper-{name}-"))
    s["total_s"] = time.perf_counter() - t0
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10.0, help="CPU budget per experiment")
    ap.add_argument("--only", nargs="+", choices=list(EXPERIMENTS))
    args = ap.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    print(f"machine: {machine()}; budget {args.minutes} min per experiment; embedded digits (4,500 train / 500 test)")
    data = ensure_default_data()
    rows = []
    for name in args.only or EXPERIMENTS:
        metric, paper, _ = EXPERIMENTS[name]
        s = run(name, args.minutes, data)
        m = s["metrics"]
        value = m.get(metric)
        shown = f"{value:.2f} +- {m['parzen_ll_se']:.2f} nats" if metric == "parzen_ll" else (
            f"{100 * value:.2f}%" if metric.endswith("error") else f"{value:.4f}")
        rows.append((name, metric, shown, paper, s["epochs"], s["total_s"]))
        print(f"{name:28s} {metric:15s} {shown:22s} paper {paper:22s} {s['epochs']:.1f} epochs {s['total_s'] / 60:.1f} min "
              f"(recon {m['recon_loss']:.4f})", flush=True)
    print("\n| experiment | metric | aae-dist (embedded digits) | paper (full MNIST) | epochs | minutes |\n|---|---|---|---|---|---|")
    for name, metric, shown, paper, ep, secs in rows:
        print(f"| {name} | {metric} | {shown} | {paper} | {ep:.1f} | {secs / 60:.1f} |")


if __name__ == "__main__":
    main()
