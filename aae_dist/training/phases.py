"""A training step is an explicit list of phases, each with its networks, loss, optimizer and interval.

Gradients reach only the phase's own networks: the networks it merely reads run as their
plain (un-wrapped) modules with gradients off, so DDP never all-reduces or keeps stale
gradients for them.  Each variant of the paper is a different list (`build_phases`)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, PhaseConfig
from ..models.networks import has_categorical

LossFn = Callable[["StepContext", torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepContext:
    """What a phase's loss sees: wrapped networks to train, plain ones to read, the prior, randomness."""

    wrapped: dict[str, nn.Module]
    plain: dict[str, nn.Module]
    prior: object
    generator: torch.Generator
    output: str  # bernoulli | gaussian
    cfg: Config
    num_classes: int = 0
    labelled: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None  # semi-supervised: a labelled minibatch

    @property
    def variant(self) -> str:
        return self.cfg.model.variant

    def one_hot(self, y: torch.Tensor, extra: int = 0) -> torch.Tensor:
        """One-hot labels; unknown labels (-1) become the extra 'unlabelled' class when extra=1."""
        k = self.num_classes + extra
        idx = torch.where(y >= 0, y, torch.full_like(y, k - 1)) if extra else y.clamp_min(0)
        return F.one_hot(idx, k).float()

    def decoder_y(self, codes, y: torch.Tensor) -> torch.Tensor | None:
        if self.variant == "supervised":
            return self.one_hot(y)
        return codes.y


@dataclass
class Phase:
    name: str
    networks: tuple[str, ...]  # networks this phase trains
    loss: LossFn
    cfg: PhaseConfig
    repeat: int = 1
    start_step: int = 0  # e.g. adversarial phases wait for the warm-up
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    stat_names: tuple[str, ...] = field(default_factory=tuple)

    def runs_at(self, step: int) -> bool:
        return step >= self.start_step and step % self.cfg.every == 0


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Read a network without computing gradients for its parameters."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def reconstruction_error(output: str, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if output == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits.float(), x.float())
    return F.mse_loss(logits.float(), x.float())


def _bce(logits: torch.Tensor, value: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full(logits.shape, value, device=logits.device))


def _noisy(ctx: StepContext, z: torch.Tensor, std: float) -> torch.Tensor:
    return z + std * torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=ctx.generator) if std else z


# ---- phases ------------------------------------------------------------------------------------

def reconstruction_loss(ctx: StepContext, x, y):
    codes = ctx.wrapped["encoder"](x, generator=ctx.generator)
    dec = ctx.wrapped["decoder"]
    loss = reconstruction_error(ctx.output, dec(codes.z, ctx.decoder_y(codes, y)), x)
    stats = {"loss": loss.detach()}
    total = loss
    if ctx.cfg.model.regularizer == "kl":  # VAE baseline: negative ELBO per data dimension
        kl = -0.5 * torch.sum(1 + codes.logvar - codes.mu.pow(2) - codes.logvar.exp(), 1).mean()
        total = total + kl / x[0].numel()
        stats["kl"] = kl.detach()
    if ctx.variant == "dim_reduction" and ctx.cfg.model.cluster_head_weight:
        heads = ctx.plain["decoder"].cluster_heads
        dist = torch.cdist(heads, heads)
        k = heads.shape[0]
        off = ~torch.eye(k, dtype=torch.bool, device=heads.device)
        penalty = F.relu(ctx.cfg.model.cluster_head_distance - dist[off]).sum() / max(1, k * (k - 1))
        total = total + ctx.cfg.model.cluster_head_weight * penalty
    return total, stats


def _prior_labels(ctx: StepContext, y: torch.Tensor) -> torch.Tensor:
    """Label-regularised: the component a label names; unlabelled samples draw a random one."""
    rand = torch.randint(0, ctx.num_classes, y.shape, device=y.device, generator=ctx.generator)
    return torch.where(y >= 0, y, rand)


def discriminator_loss(ctx: StepContext, x, y):
    with torch.no_grad():
        fake = ctx.plain["encoder"](x, generator=ctx.generator).z
    if ctx.variant == "label_regularized":
        real = ctx.prior.sample(len(x), ctx.generator, x.device, labels=_prior_labels(ctx, y))
        tag = ctx.one_hot(y, extra=1)
        real, fake = torch.cat([real, tag], 1), torch.cat([fake, tag], 1)
    else:
        real = ctx.prior.sample(len(x), ctx.generator, x.device)
    return _discriminate(ctx, "discriminator", real, fake, ctx.cfg.phases.discriminator.input_noise)


