"""Pictures for people, drawn with matplotlib (Agg, no display): code scatters with a colour bar,
image grids with labelled rows.  numpy in; a Figure, a CHW float array or PNG bytes out."""

from __future__ import annotations

import io

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: np.ndarray, cols: int) -> np.ndarray:
    """(N, C, H, W) in [0,1] -> one (C, rows*H, cols*W) image, 1-pixel gaps."""
    n, c, h, w = images.shape
    rows = (n + cols - 1) // cols
    grid = np.ones((c, rows * (h + 1) - 1, cols * (w + 1) - 1), np.float32)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * (h + 1) : r * (h + 1) + h, k * (w + 1) : k * (w + 1) + w] = images[i]
    return grid


PRIOR_COLOUR = "black"  # prior samples: a colour no label has (tab10 has a grey, label 7's)


def project_2d(points: np.ndarray, *others: np.ndarray) -> tuple[list[np.ndarray], tuple[str, str]]:
    """2-D codes as they are; higher-dimensional ones through the first two principal axes of `points`.
    Returns the points and the (x, y) axis labels."""
    if points.shape[1] == 2:
        return [points, *others], ("z1", "z2")
    if points.shape[1] == 1:
        return [np.c_[p, np.zeros(len(p))] for p in (points, *others)], ("z1", "")
    mean = points.mean(0)
    _, _, vt = np.linalg.svd(points - mean, full_matrices=False)
    return [(p - mean) @ vt[:2].T for p in (points, *others)], ("principal axis 1", "principal axis 2")


def _label_axes(ax, names: tuple[str, str]) -> None:
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])


def _caption(fig, caption: str | None) -> None:
    """Which run and step a picture shows, above it (a PNG or a TensorBoard image travels without its folder)."""
    if caption:
        fig.suptitle(caption, fontsize=10)


def codes_figure(codes: np.ndarray, labels: np.ndarray | None, prior: np.ndarray, title: str = "codes of held-out data",
                 caption: str | None = None):
    """Paper Fig. 2/4: the codes of held-out data coloured by label, beside samples from the prior."""
    plt = _plt()
    (pts, pri), axes_name = project_2d(codes, prior)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    sc = a.scatter(pts[:, 0], pts[:, 1], c=labels if labels is not None else "tab:blue", cmap="tab10", s=4,
                   vmin=-0.5, vmax=9.5)
    a.set_title(title)
    b.scatter(pri[:, 0], pri[:, 1], s=4, c=PRIOR_COLOUR)
    b.set_title("samples from the prior")
    for ax in (a, b):
        _label_axes(ax, axes_name)
    if labels is not None:
        fig.colorbar(sc, ax=[a, b], ticks=range(10), label="label")
    _caption(fig, caption)
    return fig


def scatter_figure(points: np.ndarray, labels: np.ndarray | None, title: str, centres: np.ndarray | None = None,
                   caption: str | None = None):
    """A 2-D representation coloured by label (paper Fig. 9/10), with optional centres marked."""
    plt = _plt()
    (pts,), axes_name = project_2d(points)
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(pts[:, 0], pts[:, 1], c=labels, cmap="tab10", s=4, vmin=-0.5, vmax=9.5)
    if centres is not None and centres.shape[1] == 2:
        ax.scatter(centres[:, 0], centres[:, 1], marker="x", c="k", s=40, label="cluster heads")
        ax.legend(loc="upper right")
    ax.set_title(title)
    _label_axes(ax, axes_name)
    if labels is not None:
        fig.colorbar(sc, ax=ax, ticks=range(10), label="label")
    _caption(fig, caption)
    return fig


def rows_figure(rows: np.ndarray, row_names: list[str], title: str, col_names: list[str] | None = None, caption: str | None = None):
    """(R, K, C, H, W) images in [0,1] as R labelled rows of K (paper Fig. 6-8)."""
    plt = _plt()
    r, k, c, h, w = rows.shape
    grid = image_grid(rows.reshape(r * k, c, h, w), cols=k)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * k + 1.5), max(2, 0.5 * r + 1)))
    ax.imshow(grid[0] if c == 1 else grid.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([i * (h + 1) + h / 2 for i in range(r)], row_names)
    if col_names:
        ax.set_xticks([i * (w + 1) + w / 2 for i in range(k)], col_names)
    else:
        ax.set_xticks([])
    ax.set_title(title)
    _caption(fig, caption)
    return fig


def to_array(fig) -> np.ndarray:
    """A Figure as a (3, H, W) float image for TensorBoard; the figure is closed."""
    plt = _plt()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba(), dtype=np.float32) / 255.0
    plt.close(fig)
    return rgba[:, :, :3].transpose(2, 0, 1).copy()


def to_png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
