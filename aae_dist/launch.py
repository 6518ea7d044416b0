"""The driver side of `aae-dist train`: resolve the config, prepare data and the run folder, launch workers."""

from __future__ import annotations

import json
import os
import sys
import time

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
    cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", []))
    run = cfg.run
    for flag in ("workers", "storage", "name", "address"):
        value = getattr(args, flag, None)
        if value is not None:
            set_value(run, flag, str(value), f"--{flag}")
    if getattr(args, "gpu", False):
        run.gpu = True
    if run.name is None or (run.name == "" and getattr(args, "name", None) is None):
        run.name = time.strftime("aae-%Y%m%d-%H%M%S")
    runfolder.check_name(run.name, "--name" if getattr(args, "name", None) is not None else "run.name")
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


def train_from_cli(args, started_at: float | None = None) -> int:
    started_at = time.time() if started_at is None else started_at
    timeline.reset()
    timeline.mark("start", started_at)
    cfg = resolve(args)
    if not cfg.data.path:
        cfg.data.path = ensure_default_data()
    storage_url = cfg.run.storage
    if storage.is_local(storage_url):
        storage_url = os.path.abspath(storage_url)
        cfg.run.storage = storage_url
    runfolder.check_storage(storage_url)
    run_url = storage.join(storage_url, cfg.run.name)
    resume, overwrite = getattr(args, "resume", False), getattr(args, "overwrite", False)
    exists = check_flags(cfg, run_url, resume, overwrite)
    preflight(cfg)
    if resume:
        check_resume(run_url, cfg)
    verbose = getattr(args, "verbose", False)
    if cfg.run.uses_ray:
        check_feasible(cfg, verbose)
    if getattr(args, "dry_run", False):
        print(plan(cfg, run_url, exists and not resume))
        return 0
    lease = runfolder.Lease(run_url, cfg.run.name).acquire()  # one owner from here on
    try:
        return _train_holding_lease(cfg, run_url, resume, overwrite, started_at, verbose)
    finally:
        lease.release()


def _train_holding_lease(cfg: Config, run_url: str, resume: bool, overwrite: bool, started_at: float, verbose: bool) -> int:
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
        return _start(cfg, run_url, started_at, verbose)
    finally:
        if exists and not resume:
            runfolder.settle_aside(run_url)  # the old run goes once the new one has a checkpoint; else it is put back


def _start(cfg: Config, run_url: str, started_at: float, verbose: bool) -> int:
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
        return 130
    if summary:
        print(final_table(summary, dict(variant(cfg.model.variant).paper), run_url, storage.redact))
        if logs:
            print(f"Ray's logs (workers' output included): {logs}")
    return 0


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


def torch_trainer(cfg: Config, run_url: str, started_at: float, board=None, callbacks=()):
    """The Ray Train trainer of one run (also one sweep trial's): cfg.run says how many workers, where."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .training.trainer import train_worker

    lo, hi = cfg.run.worker_range
    cpus = cpus_per_worker(cfg)
    cfg.run.cpus_per_worker = cpus
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