def discriminator_cat_loss(ctx: StepContext, x, y):
    with torch.no_grad():
        fake = ctx.plain["encoder"](x, generator=ctx.generator).y
    real = F.one_hot(torch.randint(0, ctx.num_classes, (len(x),), device=x.device, generator=ctx.generator), ctx.num_classes).float()
    return _discriminate(ctx, "discriminator_cat", real, fake, ctx.cfg.phases.discriminator_cat.input_noise)


def _discriminate(ctx, name, real, fake, noise):
    logits = ctx.wrapped[name](torch.cat([_noisy(ctx, real, noise), _noisy(ctx, fake.to(real.dtype), noise)]))
    n = len(real)
    lr, lf = logits[:n], logits[n:]
    loss = 0.5 * (_bce(lr, 1.0) + _bce(lf, 0.0))
    return loss, {"loss": loss.detach(), "acc_prior": (lr.detach() > 0).float().mean(), "acc_codes": (lf.detach() < 0).float().mean()}


def generator_loss(ctx: StepContext, x, y):
    codes = ctx.wrapped["encoder"](x, generator=ctx.generator)
    z = _noisy(ctx, codes.z, ctx.cfg.phases.discriminator.input_noise)
    if ctx.variant == "label_regularized":
        z = torch.cat([z, ctx.one_hot(y, extra=1)], 1)
    with frozen(ctx.plain["discriminator"]) as disc:
        loss = _bce(disc(z), 1.0)
    if "discriminator_cat" in ctx.plain:
        with frozen(ctx.plain["discriminator_cat"]) as disc_cat:
            loss = loss + _bce(disc_cat(_noisy(ctx, codes.y, ctx.cfg.phases.discriminator_cat.input_noise)), 1.0)
    return loss, {"loss": loss.detach()}


def classification_loss(ctx: StepContext, x, y):
    """Semi-supervised phase: the encoder's y learns the labels of a labelled minibatch."""
    xl, yl = ctx.labelled() if ctx.labelled is not None else (x, y)
    logits = ctx.wrapped["encoder"](xl, generator=ctx.generator).y_logits
    known = yl >= 0
    loss = F.cross_entropy(logits.float(), yl.clamp_min(0), reduction="none")
    loss = (loss * known).sum() / known.sum().clamp_min(1)
    acc = ((logits.argmax(1) == yl) & known).float().sum() / known.sum().clamp_min(1)
    return loss, {"loss": loss.detach(), "accuracy": acc.detach()}


def build_phases(cfg: Config) -> list[Phase]:
    p, m = cfg.phases, cfg.model
    warm = cfg.train.warmup_steps
    phases = [Phase("reconstruction", ("encoder", "decoder"), reconstruction_loss, p.reconstruction, stat_names=("loss", "kl"))]
    if m.regularizer == "kl":
        return phases
    disc_stats = ("loss", "acc_prior", "acc_codes")
    if has_categorical(m):
        phases.append(Phase("discriminator_cat", ("discriminator_cat",), discriminator_cat_loss, p.discriminator_cat,
                            repeat=p.discriminator_cat.repeat, start_step=warm, stat_names=disc_stats))
    phases += [
        Phase("discriminator", ("discriminator",), discriminator_loss, p.discriminator, repeat=p.discriminator.repeat,
              start_step=warm, stat_names=disc_stats),
        Phase("generator", ("encoder",), generator_loss, p.generator, start_step=warm, stat_names=("loss",)),
    ]
    if m.variant == "semi_supervised" or (m.variant == "dim_reduction" and cfg.data.labeled_per_class):
        phases.append(Phase("classification", ("encoder",), classification_loss, p.classification, stat_names=("loss", "accuracy")))
    return phases


def make_optimizer(phase: Phase, plain: dict[str, nn.Module], total_steps: int) -> None:
    """Adam over the phase's networks plus its learning-rate schedule."""
    params = [prm for n in phase.networks for prm in plain[n].parameters()]
    kw = {"foreach": True} if params and params[0].device.type != "cpu" else {}
    phase.optimizer = torch.optim.Adam(params, lr=phase.cfg.lr, betas=(phase.cfg.beta1, phase.cfg.beta2), **kw)
    c = phase.cfg
    if c.schedule == "cosine":
        fn = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(1, total_steps)))  # noqa: E731
    elif c.schedule == "step":
        fn = lambda s: c.decay ** (s // c.decay_every)  # noqa: E731
    else:
        fn = lambda s: 1.0  # noqa: E731
    phase.scheduler = torch.optim.lr_scheduler.LambdaLR(phase.optimizer, fn)
