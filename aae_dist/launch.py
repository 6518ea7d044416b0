"""The driver side of `aae-dist train`: resolve the config, prepare data and the run folder, launch workers."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

from . import runfolder, storage, timeline
from .config import Config, load_config, set_value
from .errors import UserError
from .console import ConsoleProgress, LocalBoard, Poller, ProgressBoard, final_table, start_line
from .data import read_manifest
from .ray_connect import connect_ray, ray_log_dir
from .ray_failures import USER_ERROR_MARK, user_errors_are_final
from .variants import variant

DEFAULT_DATA_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "aae-dist", "digits")


def ensure_default_data(cache: str = DEFAULT_DATA_CACHE) -> str:
    """The embedded digits, sharded into a local cache the first time."""
    from .data.format import MANIFEST

    if not os.path.exists(os.path.join(cache, MANIFEST)):
        from .data.sources import load_digits
        from .data.writer import write_dataset

        src = load_digits()
        write_dataset(cache, src.splits, num_classes=src.num_classes, source=src.name, shard_size=1000, overwrite=True)
    return cache


def resolve(args) -> Config:
    return resolve_config(getattr(args, "config", None), getattr(args, "overrides", []),
                          **{flag: getattr(args, flag, None) for flag in ("workers", "storage", "name", "address")},
                          gpu=getattr(args, "gpu", False))


def resolve_config(config: str | None = None, overrides=(), base: dict | None = None, *, workers=None, storage=None, name=None,
                   address=None, gpu: bool = False) -> Config:
    """The run's config from plain arguments (the CLI's flags or the Python API's keywords): defaults <- base
    <- YAML file <- overrides <- the run flags; a run without a name gets a timestamp."""
    cfg = load_config(config, overrides, base=base)
    run = cfg.run
    for flag, value in (("workers", workers), ("storage", storage), ("name", name), ("address", address)):
        if value is not None:
            set_value(run, flag, str(value), f"--{flag}")
    if gpu:
        run.gpu = True
    if run.name is None or (run.name == "" and name is None):
        run.name = time.strftime("aae-%Y%m%d-%H%M%S")
    runfolder.check_name(run.name, "--name" if name is not None else "run.name")
    return cfg


def preflight(cfg: Config) -> None:
    """Everything that can be checked before a worker starts."""
    from .models.priors import build_prior

    hi = cfg.run.worker_range[1]
    build_prior(cfg.prior, cfg.model.latent_dim)
    if cfg.run.gpu:
        import torch

        if cfg.run.address is None and not torch.cuda.is_available():
            raise UserError("--gpu given but no CUDA GPU is visible here: drop --gpu or run on a GPU node (--address)")
    if cfg.train.precision == "bf16" and not cfg.run.gpu and cfg.run.address is None:  # local CPU workers: refuse before any starts
        import torch

        from .training.precision import autocast_dtype

        autocast_dtype(cfg.train, torch.device("cpu"))
    m = read_manifest(cfg.data.path)
    train = m.split("train", cfg.data.path)
    world = max(1, hi)
    if train.count < world:
        raise UserError(f"{world} workers but split 'train' of {storage.redact(cfg.data.path)} has only {train.count} samples: use fewer workers")
    if train.count // world < cfg.data.batch_size:
        raise UserError(
            f"{world} workers x data.batch_size={cfg.data.batch_size} needs at least {world * cfg.data.batch_size} training samples, "
            f"{storage.redact(cfg.data.path)} has {train.count}: lower data.batch_size or --workers"
        )
    if cfg.data.labeled_per_class and not m.labels:
        raise UserError(f"data.labeled_per_class needs labels, but {storage.redact(cfg.data.path)} has none: shard a labelled source")
    row = variant(cfg.model.variant)
    if row.needs_labels and not m.labels:
        raise UserError(f"model.variant={cfg.model.variant} needs labels, but {storage.redact(cfg.data.path)} has none: shard a labelled source")
    k = cfg.model.num_classes or m.num_classes
    for option in ("consistency", "vat"):
        if getattr(cfg.phases.reconstruction, option) and not row.categorical:
            raise UserError(f"phases.reconstruction.{option} needs a variant with a categorical y (clustering, semi_supervised, "
                            f"dim_reduction), not model.variant={cfg.model.variant}: set it to 0")
    if cfg.phases.reconstruction.consistency and len(m.shape) != 3:
        raise UserError(f"phases.reconstruction.consistency translates images, but samples of {storage.redact(cfg.data.path)} are "
                        f"shaped {tuple(m.shape)}, not (channels, height, width): set it to 0")
    if row.label_tag and cfg.prior.kind in ("mixture", "swiss_roll") and cfg.prior.components != k:
        raise UserError(f"model.variant={cfg.model.variant}: prior.components={cfg.prior.components} must equal the {k} classes")
    if row.uses_labels(cfg.data.labeled_per_class) and k < m.num_classes:
        raise UserError(f"model.num_classes={k} is fewer than the {m.num_classes} classes of {storage.redact(cfg.data.path)}: raise it or drop it")
    from .models.networks import build_networks

    build_networks(cfg.model, tuple(m.shape), k)
    from .training.trackers import check as check_trackers

    check_trackers(cfg)  # log.mlflow / log.wandb: their clients are installed


def run_exists(run_url: str) -> bool:
    """A run exists once it has a checkpoint or a summary (a config.json alone is a start that failed),
    or while an --overwrite has it set aside."""
    from .checkpoint import PREFIX

    return any(n.startswith(PREFIX) or n in ("summary.json", runfolder.ASIDE) for n in storage.listdir(run_url))


def check_resume(run_url: str, cfg: Config) -> None:
    """Refuse, before anything is written, to resume with a config the checkpoint's weights do not fit."""
    from . import checkpoint

    found = checkpoint.listing(run_url)
    if not found:
        return
    meta = json.loads(storage.read_bytes(storage.join(found[-1][1], checkpoint.META)))
    checkpoint.check_architecture(meta, cfg.to_dict())


