"""Encoder q(z|x), decoder p(x|z), discriminator D(z): MLP (the paper's) and convolutional families.

Every parameter of a module takes part in every phase that uses the module (one head
Linear for mu and log-sigma), so DDP never sees a partly-used module."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserError
from ..variants import discriminators, regularizer, variant


@dataclass
class Codes:
    z: torch.Tensor  # style / code
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    y_logits: torch.Tensor | None = None  # categorical head (semi-supervised, clustering, dim. reduction)
    extra_heads: tuple[torch.Tensor, ...] = ()  # model.cluster_heads > 1: the other heads' y logits

    @property
    def heads(self) -> tuple[torch.Tensor, ...]:
        """Every y head's logits, the first (the one the decoder reads) first."""
        return () if self.y_logits is None else (self.y_logits, *self.extra_heads)

    @property
    def y(self) -> torch.Tensor | None:
        return None if self.y_logits is None else torch.softmax(self.y_logits.float(), 1).to(self.y_logits.dtype)


def mlp(sizes: list[int], final_activation: bool = False, batch_norm: bool = False) -> nn.Sequential:
    """Linear layers with ReLU between them; batch_norm: BatchNorm1d after every hidden Linear."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ConvTrunk(nn.Module):
    """Strided 4x4 convolutions halving the image each time, then flatten."""

    def __init__(self, channels: int, widths: list[int], height: int, width: int):
        super().__init__()
        layers, c = [], channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
            c = w
        self.net = nn.Sequential(*layers, nn.Flatten())
        f = 2 ** len(widths)
        self.out_features = c * (height // f) * (width // f)

    def forward(self, x):
        return self.net(x)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        self.posterior = cfg.posterior
        self.num_y = num_classes if variant(cfg.variant).categorical else 0
        self.latent_dim = cfg.latent_dim
        self.noise_dim = cfg.noise_dim if cfg.posterior == "universal" else 0
        self.code_width = cfg.latent_dim * (2 if cfg.posterior == "gaussian" else 1)
        self.num_heads = cfg.cluster_heads if self.num_y else 1
        # the extra heads' logits come last, so one head keeps today's layout (and checkpoints)
        width = self.num_y + self.code_width + (self.num_heads - 1) * self.num_y
        self.input_noise, self.input_dropout = cfg.input_noise, cfg.input_dropout
        self.own = bool(cfg.encoder.class_path)
        self.head_norm = nn.BatchNorm1d(width) if cfg.batch_norm else nn.Identity()
        if cfg.encoder.class_path:  # the user's network maps x straight to the head's outputs
            if self.noise_dim:
                raise UserError("model.posterior=universal feeds noise inside the built-in encoder, not into model.encoder.class_path: "
                                "use model.posterior=deterministic or gaussian with your own encoder")
            self.trunk = build_own(cfg.encoder, "encoder", {"in_shape": tuple(shape), "out_features": width}, (2, *shape), [(2, width)])
            self.body, self.head = nn.Identity(), nn.Identity()
            return
        if cfg.kind == "conv":
            self.trunk = ConvTrunk(shape[0], cfg.conv_channels, shape[1], shape[2])
            feat = self.trunk.out_features
        else:
            self.trunk = nn.Flatten()
            feat = int(math.prod(shape))
        hidden = cfg.encoder_hidden or cfg.hidden
        self.body = mlp([feat + self.noise_dim] + list(hidden), final_activation=True, batch_norm=cfg.batch_norm)
        # one head for y, z (and log-variance): every phase that uses the encoder uses all its parameters
        self.head = nn.Linear(hidden[-1], width)
        # batch norm on the y and z outputs (the paper's clustering encoder): it keeps the y logits large enough for a sharp softmax

    @property
    def repeatable(self) -> bool:
        """Two training-mode forwards of the same x with the same weights give the same codes and change nothing:
        no random draw (noise, dropout, a sampled posterior) and no batch-norm running statistics to update.
        A user's own network is not assumed to be."""
        stateful = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
        return (not self.own and self.posterior == "deterministic" and not self.input_noise
                and not self.input_dropout and not any(isinstance(m, stateful) for m in self.modules()))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None, corrupt: bool = True) -> Codes:
        if self.training and corrupt:  # input noise and dropout, training only, drawn from the step's generator (exact resume)
            if self.input_noise:
                x = x + self.input_noise * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
            if self.input_dropout:
                keep = torch.rand(x.shape, device=x.device, generator=generator) >= self.input_dropout
                x = x * keep / (1.0 - self.input_dropout)
        h = self.trunk(x)
        if self.noise_dim:
            h = torch.cat([h, torch.randn(h.shape[0], self.noise_dim, device=h.device, dtype=h.dtype, generator=generator)], 1)
        out = self.head_norm(self.head(self.body(h)))
        y_logits, extra, out = self.split(out)
        if self.posterior != "gaussian":
            return Codes(z=out, y_logits=y_logits, extra_heads=extra)
        mu, logvar = out.chunk(2, dim=1)
        eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
        return Codes(z=mu + torch.exp(0.5 * logvar) * eps, mu=mu, logvar=logvar, y_logits=y_logits, extra_heads=extra)

    def split(self, out: torch.Tensor):
        """The head's output as (first y logits, the other heads' y logits, z part)."""
        if not self.num_y:
            return None, (), out
        k, end = self.num_y, self.num_y + self.code_width
        extra = tuple(out[:, end + i * k : end + (i + 1) * k] for i in range(self.num_heads - 1))
        return out[:, :k], extra, out[:, k:end]


