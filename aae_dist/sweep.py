"""`aae-dist sweep`: many ordinary runs at once, as Ray Tune trials.

Each trial is an aae-dist training run like `train` makes (its own run folder STORAGE/NAME/<trial>,
checkpoints, TensorBoard), on --workers-per-trial Ray workers of its own (one TorchTrainer per trial),
as many trials at once as the cluster fits.  Tune's ASHA stops poor trials early on a metric the
coordinator already reduces and reports at every checkpoint (--prune-on); the final table ranks the
trials by --metric, read from each trial's summary.json, and is written to STORAGE/NAME/sweep.csv.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import sys
import time

from . import runfolder, storage
from .config import Config, load_config
from .errors import UserError
from .launch import ensure_default_data, make_plan
from .ray_launch import check_feasible, ray_storage, torch_trainer
from .ray_connect import connect_ray

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
_DIST = re.compile(r"^(\w+)\((.*)\)$")
TRIAL_PREFIX = "trial_"


def split_values(text: str) -> list[str]:
    """V1,V2,... where a value may itself hold commas inside brackets ([64,64])."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{(" and 1 or (ch in "]})" and -1 or 0)
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return [v for v in out if v != ""]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid = {}
    for item in items:
        key, eq, values = item.partition("=")
        vals = split_values(values) if eq else []
        if not key.strip() or not vals:
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid phases.reconstruction.lr=1e-3,3e-4")
        grid[key.strip()] = vals
    return grid


def parse_sample(items: list[str]) -> dict[str, tuple[str, list[str]]]:
    sample = {}
    for item in items:
        key, eq, dist = item.partition("=")
        m = _DIST.match(dist.strip()) if eq else None
        if not key.strip() or not m or m.group(1) not in DISTRIBUTIONS:
            raise UserError(f"--sample {item!r}: expected KEY=DIST with DIST one of {', '.join(d + '(...)' for d in DISTRIBUTIONS)}, "
                            "e.g. --sample phases.generator.lr=loguniform(1e-4,1e-2)")
        args = split_values(m.group(2))
        if m.group(1) != "choice":
            try:
                lo, hi = (float(a) for a in args)
            except ValueError:
                raise UserError(f"--sample {item!r}: {m.group(1)} takes two numbers LOW,HIGH") from None
            if not lo < hi or (m.group(1) == "loguniform" and lo <= 0):
                raise UserError(f"--sample {item!r}: need 0 < LOW < HIGH for loguniform, LOW < HIGH otherwise")
        elif not args:
            raise UserError(f"--sample {item!r}: choice needs at least one value")
        sample[key.strip()] = (m.group(1), args)
    return sample


def search_space(grid: dict, sample: dict) -> dict:
    from ray import tune

    space = {k: tune.grid_search(v) for k, v in grid.items()}
    for key, (kind, args) in sample.items():
        if kind == "choice":
            space[key] = tune.choice(args)
        elif kind == "randint":
            space[key] = tune.randint(int(float(args[0])), int(float(args[1])))
        else:
            space[key] = getattr(tune, kind)(float(args[0]), float(args[1]))
    return space


def overrides_of(params: dict) -> list[str]:
    return [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(params.items())]


