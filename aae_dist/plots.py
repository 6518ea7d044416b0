"""Pictures for people: image grids and code scatters (numpy in, CHW float images out)."""

from __future__ import annotations

import numpy as np


def image_grid(images: np.ndarray, cols: int) -> np.ndarray:
    """(N, C, H, W) in [0,1] -> one (C, rows*H, cols*W) image, 1-pixel gaps."""
    n, c, h, w = images.shape
    rows = (n + cols - 1) // cols
    grid = np.ones((c, rows * (h + 1) - 1, cols * (w + 1) - 1), np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = images[i]
    return grid


PALETTE = np.array(
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
     [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [0, 0, 0]], np.float32
) / 255.0


def scatter_image(points: np.ndarray, labels: np.ndarray, size: int = 256) -> np.ndarray:
    """Rasterise 2-D points coloured by label into a (3, size, size) image (no plotting library)."""
    img = np.ones((3, size, size), np.float32)
    if len(points) == 0:
        return img
    lo, hi = points.min(0), points.max(0)
    span = np.where(hi - lo > 1e-9, hi - lo, 1.0)
    px = ((points - lo) / span * (size - 3) + 1).astype(int)
    colours = PALETTE[np.where(labels >= 0, labels % 10, 10)]
    for dx in (0, 1):
        for dy in (0, 1):
            img[:, size - 1 - (px[:, 1] + dy), px[:, 0] + dx] = colours.T
    return img
