"""A training step is an explicit list of phases, each with its networks, loss, optimizer and interval.

Gradients reach only the phase's own networks: the networks it merely reads run as their
plain (un-wrapped) modules with gradients off, so DDP never all-reduces or keeps stale
gradients for them.  `build_phases` reads the variant's and the regularizer's rows once and composes
each phase from the loss terms registered for it (aae_dist/training/terms.py); the skip and stop
policies a phase's settings ask for are attached to that phase."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, PhaseConfig, PhasesConfig
from ..models import AAE
from ..variants import regularizer, variant
from .terms import Batch, Settings, Term, check_named_terms, term, terms_of


@dataclass
class StepContext:
    """What a phase's loss sees: wrapped networks to train, plain ones to read, the model, randomness."""

    wrapped: dict[str, nn.Module]
    aae: AAE
    generator: torch.Generator
    labelled: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None  # a labelled minibatch (few-label runs)
    radius: Callable[[torch.Tensor], torch.Tensor] | None = None  # adaptive VAT: each sample's k-th neighbour distance
    neighbour: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None  # one of each sample's nearest training samples
    shared_codes: dict | None = None  # id(x) -> the encoder's codes of x with their graph, while the trainer allows (codes_of)

    @property
    def plain(self) -> dict[str, nn.Module]:
        return self.aae.nets


