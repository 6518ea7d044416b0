"""Experiment trackers beside TensorBoard (log.mlflow, log.wandb), on rank 0 only.

They get what TensorBoard gets: the per-sync scalars, the config as hparams, the final metrics and the
figures (as PNG artifacts).  A tracker that cannot start is one line before training; one that fails
mid-run is dropped with a warning, never the run (the checkpoints and TensorBoard still hold it all)."""

from __future__ import annotations

import io
import os
import shutil
import time

import numpy as np

from .. import storage, tempdirs
from ..config import Config
from ..errors import UserError
from .tensorboard import flatten_config

RUN_TAG = "aae_dist.run"  # the MLflow run's tag naming its aae-dist run folder (redacted): a resume continues that run
HPARAM_SECTIONS = ("model", "prior", "phases", "train", "data")
INSTALL = {"mlflow": "pip install 'aae-dist[mlflow]' (mlflow-skinny)", "wandb": "pip install 'aae-dist[wandb]'"}


def check(cfg: Config) -> None:
    """Pre-flight: each tracker that is switched on has its client installed."""
    for name, section in (("mlflow", cfg.log.mlflow), ("wandb", cfg.log.wandb)):
        if section.enabled:
            try:
                __import__(name)
            except ImportError:
                raise UserError(f"log.{name} is set but the {name} package is not installed here: {INSTALL[name]}, "
                                f"or unset log.{name}") from None


def hparams(cfg: Config) -> dict:
    """The settings a run is compared by, flattened (model.latent_dim, train.seed, ...); credentials redacted."""
    d = cfg.to_dict(redact=True)
    return flatten_config({k: d[k] for k in HPARAM_SECTIONS})


def png(img: np.ndarray) -> bytes:
    """A (C, H, W) float image in [0, 1] as PNG bytes."""
    from PIL import Image

    hwc = (np.clip(img, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(buf, format="PNG")
    return buf.getvalue()


def _one_line(exc: BaseException) -> str:
    return storage.redact(" ".join(f"{type(exc).__name__}: {exc}".split()))[:300]


class MlflowTracker:
    """One MLflow run per aae-dist run, through MlflowClient (no global state in the worker)."""

    name = "mlflow"

    def __init__(self, cfg: Config, run_url: str, resumed: bool):
        from mlflow.tracking import MlflowClient

        c = cfg.log.mlflow
        experiment = c.experiment or "aae-dist"
        try:
            self.client = MlflowClient(tracking_uri=c.tracking_uri)
            found = self.client.get_experiment_by_name(experiment)
        except Exception as exc:
            if "MLFLOW_ALLOW_FILE_STORE" not in str(exc):
                raise
            raise UserError(f"log.mlflow.tracking_uri={storage.redact(c.tracking_uri or os.environ.get('MLFLOW_TRACKING_URI', ''))}: MLflow 3 refuses its file store unless "
                            "MLFLOW_ALLOW_FILE_STORE=true is set; or use sqlite:///mlflow.db (the full mlflow package) or an http:// "
                            "tracking server") from None
        exp_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self._previous(exp_id, run_url) if resumed else None
        if self.run_id is None:
            run = self.client.create_run(exp_id, run_name=cfg.run.name, tags={RUN_TAG: storage.redact(run_url)})
            self.run_id = run.info.run_id
            self._params(hparams(cfg))
        self.figures: dict[str, np.ndarray] = {}

    def _previous(self, exp_id: str, run_url: str) -> str | None:
        """The MLflow run this aae-dist run logged to before (a resume continues its curves)."""
        where = storage.redact(run_url).replace("'", "\\'")
        runs = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{where}'", max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def _params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def scalars(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        self.figures[tag] = img  # the newest of each goes up as an artifact at the end

    def finish(self, metrics: dict, step: int) -> None:
        self.scalars({f"final/{k}": v for k, v in metrics.items()}, step)
        local = tempdirs.make("aae-mlflow-")
        try:
            for tag, img in self.figures.items():
                path = os.path.join(local, tag.replace("/", "_") + ".png")
                with open(path, "wb") as fh:
                    fh.write(png(img))
            if self.figures:
                self.client.log_artifacts(self.run_id, local, "figures")
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbTracker:
    """One W&B run; its files (offline mode: the run to `wandb sync`) go to RUN/wandb."""

    name = "wandb"

    def __init__(self, cfg: Config, run_url: str, resumed: bool):
        import wandb

        self.wandb, self.dest = wandb, storage.join(run_url, "wandb")
        self.local = storage.filesystem(run_url)[1] if storage.is_local(run_url) else tempdirs.make("aae-wandb-")
        os.makedirs(self.local, exist_ok=True)
        c = cfg.log.wandb
        self.run = wandb.init(project=c.project, mode=c.mode, dir=self.local, name=cfg.run.name, group=cfg.run.name,
                              config=hparams(cfg), job_type="resume" if resumed else "train",
                              settings=wandb.Settings(silent=True, console="off"))
        self.step = -1

    def _log(self, values: dict, step: int) -> None:
        self.step = max(self.step, step)  # W&B refuses steps that go back
        self.run.log(values, step=self.step)

    def scalars(self, values: dict, step: int) -> None:
        self._log({k: float(v) for k, v in values.items()}, step)

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        from PIL import Image

        self._log({tag: self.wandb.Image(Image.open(io.BytesIO(png(img))))}, step)

    def finish(self, metrics: dict, step: int) -> None:
        final = {f"final/{k}": float(v) for k, v in metrics.items()}
        self._log(final, step)
        self.run.summary.update(final)

    def close(self, failed: bool) -> None:
        try:
            self.run.finish(exit_code=1 if failed else 0)
        finally:
            if not storage.is_local(self.dest):
                storage.upload_dir(self.local, self.dest)
                shutil.rmtree(self.local, ignore_errors=True)


class Trackers:
    """Every tracker the config switches on, as one; a call that fails drops that tracker with one warning."""

    def __init__(self, cfg: Config, run_url: str, resumed: bool, warn=None):
        self.warn = warn or (lambda text: None)
        self.active = []
        kinds = ((MlflowTracker, cfg.log.mlflow), (WandbTracker, cfg.log.wandb))
        check(cfg)
        for kind, section in kinds:
            if section.enabled:
                self.active.append(self._start(kind, cfg, run_url, resumed))

    @staticmethod
    def _start(kind, cfg: Config, run_url: str, resumed: bool):
        try:
            return kind(cfg, run_url, resumed)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any client failure at start is the user's setting to fix
            raise UserError(f"log.{kind.name}: the tracker did not start ({_one_line(exc)}): check log.{kind.name} "
                            f"(see `aae-dist config`) or unset it") from None

    def _each(self, method: str, *args) -> None:
        for t in list(self.active):
            try:
                getattr(t, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker outage must not end the training
                self.active.remove(t)
                self.warn(f"log.{t.name}: {method} failed ({_one_line(exc)}); {t.name} logging stopped for this run, "
                          "TensorBoard and the checkpoints go on")

    def scalars(self, values: dict, step: int) -> None:
        self._each("scalars", values, step)

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        self._each("image", tag, img, step)

    def finish(self, metrics: dict, step: int) -> None:
        self._each("finish", metrics, step)

    def close(self, failed: bool = False) -> None:
        self._each("close", failed)
        self.active = []