def check_flags(cfg: Config, run_url: str, resume: bool, overwrite: bool) -> bool:
    """Whether the run exists, refusing a start that --resume / --overwrite do not allow."""
    exists = run_exists(run_url)
    if resume and not exists:
        raise UserError(f"--resume: no run named '{cfg.run.name}' at {storage.redact(cfg.run.storage)}: check --name/--storage or drop --resume")
    if exists and not resume and not overwrite:
        raise UserError(f"run '{cfg.run.name}' already exists at {storage.redact(cfg.run.storage)}: pass --resume to continue it or --overwrite to replace it")
    if exists and overwrite and not resume:
        runfolder.check_overwritable(run_url)
    return exists


@dataclass
class Outcome:
    """What one `train` did: its exit status, summary.json's content (None when nothing ran) and its run folder."""

    code: int
    summary: dict | None
    run_url: str | None


FAST_DEV_STEPS = 3  # --fast-dev-run: steps of the throwaway run
FAST_DEV_PARZEN = 100  # and decoded samples of its Parzen estimate (not 10,000)


def train_from_cli(args, started_at: float | None = None) -> int:
    started_at = time.time() if started_at is None else started_at
    timeline.reset()
    timeline.mark("start", started_at)
    return run_training(resolve(args), resume=getattr(args, "resume", False), overwrite=getattr(args, "overwrite", False),
                        dry_run=getattr(args, "dry_run", False), verbose=getattr(args, "verbose", False),
                        fast_dev_run=getattr(args, "fast_dev_run", False), started_at=started_at).code


def run_training(cfg: Config, *, resume: bool = False, overwrite: bool = False, dry_run: bool = False, verbose: bool = False,
                 fast_dev_run: bool = False, started_at: float | None = None) -> Outcome:
    """`aae-dist train` and `aae_dist.train()` alike: pre-flight, config.json, the lease, Ray or in-process."""
    started_at = time.time() if started_at is None else started_at
    if fast_dev_run:
        if resume or overwrite:
            raise UserError("--fast-dev-run trains a throwaway run and keeps nothing: drop --resume/--overwrite")
        throwaway = fast_dev_config(cfg)
        try:
            outcome = _run_training(cfg, False, False, dry_run, verbose, started_at, kept=False)
        finally:
            with contextlib.suppress(Exception):  # a throwaway folder left behind must not hide why the run failed
                storage.remove(throwaway)
        return Outcome(outcome.code, outcome.summary, None)
    return _run_training(cfg, resume, overwrite, dry_run, verbose, started_at)


def fast_dev_config(cfg: Config) -> str:
    """Lightning's fast_dev_run: a few steps, no checkpoint before the last, a tiny evaluation, in a folder
    of its own (returned, to be removed afterwards) so no existing run is touched."""
    import tempfile
    import uuid

    t = cfg.train
    t.max_steps = min(t.max_steps or FAST_DEV_STEPS, FAST_DEV_STEPS)
    t.checkpoint_every = t.image_every = FAST_DEV_STEPS
    t.parzen_samples = min(t.parzen_samples, FAST_DEV_PARZEN)
    if storage.is_local(cfg.run.storage) and not cfg.run.address:
        cfg.run.storage = tempfile.mkdtemp(prefix="aae-fast-dev-run-")
    else:  # workers elsewhere must reach it: beside the real runs, under a fresh name
        cfg.run.storage = storage.join(cfg.run.storage, f"fast-dev-run-{uuid.uuid4().hex[:12]}")
    return cfg.run.storage


