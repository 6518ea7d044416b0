"""The driver side of `aae-dist train`: resolve the config, make the run plan, hold the run folder, start the run
(the checks: preflight.py; the plan: plan.py; Ray Train: ray_launch.py)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

from . import runfolder, storage, timeline
from .config import Config, load_config, set_value
from .console import ConsoleProgress, LocalBoard, final_table, start_line
from .data import read_manifest
from .errors import UserError
from .plan import RunPlan
from .preflight import check_flags, check_models, check_plan, check_resume, preflight
from .ray_connect import connect_ray, ray_log_dir, start_early
from .ray_launch import check_feasible, launch_ray
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
    plan, m = plan_and_manifest(cfg, run_url)
    check_plan(cfg, plan, m)
    if resume:
        check_resume(run_url, cfg)
    if cfg.run.uses_ray:
        check_feasible(plan, cfg.run, verbose)
    early = start_early(verbose) if cfg.run.uses_ray and not cfg.run.address and not dry_run else None
    with stopped_if_refused(early):  # the torch-bound checks run while the local Ray starts
        check_models(cfg, m)
        if dry_run:
            print(dry_run_text(cfg, plan, exists and not resume))
            return Outcome(0, None, None)
        lease = runfolder.Lease(run_url, cfg.run.name).acquire()  # one owner from here on
    try:
        return _train_holding_lease(cfg, plan, resume, overwrite, started_at, verbose, kept)
    finally:
        lease.release()


def make_plan(cfg: Config, run_url: str, check: bool = False) -> RunPlan:
    """The run plan from the config and the dataset's manifest (read once); check=True: pre-flight too."""
    plan, m = plan_and_manifest(cfg, run_url)
    if check:
        preflight(cfg, plan, m)
    return plan


def plan_and_manifest(cfg: Config, run_url: str):
    """The plan and the manifest it was made from.  A table dataset's own defaults are applied to `cfg`
    first, where the config left a key unset."""
    from .data.tables import apply_table_defaults

    m = read_manifest(cfg.data.path)
    apply_table_defaults(cfg, m)
    return RunPlan.of(cfg, run_url, m.split("train", cfg.data.path).count), m


@contextlib.contextmanager
def stopped_if_refused(early):
    """A Ray started early is shut down again when what follows refuses: a refused run leaves nothing running."""
    try:
        yield
    except BaseException:
        if early is not None:
            early.stop()
        raise


def dry_run_text(cfg: Config, plan: RunPlan, replaces: bool) -> str:
    """What `train` would do, for --dry-run: the resolved config, then the plan."""
    import yaml

    return "\n".join([yaml.safe_dump(cfg.to_dict(redact=True), sort_keys=False).rstrip(), "",
                      "plan (--dry-run: nothing was written):", *plan.describe(replaces)])


def _train_holding_lease(cfg: Config, plan: RunPlan, resume: bool, overwrite: bool, started_at: float, verbose: bool,
                         kept: bool = True) -> Outcome:
    run_url = plan.run_url
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
        return _start(cfg, plan, started_at, verbose, kept)
    finally:
        if exists and not resume:
            runfolder.settle_aside(run_url)  # the old run goes once the new one has a checkpoint; else it is put back


def _start(cfg: Config, plan: RunPlan, started_at: float, verbose: bool, kept: bool = True) -> Outcome:
    run_url = plan.run_url
    if cfg.run.uses_ray:
        connect_ray(cfg.run.address, verbose)
        timeline.mark("ray_started")
    print(start_line(cfg, plan.train_samples, run_url, storage.redact), flush=True)
    storage.write_bytes_atomic(storage.join(run_url, "config.json"), json.dumps(cfg.to_dict(redact=True), indent=1).encode())
    from .training import interrupt

    interrupt.clear_marker(run_url)
    interrupt.reset()
    restore = interrupt.install(run_url if cfg.run.uses_ray else None)
    try:
        summary = launch(cfg, plan, started_at)
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


def launch(cfg: Config, plan: RunPlan, started_at: float) -> dict:
    console = ConsoleProgress(enabled=cfg.train.progress)
    if not cfg.run.uses_ray:
        from .training.trainer import train_in_process

        try:
            return train_in_process(cfg, plan.run_url, started_at, LocalBoard(console))
        finally:
            console.close()
    return launch_ray(cfg, plan, started_at, console)
