"""Clustering scores by the paper's protocol and by majority vote, on cases whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aae_dist.scoring import cluster_scores, kmeans_baseline, logistic_baseline


def test_paper_protocol_uses_the_most_confident_member_majority_uses_all():
    # cluster 0: members labelled 3 (confidence .9), 4 (.5), 4 (.4): paper -> 3, majority -> 4
    pool_cluster = np.array([0, 0, 0, 1, 1, 2])
    pool_conf = np.array([0.9, 0.5, 0.4, 0.6, 0.8, 0.7])
    pool_labels = np.array([3, 4, 4, 5, 5, 6])
    test_cluster = np.array([0, 0, 1, 2, 3])  # cluster 3 has no pool member: always wrong
    test_labels = np.array([4, 4, 5, 6, 6])
    s = cluster_scores(pool_cluster, pool_conf, pool_labels, test_cluster, test_labels, k=4)
    assert s["cluster_error"] == pytest.approx(3 / 5)
    assert s["cluster_error_majority"] == pytest.approx(1 / 5)
    assert s["clusters_used"] == 4
    p = np.array([2, 1, 1, 1]) / 5
    assert s["cluster_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))


def test_usage_counts_only_clusters_with_one_percent():
    test_cluster = np.array([0] * 995 + [1] * 5)  # cluster 1 holds 0.5%
    s = cluster_scores(np.array([0, 1]), np.array([1.0, 1.0]), np.array([0, 1]), test_cluster, np.zeros(1000, int), k=16)
    assert s["clusters_used"] == 1 and s["cluster_entropy"] < math.log(2)


def test_baselines_on_separable_blobs():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, (3, 5))
    y = np.repeat(np.arange(3), 100)
    x = centres[y] + rng.normal(0, 0.5, (300, 5))
    km = kmeans_baseline(x[::2], y[::2], x[1::2], y[1::2], k=3)
    assert km["kmeans_cluster_error"] == 0 and km["kmeans_cluster_error_majority"] == 0 and km["kmeans_clusters_used"] == 3
    lr = logistic_baseline(x[:300:50], y[:300:50], x, y)
    assert lr["labelled_samples"] == 6 and lr["logistic_classify_error"] < 0.05


def test_parzen_sigma_search_computes_distances_once_and_agrees_with_the_plain_search():
    import torch

    from aae_dist.evaluation import PARZEN_SIGMAS, best_sigma, parzen_ll

    g = torch.Generator().manual_seed(0)
    mu = torch.rand(300, 20, generator=g, dtype=torch.float64)
    picked = set()
    for scale in (0.02, 0.3, 2.0):  # validation points near the samples, farther, far: different sigmas win
        val = mu[:120] + scale * torch.randn(120, 20, generator=g, dtype=torch.float64)
        plain = max(PARZEN_SIGMAS, key=lambda s: float(parzen_ll(val, mu, s).mean()))
        assert best_sigma(val, mu, PARZEN_SIGMAS, chunk=50) == plain
        picked.add(plain)
    assert len(picked) > 1