def _run_training(cfg: Config, resume: bool, overwrite: bool, dry_run: bool, verbose: bool, started_at: float,
                  kept: bool = True) -> Outcome:
    if not cfg.data.path:
        cfg.data.path = ensure_default_data()
    storage_url = cfg.run.storage
    if storage.is_local(storage_url):
        storage_url = os.path.abspath(storage_url)
        cfg.run.storage = storage_url
    runfolder.check_storage(storage_url)
    run_url = storage.join(storage_url, cfg.run.name)
    exists = check_flags(cfg, run_url, resume, overwrite)
    preflight(cfg)
    if resume:
        check_resume(run_url, cfg)
    if cfg.run.uses_ray:
        check_feasible(cfg, verbose)
    if dry_run:
        print(plan(cfg, run_url, exists and not resume))
        return Outcome(0, None, None)
    lease = runfolder.Lease(run_url, cfg.run.name).acquire()  # one owner from here on
    try:
        return _train_holding_lease(cfg, run_url, resume, overwrite, started_at, verbose, kept)
    finally:
        lease.release()


def _train_holding_lease(cfg: Config, run_url: str, resume: bool, overwrite: bool, started_at: float, verbose: bool,
                         kept: bool = True) -> Outcome:
    settled = runfolder.settle_aside(run_url)  # an earlier --overwrite that was killed
    if settled:
        print(f"aae-dist: an interrupted --overwrite of run '{cfg.run.name}' was settled: the {'new run was kept' if settled == 'replaced' else 'old run was put back'}",
              file=sys.stderr)
    exists = check_flags(cfg, run_url, resume, overwrite)  # again: another process may have run in between
    if resume and settled:
        check_resume(run_url, cfg)
    runfolder.clear_temp_files(run_url)
    if exists and not resume:
        runfolder.set_aside(run_url)  # --overwrite: put back if the new run fails before its first checkpoint
    timeline.mark("checked")
    try:
        return _start(cfg, run_url, started_at, verbose, kept)
    finally:
        if exists and not resume:
            runfolder.settle_aside(run_url)  # the old run goes once the new one has a checkpoint; else it is put back


def _start(cfg: Config, run_url: str, started_at: float, verbose: bool, kept: bool = True) -> Outcome:
    if cfg.run.uses_ray:
        connect_ray(cfg.run.address, verbose)
        timeline.mark("ray_started")
    train_count = read_manifest(cfg.data.path).split("train", cfg.data.path).count
    print(start_line(cfg, train_count, run_url, storage.redact), flush=True)
    storage.write_bytes_atomic(storage.join(run_url, "config.json"), json.dumps(cfg.to_dict(redact=True), indent=1).encode())
    from .training import interrupt

    interrupt.clear_marker(run_url)
    interrupt.reset()
    restore = interrupt.install(run_url if cfg.run.uses_ray else None)
    try:
        summary = launch(cfg, run_url, started_at)
    finally:
        restore()
    logs = ray_log_dir() if cfg.run.uses_ray else None
    if summary and summary.get("stop_reason") == "interrupted":
        interrupt.clear_marker(run_url)
        print(f"aae-dist: interrupted at step {summary['steps']}: checkpoint saved; continue with --resume --name {cfg.run.name}", file=sys.stderr)
        return Outcome(130, summary, run_url)
    if summary:
        print(final_table(summary, dict(variant(cfg.model.variant).paper), run_url, storage.redact, kept=kept))
        if logs:
            print(f"Ray's logs (workers' output included): {logs}")
    return Outcome(0, summary, run_url)


