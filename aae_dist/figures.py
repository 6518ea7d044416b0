"""The paper's pictures of a trained AAE: codes beside the prior (Fig. 2/4), clusters by their most
confident images (Fig. 7), style fixed along rows and the label along columns (Fig. 6/8), and the
2-D representation of dimensionality reduction (Fig. 9/10).  Which ones apply is read from the
variant's row."""

from __future__ import annotations

import numpy as np
import torch

from .models import AAE
from .plots import codes_figure, rows_figure, scatter_figure


def as_images(aae: AAE, pixels) -> np.ndarray:
    """Decoded pixels (tensor or array) as (N, C, H, W) display images in [0, 1]."""
    imgs = aae.displayable(pixels.float().cpu().numpy() if isinstance(pixels, torch.Tensor) else pixels)
    return imgs[:, :, None, :] if imgs.ndim == 3 else imgs  # (N, 1, D) vectors as 1-pixel-high strips


def representation(aae: AAE, codes) -> torch.Tensor:
    """What the decoder reads as a point: y @ cluster_heads + z (dimensionality reduction)."""
    return codes.y.float() @ aae.nets["decoder"].cluster_heads.float() + codes.z.float()


@torch.no_grad()
def paper_figures(aae: AAE, x: torch.Tensor, labels: np.ndarray, generator: torch.Generator, rows: int = 8,
                  caption: str | None = None) -> dict:
    """name -> matplotlib Figure, for a batch of held-out inputs `x` (normalised) and their labels (-1: none);
    `caption` (e.g. "run NAME, step N") tops every figure.  Call under `aae.evaluating()`."""
    v = aae.variant
    codes = aae.encode(x, generator)
    shown = labels if (labels >= 0).any() else None
    prior = aae.prior.sample(len(x), generator, aae.device).float().cpu().numpy()
    figs = {"codes": codes_figure(codes.z.float().cpu().numpy(), shown, prior, caption=caption)}
    if v.categorical and v.decoder_input != "heads":
        figs["clusters"] = _clusters(aae, x, codes, per_row=10, caption=caption)
    if v.needs_classes and v.decoder_input in ("z+label", "z+y"):
        z, _ = aae.sample_latents(rows, generator)
        k = aae.num_classes
        ys = torch.eye(k, device=aae.device)
        grid = torch.stack([aae.decode(z[i : i + 1].expand(k, -1), ys) for i in range(rows)])  # (rows, K, ...)
        imgs = np.stack([as_images(aae, g) for g in grid])
        figs["style_by_label"] = rows_figure(imgs, [f"style {i}" for i in range(rows)], "style fixed per row, label per column",
                                             [str(c) for c in range(k)], caption=caption)
    if v.decoder_input == "heads":
        heads = aae.nets["decoder"].cluster_heads.float().cpu().numpy()
        figs["representation"] = scatter_figure(representation(aae, codes).cpu().numpy(), shown,
                                                "2-D representation y @ cluster_heads + z", centres=heads, caption=caption)
    return figs


def _clusters(aae: AAE, x: torch.Tensor, codes, per_row: int, caption: str | None = None):
    """One row per cluster: its most confident images (blank where a cluster has fewer)."""
    p = torch.softmax(codes.y_logits.float(), 1)
    conf, cl = p.max(1)
    k = aae.num_classes
    imgs = as_images(aae, x)
    rows = np.ones((k, per_row) + imgs.shape[1:], np.float32)
    names = []
    for c in range(k):
        members = torch.nonzero(cl == c).flatten()
        order = members[torch.argsort(conf[members], descending=True)][:per_row].cpu().numpy()
        rows[c, : len(order)] = imgs[order]
        names.append(f"cluster {c} ({len(members)})")
    return rows_figure(rows, names, "each cluster's most confident held-out images", caption=caption)
