"""A training step is an explicit list of phases, each with its networks, loss, optimizer and interval.

Gradients reach only the phase's own networks: the networks it merely reads run as their
plain (un-wrapped) modules with gradients off, so DDP never all-reduces or keeps stale
gradients for them.  A new phase is a new `Phase` in the list `build_phases` returns."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, PhaseConfig

LossFn = Callable[["StepContext", torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepContext:
    """What a phase's loss sees: wrapped networks to train, plain ones to read, the prior, randomness."""

    wrapped: dict[str, nn.Module]
    plain: dict[str, nn.Module]
    prior: object
    generator: torch.Generator
    output: str  # bernoulli | gaussian
    disc_input_noise: float = 0.0


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


def reconstruction_error(ctx: StepContext, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if ctx.output == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits.float(), x.float())
    return F.mse_loss(logits.float(), x.float())


def reconstruction_loss(ctx: StepContext, x, y):
    codes = ctx.wrapped["encoder"](x, generator=ctx.generator)
    loss = reconstruction_error(ctx, ctx.wrapped["decoder"](codes.z), x)
    return loss, {"loss": loss.detach()}


def _disc_in(ctx: StepContext, z: torch.Tensor) -> torch.Tensor:
    if ctx.disc_input_noise:
        z = z + ctx.disc_input_noise * torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=ctx.generator)
    return z


def discriminator_loss(ctx: StepContext, x, y):
    with torch.no_grad():
        fake = ctx.plain["encoder"](x, generator=ctx.generator).z
    real = ctx.prior.sample(x.shape[0], ctx.generator, x.device)
    logits = ctx.wrapped["discriminator"](torch.cat([_disc_in(ctx, real), _disc_in(ctx, fake)]))
    target = torch.cat([torch.ones(len(real), device=x.device), torch.zeros(len(fake), device=x.device)])
    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
    lr, lf = logits[: len(real)].detach(), logits[len(real) :].detach()
    return loss, {"loss": loss.detach(), "acc_prior": (lr > 0).float().mean(), "acc_codes": (lf < 0).float().mean()}


def generator_loss(ctx: StepContext, x, y):
    z = ctx.wrapped["encoder"](x, generator=ctx.generator).z
    with frozen(ctx.plain["discriminator"]) as disc:
        logits = disc(_disc_in(ctx, z))
    loss = F.binary_cross_entropy_with_logits(logits.float(), torch.ones_like(logits, dtype=torch.float32))
    return loss, {"loss": loss.detach()}


def build_phases(cfg: Config) -> list[Phase]:
    p = cfg.phases
    warm = cfg.train.warmup_steps
    return [
        Phase("reconstruction", ("encoder", "decoder"), reconstruction_loss, p.reconstruction, stat_names=("loss",)),
        Phase(
            "discriminator", ("discriminator",), discriminator_loss, p.discriminator,
            repeat=p.discriminator.repeat, start_step=warm, stat_names=("loss", "acc_prior", "acc_codes"),
        ),
        Phase("generator", ("encoder",), generator_loss, p.generator, start_step=warm, stat_names=("loss",)),
    ]


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