def _trial(params: dict, spec: dict) -> None:
    """One Tune trial: an ordinary run in STORAGE/NAME/<trial id>, its reports forwarded to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = load_config(None, overrides_of(params), base=spec["config"])
    trial_id = tune.get_context().get_trial_id()
    if spec["vary_seed"]:  # repeats of one grid point differ by seed; grid points share seeds (a fair comparison)
        cfg.train.seed += int(trial_id.rsplit("_", 1)[-1]) // spec["grid_points"]
    cfg.run.name = TRIAL_PREFIX + trial_id
    cfg.run.storage = spec["sweep_url"]
    run_url = storage.join(cfg.run.storage, cfg.run.name)
    storage.write_bytes_atomic(storage.join(run_url, "config.json"), json.dumps(cfg.to_dict(redact=True), indent=1).encode())
    if cfg.run.worker_range[1] == 1:  # one worker: it is this trial process (no second Ray Train layer to start)
        from .training.session import TuneSession
        from .training.trainer import Trainer, worker_options

        Trainer(cfg, TuneSession(run_url, cfg.train.keep_checkpoints), **worker_options(cfg)).fit()
    else:
        result = torch_trainer(cfg, make_plan(cfg, run_url), time.time(), callbacks=[TuneReportCallback()]).fit()
        if result.error:
            raise result.error
    write_hparams(run_url, params, spec["metric"])


def _keep_credentials_out_of_trial_envs() -> None:
    """Ray Tune copies the driver's AWS_* credentials into every trial actor's runtime environment,
    which Ray's runtime-env agent writes to its log in plain text.  Trials read storage with the
    credentials their node already has (as Ray Train workers do), so Tune is told not to copy them."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})


def _leave_ray_working_dir() -> None:
    """A sweep submitted as a Ray job runs in the job's working_dir, which Ray deletes once the job's
    runtime environment leaves its cache, while the driver still runs; Tune then fails on
    os.getcwd().  Every path is absolute by now, so the driver steps out into the temp folder."""
    import tempfile

    try:
        inside = f"{os.sep}runtime_resources{os.sep}" in os.getcwd()
    except FileNotFoundError:
        inside = True
    if inside:
        os.chdir(tempfile.gettempdir())


