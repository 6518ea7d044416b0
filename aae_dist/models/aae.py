"""One AAE: its networks, prior, output likelihood and pixel scaling, with the operations that
training, evaluation and inference share (normalise, encode, decode, reconstruction error, sample)."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, PriorConfig
from ..variants import variant
from .deskew import deskewed
from .networks import Codes, build_networks
from .priors import build_prior


def output_likelihood(setting: str, dtype: str) -> str:
    """auto: Bernoulli (sigmoid + BCE) for uint8 pixels, Gaussian (MSE) for anything else."""
    if setting != "auto":
        return setting
    return "bernoulli" if dtype == "uint8" else "gaussian"


class AAE:
    def __init__(self, model: ModelConfig, prior: PriorConfig, shape: tuple[int, ...], dtype: str, num_classes: int, table: dict | None = None,
                 scaling: dict | None = None):
        self.cfg, self.variant = model, variant(model.variant)
        self.shape, self.dtype, self.num_classes = tuple(shape), dtype, num_classes
        self.output = output_likelihood(model.output, dtype)
        self.rows = None  # a table's per-column heads (models/rows.py): they replace the pixel likelihood
        if table is not None:
            from .rows import RowLayout

            self.rows, self.output = RowLayout(table), "rows"
        self.offset, self.divide, self.scale = input_scaling(scaling, dtype, self.shape)
        self.nets: dict[str, nn.Module] = build_networks(model, self.shape, num_classes)
        if self.rows is not None and not model.decoder.class_path:
            start_at_marginals(self.nets["decoder"], self.rows.output_bias())
        self.prior = build_prior(prior, model.latent_dim)
        self.device = torch.device("cpu")

    @classmethod
    def from_config(cls, model: ModelConfig, prior: PriorConfig, manifest) -> "AAE":
        """The AAE for a dataset: its sample shape, dtype and table come from the manifest, K from
        model.num_classes or the manifest's classes."""
        return cls(model, prior, tuple(manifest.shape), manifest.dtype, model.num_classes or manifest.num_classes, table=manifest.table,
                   scaling=getattr(manifest, "scaling", None))

    def to(self, device) -> "AAE":
        self.device = torch.device(device)
        self.nets = {n: m.to(self.device) for n, m in self.nets.items()}
        return self

    def eval(self) -> "AAE":
        for m in self.nets.values():
            m.eval()
        return self

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode (no input noise or dropout, batch-norm running statistics) for a while, then back."""
        modes = {n: m.training for n, m in self.nets.items()}
        self.eval()
        try:
            with torch.no_grad():
                yield self
        finally:
            for n, m in self.nets.items():
                m.train(modes[n])

    # ---- data in -------------------------------------------------------------------------------
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Raw samples (uint8 pixels or floats) -> float input on the model's device."""
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        if self.cfg.deskew:  # on the stored values, before any scaling: ink is what is stored
            x = deskewed(x.float())
        if isinstance(self.divide, torch.Tensor):  # per-feature statistics from the manifest
            self.offset, self.divide = self.offset.to(x.device), self.divide.to(x.device)
            return (x.float() - self.offset) / self.divide
        x = x.float().sub_(self.offset) if self.offset else x.float()
        return x.div_(self.divide) if self.divide != 1.0 else x

    def one_hot(self, labels: torch.Tensor, extra: int = 0) -> torch.Tensor:
        """One-hot labels; unknown labels (-1) become the extra 'unlabelled' class when extra=1."""
        k = self.num_classes + extra
        idx = torch.where(labels >= 0, labels, torch.full_like(labels, k - 1)) if extra else labels.clamp_min(0)
        return F.one_hot(idx, k).float()

    # ---- encode / decode -----------------------------------------------------------------------
    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Codes:
        return self.nets["encoder"](x, generator=generator)

    def decoder_y(self, codes: Codes, labels: torch.Tensor | None) -> torch.Tensor | None:
        """What the decoder reads besides z: the true label where the variant decodes from labels, else the softmax y."""
        if self.variant.decoder_input == "z+label":
            return self.one_hot(labels)
        return codes.y

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.nets["decoder"](z, y)

    def to_pixels(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self.rows.to_encoded(logits)
        return torch.sigmoid(logits) if self.output == "bernoulli" else logits

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.to_pixels(self.decode_logits(z, y))

    def reconstruction_error(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self.rows.loss(logits, x)
        return reconstruction_error(self.output, logits, x)

    def displayable(self, pixels):
        """Images in [0, 1] for display: Bernoulli means already are; Gaussian means are min-max scaled."""
        if self.output == "bernoulli":
            return pixels.clip(0, 1)
        lo, hi = pixels.min(), pixels.max()
        return (pixels - lo) / max(float(hi - lo), 1e-9)

    # ---- sample --------------------------------------------------------------------------------
    def sample_latents(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, y) for `decode(z, y)` drawn from the prior; `labels` fixes the class where the variant has one."""
        v, dev = self.variant, self.device
        if labels is None and v.needs_classes:
            labels = torch.randint(0, self.num_classes, (n,), generator=generator, device=dev)
        if v.label_tag:
            return self.prior.sample(n, generator, dev, labels=labels.to(dev)), None
        z = self.prior.sample(n, generator, dev)
        if labels is None or v.decoder_input == "z":
            return z, None
        return z, F.one_hot(labels.to(dev), self.num_classes).float()

    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(*self.sample_latents(n, generator, labels))

    # ---- weights -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {n: m.state_dict() for n, m in self.nets.items()}

    def load_state_dict(self, state: dict) -> None:
        for n, m in self.nets.items():
            m.load_state_dict(state[n])


def start_at_marginals(decoder: nn.Module, bias: torch.Tensor) -> None:
    """A table's built-in decoder starts with its last layer's bias at the columns' real rates (RowLayout.output_bias);
    a user's own decoder (model.decoder.class_path) is left as its class built it."""
    last = [m for m in decoder.modules() if isinstance(m, nn.Linear)]
    if getattr(decoder, "up", None) is None and last and last[-1].bias is not None and last[-1].bias.shape == bias.shape:
        with torch.no_grad():
            last[-1].bias.copy_(bias)


def input_scaling(scaling: dict | None, dtype: str, shape: tuple[int, ...]):
    """(offset, divide, scale) from the manifest's `scaling`: numbers, or per-feature tensors shaped like a sample.
    Manifests and checkpoints without one get today's rule, uint8 pixels / 255 and other dtypes as they are; `scale`
    is what turns a Bernoulli mean back into a uint8 pixel (1 where the scaling is per feature)."""
    if scaling is None:
        divide = 255.0 if dtype == "uint8" else 1.0
        return 0.0, divide, divide
    off, div = scaling["offset"], scaling["divide"]
    if isinstance(off, list) or isinstance(div, list):
        as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float32).expand(math.prod(shape)).reshape(shape).clone()  # noqa: E731
        return as_tensor(off), as_tensor(div), 1.0
    return float(off), float(div), float(div)


def reconstruction_error(output: str, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if output == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits.float(), x.float())
    return F.mse_loss(logits.float(), x.float())
