"""Draw what the decoder reads from the priors, per variant (for samples, grids, Parzen, generate)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .networks import has_categorical


def sample_latents(cfg: ModelConfig, prior, num_classes: int, n: int, generator: torch.Generator, device,
                   labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z, y) for `decoder(z, y)`; `labels` fixes the class where the variant has one."""
    if labels is None and (has_categorical(cfg) or cfg.variant in ("supervised", "label_regularized")):
        labels = torch.randint(0, num_classes, (n,), generator=generator, device=device)
    if cfg.variant == "label_regularized":
        return prior.sample(n, generator, device, labels=labels), None
    z = prior.sample(n, generator, device)
    if cfg.variant == "basic" or labels is None:
        return z, None
    return z, F.one_hot(labels.to(device), num_classes).float()
