"""Deskewing: handwriting's slant and position taken out by each image's own moments, the classic
normalisation before comparing digits (a 4 written at two slants lands close).  Used as the model's input
(model.deskew) and as the neighbour search's space (phases.reconstruction.neighbours_space)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def deskewed(x: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) with their slant removed and their centre of mass moved to the middle, by each image's
    own second moments (the classic deskewing of handwriting before a nearest-neighbour search: the same digit
    written at two slants lands close).  A blank image stays as it is."""
    n, _, h, w = x.shape
    ink = x.float().sum(1).clamp_min(0)  # (N, H, W)
    mass = ink.sum((1, 2)).clamp_min(1e-12)
    rows = torch.arange(h, dtype=torch.float32, device=x.device).view(1, h, 1)
    cols = torch.arange(w, dtype=torch.float32, device=x.device).view(1, 1, w)
    cy, cx = (ink * rows).sum((1, 2)) / mass, (ink * cols).sum((1, 2)) / mass
    var_y = (ink * (rows - cy.view(-1, 1, 1)) ** 2).sum((1, 2)) / mass
    cov = (ink * (rows - cy.view(-1, 1, 1)) * (cols - cx.view(-1, 1, 1))).sum((1, 2)) / mass
    slant = torch.where(var_y > 1e-6, cov / var_y.clamp_min(1e-6), torch.zeros_like(cov))  # columns per row
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 1] = slant * h / w  # the output's row yo reads the input's column cx + slant x (row - cy)
    theta[:, 0, 2] = (2 * cx + 1) / w - 1
    theta[:, 1, 2] = (2 * cy + 1) / h - 1
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    blank = (x.float().flatten(1).abs().sum(1) == 0).view(-1, 1, 1, 1)
    return torch.where(blank, x.float(), out).to(x.dtype)