@dataclass
class Phase:
    """A phase: the networks it trains, its terms (summed into one loss), its section, its policies."""

    name: str
    networks: tuple[str, ...]  # networks this phase trains
    terms: list[tuple[Term, float | None]]  # (term, weight; None: unweighted), in the order they add up
    cfg: PhaseConfig
    settings: Settings
    repeat: int = 1
    start_step: int = 0  # e.g. adversarial phases wait for the warm-up
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    kernels: dict = field(default_factory=dict)  # the optimizer's fused/foreach flags (make_optimizer)
    skip_policy: object | None = None  # .skip(name, means, skipping) -> bool (the coordinator's decide)
    stop_policy: object | None = None  # .stop(name, means) -> reason or None

    def runs_at(self, step: int) -> bool:
        return step >= self.start_step and step % self.cfg.every == 0

    @property
    def stat_names(self) -> tuple[str, ...]:
        """What its terms declared they report."""
        return tuple(dict.fromkeys(s for t, _ in self.terms for s in t.stats))

    def loss(self, ctx: "StepContext", x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The sum of the weighted terms, and every statistic they reported."""
        b, total, stats = Batch(ctx, x, y), None, {}
        for t, weight in self.terms:
            value, reported = t.fn(ctx, b, self.settings)
            stats.update(reported)
            part = value if weight is None else weight * value
            total = part if total is None else total + part
        return total, stats


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


def codes_of(ctx: StepContext, x: torch.Tensor, grad: bool):
    """The encoder's codes of x, read (grad=False: use them detached) or trained through (grad=True).

    The discriminators read the codes of the very batch, under the very weights, the generator then trains
    through: where the trainer allows it (ctx.shared_codes is a dict: a repeatable encoder, the generator
    runs later in this step, no update of the encoder in between) the first phase to ask runs the wrapped
    encoder once, with its graph, and the generator's backward goes through that graph: one encoder
    forward fewer per step, the same values bit for bit."""
    cache = ctx.shared_codes
    if cache is None:
        if grad:
            return ctx.wrapped["encoder"](x, generator=ctx.generator)
        with torch.no_grad():
            return ctx.plain["encoder"](x, generator=ctx.generator)
    codes = cache.get(id(x))
    if codes is None:
        codes = cache[id(x)] = ctx.wrapped["encoder"](x, generator=ctx.generator)
    return codes


def _bce(logits: torch.Tensor, value: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full(logits.shape, value, device=logits.device))


def _noisy(ctx: StepContext, z: torch.Tensor, std: float) -> torch.Tensor:
    return z + std * torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=ctx.generator) if std else z


def translated(x: torch.Tensor, shift: int, generator: torch.Generator, rotate: float = 0.0, scale: float = 0.0,
               shear: float = 0.0, thickness: float = 0.0) -> torch.Tensor:
    """Each image (N, C, H, W) moved by its own whole-pixel offset in [-shift, shift] on each axis, zeros shifted in;
    with rotate (degrees) / scale (fraction) / shear (degrees) also turned, zoomed and slanted by its own uniform
    draw, bilinear; with thickness (0-1) its strokes thickened or thinned by up to that fraction of a 3x3 dilation
    or erosion.  Draws for an option are made only when it is on, so adding one leaves the others' draws alone."""
    n, _, h, w = x.shape
    offsets = torch.randint(-shift, shift + 1, (n, 2), device=x.device, generator=generator).to(x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if rotate or scale:
        u = torch.rand(n, 2, device=x.device, generator=generator).to(x.dtype) * 2 - 1
        angle, zoom = u[:, 0] * math.radians(rotate), 1.0 + u[:, 1] * scale
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    if shear:  # x' = x + k y: the linear part times [[1, k], [0, 1]]
        k = (torch.rand(n, device=x.device, generator=generator).to(x.dtype) * 2 - 1) * math.tan(math.radians(shear))
        theta[:, 0, 1] = theta[:, 0, 0] * k + theta[:, 0, 1]
        theta[:, 1, 1] = theta[:, 1, 0] * k + theta[:, 1, 1]
    theta[:, 0, 2], theta[:, 1, 2] = offsets[:, 0] * 2 / w, offsets[:, 1] * 2 / h  # grid units: 2 / size per pixel
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    mode = "bilinear" if rotate or scale or shear else "nearest"
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    if thickness:
        t = ((torch.rand(n, device=x.device, generator=generator) * 2 - 1) * thickness).to(x.dtype).view(n, 1, 1, 1)
        thick, thin = _max3x3(out), -_max3x3(-out)
        out = out + t.clamp_min(0) * (thick - out) + (-t).clamp_min(0) * (thin - out)
    return out


def _max3x3(x: torch.Tensor) -> torch.Tensor:
    """max_pool2d(x, 3, stride=1, padding=1), as the maximum of shifted views: the same values, ~20x faster on a CPU."""
    p = F.pad(x, (1, 1, 1, 1), value=float("-inf"))
    rows = torch.maximum(torch.maximum(p[..., :, :-2], p[..., :, 1:-1]), p[..., :, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def _per_sample_unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def _kl_y(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(logits.float(), 1), target, reduction="batchmean")


def _per_head(values) -> torch.Tensor:
    """The sum over y heads (model.cluster_heads), added in head order: one head is its own value exactly."""
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def _kl_heads(targets, codes) -> torch.Tensor:
    """Each head's y of x learns its own target y (a tensor: the one head), summed over heads."""
    targets = (targets,) if torch.is_tensor(targets) else targets
    return _per_head([_kl_y(t, logits) for t, logits in zip(targets, codes.heads)])


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), 1).to(logits.dtype)


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
    perturbation of norm eps that moves y(x) most (every head's y together), found on the plain encoder with its
    parameters frozen (no gradient reaches them, and DDP sees no extra backward).  eps: a number, or
    one radius per sample shaped (N, 1, ...); target: y(x), or one per head."""
    d = eps * _per_sample_unit(torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=ctx.generator))
    d.requires_grad_(True)
    with torch.enable_grad(), frozen(ctx.plain["encoder"]) as enc:
        (grad,) = torch.autograd.grad(_kl_heads(target, enc(x + d, generator=ctx.generator)), d)
    return eps * _per_sample_unit(grad.detach())


# ---- the built-in loss terms (registered once; build_phases composes them) -------------------------

def _codes(b: Batch):
    """The encoder's reading of x, shared by the terms of a reconstruction step."""
    return b.once("codes", lambda: b.ctx.wrapped["encoder"](b.x, generator=b.ctx.generator))


def _target(b: Batch, s: Settings):
    """The consistency and vat terms' target y(x), one per head: the reconstruction's own noisy reading, or a clean one."""
    def make():
        ctx = b.ctx
        if s.phase.consistency_target == "clean":
            with torch.no_grad():
                heads = ctx.plain["encoder"](b.x, generator=ctx.generator, corrupt=False).heads
                return tuple(torch.softmax(h.float(), 1) for h in heads)
        return tuple(torch.softmax(h.detach().float(), 1) for h in _codes(b).heads)

    return b.once("target", make)


@term("reconstruction", stats=("loss",))
def reconstruction(ctx: StepContext, b: Batch, s: Settings):
    """The reconstruction error of x."""
    codes = _codes(b)
    loss = ctx.aae.reconstruction_error(ctx.wrapped["decoder"](codes.z, ctx.aae.decoder_y(codes, b.y)), b.x)
    return loss, {"loss": loss.detach()}


@term("reconstruction", weight="consistency", stats=("consistency",))
def consistency(ctx: StepContext, b: Batch, s: Settings):
    """The y of a moved copy of x learns the y of x (cluster membership should not move with the digit)."""
    target, c = _target(b, s), s.phase
    moved = ctx.wrapped["encoder"](translated(b.x, c.consistency_shift, ctx.generator, c.consistency_rotate, c.consistency_scale,
                                              c.consistency_shear, c.consistency_thickness),
                                   generator=ctx.generator)
    if c.consistency_threshold:
        value = _per_head([_pseudo_label_loss(t, logits, c.consistency_threshold) for t, logits in zip(target, moved.heads)])
    else:
        value = _kl_heads(target, moved)
    return value, {"consistency": value.detach()}


def _pseudo_label_loss(target: torch.Tensor, logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """FixMatch's unlabelled loss: the cross-entropy of the moved copy's y against the target's most likely
    class, where the target is at least `threshold` confident; divided by the whole batch (as FixMatch), so
    the term grows as y grows confident instead of weighing a few early pseudo-labels as much as a full batch."""
    confidence, label = target.max(1)
    keep = (confidence >= threshold).to(torch.float32)
    return (F.cross_entropy(logits.float(), label, reduction="none") * keep).sum() / len(target)


@term("reconstruction", weight="vat", stats=("vat",))
def vat(ctx: StepContext, b: Batch, s: Settings):
    """So does the y of x + the small perturbation that would move it most (vat_alpha: per-sample radii)."""
    kl_v = _vat_term(ctx, b.x, _target(b, s), s.phase.vat_eps, s.phase.vat_alpha)
    return kl_v, {"vat": kl_v.detach()}


@term("reconstruction", weight="neighbours", stats=("neighbours",))
def neighbours(ctx: StepContext, b: Batch, s: Settings):
    """The y of one of x's nearest training samples learns the y of x (SCAN): nearby samples share a cluster, which
    links the digits the moves and VAT's small perturbations cannot reach from one another."""
    c, n = s.phase, ctx.neighbour(b.x, ctx.generator)
    if c.neighbours_moved:
        n = translated(n, c.consistency_shift, ctx.generator, c.consistency_rotate, c.consistency_scale, c.consistency_shear,
                       c.consistency_thickness)
    kl_n = _kl_heads(_target(b, s), ctx.wrapped["encoder"](n, generator=ctx.generator))
    return kl_n, {"neighbours": kl_n.detach()}


@term("reconstruction", weight="info", stats=("entropy_y", "entropy_mean_y"))
def info(ctx: StepContext, b: Batch, s: Settings):
    """IMSAT's information term on y: H(y|x) - info_mu x H(mean y), summed over heads (stats: their mean)."""
    pairs = [entropy_terms(h) for h in _codes(b).heads]
    value = _per_head([cond - s.phase.info_mu * marg for cond, marg in pairs])
    cond, marg = (_per_head([p[i].detach() for p in pairs]) / len(pairs) for i in (0, 1))
    return value, {"entropy_y": cond, "entropy_mean_y": marg}


@term("reconstruction", stats=("kl",), when=lambda s: "kl" in s.regularizer.terms)
def kl(ctx: StepContext, b: Batch, s: Settings):
    """The VAE baseline's KL term: with the reconstruction error, the negative ELBO per data dimension."""
    codes = _codes(b)
    kl_term = -0.5 * torch.sum(1 + codes.logvar - codes.mu.pow(2) - codes.logvar.exp(), 1).mean()
    return kl_term / b.x[0].numel(), {"kl": kl_term.detach()}


@term("reconstruction", weight=lambda s: s.model.cluster_head_weight, when=lambda s: s.row.decoder_input == "heads")
def cluster_heads(ctx: StepContext, b: Batch, s: Settings):
    """Dimensionality reduction: cluster heads closer than model.cluster_head_distance are pushed apart."""
    heads = ctx.plain["decoder"].cluster_heads
    k = heads.shape[0]
    off = ~torch.eye(k, dtype=torch.bool, device=heads.device)
    return F.relu(s.model.cluster_head_distance - torch.cdist(heads, heads)[off]).sum() / max(1, k * (k - 1)), {}


def _vat_term(ctx: StepContext, x, target, vat_eps: float, vat_alpha: float) -> torch.Tensor:
    """KL(y(x) || y(x + r)): with vat_alpha, r's norm is per sample and batch norm keeps its statistics."""
    if not vat_alpha:
        r = adversarial_perturbation(ctx, x, target, vat_eps)
        return _kl_heads(target, ctx.wrapped["encoder"](x + r, generator=ctx.generator))
    eps = (vat_alpha * ctx.radius(x)).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    with batch_stats_frozen([ctx.plain["encoder"]]):
        r = adversarial_perturbation(ctx, x, target, eps)
        return _kl_heads(target, ctx.wrapped["encoder"](x + r, generator=ctx.generator))


def _prior_labels(ctx: StepContext, y: torch.Tensor) -> torch.Tensor:
    """A label tag conditions the prior on the label; unlabelled samples draw a random component."""
    rand = torch.randint(0, ctx.aae.num_classes, y.shape, device=y.device, generator=ctx.generator)
    return torch.where(y >= 0, y, rand)


DISCRIMINATOR_STATS = ("loss", "acc_prior", "acc_codes")


@term("discriminator", stats=DISCRIMINATOR_STATS)
def discriminator(ctx: StepContext, b: Batch, s: Settings):
    """D tells prior samples from codes (with a label tag, both joined with the one-hot label)."""
    x, y = b.x, b.y
    fake = codes_of(ctx, x, grad=False).z.detach()
    prior = ctx.aae.prior
    if s.row.label_tag:
        real = prior.sample(len(x), ctx.generator, x.device, labels=_prior_labels(ctx, y))
        tag = ctx.aae.one_hot(y, extra=1)
        real, fake = torch.cat([real, tag], 1), torch.cat([fake, tag], 1)
    else:
        real = prior.sample(len(x), ctx.generator, x.device)
    return _discriminate(ctx, "discriminator", real, fake, s.phase.input_noise)


@term("discriminator_cat", stats=DISCRIMINATOR_STATS)
def discriminator_cat(ctx: StepContext, b: Batch, s: Settings):
    """D on the categorical y: one-hot draws against the encoder's softmax (every head's, one D for all)."""
    x = b.x
    heads = [h.detach() for h in codes_of(ctx, x, grad=False).heads]
    fake = _softmax(heads[0]) if len(heads) == 1 else torch.cat([_softmax(h) for h in heads])
    k = ctx.aae.num_classes
    real = F.one_hot(torch.randint(0, k, (len(fake),), device=x.device, generator=ctx.generator), k).float()
    return _discriminate(ctx, "discriminator_cat", real, fake, s.phase.input_noise)


def _discriminate(ctx, name, real, fake, noise):
    logits = ctx.wrapped[name](torch.cat([_noisy(ctx, real, noise), _noisy(ctx, fake.to(real.dtype), noise)]))
    n = len(real)
    lr, lf = logits[:n], logits[n:]
    loss = 0.5 * (_bce(lr, 1.0) + _bce(lf, 0.0))
    return loss, {"loss": loss.detach(), "acc_prior": (lr.detach() > 0).float().mean(), "acc_codes": (lf.detach() < 0).float().mean()}


@term("generator", stats=("loss",))
def generator(ctx: StepContext, b: Batch, s: Settings):
    """The encoder learns to fool every D of the variant (their input noise applies here too)."""
    codes = codes_of(ctx, b.x, grad=True)
    z = _noisy(ctx, codes.z, s.phases.discriminator.input_noise)
    if s.row.label_tag:
        z = torch.cat([z, ctx.aae.one_hot(b.y, extra=1)], 1)
    with frozen(ctx.plain["discriminator"]) as disc:
        loss = _bce(disc(z), 1.0)
    weight = s.phases.generator.categorical
    if s.row.categorical and weight:
        with frozen(ctx.plain["discriminator_cat"]) as disc_cat:
            for head in codes.heads:  # each head fools the categorical D on its own
                fool = _bce(disc_cat(_noisy(ctx, _softmax(head), s.phases.discriminator_cat.input_noise)), 1.0)
                loss = loss + (fool if weight == 1.0 else weight * fool)
    return loss, {"loss": loss.detach()}


@term("classification", stats=("loss", "accuracy"))
def classification(ctx: StepContext, b: Batch, s: Settings):
    """The supervised phase: the encoder's y (every head's, summed) learns the labels of a labelled minibatch."""
    xl, yl = ctx.labelled() if ctx.labelled is not None else (b.x, b.y)
    c = s.phase
    if c.moves:  # the labelled images moved a little: 100 labels are memorised less
        xl = translated(xl, c.shift, ctx.generator, c.rotate, c.scale)
    heads = ctx.wrapped["encoder"](xl, generator=ctx.generator).heads
    known = yl >= 0
    loss = _per_head([(F.cross_entropy(h.float(), yl.clamp_min(0), reduction="none") * known).sum() / known.sum().clamp_min(1)
                      for h in heads])
    logits = heads[0]
    acc = ((logits.argmax(1) == yl) & known).float().sum() / known.sum().clamp_min(1)
    return loss, {"loss": loss.detach(), "accuracy": acc.detach()}


# ---- the phase list -------------------------------------------------------------------------

PHASES: dict[str, tuple[tuple[str, ...], bool]] = {  # name -> (networks it trains, waits for train.warmup_steps)
    "reconstruction": (("encoder", "decoder"), False),
    "discriminator_cat": (("discriminator_cat",), True),
    "discriminator": (("discriminator",), True),
    "generator": (("encoder",), True),
    "classification": (("encoder",), False),
}


def phase_names(row, reg, labeled_per_class: int | None, categorical_adversary: bool = True) -> list[str]:
    """Reconstruction, the regularizer's phases (discriminator_cat where y is categorical and its adversary is on), classification."""
    names = ["reconstruction"] + [p for p in reg.phases if p != "discriminator_cat" or (row.categorical and categorical_adversary)]
    if reg.phases and row.has_classification_phase(labeled_per_class):  # the VAE baseline trains reconstruction only
        names.append("classification")
    return names


def build_phases(phases: PhasesConfig, model: ModelConfig, warmup_steps: int = 0, labeled_per_class: int | None = None,
                 target_recon_loss: float | None = None) -> list[Phase]:
    """The phases of this (variant, regularizer), each with its active terms and the policies its settings ask for."""
    row, reg = variant(model.variant), regularizer(model.regularizer)
    out = []
    for name in phase_names(row, reg, labeled_per_class, phases.generator.categorical > 0):
        section = getattr(phases, name)
        check_named_terms(name, section)
        settings = Settings(section, model, row, reg, phases)
        nets, waits = PHASES[name]
        ph = Phase(name, nets, terms_of(name, settings), section, settings, repeat=getattr(section, "repeat", 1),
                   start_step=warmup_steps if waits else 0)
        if getattr(section, "skip_above_accuracy", None) is not None:
            ph.skip_policy = SkipAboveAccuracy(section.skip_above_accuracy)
        if name == "reconstruction" and target_recon_loss is not None:
            ph.stop_policy = StopBelow("loss", target_recon_loss, "train.target_recon_loss")
        out.append(ph)
    return out


@dataclass(frozen=True)
class SkipAboveAccuracy:
    """phases.<D>.skip_above_accuracy: skip that D while its global accuracy is above the threshold; after an
    interval with no statistics of it (it was skipped) let it run again to be measured."""

    threshold: float

    def skip(self, name: str, means: dict[str, float], skipping: bool) -> bool:
        if f"{name}/acc_prior" in means:
            return 0.5 * (means[f"{name}/acc_prior"] + means[f"{name}/acc_codes"]) > self.threshold
        return False  # skipped all interval (or never measured): run to be measured


@dataclass(frozen=True)
class StopBelow:
    """Stop every rank once the phase's reduced statistic is below a target (train.target_recon_loss)."""

    stat: str
    target: float
    key: str

    def stop(self, name: str, means: dict[str, float]) -> str | None:
        value = means.get(f"{name}/{self.stat}", float("inf"))
        return f"{name} {self.stat} {value:.4f} reached {self.key}={self.target}" if value < self.target else None


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
