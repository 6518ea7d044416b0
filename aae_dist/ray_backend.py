"""Ray Train's torch backend with one addition: before the process group forms, every worker begins its
heavy imports in a thread (training/prewarm.py), so they overlap Ray Train's own start-up instead of
following it.  Imported only once Ray is running (it imports ray.train)."""

from __future__ import annotations

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend  # noqa: PLC2701 - the backend TorchConfig names; extended, not replaced

from .training import prewarm


class PrewarmingBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        worker_group.execute(prewarm.start)  # returns at once on every worker
        super().on_start(worker_group, backend_config)


class PrewarmingTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return PrewarmingBackend
