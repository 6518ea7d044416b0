"""TensorBoard on rank 0: event files are written locally and copied to the run folder.

(SummaryWriter straight to s3:// re-uploads the whole file on every flush.)"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import torch

from .. import storage


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


class TensorBoardLogger:
    def __init__(self, run_url: str, purge_step: int | None = None, upload_every_s: float = 30.0):
        from torch.utils.tensorboard import SummaryWriter

        self.dest = storage.join(run_url, "tensorboard")
        self.local = tempfile.mkdtemp(prefix="aae-tb-")
        if purge_step:  # resume: continue the curves where the checkpoint left them
            try:
                storage.filesystem(self.dest)[0].get(storage.filesystem(self.dest)[1] + "/", self.local + "/", recursive=True)
            except (FileNotFoundError, OSError):
                pass
        self.writer = SummaryWriter(self.local, purge_step=purge_step)
        self.upload_every_s, self.last_upload = upload_every_s, time.monotonic()

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, img, step, dataformats="CHW")

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self.writer.add_histogram(tag, values.detach().float().cpu().numpy(), step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        self.writer.add_hparams(clean, {f"hparam/{k}": float(v) for k, v in metrics.items()}, run_name=".")

    def maybe_upload(self) -> None:
        if time.monotonic() - self.last_upload > self.upload_every_s:
            self.upload()

    def upload(self) -> None:
        self.writer.flush()
        storage.upload_dir(self.local, self.dest)
        self.last_upload = time.monotonic()

    def close(self) -> None:
        self.writer.close()
        self.upload()
        shutil.rmtree(self.local, ignore_errors=True)


def flatten_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out
