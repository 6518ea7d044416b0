"""TensorBoard on rank 0: event files are written locally and copied to the run folder.

(SummaryWriter straight to s3:// re-uploads the whole file on every flush.)"""

from __future__ import annotations

import shutil
import time

import numpy as np
import torch

from .. import storage, tempdirs


class TensorBoardLogger:
    def __init__(self, run_url: str, purge_step: int | None = None, upload_every_s: float = 30.0):
        from torch.utils.tensorboard import SummaryWriter

        self.dest = storage.join(run_url, "tensorboard")
        self.local = tempdirs.make("aae-tb-")
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
        """Also on a failed run: the curves up to the failure are what tell why it failed."""
        try:
            self.writer.close()
            self.upload()
        finally:
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
