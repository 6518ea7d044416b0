"""`aae-dist` command line: one sub-command per user task; heavy imports happen inside each."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def cmd_shard(args) -> int:
    from .data.sources import load_source
    from .data.writer import write_dataset

    src = load_source(args.source, image_size=args.image_size, channels=args.channels, test_fraction=args.test_fraction)
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
    print(f"wrote {src.name} to {args.dest}: {counts}; samples {m.dtype} {'x'.join(map(str, m.shape))}")
    return 0


def cmd_verify(args) -> int:
    from .data.verify import verify_dataset

    print(verify_dataset(args.url))
    return 0


def cmd_train(args) -> int:
    from .launch import train_from_cli

    return train_from_cli(args)


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
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_shard)

    v = sub.add_parser("verify", help="check every shard of a dataset against its manifest (size, sha256, shape)")
    v.add_argument("url")
    v.set_defaults(func=cmd_verify)

    t = sub.add_parser("train", help="train an AAE (default: embedded digits, one local worker)")
    add_run_arguments(t)
    t.add_argument("--resume", action="store_true", help="continue the named run from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="delete an existing run of this name first")
    t.set_defaults(func=cmd_train)
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
    parser = build_parser()
    args = parser.parse_args(argv)
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
