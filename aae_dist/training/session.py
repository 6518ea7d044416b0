"""Where a worker runs: under Ray Train (report/get_checkpoint are Ray's) or in-process (no Ray).

The worker loop talks only to this small interface, so the same loop serves both."""

from __future__ import annotations

import contextlib
import os
import tempfile

import torch

from . import checkpoint


class Session:
    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, run_url: str, keep: int):
        self.run_url, self.keep = run_url, keep

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        raise NotImplementedError

    def stop_requested(self) -> bool:
        """Asked on rank 0 at coordinator syncs only (one storage call per sync under Ray)."""
        from . import interrupt

        return interrupt.requested()

    @contextlib.contextmanager
    def latest_checkpoint(self):
        """Yields a local folder of the latest complete checkpoint, or None."""
        url = checkpoint.latest_in_run(self.run_url)
        if url is None:
            yield None
            return
        local = checkpoint.fetch(url)
        try:
            yield local
        finally:
            checkpoint.remove_local(local)

    def node(self) -> str:
        import socket

        return socket.gethostname()

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu and torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


class LocalSession(Session):
    """Without Ray (in-process, or processes started by the caller): aae-dist stores checkpoints itself."""

    def __init__(self, run_url: str, keep: int, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        super().__init__(run_url, keep)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    def report(self, metrics, checkpoint_dir):
        if checkpoint_dir:
            checkpoint.persist(checkpoint_dir, self.run_url, int(metrics["step"]), self.keep)


class RaySession(Session):
    def __init__(self, run_url: str, keep: int):
        super().__init__(run_url, keep)
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()

    def report(self, metrics, checkpoint_dir):
        ckpt = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=ckpt)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def stop_requested(self) -> bool:
        from .. import storage
        from .interrupt import STOP_MARKER

        return storage.exists(storage.join(self.run_url, STOP_MARKER))

    @contextlib.contextmanager
    def latest_checkpoint(self):
        ckpt = self._train.get_checkpoint()
        if ckpt is None:  # e.g. --resume of a run that began in-process
            with super().latest_checkpoint() as local:
                yield local
            return
        with ckpt.as_directory() as local:
            yield local


def scratch_dir() -> str:
    return tempfile.mkdtemp(prefix="aae-")


