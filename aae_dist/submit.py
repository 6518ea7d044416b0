"""Ray jobs: `aae-dist submit` and `aae-dist jobs list|status|logs|stop`, over JobSubmissionClient.

The job carries this package as a Ray `py_modules` entry (the `aae_dist` folder alone, whether
installed in site-packages or checked out), so the cluster runs exactly this code; its working
folder holds only the resolved config, written here.  With --pip it also installs the package's
requirements.  Authentication tokens come from RAY_AUTH_TOKEN (Ray's own variable) and are never
printed."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile

from . import storage
from .errors import UserError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))  # the aae_dist package folder, nothing around it
JOB_CONFIG = "config.yaml"


def client(address: str):
    if os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"  # Ray's client sends the token only in token mode (read at import)
    from ray.job_submission import JobSubmissionClient

    from .ray_connect import check_reachable

    check_reachable(address if "://" not in address else address.split("://", 1)[1])
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - turn Ray's many failure types into one line
        raise explain(exc, address) from None


def explain(exc: BaseException, address: str) -> UserError:
    text = " ".join(str(exc).split())
    low = text.lower()
    if "token" in low or "unauthenticated" in low or "401" in low or "403" in low:
        return UserError(f"the Ray cluster at {address} refused the request: authentication token missing or wrong "
                         "(set RAY_AUTH_TOKEN to the cluster's token, see `ray get-auth-token` on the head)")
    return UserError(f"Ray job API at {address} failed: {type(exc).__name__}: {text[:300]}")


def refuse_credentials(args) -> None:
    """Ray keeps a job's command line, runtime environment and files in plain text (job table, dashboard,
    logs): a URL with KEY:SECRET@ in it would be stored there, so it is refused, naming where it was."""
    from .config import load_config

    places = [("--storage", getattr(args, "storage", None))] + [("an argument after --", a) for a in (args.extra or [])]
    if args.command_to_run in ("train", "sweep"):
        places.append(("data.path", load_config(args.config, args.overrides).data.path))
    for where, value in places:
        if value and storage.has_credentials(str(value)):
            raise UserError(f"{where} ({storage.redact(str(value))}) carries credentials in the URL, which Ray would store in plain text: "
                            "give the cluster its credentials through its environment (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                            "on every node) and drop KEY:SECRET@ from the URL")


def job_folder(args) -> str:
    """The job's working folder: the resolved config (credentials redacted; the cluster has its own) and nothing else."""
    import yaml

    from .config import load_config

    folder = tempfile.mkdtemp(prefix="aae-job-")
    if args.command_to_run in ("train", "sweep"):
        cfg = load_config(args.config, args.overrides)
        if cfg.data.path and storage.is_local(cfg.data.path):
            raise UserError(f"data.path {cfg.data.path} is a local path the cluster's workers cannot read: shard the data to "
                            "storage every node reaches (aae-dist shard SOURCE s3://BUCKET/NAME) and pass that URL")
        with open(os.path.join(folder, JOB_CONFIG), "w") as fh:
            yaml.safe_dump(cfg.to_dict(redact=True), fh, sort_keys=False)
    return folder


def runtime_env(pip: bool, folder: str) -> dict:
    env: dict = {
        "working_dir": folder,
        "py_modules": [PACKAGE_DIR],
        "excludes": ["**/__pycache__"],
        "env_vars": {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"},
    }
    if pip:
        env["pip"] = ["ray[train,default]>=2.50", "fsspec>=2024.2", "s3fs>=2024.2", "tensorboard>=2.15", "pyyaml>=6",
                      "pydantic>=2.5", "tqdm>=4.60", "pillow>=10", "pyarrow>=14", "mlxtend>=0.23"]
    return env


def train_entrypoint(args) -> str:
    cmd = [args.command_to_run]
    if args.command_to_run not in ("train", "sweep"):  # eval / generate: their own arguments follow --
        extra = list(args.extra or []) + (["--address", "auto"] if args.command_to_run == "generate" else [])
        return "python -m aae_dist.cli " + " ".join(shlex.quote(c) for c in cmd + extra)
    cmd += ["--config", JOB_CONFIG]  # the resolved config in the job's working folder (--set folded in)
    for flag in ("workers", "storage", "name") if args.command_to_run == "train" else ("storage", "name"):
        if getattr(args, flag, None):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.gpu:
        cmd.append("--gpu")
    cmd += list(args.extra or [])
    # inside the job the driver joins the cluster it runs on
    return "python -m aae_dist.cli " + " ".join(shlex.quote(c) for c in cmd) + " --address auto"


def submit(args) -> int:
    from .config import RunSection, set_value

    if args.command_to_run == "train" and args.workers:
        run = RunSection()
        set_value(run, "workers", str(args.workers), "--workers")
        if not run.uses_ray:
            raise UserError("--workers 0 runs in-process; a submitted job needs at least one Ray worker")
    refuse_credentials(args)
    folder = job_folder(args)
    entry = train_entrypoint(args)
    if getattr(args, "dry_run", False):
        from .ray_connect import check_reachable

        check_reachable(args.address if "://" not in args.address else args.address.split("://", 1)[1])
        print(plan(entry, runtime_env(args.pip, folder)))
        return 0
    c = client(args.address)
    try:
        job_id = c.submit_job(entrypoint=entry, runtime_env=runtime_env(args.pip, folder), submission_id=args.job_id)
    except Exception as exc:  # noqa: BLE001
        raise explain(exc, args.address) from None
    print(job_id, flush=True)
    if not args.follow:
        return 0
    return follow(c, job_id, args.address)


def plan(entry: str, env: dict) -> str:
    """What `submit` would send, for --dry-run: the entrypoint, the files that travel, the resolved config."""
    lines = ["plan (--dry-run: nothing was submitted):", f"  entrypoint: {entry}"]
    for module in env["py_modules"]:
        files = [os.path.join(r, f) for r, _, fs in os.walk(module) for f in fs if "__pycache__" not in r]
        lines.append(f"  py_modules: {module} ({len(files)} files, {sum(os.path.getsize(f) for f in files) / 1e3:.0f} kB)")
    lines.append(f"  working_dir: {env['working_dir']}: {', '.join(sorted(os.listdir(env['working_dir']))) or '(empty)'}")
    if env.get("pip"):
        lines.append(f"  pip: {' '.join(env['pip'])}")
    cfg = os.path.join(env["working_dir"], JOB_CONFIG)
    if os.path.exists(cfg):
        lines += ["", open(cfg).read().rstrip()]
    return "\n".join(lines)


def follow(c, job_id: str, address: str) -> int:
    """Stream the job's logs with Ray's log-tailing API until it ends; exit status from its final state."""

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
        status = str(c.get_job_status(job_id)).split(".")[-1]
    except Exception as exc:  # noqa: BLE001
        raise explain(exc, address) from None
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def jobs_command(args) -> int:
    c = client(args.address)
    try:
        if args.action == "list":
            for j in c.list_jobs():
                print(f"{j.submission_id}\t{str(j.status).split('.')[-1]}\t{j.entrypoint}")
        elif args.action == "status":
            print(str(c.get_job_status(args.job_id)).split(".")[-1])
        elif args.action == "logs":
            if args.follow:
                return follow(c, args.job_id, args.address)
            sys.stdout.write(c.get_job_logs(args.job_id))
        elif args.action == "stop":
            print("stopped" if c.stop_job(args.job_id) else "not running")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise explain(exc, args.address) from None
    return 0
