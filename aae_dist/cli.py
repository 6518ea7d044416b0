"""`aae-dist` command line: one sub-command per user task; heavy imports happen inside each."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def storage_redact(url: str) -> str:
    from .storage import redact

    return redact(url)


def cmd_shard(args) -> int:
    """Any registered source (data/sources/): chunks streamed into shards, or a source that writes its own (tables)."""
    from .data.sources import lookup, open_source
    from .data.writer import write_source

    source, arg = lookup(args.source)
    opts = {o.dest: getattr(args, o.dest, o.default) for o in source.options}
    writer = dict(shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.quiet)
    if source.write is not None:
        m = source.write(arg, args.dest, {**opts, "test_fraction": args.test_fraction}, **writer)
    else:
        m = write_source(args.dest, open_source(args.source, args.test_fraction, **opts), validation_size=args.validation_size, **writer)
    counts = ", ".join(f"{k}={v.count} in {len(v.shards)} shards" for k, v in m.splits.items())
    tail = source.summary(m) if source.summary else f"samples {m.dtype} {'x'.join(map(str, m.shape))}"
    print(f"wrote {m.source} to {storage_redact(args.dest)}: {counts}; {tail}")
    return 0


def source_usages() -> str:
    from .data.sources import registry

    return " | ".join(src.usage for src in registry(strict=False).values())


def add_source_options(s: argparse.ArgumentParser) -> None:
    """The flags every registered source declares (images: --image-size; tables: --categorical; plug-ins: theirs)."""
    from .data.sources import options

    for opt in options(strict=False):
        kw = {"type": opt.type} if opt.type else {}
        s.add_argument(opt.flag, default=opt.default, help=opt.help, metavar=opt.metavar, **kw)


def cmd_verify(args) -> int:
    from .data.verify import verify_dataset

    print(verify_dataset(args.url))
    return 0


def cmd_train(args) -> int:
    from .launch import train_from_cli

    return train_from_cli(args, started_at=args.started_at)


def cmd_sweep(args) -> int:
    from .sweep import sweep_from_cli

    return sweep_from_cli(args)


def cmd_eval(args) -> int:
    from .inference import evaluate, to_json, write_figures

    result = evaluate(args.ref, args.data, args.split)  # a table run's row report is in result["table"]
    table = None if "table" in result else table_eval(args)
    print(to_json({**result, "table": table} if table else result))
    if args.plots:
        for path in write_figures(args.ref, args.plots, args.data, args.split):
            print(f"wrote {storage_redact(path)}", file=sys.stderr)
    return 0


def table_eval(args) -> dict | None:
    """A table run's report (quality, efficacy, privacy) beside the usual metrics; None for image runs."""
    from .inference import load_run, run_data

    cfg, model = load_run(args.ref)
    if model.rows is None:
        return None
    from .tabular import evaluate_table

    return evaluate_table(args.ref, run_data(cfg, args.data), args.split)


def cmd_sample(args) -> int:
    from .inference import sample_grid

    if args.out is None or args.rows:
        from .tabular import sample_rows

        print(sample_rows(args.ref, args.n if args.n != 64 else 10, seed=args.seed, label=args.label))
        return 0
    if args.label is not None:
        try:
            args.label = int(args.label)
        except ValueError:
            raise UserError(f"--label {args.label!r}: an image run's class is a whole number") from None
    print(storage_redact(sample_grid(args.ref, args.n, args.out, label=args.label, interpolate=args.interpolate, seed=args.seed)))
    return 0


def cmd_encode(args) -> int:
    from .inference import encode

    keep = [c.strip() for c in (args.keep or "").split(",") if c.strip()]
    n = encode(args.ref, args.data, args.out, splits=args.split, workers=args.workers, address=args.address, keep=keep)
    print(f"encoded {n} samples to {storage_redact(args.out)}")
    return 0


def cmd_generate(args) -> int:
    from .inference import generate

    if args.format:
        from .tabular import generate_table

        n = generate_table(args.ref, args.n, args.out, args.format, label=args.label, shard_size=args.shard_size, seed=args.seed,
                           workers=args.workers, address=args.address, overwrite=args.overwrite)
        print(f"generated {n} rows as {args.format} files in {storage_redact(args.out)}")
        return 0
    if args.label is not None:
        raise UserError("--label on generate needs --format parquet|csv (a table run); image runs take --label on sample")
    n = generate(args.ref, args.n, args.out, shard_size=args.shard_size, seed=args.seed, workers=args.workers,
                 address=args.address, overwrite=args.overwrite)
    print(f"generated {n} samples as a dataset at {storage_redact(args.out)}")
    return 0