class Decoder(nn.Module):
    """p(x | z[, y]): logits (bernoulli output) or means (gaussian output) shaped like the data.

    What it reads is the variant's `decoder_input`: z; z joined with a one-hot label or the
    softmax y; or y @ cluster_heads + z (the heads live here so the reconstruction phase, which
    trains them, uses every decoder parameter)."""

    def __init__(self, cfg: ModelConfig, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        self.shape = tuple(shape)
        reads = variant(cfg.variant).decoder_input
        self.joins_y = reads in ("z+label", "z+y")
        self.cluster_heads = nn.Parameter(torch.randn(num_classes, cfg.latent_dim) * 1.0) if reads == "heads" else None
        in_dim = cfg.latent_dim + (num_classes if self.joins_y else 0)
        hidden = cfg.decoder_hidden or cfg.hidden
        if cfg.decoder.class_path:
            self.up = None
            self.body = build_own(cfg.decoder, "decoder", {"in_features": in_dim, "out_shape": self.shape}, (2, in_dim), [(2, *self.shape)])
        elif cfg.kind == "conv":
            f = 2 ** len(cfg.conv_channels)
            self.base = (cfg.conv_channels[-1], shape[1] // f, shape[2] // f)
            layers: list[nn.Module] = []
            widths = list(reversed(cfg.conv_channels))
            for a, b in zip(widths, widths[1:] + [shape[0]]):
                layers += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ReLU(inplace=True)]
            self.up = nn.Sequential(*layers[:-1])
            self.body = mlp([in_dim] + list(hidden) + [int(math.prod(self.base))], final_activation=True)
        else:
            self.up = None
            self.body = mlp([in_dim] + list(hidden) + [int(math.prod(shape))])

    def represent(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """What the decoder reads: the code, joined with y as the variant wants."""
        if self.cluster_heads is not None:
            return y @ self.cluster_heads + z
        if y is not None and self.joins_y:
            return torch.cat([z, y.to(z.dtype)], 1)
        return z

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(self.represent(z, y))
        if self.up is None:
            return h.view(-1, *self.shape)
        return self.up(h.view(-1, *self.base))


class Discriminator(nn.Module):
    def __init__(self, cfg: ModelConfig, in_dim: int):
        super().__init__()
        if cfg.discriminator.class_path:
            self.net = build_own(cfg.discriminator, "discriminator", {"in_features": in_dim}, (2, in_dim), [(2, 1), (2,)])
        else:
            self.net = mlp([in_dim] + list(cfg.disc_hidden) + [1])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.net(z)
        return out.squeeze(1) if out.dim() == 2 else out


def build_networks(cfg: ModelConfig, shape: tuple[int, ...], num_classes: int = 0) -> dict[str, nn.Module]:
    if cfg.kind == "conv":
        if len(shape) != 3:
            raise UserError(f"model.kind=conv needs image samples (C, H, W), the dataset has shape {tuple(shape)}: use model.kind=mlp")
        f = 2 ** len(cfg.conv_channels)
        if shape[1] % f or shape[2] % f:
            raise UserError(f"model.kind=conv with {len(cfg.conv_channels)} layers needs H and W divisible by {f}, data is {shape[1]}x{shape[2]}: change model.conv_channels")
    row = variant(cfg.variant)
    if cfg.cluster_heads > 1 and not row.categorical:
        raise UserError(f"model.cluster_heads={cfg.cluster_heads} needs a categorical y (model.variant=clustering, semi_supervised or "
                        f"dim_reduction), model.variant={cfg.variant} has none: set model.cluster_heads=1")
    if row.needs_classes and num_classes < 2:
        raise UserError(f"model.variant={cfg.variant} needs classes: set model.num_classes or use a labelled dataset")
    nets = {
        "encoder": Encoder(cfg, shape, num_classes),
        "decoder": Decoder(cfg, shape, num_classes),
    }
    reg = regularizer(cfg.regularizer)
    if reg.posterior and cfg.posterior != reg.posterior:
        raise UserError(f"model.regularizer={reg.name} needs model.posterior={reg.posterior}: set it, or use another regularizer")
    # a label tag: D also sees the one-hot label plus an 'unlabelled' class
    inputs = {"discriminator": cfg.latent_dim + (num_classes + 1 if row.label_tag else 0), "discriminator_cat": num_classes}
    wanted = discriminators(row, reg)
    for name in sorted(wanted):  # discriminator before discriminator_cat: the order their initial weights are drawn in
        nets[name] = Discriminator(cfg, inputs[name])
    if cfg.init_std:
        for net in nets.values():
            init_weights(net, cfg.init_std)
    return nets


def init_weights(net: nn.Module, std: float) -> None:
    """Weights N(0, std^2), biases 0 (the paper's and several reproductions' small-scale initialisation)."""
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)


# ---- a user's own networks (model.encoder / decoder / discriminator: {class_path, init_args}) ----------------

def own_class(path: str, key: str) -> type:
    """The class a config names, imported; anything else is one line naming the key."""
    import importlib

    where = f"model.{key}.class_path {path!r}"
    module, _, name = path.rpartition(".")
    if not module or not name:
        raise UserError(f"{where}: expected a dotted path pkg.module.Class")
    try:
        found = getattr(importlib.import_module(module), name, None)
    except Exception as exc:  # noqa: BLE001 - an import error of any kind is the user's to fix
        raise UserError(f"{where}: cannot import {module} ({type(exc).__name__}: {exc}): install it, put it on PYTHONPATH, or ship it "
                        "with aae-dist submit --py-modules PATH") from None
    if found is None:
        raise UserError(f"{where}: module {module} has no {name}: check the class name")
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise UserError(f"{where} is not a torch.nn.Module subclass: name a network class")
    return found


def build_own(spec, key: str, shapes: dict, dummy: tuple, expected: list[tuple]) -> nn.Module:
    """The user's network, given the shapes its constructor declares (in_shape, in_features, out_shape,
    out_features) unless init_args sets them, and checked on a dummy batch against the variant's contract:
    a mismatch is found here, at pre-flight, not deep in a worker."""
    import inspect

    cls = own_class(spec.class_path, key)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    kwargs = {k: v for k, v in shapes.items() if k in params and k not in spec.init_args}
    name = f"model.{key} ({spec.class_path})"
    try:
        net = cls(**kwargs, **spec.init_args)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{name} cannot be built with init_args {spec.init_args} (+ {sorted(kwargs)} from aae-dist): "
                        f"{type(exc).__name__}: {exc}") from None
    check_own(net, name, dummy, expected)
    return net


def check_own(net: nn.Module, name: str, dummy: tuple, expected: list[tuple]) -> None:
    """One forward of zeros in eval mode (no batch-norm statistics move; lazy layers take their size)."""
    shown = " or ".join(str(e) for e in expected)
    mode = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(dummy))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{name} fails on a dummy batch of shape {dummy} (expected output {shown}): {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]}") from None
    finally:
        net.train(mode)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got not in expected:
        raise UserError(f"{name} gives shape {got} for a dummy batch of shape {dummy}; expected {shown}: fix its init_args or its forward")
