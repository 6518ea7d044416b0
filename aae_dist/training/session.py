"""Where a worker runs: under Ray Train or in-process (no Ray).  Both store checkpoints the same
way (rank 0 writes `checkpoint_step_N` into the run folder) and resume from the run folder's latest;
they differ in who the worker is and how metrics travel (Ray's `report` is a collective)."""

from __future__ import annotations

import contextlib

import torch

from .. import checkpoint, storage, tempdirs
from . import interrupt


class Session:
    rank = 0
    world_size = 1
    local_rank = 0

    best: tuple[str, str] | None = None  # train.keep_best: (METRIC, min|max)

    def __init__(self, run_url: str, keep: int):
        self.run_url, self.keep = run_url, keep

    def retain_best(self, metric: str | None, mode: str = "min") -> None:
        """train.keep_best: pruning also keeps the checkpoint best by `metric`."""
        self.best = (metric, mode) if metric else None

    def save(self, folder: str | None, step: int, metrics: dict) -> str | None:
        """Every rank calls this; rank 0 passes the checkpoint folder it wrote and gets its URL in the run folder."""
        if folder:
            return checkpoint.persist(folder, self.run_url, step, self.keep, metrics=metrics, best=self.best)
        return None

    def stop_requested(self) -> bool:
        """Asked on rank 0 at coordinator syncs only."""
        return interrupt.requested()

    @contextlib.contextmanager
    def latest_checkpoint(self):
        """Yields a local folder of the run's latest complete checkpoint, or None."""
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
    """In-process, or processes started by the caller (tests, benchmarks)."""

    def __init__(self, run_url: str, keep: int, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        super().__init__(run_url, keep)
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank


class RaySession(Session):
    def __init__(self, run_url: str, keep: int):
        super().__init__(run_url, keep)
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()

    def save(self, folder, step, metrics):
        """Rank 0 reports the checkpoint folder it persisted to Ray as a `Checkpoint` in place (NO_UPLOAD: the run
        folder is Ray's experiment folder, so no second copy), so `Result.checkpoint` works; the others report none."""
        url = super().save(folder, step, metrics)
        ray_checkpoint, mode = None, {}
        if url:
            from ray.train import Checkpoint, CheckpointUploadMode

            where = self._train.get_context().get_storage()  # the filesystem and path Ray itself checks against
            ray_checkpoint = Checkpoint(f"{where.experiment_fs_path}/{url.rstrip('/').rsplit('/', 1)[-1]}", where.storage_filesystem)
            mode = {"checkpoint_upload_mode": CheckpointUploadMode.NO_UPLOAD}
        self._train.report(metrics, checkpoint=ray_checkpoint, **mode)  # a collective: every rank, every time
        return url

    def node(self) -> str:
        return ray_node_id()

    def stop_requested(self) -> bool:
        return storage.exists(storage.join(self.run_url, interrupt.STOP_MARKER))


def ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def scratch_dir() -> str:
    return tempdirs.make("aae-scratch-")


class TuneSession(LocalSession):
    """A one-worker sweep trial trained inside its Ray Tune trial process: metrics go to Tune at every
    checkpoint (what ASHA prunes on), checkpoints to the trial's run folder as in any run."""

    def save(self, folder, step, metrics):
        from ray import tune

        url = super().save(folder, step, metrics)
        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        return url

    def node(self) -> str:
        return ray_node_id()  # the Ray node the trial runs on, as for Ray Train workers
