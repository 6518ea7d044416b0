"""The Python API: `train` (the same path as `aae-dist train`: pre-flight, config.json, the lease, Ray or
in-process) and `load` (a trained run as an `nn.Module` that takes and gives data as the dataset holds it).

Mistakes raise `UserError` (one line: what is wrong and how to fix it), never exit the interpreter."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from .config import Config
from .errors import UserError


@dataclass
class Result:
    """What a run left: its folder, final metrics and baselines, its latest checkpoint folder and summary.json.
    A --fast-dev-run (or an interrupted start) leaves no folder: run_dir and checkpoint are None."""

    run_dir: str | None
    metrics: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)
    checkpoint: str | None = None
    summary: dict = field(default_factory=dict)


def train(config: str | Mapping | Config | None = None, *, overrides: Mapping[str, Any] | None = None, workers: int | str = 1,
          storage: str | None = None, name: str | None = None, resume: bool = False, overwrite: bool = False,
          address: str | None = None, gpu: bool = False, fast_dev_run: bool = False) -> Result:
    """Train one run, as `aae-dist train` would.  `config`: a YAML path, a dict of sections or a Config;
    `overrides`: {"train.epochs": 3, ...} as `--set` takes them; the keywords are the command's flags."""
    from . import checkpoint, timeline
    from .launch import resolve_config, run_training

    started_at = time.time()
    timeline.reset()
    timeline.mark("start", started_at)
    path, base = _config_source(config)
    cfg = resolve_config(path, _override_list(overrides), base, workers=workers, storage=storage, name=name, address=address, gpu=gpu)
    outcome = run_training(cfg, resume=resume, overwrite=overwrite, fast_dev_run=fast_dev_run, started_at=started_at)
    summary = outcome.summary or {}
    run_dir = outcome.run_url
    return Result(run_dir=run_dir, metrics=summary.get("metrics", {}), baselines=summary.get("baselines", {}),
                  checkpoint=checkpoint.latest_in_run(run_dir) if run_dir else None, summary=summary)


def _config_source(config) -> tuple[str | None, dict | None]:
    """(YAML path, base dict) of what `config` is."""
    if config is None or isinstance(config, str):
        return config, None
    if isinstance(config, Config):
        return None, config.to_dict()
    if isinstance(config, Mapping):
        return None, dict(config)
    import os

    if isinstance(config, os.PathLike):
        return os.fspath(config), None
    raise UserError(f"config must be a YAML file path, a dict of sections or an aae_dist.Config, not {type(config).__name__}")


def _override_list(overrides) -> list[str]:
    """{"train.epochs": 3} as the `--set` items the CLI parses (values written as JSON, which YAML reads back)."""
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise UserError(f"overrides must be a dict of 'section.key': value, e.g. {{'train.epochs': 3}}, not {type(overrides).__name__}")
    out = []
    for key, value in overrides.items():
        try:
            text = value if isinstance(value, str) and value.strip() == value and value else json.dumps(value)
        except TypeError:
            raise UserError(f"overrides[{key!r}]: {type(value).__name__} is not a config value (numbers, text, lists, dicts)") from None
        out.append(f"{key}={text}")
    return out


# ---- a trained model ---------------------------------------------------------------------------

def load(ref: str) -> "AAEModel":
    """A run folder (its latest checkpoint) or a checkpoint_* folder, at any URL, as an AAEModel in eval mode."""
    from .inference import load_run

    cfg, aae = load_run(str(ref))
    return AAEModel(aae, cfg)