def cmd_config(args) -> int:
    from .config import describe

    rows = describe()
    width = max(len(r[0]) for r in rows)
    for key, typ, default, meaning in rows:
        if typ == "section":
            print(f"\n{key}: {meaning}")
        else:
            print(f"  {key.ljust(width)}  {typ}  = {default}  {meaning}")
    return 0


def cmd_submit(args) -> int:
    from .submit import submit

    return submit(args)


def cmd_jobs(args) -> int:
    from .submit import jobs_command

    if args.action != "list" and not args.job_id:
        raise UserError(f"aae-dist jobs {args.action} needs a JOB_ID (see aae-dist jobs list)")
    return jobs_command(args)


class Parser(argparse.ArgumentParser):
    """argparse, except that a Hydra-style `key.sub=value` gets the --set it needs as one line."""

    def error(self, message: str):
        hint = hydra_hint(message)
        if hint:
            raise UserError(hint)
        super().error(message)


def hydra_hint(message: str) -> str | None:
    """For 'unrecognized arguments: train.epochs=3': how to say it (config keys are set with --set)."""
    import re

    if not message.startswith("unrecognized arguments: "):
        return None
    tokens = message.split(": ", 1)[1].split()
    keys = [t for t in tokens if re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*=.*", t)]
    if not keys:
        return None
    return (f"unrecognized arguments: {' '.join(tokens)}: config keys are set with --set KEY=VALUE, e.g. "
            f"{' '.join('--set ' + k for k in keys)} (aae-dist config lists every key)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = Parser(prog="aae-dist", description="Distributed Adversarial Autoencoders on Ray Train")
    p.add_argument("--version", action="version", version=f"aae-dist {__version__}")
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("shard", help="write a dataset as shards + manifest.json to any fsspec URL")
    s.add_argument("source", help=source_usages() + " (URL: a file, folder or glob)")
    s.add_argument("dest", help="destination URL (path, file://, s3://, gs://, memory://)")
    s.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (default 10000)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing dataset at DEST")
    s.add_argument("--test-fraction", type=float, default=0.1, help="held-out share for sources without a test split")
    s.add_argument("--validation-size", type=int, default=0,
                   help="hold the last N training samples out as a 'validation' split (Parzen sigma is chosen there)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    add_source_options(s)
    s.set_defaults(func=cmd_shard)

    v = sub.add_parser("verify", help="check every shard of a dataset against its manifest (size, checksums, shape)")
    v.add_argument("url", help="dataset URL (folder holding manifest.json)")
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser("eval", help="metrics of a trained run as JSON")
    e.add_argument("ref", metavar="RUN_OR_CHECKPOINT", help="a run folder (its latest checkpoint) or a checkpoint_* folder")
    e.add_argument("--data", help="dataset URL (default: the run's data.path)")
    e.add_argument("--split", default="test", help="split to evaluate (default test)")
    e.add_argument("--plots", metavar="DIR", help="also write the paper's figures (codes, clusters, style x label, 2-D representation) as PNGs to DIR")
    e.set_defaults(func=cmd_eval)

    sm = sub.add_parser("sample", help="a PNG grid of decoded prior samples")
    sm.add_argument("ref", metavar="RUN_OR_CHECKPOINT", help="a run folder or a checkpoint_* folder")
    sm.add_argument("--n", type=int, default=64, help="samples in the grid (default 64)")
    sm.add_argument("--out", help="PNG file (any fsspec URL); table runs print rows instead")
    sm.add_argument("--label", help="fix the class (supervised, semi-supervised, label-regularised); tables: a value of the target")
    sm.add_argument("--rows", action="store_true", help="tables: print generated rows (the default without --out)")
    sm.add_argument("--interpolate", action="store_true", help="walk between two codes")
    sm.add_argument("--seed", type=int, default=0, help="seed of the prior draws")
    sm.set_defaults(func=cmd_sample)

    en = sub.add_parser("encode", help="codes (and predicted y) of a dataset as Parquet")
    en.add_argument("ref", metavar="RUN_OR_CHECKPOINT", help="a run folder or a checkpoint_* folder")
    en.add_argument("--data", required=True, help="dataset URL to encode")
    en.add_argument("--out", required=True, help="folder URL for <split>-NNNNN.parquet")
    en.add_argument("--split", action="append", help="splits to encode (default all)")
    en.add_argument("--workers", type=int, default=0, help="Ray tasks at once (0: in this process)")
    en.add_argument("--address", help="Ray cluster address")
    en.add_argument("--keep", metavar="COL,...", help="tables: write these key columns (kept by shard --keep) beside each code")
    en.set_defaults(func=cmd_encode)

    g = sub.add_parser("generate", help="N generated samples as a sharded dataset")
    g.add_argument("ref", metavar="RUN_OR_CHECKPOINT", help="a run folder or a checkpoint_* folder")
    g.add_argument("--n", type=int, required=True, help="samples to generate")
    g.add_argument("--out", required=True, help="dataset URL to write (shards + manifest.json)")
    g.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (default 10000)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prior draws")
    g.add_argument("--workers", type=int, default=0, help="Ray tasks at once (0: in this process)")
    g.add_argument("--address", help="Ray cluster address")
    g.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    g.add_argument("--format", choices=["parquet", "csv"], help="tables: write rows as part-NNNNN.parquet|csv files in --out")
    g.add_argument("--label", help="tables: every row of this target value (labelled variants)")
    g.set_defaults(func=cmd_generate)

    sb = sub.add_parser("submit", help="submit a run as a Ray job to a cluster")
    sb.add_argument("--address", required=True, help="Ray dashboard/job API URL, e.g. http://head:8265")
    sb.add_argument("--config", help="YAML config file")
    sb.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key (see aae-dist config)")
    sb.add_argument("--workers", help="number of Ray workers N, or MIN:MAX for elastic")
    sb.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    sb.add_argument("--storage", help="run storage every node can reach (s3://, gs://, shared mount)")
    sb.add_argument("--name", help="run name (default: a timestamp)")
    sb.add_argument("--follow", action="store_true", help="stream the logs; exit with the job's status")
    sb.add_argument("--command", dest="command_to_run", default="train", choices=["train", "sweep", "eval", "generate"],
                    help="what the job runs (sweep/eval/generate take their own arguments after --, e.g. -- --grid KEY=V1,V2)")
    sb.add_argument("--pip", action="store_true", help="install aae-dist's requirements in the job (clusters without it)")
    sb.add_argument("--py-modules", dest="py_modules", action="append", default=[], metavar="PATH",
                    help="ship your own Python module or package folder with the job (e.g. the networks model.encoder.class_path names)")
    sb.add_argument("--job-id", help="submission id to use")
    sb.add_argument("--dry-run", action="store_true", help="check the config and the cluster's job API, print what would be sent, submit nothing")
    sb.add_argument("extra", nargs="*", help="more arguments for the command, after --")
    sb.set_defaults(func=cmd_submit)

    jb = sub.add_parser("jobs", help="list, inspect, follow or stop Ray jobs")
    jb.add_argument("action", choices=["list", "status", "logs", "stop"], help="what to do")
    jb.add_argument("job_id", nargs="?", help="the job (see aae-dist jobs list)")
    jb.add_argument("--address", required=True, help="Ray dashboard/job API URL, e.g. http://head:8265")
    jb.add_argument("--follow", action="store_true", help="logs: keep streaming until the job ends")
    jb.set_defaults(func=cmd_jobs)

    cf = sub.add_parser("config", help="every config key with its type, default and meaning (for --set and YAML files)")
    cf.set_defaults(func=cmd_config)

    t = sub.add_parser(
        "train", help="train an AAE (default: embedded digits, one local worker)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="most used config keys (--set KEY=VALUE or YAML):\n"
               "  data.path, data.batch_size, data.labeled_per_class, model.variant, model.hidden, model.latent_dim,\n"
               "  model.posterior, model.batch_norm, prior.kind, phases.<phase>.lr, train.epochs, train.max_steps,\n"
               "  train.checkpoint_every, train.seed, model.encoder.class_path / model.decoder.class_path (your own networks)\n"
               "every key with its type, default and meaning: aae-dist config; full examples: jobs/*.yaml, jobs/cpu/*.yaml")
    add_run_arguments(t)
    t.add_argument("--resume", action="store_true", help="continue the named run from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run of this name (deleted only once every check has passed)")
    t.add_argument("--dry-run", action="store_true", help="check everything, print the resolved config and the plan, write nothing")
    t.add_argument("--verbose", action="store_true", help="show Ray's own logs and the workers' output on the console")
    t.add_argument("--fast-dev-run", action="store_true",
                   help="smoke test: 3 steps, a tiny evaluation, in a throwaway folder; nothing kept but the printed summary")
    t.set_defaults(func=cmd_train)

    sw = sub.add_parser("sweep", help="many runs at once as Ray Tune trials (grid and/or sampled keys), ranked in a table and sweep.csv")
    sw.add_argument("--config", help="base YAML config (every trial starts from it)")
    sw.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key for every trial")
    sw.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", help="try every value (all --grid keys crossed)")
    sw.add_argument("--sample", action="append", default=[], metavar="KEY=DIST",
                    help="draw per trial: uniform(a,b), loguniform(a,b), randint(a,b), choice(v1,v2,...)")
    sw.add_argument("--trials", type=int, default=1, help="trials per grid point (default 1)")
    sw.add_argument("--workers-per-trial", default="1", help="Ray workers per trial (default 1)")
    sw.add_argument("--metric", default="recon_loss", help="final metric that ranks the trials (default recon_loss; e.g. classify_error)")
    sw.add_argument("--mode", choices=["min", "max"], default="min", help="lower (min) or higher (max) is better")
    sw.add_argument("--prune-on", default="reconstruction/loss",
                    help="metric reported at every checkpoint that ASHA stops poor trials on (lower is better)")
    sw.add_argument("--grace-steps", type=int, default=200, help="steps every trial runs before ASHA may stop it")
    sw.add_argument("--max-concurrent", type=int, default=0, help="trials at once (default: as many as the cluster fits)")
    sw.add_argument("--trial-retries", type=int, default=2, help="restarts of a failed trial (from its last checkpoint)")
    sw.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    sw.add_argument("--storage", help="where the sweep folder goes (default ./runs)")
    sw.add_argument("--name", help="sweep name (default: a timestamp)")
    sw.add_argument("--resume", action="store_true", help="continue an interrupted sweep of this name")
    sw.add_argument("--verbose", action="store_true", help="show Ray's own logs on the console")
    sw.set_defaults(func=cmd_sweep)
    return p


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--workers", help="number of workers N, or MIN:MAX for elastic (0 = in-process, no Ray)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p.add_argument("--storage", help="run storage URL (default ./runs)")
    p.add_argument("--name", help="run name (default: from the config)")


def main(argv: list[str] | None = None) -> int:
    import time

    started_at = time.time()  # start-up and wall time are measured from here
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UserError as exc:
        print(f"aae-dist: error: {exc}", file=sys.stderr)
        return 2
    args.started_at = started_at
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"aae-dist: error: {storage_redact(str(exc))}", file=sys.stderr)  # a last guard: no URL's user-info
        return 2
    except KeyboardInterrupt:
        print("aae-dist: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        line = os_error_line(exc)
        if line is None:
            raise
        print(f"aae-dist: error: {line}", file=sys.stderr)
        return 2


def os_error_line(exc: OSError) -> str | None:
    """A full disk, a read-only or forbidden folder: the user's to fix, so one line and not a traceback
    (checkpoints are written atomically: the last complete one is kept)."""
    import errno

    fixes = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space or raise the quota",
             errno.EROFS: "choose a writable location", errno.EACCES: "choose a location you may write to",
             errno.EPERM: "choose a location you may write to"}
    if exc.errno not in fixes:
        return None
    where = f" ({storage_redact(exc.filename)})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}: {fixes[exc.errno]}; the last complete checkpoint is kept (continue with --resume)"


def entry() -> None:
    """The `aae-dist` command: main(), then leave any Ray it joined while the interpreter is whole."""
    from .ray_connect import disconnect

    try:
        code = main()
    finally:
        disconnect()
    sys.exit(code)


if __name__ == "__main__":
    entry()
