"""The Ray side of the driver: is the cluster able to place the plan, Ray Train's storage and checkpoint
settings, the `TorchTrainer` of one run (or sweep trial), and a worker's UserError surfaced as one line."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

from . import storage, tempdirs, timeline
from .config import Config, RunSection
from .console import ConsoleProgress, Poller, ProgressBoard, read_board_file
from .errors import UserError
from .plan import RunPlan
from .ray_connect import connect_ray
from .ray_failures import USER_ERROR_MARK, user_errors_are_final


def check_feasible(plan: RunPlan, run: RunSection, verbose: bool = False) -> None:
    """Refuse, before anything starts, what the connected cluster can never place (Ray would retry
    placing it forever); a cluster that adds nodes (run.autoscaling) is trusted to grow."""
    if run.autoscaling:
        return
    lo = plan.workers[0]
    ask = {k: float(v) for k, v in plan.resources.items()}
    if run.address:
        import ray

        connect_ray(run.address, verbose)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    else:  # the local Ray to be started: this machine (torch, for its GPUs, only where the plan asks for one)
        nodes = [{"CPU": float(os.cpu_count() or 1), "GPU": float(_local_gpus() if ask.get("GPU") else 0)}]
    fits = sum(min(int(res.get(k, 0) // v) for k, v in ask.items() if v > 0) for res in nodes)
    if fits < max(1, lo):
        have = ", ".join(f"{k} {sum(r.get(k, 0) for r in nodes):g}" for k in ask)
        raise UserError(f"the cluster can place {fits} of the {max(1, lo)} workers asked for ({', '.join(f'{k} {v:g}' for k, v in ask.items())} "
                        f"each; it has {have} on {len(nodes)} node(s)): lower --workers or run.cpus_per_worker, "
                        "or set run.autoscaling=true for a cluster that adds nodes")


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def check_shared_storage(storage_url: str, nodes: int) -> None:
    if nodes > 1 and storage.is_local(storage_url):
        raise UserError(
            f"--storage {storage.redact(storage_url)} is a local path but the cluster has {nodes} nodes: "
            "use storage every node can reach (s3://, gs://, or a shared mount given as such)"
        )


def ray_storage(url: str) -> dict:
    """Ray Train writes its checkpoints through the same fsspec filesystem aae-dist uses for everything
    else (Ray's own pyarrow S3 client disagrees with some S3-compatible servers on multipart uploads)."""
    if storage.is_local(url):
        return {"storage_path": url}
    import pyarrow.fs

    fs, path = storage.filesystem(url)
    return {"storage_path": path, "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of reported checkpoints, in the run folder


def ray_checkpoint_config(cfg: Config):
    """Ray deletes no checkpoint (num_to_keep=None): aae-dist prunes its own folders (train.keep_checkpoints,
    train.keep_best).  Ray ranks `Result.best_checkpoints` by train.keep_best."""
    from ray.train import CheckpointConfig

    best = cfg.train.keep_best
    return CheckpointConfig(num_to_keep=None, checkpoint_score_attribute=best, checkpoint_score_order=cfg.train.keep_best_mode if best else "max")


def forget_ray_snapshot(run_url: str) -> None:
    """Ray refuses to start a run whose snapshot names a checkpoint aae-dist has since pruned (or set aside on
    --overwrite); aae-dist resumes from its own run folder, so each launch starts Ray's list anew."""
    storage.remove(storage.join(run_url, RAY_SNAPSHOT), recursive=False)


def worker_payload(cfg: Config, plan: RunPlan, started_at: float, board: "Board | None" = None) -> dict:
    """train_loop_config: plain data.  "plan" is the run plan (RunPlan.from_dict); "worker" is what a worker
    takes from the run section (threads, GPU, name), so no worker code reads run.* (the caller's cfg is not changed).
    board: where rank 0 posts progress (its payload keys), or None."""
    worker = {"threads": cfg.train.threads or plan.threads, "gpu": cfg.run.gpu, "name": cfg.run.name}
    where = board.payload if board is not None else {"board": None}
    return {"config": cfg.to_dict(), "run_url": plan.run_url, "started_at": started_at, **where,
            "timeline": timeline.marks(), "plan": plan.to_dict(), "worker": worker}


@dataclass(frozen=True)
class Board:
    """The progress board of one fit: what the workers are told (payload keys), how the driver reads it, and
    what to remove afterwards."""

    payload: dict
    read: Callable[[], tuple[dict, list[str]]]
    close: Callable[[], None] = lambda: None


def progress_board(cfg: Config) -> Board:
    """A file for the local Ray this driver started (rank 0 is on this machine: no actor process to start),
    an actor on a cluster joined by --address."""
    import ray

    if not cfg.run.address:
        folder = tempdirs.make("aae-progress-")
        path = os.path.join(folder, "board.json")
        return Board({"board_file": path}, lambda: read_board_file(path), lambda: shutil.rmtree(folder, ignore_errors=True))
    actor = ray.remote(ProgressBoard).options(num_cpus=0).remote()
    return Board({"board": actor}, lambda: ray.get(actor.read.remote(), timeout=5))


def torch_trainer(cfg: Config, plan: RunPlan, started_at: float, board: Board | None = None, callbacks=()):
    """The Ray Train trainer of one run (also one sweep trial's): the plan says how many workers and what each asks for."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .training.trainer import train_worker

    lo, hi = plan.workers
    run = cfg.run
    forget_ray_snapshot(plan.run_url)  # called right before fit()
    return TorchTrainer(
        train_worker,
        train_loop_config=worker_payload(cfg, plan, started_at, board),
        scaling_config=ScalingConfig(
            num_workers=(lo, hi) if plan.elastic else hi, use_gpu=run.gpu, placement_strategy=run.placement,
            **({"elastic_resize_monitor_interval_s": run.resize_check_s} if plan.elastic else {}),
            resources_per_worker=dict(plan.resources),
        ),
        torch_config=TorchConfig(backend="nccl" if run.gpu else "gloo"),
        run_config=RunConfig(
            name=run.name,
            **ray_storage(run.storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),  # checkpoints: kept by aae-dist in the run folder
            checkpoint_config=ray_checkpoint_config(cfg),
            callbacks=list(callbacks),
        ),
    )


def launch_ray(cfg: Config, plan: RunPlan, started_at: float, console: ConsoleProgress) -> dict:
    import ray

    connect_ray(cfg.run.address)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not cfg.run.shared_storage:
        check_shared_storage(cfg.run.storage, len(nodes))
    board = progress_board(cfg)  # rank 0 posts progress there; the driver draws it
    timeline.mark("fit_called")
    trainer = torch_trainer(cfg, plan, started_at, board)
    poller = Poller(board.read, console)
    try:
        with user_errors_are_final():  # a UserError on any worker ends the run: no retry
            result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - surface a worker's UserError as one line
        raise _user_error_from(exc) from None
    finally:
        poller.close()
        board.close()
    if result.error:
        raise _user_error_from(result.error)
    raw = storage.read_bytes(storage.join(plan.run_url, "summary.json"))
    return json.loads(raw)


def _user_error_from(exc: BaseException) -> BaseException:
    text = str(exc)
    if USER_ERROR_MARK in text:
        return UserError(text.split(USER_ERROR_MARK, 1)[1].splitlines()[0])
    cause = exc
    while cause is not None:
        if isinstance(cause, UserError):
            return cause
        cause = cause.__cause__ or getattr(cause, "cause", None)
    return UserError(f"training failed: {type(exc).__name__}: {' '.join(text.split())[:300]}")