class AAEModel(nn.Module):
    """A trained AAE as one nn.Module.  Data goes in and comes out as the dataset holds it: raw uint8
    images in (a batch, or one sample), images out in the same scale and dtype; codes are float tensors.
    `.to(device)` moves it; every method runs without gradients in eval mode."""

    def __init__(self, aae, config: Config):
        super().__init__()
        self.aae, self.config = aae, config
        self.nets = nn.ModuleDict(aae.nets)
        self.eval()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.aae.shape

    @property
    def num_classes(self) -> int:
        return self.aae.num_classes

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        first = next(self.nets.parameters(), None)
        if first is not None:
            self.aae.device = first.device  # the AAE's own ops (prior samples, normalise) follow the weights
        return out

    def forward(self, x) -> torch.Tensor:
        """The reconstruction of x (what the autoencoder is trained for)."""
        return self.reconstruct(x)

    @torch.no_grad()
    def encode(self, x, with_y: bool = False):
        """Codes z of raw samples (the posterior mean where it is gaussian); with_y: also q(y|x) (variants with a y)."""
        with self.aae.evaluating():
            c = self.aae.encode(self._batch(x))
        z = (c.mu if c.mu is not None else c.z).float()
        return (z, None if c.y is None else c.y.float()) if with_y else z

    @torch.no_grad()
    def reconstruct(self, x, labels=None) -> torch.Tensor:
        """x encoded and decoded; `labels` (class indices) where the decoder reads the true label (supervised)."""
        with self.aae.evaluating():
            c = self.aae.encode(self._batch(x))
            if self.aae.variant.decoder_input == "z+label":
                y = self._y(labels, len(c.z), "reconstruct(x, labels=...)")
            else:
                y = c.y
            return self._to_data(self.aae.decode(c.mu if c.mu is not None else c.z, y))

    @torch.no_grad()
    def decode(self, z, y=None) -> torch.Tensor:
        """Samples (in the dataset's scale) of codes z; y: class indices or (N, K) probabilities, where the variant decodes a class."""
        z = torch.as_tensor(np.asarray(z) if not isinstance(z, torch.Tensor) else z, dtype=torch.float32).to(self.aae.device)
        if z.dim() == 1:
            z = z[None]
        if z.dim() != 2 or z.shape[1] != self.config.model.latent_dim:
            raise UserError(f"decode: codes shaped {tuple(z.shape)}, expected (N, {self.config.model.latent_dim})")
        reads = self.aae.variant.decoder_input
        y = self._y(y, len(z), "decode(z, y=...)") if reads != "z" else None
        with self.aae.evaluating():
            return self._to_data(self.aae.decode(z, y))

    @torch.no_grad()
    def sample(self, n: int, label: int | None = None, seed: int = 0) -> torch.Tensor:
        """n samples decoded from the prior (seeded, like `aae-dist sample`); `label` fixes the class where the variant has one."""
        if not isinstance(n, int) or n <= 0:
            raise UserError(f"sample: n must be a positive number of samples, got {n!r}")
        labels = None
        if label is not None:
            if not self.aae.variant.needs_classes:
                raise UserError(f"sample(label={label}): model.variant={self.config.model.variant} has no classes to fix: drop label")
            if not 0 <= int(label) < self.num_classes:
                raise UserError(f"sample(label={label}): this model has classes 0..{self.num_classes - 1}")
            labels = torch.full((n,), int(label), dtype=torch.long, device=self.aae.device)
        g = torch.Generator(device=self.aae.device).manual_seed(seed)
        with self.aae.evaluating():
            return self._to_data(self.aae.sample(n, g, labels=labels))

    # ---- data in and out ------------------------------------------------------------------------
    def _batch(self, x) -> torch.Tensor:
        """Raw samples as a batch on the model's device: numpy or torch, one sample or many, (N, H, W) for one channel."""
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        shape = self.aae.shape
        if tuple(t.shape) == shape:
            t = t[None]
        elif len(shape) == 3 and shape[0] == 1 and tuple(t.shape[-2:]) == shape[1:] and t.dim() in (2, 3):
            t = t.reshape(-1, *shape)  # grey images without their channel axis
        if tuple(t.shape[1:]) != shape:
            raise UserError(f"this model takes samples shaped {shape} (or a batch of them), got {tuple(t.shape)}")
        return self.aae.normalise(t)

    def _y(self, y, n: int, where: str) -> torch.Tensor:
        """Class indices or (N, K) probabilities as the one-hot/probability rows the decoder reads."""
        if y is None:
            raise UserError(f"{where}: model.variant={self.config.model.variant} decodes a class too: pass class indices "
                            f"(0..{self.num_classes - 1}) or (N, {self.num_classes}) probabilities")
        t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).to(self.aae.device)
        if t.dim() == 0:
            t = t.expand(n)
        if t.dim() == 1:
            if t.is_floating_point() or len(t) != n or (t < 0).any() or (t >= self.num_classes).any():
                raise UserError(f"{where}: {n} class indices in 0..{self.num_classes - 1} expected, got {tuple(t.shape)} {t.dtype}")
            return torch.nn.functional.one_hot(t.long(), self.num_classes).float()
        if tuple(t.shape) != (n, self.num_classes):
            raise UserError(f"{where}: probabilities shaped {tuple(t.shape)}, expected ({n}, {self.num_classes})")
        return t.float()

    def _to_data(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoded means as the dataset holds samples: uint8 pixels rounded back to 0..255, other dtypes cast."""
        out = decoded.float()
        if self.aae.dtype == "uint8":
            return (out * self.aae.scale).round_().clamp_(0, 255).to(torch.uint8)
        return out.to(getattr(torch, str(np.dtype(self.aae.dtype)), torch.float32))
