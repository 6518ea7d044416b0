"""Networks (shapes for every family/posterior) and priors (moments, conditioning, compatibility)."""

from __future__ import annotations

import math

import pytest
import torch

from aae_dist.config import load_config
from aae_dist.errors import UserError
from aae_dist.models import build_networks, build_prior


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("posterior", ["deterministic", "gaussian", "universal"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_network_shapes(kind, posterior, shape):
    cfg = load_config(None, [f"model.kind={kind}", f"model.posterior={posterior}", "model.hidden=[32,16]", "model.latent_dim=5"])
    nets = build_networks(cfg.model, shape)
    x = torch.rand(4, *shape)
    g = torch.Generator().manual_seed(0)
    codes = nets["encoder"](x, generator=g)
    assert codes.z.shape == (4, 5)
    assert (codes.mu is not None) == (posterior == "gaussian")
    assert nets["decoder"](codes.z).shape == x.shape
    assert nets["discriminator"](codes.z).shape == (4,)


def test_paper_mlp_sizes():
    cfg = load_config(None, [])
    nets = build_networks(cfg.model, (1, 28, 28))
    linears = [m for m in nets["encoder"].modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 1000), (1000, 1000), (1000, 8)]


def test_stochastic_posteriors_use_the_generator():
    for post in ("gaussian", "universal"):
        cfg = load_config(None, [f"model.posterior={post}", "model.hidden=[16]"])
        enc = build_networks(cfg.model, (1, 8, 8))["encoder"]
        x = torch.rand(3, 1, 8, 8)
        a = enc(x, generator=torch.Generator().manual_seed(1)).z
        b = enc(x, generator=torch.Generator().manual_seed(1)).z
        c = enc(x, generator=torch.Generator().manual_seed(2)).z
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_conv_rejects_indivisible_images():
    cfg = load_config(None, ["model.kind=conv"])
    with pytest.raises(UserError, match="divisible by 4"):
        build_networks(cfg.model, (1, 30, 30))


def sample(kind, n=200_000, dim=4, labels=None, **kw):
    cfg = load_config(None, [f"prior.kind={kind}"] + [f"prior.{k}={v}" for k, v in kw.items()])
    return build_prior(cfg.prior, dim).sample(n, torch.Generator().manual_seed(0), "cpu", labels=labels)


def test_gaussian_moments():
    s = sample("gaussian", std=2.0)
    assert s.shape == (200_000, 4)
    assert abs(s.mean()) < 0.02 and abs(s.std() - 2.0) < 0.02


def test_uniform_range_and_moments():
    s = sample("uniform", low=-2, high=4)
    assert s.min() >= -2 and s.max() <= 4
    assert abs(s.mean() - 1) < 0.02 and abs(s.var() - 36 / 12) < 0.03


@pytest.mark.parametrize("shape", [0.5, 3.0])
def test_gamma_moments(shape):
    s = sample("gamma", shape=shape, scale=2.0)
    assert (s > 0).all()
    assert abs(s.mean() - shape * 2) / (shape * 2) < 0.02
    assert abs(s.var() - shape * 4) / (shape * 4) < 0.05


def test_mixture_layout_and_labels():
    labels = torch.arange(10).repeat_interleave(2000)
    s = sample("mixture", n=20_000, dim=2, labels=labels)
    for k in range(10):
        pts = s[labels == k]
        angle = math.atan2(pts[:, 1].mean(), pts[:, 0].mean())
        assert abs((angle - 2 * math.pi * k / 10 + math.pi) % (2 * math.pi) - math.pi) < 0.05
        assert abs(pts.norm(dim=1).mean() - 4.0) < 0.05
    free = sample("mixture", n=20_000, dim=2)
    assert abs(free.norm(dim=1).mean() - 4.0) < 0.05


def test_swiss_roll_segments_by_label():
    a = sample("swiss_roll", n=5000, dim=2, labels=torch.zeros(5000, dtype=torch.long), components=5)
    b = sample("swiss_roll", n=5000, dim=2, labels=torch.full((5000,), 4), components=5)
    assert a.norm(dim=1).mean() < b.norm(dim=1).mean()  # later segments lie further out on the roll


def test_categorical_one_hot():
    s = sample("categorical", n=10_000, dim=6, components=6)
    assert torch.equal(s.sum(1), torch.ones(10_000))
    assert (s.mean(0) - 1 / 6).abs().max() < 0.02


def test_prior_sampling_is_seeded():
    assert torch.equal(sample("gaussian", n=10), sample("gaussian", n=10))


@pytest.mark.parametrize(
    "sets, msg",
    [(["prior.kind=mixture"], "2-D prior but model.latent_dim=8"), (["prior.kind=categorical", "prior.components=10"], "latent_dim=10"),
     (["prior.kind=uniform", "prior.low=1", "prior.high=0"], "above prior.low")],
)
def test_prior_incompatible(sets, msg):
    cfg = load_config(None, sets)
    with pytest.raises(UserError, match=msg):
        build_prior(cfg.prior, cfg.model.latent_dim)
