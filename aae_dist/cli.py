"""`aae-dist` command line: one sub-command per user task; heavy imports happen inside each."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def storage_redact(url: str) -> str:
    from .storage import redact

    return redact(url)


def cmd_shard(args) -> int:
    from .data.sources import load_source
    from .data.writer import write_dataset

    src = load_source(args.source, image_size=args.image_size, channels=args.channels, test_fraction=args.test_fraction,
                      validation_size=args.validation_size)
    m = write_dataset(
        args.dest,
        src.splits,
        num_classes=src.num_classes,
        source=src.name,
        class_names=src.class_names,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    counts = ", ".join(f"{k}={v.count} in {len(v.shards)} shards" for k, v in m.splits.items())
    print(f"wrote {src.name} to {storage_redact(args.dest)}: {counts}; samples {m.dtype} {'x'.join(map(str, m.shape))}")
    return 0


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

    print(to_json(evaluate(args.ref, args.data, args.split)))
    if args.plots:
        for path in write_figures(args.ref, args.plots, args.data, args.split):
            print(f"wrote {storage_redact(path)}", file=sys.stderr)
    return 0


def cmd_sample(args) -> int:
    from .inference import sample_grid

    print(storage_redact(sample_grid(args.ref, args.n, args.out, label=args.label, interpolate=args.interpolate, seed=args.seed)))
    return 0


def cmd_encode(args) -> int:
    from .inference import encode

    n = encode(args.ref, args.data, args.out, splits=args.split, workers=args.workers, address=args.address)
    print(f"encoded {n} samples to {storage_redact(args.out)}")
    return 0


def cmd_generate(args) -> int:
    from .inference import generate

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aae-dist", description="Distributed Adversarial Autoencoders on Ray Train")
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("shard", help="write a dataset as shards + manifest.json to any fsspec URL")
    s.add_argument("source", help="mnist-idx:DIR | npz:URL | images:DIR | digits")
    s.add_argument("dest", help="destination URL (path, file://, s3://, gs://, memory://)")
    s.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (default 10000)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing dataset at DEST")
    s.add_argument("--image-size", type=int, default=28, help="images: resize to SIZE x SIZE")
    s.add_argument("--channels", type=int, default=1, help="images: 1 (grey) or 3 (RGB)")
    s.add_argument("--test-fraction", type=float, default=0.1, help="held-out share for sources without a test split")
    s.add_argument("--validation-size", type=int, default=0,
                   help="hold the last N training samples out as a 'validation' split (Parzen sigma is chosen there)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
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
    sm.add_argument("--out", required=True, help="PNG file (any fsspec URL)")
    sm.add_argument("--label", type=int, help="fix the class (supervised, semi-supervised, label-regularised)")
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
               "  train.checkpoint_every, train.seed\n"
               "every key with its type, default and meaning: aae-dist config; full examples: jobs/*.yaml, jobs/cpu/*.yaml")
    add_run_arguments(t)
    t.add_argument("--resume", action="store_true", help="continue the named run from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run of this name (deleted only once every check has passed)")
    t.add_argument("--dry-run", action="store_true", help="check everything, print the resolved config and the plan, write nothing")
    t.add_argument("--verbose", action="store_true", help="show Ray's own logs and the workers' output on the console")
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
    args = parser.parse_args(argv)
    args.started_at = started_at
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"aae-dist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aae-dist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
