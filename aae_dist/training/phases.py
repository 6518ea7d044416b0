"""A training step is an explicit list of phases, each with its networks, loss, optimizer and interval.

Gradients reach only the phase's own networks: the networks it merely reads run as their
plain (un-wrapped) modules with gradients off, so DDP never all-reduces or keeps stale
gradients for them.  `build_phases` reads the variant's row once and binds every loss's
parameters then, so no loss looks at the config or the variant at step time."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, PhaseConfig
from ..models import AAE
from ..variants import variant

LossFn = Callable[["StepContext", torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepContext:
    """What a phase's loss sees: wrapped networks to train, plain ones to read, the model, randomness."""

    wrapped: dict[str, nn.Module]
    aae: AAE
    generator: torch.Generator
    labelled: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None  # a labelled minibatch (few-label runs)
    radius: Callable[[torch.Tensor], torch.Tensor] | None = None  # adaptive VAT: each sample's k-th neighbour distance

    @property
    def plain(self) -> dict[str, nn.Module]:
        return self.aae.nets


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
    kernels: dict = field(default_factory=dict)  # the optimizer's fused/foreach flags (make_optimizer)

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


def _bce(logits: torch.Tensor, value: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full(logits.shape, value, device=logits.device))


def _noisy(ctx: StepContext, z: torch.Tensor, std: float) -> torch.Tensor:
    return z + std * torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=ctx.generator) if std else z


def translated(x: torch.Tensor, shift: int, generator: torch.Generator, rotate: float = 0.0, scale: float = 0.0) -> torch.Tensor:
    """Each image (N, C, H, W) moved by its own whole-pixel offset in [-shift, shift] on each axis, zeros shifted in;
    with rotate (degrees) / scale (fraction) also turned and zoomed by its own uniform draw, bilinear."""
    n, _, h, w = x.shape
    offsets = torch.randint(-shift, shift + 1, (n, 2), device=x.device, generator=generator).to(x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if rotate or scale:
        u = torch.rand(n, 2, device=x.device, generator=generator).to(x.dtype) * 2 - 1
        angle, zoom = u[:, 0] * math.radians(rotate), 1.0 + u[:, 1] * scale
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 2], theta[:, 1, 2] = offsets[:, 0] * 2 / w, offsets[:, 1] * 2 / h  # grid units: 2 / size per pixel
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    mode = "bilinear" if rotate or scale else "nearest"
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _per_sample_unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def _kl_y(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits.float(), 1), target, reduction="batchmean")