def write_hparams(run_url: str, params: dict, metric: str) -> None:
    """The trial's config keys and final metrics as TensorBoard hparams: `tensorboard --logdir
    STORAGE/NAME` shows the trials side by side."""
    import tempfile

    from torch.utils.tensorboard import SummaryWriter

    summary = json.loads(storage.read_bytes(storage.join(run_url, "summary.json")))
    metrics = {k: float(v) for k, v in summary.get("metrics", {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
    local = tempfile.mkdtemp(prefix="aae-hparams-")
    try:
        with SummaryWriter(local) as w:
            w.add_hparams({k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()},
                          {f"hparams/{k}": v for k, v in metrics.items()} or {f"hparams/{metric}": float("nan")}, run_name=".")
        storage.upload_dir(local, storage.join(run_url, "tensorboard"))
    finally:
        shutil.rmtree(local, ignore_errors=True)  # one per trial: never left in the trial machine's /tmp


def results_table(sweep_url: str, keys: list[str], metric: str, mode: str, trials: list[dict]) -> list[dict]:
    """One row per trial (config keys, status, steps, final metrics), best first; unfinished trials last."""
    rows = []
    for t in trials:
        row = {"trial": t["trial"], "status": t["status"], **{k: t["params"].get(k) for k in keys}}
        summary_url = storage.join(sweep_url, TRIAL_PREFIX + t["trial"], "summary.json")
        if storage.exists(summary_url):
            s = json.loads(storage.read_bytes(summary_url))
            row.update(steps=s.get("steps"), **{k: v for k, v in s.get("metrics", {}).items() if isinstance(v, (int, float))})
        else:
            row.update(steps=t.get("step"))
        rows.append(row)

    def rank(row):
        v = row.get(metric)
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return (not ok, (v if mode == "min" else -v) if ok else 0.0)

    return sorted(rows, key=rank)


def to_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def show(rows: list[dict], keys: list[str], metric: str) -> str:
    cols = ["trial", "status", *keys, "steps", metric]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table)


def sweep_from_cli(args) -> int:
    grid, sample = parse_grid(args.grid), parse_sample(args.sample)
    if not grid and not sample:
        raise UserError("sweep needs at least one --grid KEY=V1,V2 or --sample KEY=DIST")
    cfg = sweep_config(args, grid, sample)
    name, root, sweep_url = sweep_folder(args, cfg)
    verbose = getattr(args, "verbose", False)
    plan = make_plan(cfg, sweep_url, check=True)  # the base config's plan: pre-flight, and the steps ASHA's rungs stop at
    check_feasible(plan, cfg.run)
    connect_ray(cfg.run.address, verbose)
    grid_points = math.prod(len(v) for v in grid.values())
    spec = {"config": cfg.to_dict(), "sweep_url": sweep_url, "metric": args.metric, "grid_points": grid_points,
            "vary_seed": args.trials > 1 and "train.seed" not in grid and "train.seed" not in sample}
    keys = list(grid) + list(sample)
    print(f"aae-dist: sweep '{name}' over {', '.join(keys)}: {args.trials} x {grid_points} trials, "
          f"{args.workers_per_trial} worker(s) each; folder {storage.redact(sweep_url)}", flush=True)
    _keep_credentials_out_of_trial_envs()
    _leave_ray_working_dir()
    tune_store = ray_storage(root)
    tuner = _tuner(args, name, sweep_url, tune_store, _trainable(spec, plan), grid, sample, max(1, plan.total_steps()))
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:  # Tune's own tables; ours follows
        grid_result = tuner.fit()
    return _report(args, name, sweep_url, keys, _trial_records(grid_result, sweep_url, keys, tune_store))


def sweep_config(args, grid: dict, sample: dict) -> Config:
    """The trials' base config (each trial a Ray Train run of --workers-per-trial workers), every swept value checked."""
    overrides = [*args.overrides, f"run.workers={args.workers_per_trial}", *([f"run.address={args.address}"] if args.address else [])]
    cfg = load_config(args.config, overrides)
    if cfg.run.cpus_per_worker is None:  # trials share the cluster: one core per worker unless asked otherwise
        cfg.run.cpus_per_worker = 1
    check_values(cfg, grid, sample)
    if not cfg.run.uses_ray:
        raise UserError("--workers-per-trial must be at least 1: each trial is a Ray Train run")
    if not cfg.data.path:
        cfg.data.path = ensure_default_data()
    return cfg


def check_values(cfg: Config, grid: dict, sample: dict) -> None:
    """Every swept value is a valid config value, checked before Ray starts: one load per value over the
    resolved config (the YAML file is read once, by the caller)."""
    base = cfg.to_dict()
    items = [f"{key}={v}" for key, values in grid.items() for v in values]
    items += [f"{key}={vals[0] if kind == 'choice' else float(vals[0])}" for key, (kind, vals) in sample.items()]
    for item in items:
        load_config(None, [item], base=base)


def sweep_folder(args, cfg: Config) -> tuple[str, str, str]:
    """(name, storage root, sweep URL), refusing a start --resume does not allow."""
    name = runfolder.check_name(args.name) if args.name is not None else time.strftime("sweep-%Y%m%d-%H%M%S")
    root = args.storage or cfg.run.storage
    if storage.is_local(root):
        root = os.path.abspath(root)
    sweep_url = storage.join(root, name)
    exists = storage.exists(sweep_url) and bool(storage.listdir(sweep_url))
    if exists and not args.resume:
        raise UserError(f"sweep '{name}' already exists at {storage.redact(root)}: pass --resume to continue it or choose another --name")
    if args.resume and not exists:
        raise UserError(f"--resume: no sweep named '{name}' at {storage.redact(root)}: check --name/--storage")
    return name, root, sweep_url


def _trainable(spec: dict, plan):
    """One worker per trial: the trial process trains and holds its cores; more: it only waits on its
    TorchTrainer, so it asks for no CPU (Tune needs some resource: 1 byte of memory)."""
    from ray import tune

    one = plan.workers[1] == 1
    return tune.with_parameters(tune.with_resources(_trial, {"CPU": plan.resources["CPU"]} if one else {"CPU": 0, "memory": 1}), spec=spec)


def _tuner(args, name: str, sweep_url: str, tune_store: dict, trainable, grid: dict, sample: dict, steps: int):
    """A new Tuner over the search space, or the interrupted one restored (--resume)."""
    from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner
    from ray.tune.schedulers import ASHAScheduler

    if args.resume:
        fs = {"storage_filesystem": tune_store["storage_filesystem"]} if "storage_filesystem" in tune_store else {}
        return Tuner.restore(storage.join(tune_store["storage_path"], name) if fs else sweep_url, trainable,
                             resume_unfinished=True, resume_errored=True, **fs)
    scheduler = None  # runs too short to prune: every trial runs to its end
    if args.grace_steps < steps:  # ASHA's rungs at grace x 3^k steps, before the final report (evaluation), never on it
        scheduler = ASHAScheduler(time_attr="step", metric=args.prune_on, mode="min", grace_period=max(1, args.grace_steps),
                                  max_t=steps + 1, reduction_factor=3)
    return Tuner(
        trainable,
        param_space=search_space(grid, sample),
        tune_config=TuneConfig(num_samples=args.trials, scheduler=scheduler, max_concurrent_trials=args.max_concurrent or None),
        run_config=RunConfig(name=name, **tune_store, failure_config=FailureConfig(max_failures=args.trial_retries), verbose=0),
    )


def _trial_records(grid_result, sweep_url: str, keys: list[str], tune_store: dict) -> list[dict]:
    """Tune's own view of each trial: an interrupted sweep leaves its unfinished trials PENDING (resumable)."""
    states = saved_states(grid_result.experiment_path, tune_store)
    trials = []
    for r in grid_result:
        trial_id = (r.metrics or {}).get("trial_id") or _trial_id_from_path(r.path)
        finished = storage.exists(storage.join(sweep_url, TRIAL_PREFIX + trial_id, "summary.json"))
        status = "ERROR" if r.error else "DONE" if finished else "PENDING" if states.get(trial_id) in ("PENDING", "RUNNING", None) else "STOPPED"
        trials.append({"trial": trial_id, "status": status, "params": {k: (r.config or {}).get(k) for k in keys},
                       "step": (r.metrics or {}).get("step")})
    return trials


def _report(args, name: str, sweep_url: str, keys: list[str], trials: list[dict]) -> int:
    """The ranked table (printed and sweep.csv) and the exit status: 130 interrupted, 1 every trial failed."""
    rows = results_table(sweep_url, keys, args.metric, args.mode, trials)
    storage.write_bytes_atomic(storage.join(sweep_url, "sweep.csv"), to_csv(rows).encode())
    print(show(rows, keys, args.metric))
    print(f"sweep.csv: {storage.redact(storage.join(sweep_url, 'sweep.csv'))}")
    print(f"tensorboard --logdir {storage.redact(sweep_url)}   (HPARAMS tab: the trials side by side)")
    if any(t["status"] == "PENDING" for t in trials):
        print(f"aae-dist: sweep interrupted: continue it with --resume --name {name} (same --storage)", file=sys.stderr)
        return 130
    failed = [t for t in trials if t["status"] == "ERROR"]
    return 1 if failed and len(failed) == len(trials) else 0


def _trial_id_from_path(path: str | None) -> str:
    """Tune's trial folder `_trial_<experiment>_<index>_...` -> `<experiment>_<index>` (a trial that never reported)."""
    parts = os.path.basename(path or "").split("_")
    return "_".join(parts[2:4]) if len(parts) > 3 else "?"


def saved_states(experiment_path: str, tune_store: dict) -> dict[str, str]:
    """Trial statuses as Tune saved them for a resume (in memory, interrupted trials read TERMINATED)."""
    import logging

    from ray.tune import ExperimentAnalysis

    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # trials that never reported have no result file: expected
    fs = {"storage_filesystem": tune_store["storage_filesystem"]} if "storage_filesystem" in tune_store else {}
    return {t.trial_id: t.status for t in ExperimentAnalysis(experiment_path, **fs).trials}
