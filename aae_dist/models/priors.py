"""Priors p(z), sampled on the training device from a seeded generator.  A prior is one class,
registered once with `@prior(kind, params)`: its own parameters (read from the prior section, or
prior.options for a prior of your own), its own checks (`check`), and `sample`.

The mixture and swiss roll take optional labels: a label picks the component/segment
(used by the label-regularised AAE)."""

from __future__ import annotations

import math

import torch

from types import SimpleNamespace

from ..config import PRIOR_KINDS, PriorConfig
from ..errors import UserError

PRIORS: dict[str, type["Prior"]] = {}


def prior(kind: str, params: tuple[str, ...] = ()):
    """Register a Prior class as prior.kind=`kind`; `params` are the names it reads (prior.<name> for the
    built-in ones, prior.options.<name> for others)."""

    def register(cls):
        cls.kind = kind
        PRIORS[kind] = cls
        PRIOR_KINDS[kind] = tuple(params) or PRIOR_KINDS.get(kind, ())
        return cls

    return register


class Prior:
    kind = ""
    two_d_only = False
    takes_labels = False  # a label picks a component: what the label-regularised variant needs
    defaults: dict = {}  # parameter values used where prior.options leaves them out (priors of your own)

    def __init__(self, cfg, dim: int):
        self.cfg, self.dim = cfg, dim

    @classmethod
    def build(cls, section: PriorConfig, dim: int) -> "Prior":
        """This kind's parameters from the section, checked against the code's size, then the prior."""
        params = SimpleNamespace(**{**cls.defaults, **section.params()})
        if cls.two_d_only and dim != 2:
            raise UserError(f"prior.kind={cls.kind} is a 2-D prior but model.latent_dim={dim}: set model.latent_dim=2 or pick another prior")
        cls.check(params, dim)
        return cls(params, dim)

    @classmethod
    def check(cls, params, dim: int) -> None:
        """Raise UserError (naming the key and the fix) where the parameters cannot work with this code size."""

    def sample(self, n: int, generator: torch.Generator, device, labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


@prior("gaussian")
class Gaussian(Prior):
    def sample(self, n, generator, device, labels=None):
        return torch.randn(n, self.dim, generator=generator, device=device) * self.cfg.std


@prior("uniform")
class Uniform(Prior):
    @classmethod
    def check(cls, params, dim):
        if params.high <= params.low:
            raise UserError(f"prior.high ({params.high}) must be above prior.low ({params.low})")

    def sample(self, n, generator, device, labels=None):
        u = torch.rand(n, self.dim, generator=generator, device=device)
        return self.cfg.low + (self.cfg.high - self.cfg.low) * u


@prior("gamma")
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


@prior("mixture")
class Mixture2D(Prior):
    """The paper's layout: K Gaussians on a circle, each stretched along its radius."""

    two_d_only = True
    takes_labels = True

    def sample(self, n, generator, device, labels=None):
        K = self.cfg.components
        k = labels if labels is not None else torch.randint(0, K, (n,), generator=generator, device=device)
        angle = 2 * math.pi * k.float() / K
        radial = self.cfg.radius + self.cfg.radial_std * torch.randn(n, generator=generator, device=device)
        tangential = self.cfg.tangential_std * torch.randn(n, generator=generator, device=device)
        cos, sin = torch.cos(angle), torch.sin(angle)
        return torch.stack([radial * cos - tangential * sin, radial * sin + tangential * cos], 1)


@prior("swiss_roll")
class SwissRoll(Prior):
    """Points on a 2-D spiral; a label picks one of K equal segments of it."""

    two_d_only = True
    takes_labels = True

    def sample(self, n, generator, device, labels=None):
        K = self.cfg.components
        u = torch.rand(n, generator=generator, device=device)
        if labels is not None:
            u = (labels.float() + u) / K
        t = math.sqrt(1.0) * torch.sqrt(u) * 3 * math.pi + 0.5 * math.pi  # uniform along the spiral's length-ish
        r = t / (3.5 * math.pi) * self.cfg.radius
        pts = torch.stack([r * torch.cos(t), r * torch.sin(t)], 1)
        return pts + 0.05 * self.cfg.radius * torch.randn(n, 2, generator=generator, device=device)


@prior("categorical")
class Categorical(Prior):
    """One-hot vectors of K classes (uniform), e.g. for a semi-supervised y."""

    @classmethod
    def check(cls, params, dim):
        if dim != params.components:
            raise UserError(f"prior.kind=categorical with {params.components} classes needs model.latent_dim={params.components} (got {dim})")

    def sample(self, n, generator, device, labels=None):
        k = labels if labels is not None else torch.randint(0, self.dim, (n,), generator=generator, device=device)
        return torch.nn.functional.one_hot(k, self.dim).float()


def build_prior(cfg: PriorConfig, dim: int) -> Prior:
    return PRIORS[cfg.kind].build(cfg, dim)