@contextlib.contextmanager
def batch_stats_frozen(modules):
    """Batch norm normalises with the batch's own statistics but leaves its running averages alone
    (IMSAT's VAT pass: perturbed inputs must not move the statistics evaluation uses)."""
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def entropy_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H(y|x), H(mean y)) in nats for a batch of y logits.  Under DDP the marginal mean y is over the
    global batch: the per-rank sums of y and counts are all-reduced for the value, and the gradient flows
    through this rank's own sum scaled by the world size, so DDP's mean of the ranks' gradients is exactly
    the gradient of H(mean y) over the global batch (no collective in the backward pass; equal batches)."""
    from ..distributed import all_reduce_, distributed

    logp = F.log_softmax(logits.float(), 1)
    p = logp.exp()
    conditional = -(p * logp).sum(1).mean()
    local = p.sum(0)
    world = torch.distributed.get_world_size() if distributed() else 1
    if world > 1:
        glob = all_reduce_(torch.cat([local.detach(), torch.tensor([float(len(p))], device=p.device)]).double())
        total, count = glob[:-1].to(local.dtype), float(glob[-1])
        local = world * local + (total - world * local).detach()  # value: the global sum; gradient: world x this rank's
    else:
        count = float(len(p))
    marginal = (local / count).clamp_min(1e-12)
    return conditional, -(marginal * marginal.log()).sum()


def adversarial_perturbation(ctx: StepContext, x: torch.Tensor, target: torch.Tensor, eps) -> torch.Tensor:
    """VAT's one power iteration, probed at the scale it is used (a tiny probe underflows in float32): the
    perturbation of norm eps that moves y(x) most, found on the plain encoder with its
    parameters frozen (no gradient reaches them, and DDP sees no extra backward).  eps: a number, or
    one radius per sample shaped (N, 1, ...)."""
    d = eps * _per_sample_unit(torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=ctx.generator))
    d.requires_grad_(True)
    with torch.enable_grad(), frozen(ctx.plain["encoder"]) as enc:
        (grad,) = torch.autograd.grad(_kl_y(target, enc(x + d, generator=ctx.generator).y_logits), d)
    return eps * _per_sample_unit(grad.detach())


# ---- losses (parameters bound by build_phases) -------------------------------------------------

def reconstruction_loss(ctx: StepContext, x, y, *, kl: bool = False, head_distance: float = 0.0, head_weight: float = 0.0,
                        consistency: float = 0.0, shift: int = 2, rotate: float = 0.0, scale: float = 0.0,
                        vat: float = 0.0, vat_eps: float = 2.0, clean_target: bool = False, vat_alpha: float = 0.0,
                        info: float = 0.0, info_mu: float = 4.0):
    """Reconstruction error; kl: the VAE baseline's KL term; head_weight: dim. reduction pushes cluster heads apart;
    consistency: the y of a moved copy of x learns the y of x (cluster membership should not move with the digit);
    vat: so does the y of x + the small perturbation that would move it most; clean_target: that y(x) is read
    without the encoder's input noise and dropout; vat_alpha: each sample's vat radius is vat_alpha x its
    neighbour distance (ctx.radius), batch-norm statistics frozen in that pass; info: IMSAT's information
    term on y, info x (H(y|x) - info_mu x H(mean y))."""
    codes = ctx.wrapped["encoder"](x, generator=ctx.generator)
    loss = ctx.aae.reconstruction_error(ctx.wrapped["decoder"](codes.z, ctx.aae.decoder_y(codes, y)), x)
    stats = {"loss": loss.detach()}
    total = loss
    if consistency or vat:
        if clean_target:
            with torch.no_grad():
                target = torch.softmax(ctx.plain["encoder"](x, generator=ctx.generator, corrupt=False).y_logits.float(), 1)
        else:
            target = torch.softmax(codes.y_logits.detach().float(), 1)
    if consistency:
        moved = ctx.wrapped["encoder"](translated(x, shift, ctx.generator, rotate, scale), generator=ctx.generator)
        kl_y = _kl_y(target, moved.y_logits)
        total = total + consistency * kl_y
        stats["consistency"] = kl_y.detach()
    if vat:
        kl_v = _vat_term(ctx, x, target, vat_eps, vat_alpha)
        total = total + vat * kl_v
        stats["vat"] = kl_v.detach()
    if info:
        cond, marg = entropy_terms(codes.y_logits)
        total = total + info * (cond - info_mu * marg)
        stats["entropy_y"], stats["entropy_mean_y"] = cond.detach(), marg.detach()
    if kl:  # negative ELBO per data dimension
        kl_term = -0.5 * torch.sum(1 + codes.logvar - codes.mu.pow(2) - codes.logvar.exp(), 1).mean()
        total = total + kl_term / x[0].numel()
        stats["kl"] = kl_term.detach()
    if head_weight:
        heads = ctx.plain["decoder"].cluster_heads
        k = heads.shape[0]
        off = ~torch.eye(k, dtype=torch.bool, device=heads.device)
        penalty = F.relu(head_distance - torch.cdist(heads, heads)[off]).sum() / max(1, k * (k - 1))
        total = total + head_weight * penalty
    return total, stats


def _vat_term(ctx: StepContext, x, target, vat_eps: float, vat_alpha: float) -> torch.Tensor:
    """KL(y(x) || y(x + r)): with vat_alpha, r's norm is per sample and batch norm keeps its statistics."""
    if not vat_alpha:
        r = adversarial_perturbation(ctx, x, target, vat_eps)
        return _kl_y(target, ctx.wrapped["encoder"](x + r, generator=ctx.generator).y_logits)
    eps = (vat_alpha * ctx.radius(x)).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    with batch_stats_frozen([ctx.plain["encoder"]]):
        r = adversarial_perturbation(ctx, x, target, eps)
        return _kl_y(target, ctx.wrapped["encoder"](x + r, generator=ctx.generator).y_logits)


