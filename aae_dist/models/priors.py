"""Priors p(z), sampled on the training device from a seeded generator.

The mixture and swiss roll take optional labels: a label picks the component/segment
(used by the label-regularised AAE)."""

from __future__ import annotations

import math

import torch

from ..config import PriorConfig
from ..errors import UserError


class Prior:
    two_d_only = False

    def __init__(self, cfg: PriorConfig, dim: int):
        self.cfg, self.dim = cfg, dim

    def sample(self, n: int, generator: torch.Generator, device, labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


class Gaussian(Prior):
    def sample(self, n, generator, device, labels=None):
        return torch.randn(n, self.dim, generator=generator, device=device) * self.cfg.std


class Uniform(Prior):
    def sample(self, n, generator, device, labels=None):
        u = torch.rand(n, self.dim, generator=generator, device=device)
        return self.cfg.low + (self.cfg.high - self.cfg.low) * u


class Gamma(Prior):
    """Marsaglia-Tsang rejection sampling, so the seeded generator drives every draw."""

    def sample(self, n, generator, device, labels=None):
        k = self.cfg.shape
        boost = k < 1
        a = k + 1 if boost else k
        d = a - 1.0 / 3.0
        c = 1.0 / math.sqrt(9 * d)
        out = torch.empty(n * self.dim, device=device)
        todo = torch.arange(n * self.dim, device=device)
        while todo.numel():
            m = todo.numel()
            x = torch.randn(m, generator=generator, device=device)
            u = torch.rand(m, generator=generator, device=device)
            v = (1 + c * x) ** 3
            ok = (v > 0) & (torch.log(u.clamp_min(1e-30)) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30)))
            out[todo[ok]] = d * v[ok]
            todo = todo[~ok]
        if boost:
            u = torch.rand(n * self.dim, generator=generator, device=device)
            out = out * u.pow(1.0 / k)
        return (out * self.cfg.scale).view(n, self.dim)


class Mixture2D(Prior):
    """The paper's layout: K Gaussians on a circle, each stretched along its radius."""

    two_d_only = True

    def sample(self, n, generator, device, labels=None):
        K = self.cfg.components
        k = labels if labels is not None else torch.randint(0, K, (n,), generator=generator, device=device)
        angle = 2 * math.pi * k.float() / K
        radial = self.cfg.radius + self.cfg.radial_std * torch.randn(n, generator=generator, device=device)
        tangential = self.cfg.tangential_std * torch.randn(n, generator=generator, device=device)
        cos, sin = torch.cos(angle), torch.sin(angle)
        return torch.stack([radial * cos - tangential * sin, radial * sin + tangential * cos], 1)


class SwissRoll(Prior):
    """Points on a 2-D spiral; a label picks one of K equal segments of it."""

    two_d_only = True

    def sample(self, n, generator, device, labels=None):
        K = self.cfg.components
        u = torch.rand(n, generator=generator, device=device)
        if labels is not None:
            u = (labels.float() + u) / K
        t = math.sqrt(1.0) * torch.sqrt(u) * 3 * math.pi + 0.5 * math.pi  # uniform along the spiral's length-ish
        r = t / (3.5 * math.pi) * self.cfg.radius
        pts = torch.stack([r * torch.cos(t), r * torch.sin(t)], 1)
        return pts + 0.05 * self.cfg.radius * torch.randn(n, 2, generator=generator, device=device)


class Categorical(Prior):
    """One-hot vectors of K classes (uniform), e.g. for a semi-supervised y."""

    def sample(self, n, generator, device, labels=None):
        k = labels if labels is not None else torch.randint(0, self.dim, (n,), generator=generator, device=device)
        return torch.nn.functional.one_hot(k, self.dim).float()


PRIORS = {"gaussian": Gaussian, "uniform": Uniform, "gamma": Gamma, "mixture": Mixture2D, "swiss_roll": SwissRoll, "categorical": Categorical}


def build_prior(cfg: PriorConfig, dim: int) -> Prior:
    cls = PRIORS[cfg.kind]
    if cls.two_d_only and dim != 2:
        raise UserError(f"prior.kind={cfg.kind} is a 2-D prior but model.latent_dim={dim}: set model.latent_dim=2 or pick another prior")
    if cfg.kind == "categorical" and dim != cfg.components:
        raise UserError(f"prior.kind=categorical with {cfg.components} classes needs model.latent_dim={cfg.components} (got {dim})")
    if cfg.kind == "uniform" and cfg.high <= cfg.low:
        raise UserError(f"prior.high ({cfg.high}) must be above prior.low ({cfg.low})")
    return cls(cfg, dim)
