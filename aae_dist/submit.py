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
import shutil
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

    check_reachable(address)
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - turn Ray's many failure types into one line
        raise explain(exc, address) from None


def explain(exc: BaseException, address: str) -> UserError:
    from .ray_connect import shown

    text = storage.scrub(" ".join(str(exc).split()), address)
    low, address = text.lower(), shown(address)
    if "token" in low or "unauthenticated" in low or "401" in low or "403" in low:
        return UserError(f"the Ray cluster at {address} refused the request: authentication token missing or wrong "
                         "(set RAY_AUTH_TOKEN to the cluster's token, see `ray get-auth-token` on the head)")
    return UserError(f"Ray job API at {address} failed: {type(exc).__name__}: {text[:300]}")


def refuse_credentials(args) -> None:
    """Ray keeps a job's command line, runtime environment and files in plain text (job table, dashboard,
    logs), and a redacted URL would reach the job broken: so any URL with user-info in what submit would
    send or use is refused, naming the key and never the secret.  The typed flags are checked before the
    config is even loaded, so no later message can quote them."""
    for where, value in sent_values(args):
        if isinstance(value, str) and storage.has_credentials(value):
            raise UserError(credentials_message(where, value))


def sent_values(args):
    """(where, value) of every text submit sends or uses: --address, --storage, each --set, the arguments
    after --, then every value of the resolved config (its YAML file included) of a train or sweep job."""
    from .config import load_config

    yield "--address", args.address
    yield "--storage", getattr(args, "storage", None)
    for item in args.overrides or []:
        key, _, value = item.partition("=")
        yield f"--set {key.strip()}", value
    for a in args.extra or []:
        yield "an argument after --", a
    if args.command_to_run in ("train", "sweep"):
        origin = f" (in {args.config})" if args.config else ""
        for key, value in flat(load_config(args.config, args.overrides).to_dict()):
            yield key + origin, value


def flat(doc, prefix: str = ""):
    """(dotted key, value) of every leaf of a nested config dict (list items as key[i])."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else None
    if items is None:
        yield prefix, doc
        return
    for k, v in items:
        yield from flat(v, f"{prefix}[{k}]" if isinstance(doc, list) else f"{prefix}.{k}" if prefix else str(k))


def credentials_message(where: str, value: str) -> str:
    if where == "--address":
        fix = ("give the job API its token through the environment variable RAY_AUTH_TOKEN (see `ray get-auth-token` on the head) "
               "and drop USER:PASS@ from --address")
    else:
        fix = ("give the cluster its credentials through its environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the nodes' "
               "environment or the job's runtime env, or the nodes' IAM role) and drop KEY:SECRET@ from the URL")
    return f"{where} ({storage.redact(value)}) carries credentials in the URL, which submit never sends (Ray keeps jobs in plain text): {fix}"


def job_folder(args) -> str:
    """The job's working folder: the resolved config (credentials redacted; the cluster has its own) and nothing else."""
    import yaml

    from .config import load_config

    cfg = load_config(args.config, args.overrides) if args.command_to_run in ("train", "sweep") else None
    if cfg is not None and cfg.data.path and storage.is_local(cfg.data.path):
        raise UserError(f"data.path {storage.redact(cfg.data.path)} is a local path the cluster's workers cannot read: shard the data to "
                        "storage every node reaches (aae-dist shard SOURCE s3://BUCKET/NAME) and pass that URL")
    folder = tempfile.mkdtemp(prefix="aae-job-")  # the caller removes it once the job is submitted (Ray has uploaded it)
    if cfg is not None:
        with open(os.path.join(folder, JOB_CONFIG), "w") as fh:
            yaml.safe_dump(cfg.to_dict(redact=True), fh, sort_keys=False)
    return folder


def runtime_env(pip: bool, folder: str, py_modules=()) -> dict:
    env: dict = {
        "working_dir": folder,
        "py_modules": [PACKAGE_DIR, *(user_module(m) for m in py_modules)],
        "excludes": ["**/__pycache__"],
        "env_vars": {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"},
    }
    if pip:
        env["pip"] = requirements()
    return env


def user_module(path: str) -> str:
    """A --py-modules entry: a package folder or a single .py file that Ray uploads with the job."""
    full = os.path.abspath(os.path.expanduser(path))
    if not (os.path.isdir(full) or (os.path.isfile(full) and full.endswith(".py"))):
        raise UserError(f"--py-modules {path}: no such package folder or .py file: give the folder of the module your "
                        "model.*.class_path names (e.g. --py-modules ./mynets)")
    return full


def requirements() -> list[str]:
    """What --pip installs: aae-dist's own requirements (with the s3 extra, as clusters read object storage), read
    from the package's metadata, or from the pyproject.toml of the checkout being shipped; never a hand-kept list."""
    reqs = _checkout_requirements()
    if reqs is None:
        from importlib import metadata

        try:
            reqs = metadata.requires("aae-dist") or []
        except metadata.PackageNotFoundError:
            raise UserError("--pip: aae-dist is not installed here, so its requirements are unknown: pip install aae-dist "
                            "(or pip install -e . in the checkout) first") from None
    out = []
    for r in reqs:
        req, _, marker = (part.strip() for part in r.partition(";"))
        if "extra" not in marker:
            out.append(r.strip())
        elif marker.replace("'", '"').replace(" ", "") == 'extra=="s3"':
            out.append(req)
    return list(dict.fromkeys(out))


def _checkout_requirements() -> list[str] | None:
    """The dependencies (and s3 extra) of pyproject.toml beside the shipped package, when it is a checkout:
    the installed metadata of an editable install is as old as its last `pip install`."""
    path = os.path.join(os.path.dirname(PACKAGE_DIR), "pyproject.toml")
    try:
        import tomllib

        with open(path, "rb") as fh:
            project = tomllib.load(fh).get("project", {})
    except (ImportError, OSError, ValueError):
        return None
    if project.get("name") != "aae-dist":
        return None
    return list(project.get("dependencies", [])) + [f"{r}; extra == \"s3\"" for r in project.get("optional-dependencies", {}).get("s3", [])]


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
    from .runfolder import check_name

    if args.name is not None:
        check_name(args.name)
    if args.command_to_run == "train" and args.workers:
        run = RunSection()
        set_value(run, "workers", str(args.workers), "--workers")
        if not run.uses_ray:
            raise UserError("--workers 0 runs in-process; a submitted job needs at least one Ray worker")
    refuse_credentials(args)
    folder = job_folder(args)
    try:
        entry = train_entrypoint(args)
        if getattr(args, "dry_run", False):
            from .ray_connect import check_reachable

            check_reachable(args.address)
            print(plan(entry, runtime_env(args.pip, folder, getattr(args, "py_modules", []))))
            return 0
        c = client(args.address)
        try:
            job_id = c.submit_job(entrypoint=entry, runtime_env=runtime_env(args.pip, folder, getattr(args, "py_modules", [])),
                                  submission_id=args.job_id)
        except Exception as exc:  # noqa: BLE001
            raise explain(exc, args.address) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # submit_job uploaded it: never left in the user's /tmp
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