def _prior_labels(ctx: StepContext, y: torch.Tensor) -> torch.Tensor:
    """A label tag conditions the prior on the label; unlabelled samples draw a random component."""
    rand = torch.randint(0, ctx.aae.num_classes, y.shape, device=y.device, generator=ctx.generator)
    return torch.where(y >= 0, y, rand)


def discriminator_loss(ctx: StepContext, x, y, *, noise: float, label_tag: bool):
    with torch.no_grad():
        fake = ctx.plain["encoder"](x, generator=ctx.generator).z
    prior = ctx.aae.prior
    if label_tag:
        real = prior.sample(len(x), ctx.generator, x.device, labels=_prior_labels(ctx, y))
        tag = ctx.aae.one_hot(y, extra=1)
        real, fake = torch.cat([real, tag], 1), torch.cat([fake, tag], 1)
    else:
        real = prior.sample(len(x), ctx.generator, x.device)
    return _discriminate(ctx, "discriminator", real, fake, noise)


def discriminator_cat_loss(ctx: StepContext, x, y, *, noise: float):
    with torch.no_grad():
        fake = ctx.plain["encoder"](x, generator=ctx.generator).y
    k = ctx.aae.num_classes
    real = F.one_hot(torch.randint(0, k, (len(x),), device=x.device, generator=ctx.generator), k).float()
    return _discriminate(ctx, "discriminator_cat", real, fake, noise)


def _discriminate(ctx, name, real, fake, noise):
    logits = ctx.wrapped[name](torch.cat([_noisy(ctx, real, noise), _noisy(ctx, fake.to(real.dtype), noise)]))
    n = len(real)
    lr, lf = logits[:n], logits[n:]
    loss = 0.5 * (_bce(lr, 1.0) + _bce(lf, 0.0))
    return loss, {"loss": loss.detach(), "acc_prior": (lr.detach() > 0).float().mean(), "acc_codes": (lf.detach() < 0).float().mean()}


def generator_loss(ctx: StepContext, x, y, *, noise: float, label_tag: bool, categorical: bool, cat_noise: float):
    codes = ctx.wrapped["encoder"](x, generator=ctx.generator)
    z = _noisy(ctx, codes.z, noise)
    if label_tag:
        z = torch.cat([z, ctx.aae.one_hot(y, extra=1)], 1)
    with frozen(ctx.plain["discriminator"]) as disc:
        loss = _bce(disc(z), 1.0)
    if categorical:
        with frozen(ctx.plain["discriminator_cat"]) as disc_cat:
            loss = loss + _bce(disc_cat(_noisy(ctx, codes.y, cat_noise)), 1.0)
    return loss, {"loss": loss.detach()}


def classification_loss(ctx: StepContext, x, y):
    """The supervised phase: the encoder's y learns the labels of a labelled minibatch."""
    xl, yl = ctx.labelled() if ctx.labelled is not None else (x, y)
    logits = ctx.wrapped["encoder"](xl, generator=ctx.generator).y_logits
    known = yl >= 0
    loss = F.cross_entropy(logits.float(), yl.clamp_min(0), reduction="none")
    loss = (loss * known).sum() / known.sum().clamp_min(1)
    acc = ((logits.argmax(1) == yl) & known).float().sum() / known.sum().clamp_min(1)
    return loss, {"loss": loss.detach(), "accuracy": acc.detach()}