def cpus_per_worker(cfg: Config) -> int:
    """Asked per Ray worker: run.cpus_per_worker, else this machine's cores shared (local Ray) or 1 (a cluster)."""
    if cfg.run.cpus_per_worker:
        return cfg.run.cpus_per_worker
    return max(1, (os.cpu_count() or 1) // max(1, cfg.run.worker_range[1])) if not cfg.run.address else 1


def check_feasible(cfg: Config, verbose: bool = False) -> None:
    """Refuse, before anything starts, what the connected cluster can never place (Ray would retry
    placing it forever); a cluster that adds nodes (run.autoscaling) is trusted to grow."""
    if cfg.run.autoscaling:
        return
    lo, _ = cfg.run.worker_range
    ask = {"CPU": float(cpus_per_worker(cfg)), **({"GPU": 1.0} if cfg.run.gpu else {}), **cfg.run.resources_per_worker}
    if cfg.run.address:
        import ray

        connect_ray(cfg.run.address, verbose)
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    else:  # the local Ray to be started: this machine
        import torch

        nodes = [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
    fits = sum(min(int(res.get(k, 0) // v) for k, v in ask.items() if v > 0) for res in nodes)
    if fits < max(1, lo):
        have = ", ".join(f"{k} {sum(r.get(k, 0) for r in nodes):g}" for k in ask)
        raise UserError(f"the cluster can place {fits} of the {max(1, lo)} workers asked for ({', '.join(f'{k} {v:g}' for k, v in ask.items())} "
                        f"each; it has {have} on {len(nodes)} node(s)): lower --workers or run.cpus_per_worker, "
                        "or set run.autoscaling=true for a cluster that adds nodes")


def plan(cfg: Config, run_url: str, replaces: bool) -> str:
    """What `train` would do, for --dry-run."""
    import yaml

    lo, hi = cfg.run.worker_range
    world = max(1, hi)
    train = read_manifest(cfg.data.path).split("train", cfg.data.path)
    per_epoch = (train.count // world) // cfg.data.batch_size
    steps = cfg.train.epochs * per_epoch
    if cfg.train.max_steps:
        steps = min(steps, cfg.train.max_steps)
    where = "in this process, no Ray" if hi == 0 else (f"{lo}..{hi} Ray workers (elastic)" if lo != hi else f"{hi} Ray worker(s)")
    res = "" if hi == 0 else f", {cpus_per_worker(cfg)} CPU{' + 1 GPU' if cfg.run.gpu else ''} each"
    lines = [
        yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False).rstrip(),
        "",
        "plan (--dry-run: nothing was written):",
        f"  workers: {where}{res}",
        f"  data: {storage.redact(cfg.data.path)}: {train.count} training samples, batch {cfg.data.batch_size} per worker, "
        f"{per_epoch} steps per epoch",
        f"  steps: {steps} ({steps / max(1, per_epoch):.1f} epochs)",
        f"  run folder: {storage.redact(run_url)}{' (would replace the existing run)' if replaces else ''}; "
        f"a checkpoint every {cfg.train.checkpoint_every} steps, {cfg.train.keep_checkpoints} kept",
    ]
    return "\n".join(lines)


def launch(cfg: Config, run_url: str, started_at: float) -> dict:
    console = ConsoleProgress(enabled=cfg.train.progress)
    if not cfg.run.uses_ray:
        from .training.trainer import train_in_process

        try:
            return train_in_process(cfg, run_url, started_at, LocalBoard(console))
        finally:
            console.close()
    return launch_ray(cfg, run_url, started_at, console)


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


def torch_trainer(cfg: Config, run_url: str, started_at: float, board=None, callbacks=()):
    """The Ray Train trainer of one run (also one sweep trial's): cfg.run says how many workers, where."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .training.trainer import train_worker

    lo, hi = cfg.run.worker_range
    cpus = cpus_per_worker(cfg)
    cfg.run.cpus_per_worker = cpus
    forget_ray_snapshot(run_url)  # called right before fit()
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "run_url": run_url, "started_at": started_at, "board": board,
                           "timeline": timeline.marks()},
        scaling_config=ScalingConfig(
            num_workers=(lo, hi) if lo != hi else hi, use_gpu=cfg.run.gpu, placement_strategy=cfg.run.placement,
            **({"elastic_resize_monitor_interval_s": cfg.run.resize_check_s} if lo != hi else {}),
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.run.gpu else {}), **cfg.run.resources_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.run.gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run.name,
            **ray_storage(cfg.run.storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),  # checkpoints: kept by aae-dist in the run folder
            checkpoint_config=ray_checkpoint_config(cfg),
            callbacks=list(callbacks),
        ),
    )


def launch_ray(cfg: Config, run_url: str, started_at: float, console: ConsoleProgress) -> dict:
    import ray

    connect_ray(cfg.run.address)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not cfg.run.shared_storage:
        check_shared_storage(cfg.run.storage, len(nodes))
    board = ray.remote(ProgressBoard).options(num_cpus=0).remote()  # rank 0 posts progress here; the driver draws it
    timeline.mark("fit_called")
    trainer = torch_trainer(cfg, run_url, started_at, board)
    poller = Poller(board, console)
    try:
        with user_errors_are_final():  # a UserError on any worker ends the run: no retry
            result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - surface a worker's UserError as one line
        raise _user_error_from(exc) from None
    finally:
        poller.close()
    if result.error:
        raise _user_error_from(result.error)
    raw = storage.read_bytes(storage.join(run_url, "summary.json"))
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