def build_phases(cfg: Config) -> list[Phase]:
    p, m = cfg.phases, cfg.model
    row = variant(m.variant)
    warm = cfg.train.warmup_steps
    heads = row.decoder_input == "heads"
    recon = partial(reconstruction_loss, kl=m.regularizer == "kl", head_distance=m.cluster_head_distance,
                    head_weight=m.cluster_head_weight if heads else 0.0, consistency=p.reconstruction.consistency,
                    clean_target=p.reconstruction.consistency_target == "clean",
                    shift=p.reconstruction.consistency_shift, rotate=p.reconstruction.consistency_rotate,
                    scale=p.reconstruction.consistency_scale, vat=p.reconstruction.vat, vat_eps=p.reconstruction.vat_eps,
                    vat_alpha=p.reconstruction.vat_alpha, info=p.reconstruction.info, info_mu=p.reconstruction.info_mu)
    phases = [Phase("reconstruction", ("encoder", "decoder"), recon, p.reconstruction,
                    stat_names=("loss", "kl", "consistency", "vat", "entropy_y", "entropy_mean_y"))]
    if m.regularizer == "kl":
        return phases
    disc_stats = ("loss", "acc_prior", "acc_codes")
    if row.categorical:
        phases.append(Phase("discriminator_cat", ("discriminator_cat",), partial(discriminator_cat_loss, noise=p.discriminator_cat.input_noise),
                            p.discriminator_cat, repeat=p.discriminator_cat.repeat, start_step=warm, stat_names=disc_stats))
    gen = partial(generator_loss, noise=p.discriminator.input_noise, label_tag=row.label_tag, categorical=row.categorical,
                  cat_noise=p.discriminator_cat.input_noise)
    phases += [
        Phase("discriminator", ("discriminator",), partial(discriminator_loss, noise=p.discriminator.input_noise, label_tag=row.label_tag),
              p.discriminator, repeat=p.discriminator.repeat, start_step=warm, stat_names=disc_stats),
        Phase("generator", ("encoder",), gen, p.generator, start_step=warm, stat_names=("loss",)),
    ]
    if row.has_classification_phase(cfg.data.labeled_per_class):
        phases.append(Phase("classification", ("encoder",), classification_loss, p.classification, stat_names=("loss", "accuracy")))
    return phases


def optimizer_kernels(device: torch.device, fused: bool) -> dict:
    """fused: one kernel per phase for all its parameters (Adam's for-loop spends ~40% of a CPU step in
    small per-parameter kernels), where torch has fused kernels for the device; else foreach off the CPU."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if fused and device.type in _get_fused_kernels_supported_devices():
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": True if device.type != "cpu" else None}


def make_optimizer(phase: Phase, plain: dict[str, nn.Module], total_steps: int, steps_per_epoch: int, fused: bool = True) -> None:
    """Adam or SGD with momentum over the phase's networks (fused kernels where offered), plus its learning-rate
    schedule (counted in the phase's own updates, which match steps for phases that run every step)."""
    c = phase.cfg
    params = [prm for n in phase.networks for prm in plain[n].parameters()]
    kw = optimizer_kernels(params[0].device, fused) if params else {}
    if c.optimizer == "sgd":
        phase.optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, **kw)
    else:
        phase.optimizer = torch.optim.Adam(params, lr=c.lr, betas=(c.beta1, c.beta2), **kw)
    phase.kernels = kw
    if c.schedule == "cosine":
        shape = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(1, total_steps)))  # noqa: E731
    elif c.schedule == "step":
        shape = lambda s: c.decay ** (s // c.decay_every)  # noqa: E731
    else:
        shape = lambda s: 1.0  # noqa: E731
    edges = [e * steps_per_epoch for e in c.decay_epochs]
    phase.scheduler = torch.optim.lr_scheduler.LambdaLR(phase.optimizer, lambda s: shape(s) * c.decay ** sum(s >= e for e in edges))


class PhaseStates:
    """The optimizers (or schedulers) of all phases as one stateful checkpoint part."""

    def __init__(self, phases: list[Phase], attr: str):
        self.phases, self.attr = phases, attr

    def state_dict(self) -> dict:
        return {ph.name: getattr(ph, self.attr).state_dict() for ph in self.phases}

    def load_state_dict(self, state: dict) -> None:
        for ph in self.phases:
            getattr(ph, self.attr).load_state_dict(state[ph.name])
            if self.attr == "optimizer":
                _keep_kernels(ph)


def _keep_kernels(ph: Phase) -> None:
    """load_state_dict copies the saved param_groups' kernel flags: a checkpoint of the per-parameter loop
    would turn a fused optimizer back into a loop (and the other way).  The config decides, and the step
    counts move to where that kernel reads them (the parameter's device for fused, the CPU otherwise)."""
    opt, kw = ph.optimizer, ph.kernels
    for group in opt.param_groups:
        group.update(kw)
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                opt.state[p]["step"] = step.to(device=p.device if kw.get("fused") else "cpu", dtype=torch.float32)
