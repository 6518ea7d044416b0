"""Data path: samples/s the streaming reader delivers from local disk and from an S3 server (moto on
127.0.0.1), against plain numpy reading the same bytes from local disk, and against the training
step's own rate (the reader must never be the bottleneck).

    python benchmarks/bench_data.py [--samples 60000] [--batch 128] [--rounds 5] [--ratio-only]

The S3 ratio that counts is --rounds alternating rounds (plain client, shuffled reader, unshuffled reader,
one after the other, each taking the first place in turn; each round's ratio taken within the round) and
their median: on a shared machine the server's speed swings 2-3x between figures timed minutes apart.
"""

from __future__ import annotations

import argparse
import os
import statistics
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, mnist_like  # noqa: E402

from aae_dist.data import ShardStream  # noqa: E402
from aae_dist.data.writer import write_dataset  # noqa: E402


def rate_reader(url: str, batch: int, epochs: int = 2, **kw) -> float:
    s = ShardStream(url, "train", batch, seed=0, **kw)
    n, t0 = 0, time.perf_counter()
    for e in range(epochs):
        for x, _ in s.iter_epoch(e):
            n += len(x)
    return n / (time.perf_counter() - t0)


def rate_numpy(folder: str, batch: int, epochs: int = 2) -> float:
    files = sorted(f for f in os.listdir(folder) if f.startswith("train-") and f.endswith(".x.npy"))
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for f in files:
            arr = np.load(os.path.join(folder, f), allow_pickle=False)
            for i in range(0, len(arr) - batch + 1, batch):
                n += len(torch.from_numpy(arr[i : i + batch]))
    return n / (time.perf_counter() - t0)


def rate_plain_ranges(url: str, request_bytes: int, epochs: int = 2, sdk_checksum: bool = True) -> float:
    """What the server delivers to a plain client: every shard file (x and y) fetched as concurrent
    ranged requests with fsspec's `cat_ranges` (s3fs issues them at once), no checking, no decoding.
    sdk_checksum: botocore's response CRC32 as s3fs sets it up by default (False: off, as the reader has it)."""
    from aae_dist import storage
    from aae_dist.data.format import read_manifest

    split = read_manifest(url).split("train", url)
    fs, _ = storage.filesystem(url, checked_by_caller=not sdk_checksum)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for shard in split.shards:
            paths, starts, ends = [], [], []
            for meta in (shard.x, shard.y):
                path = storage.filesystem(storage.join(url, meta.file))[1]
                for a in range(0, meta.bytes, request_bytes):
                    paths.append(path), starts.append(a), ends.append(min(meta.bytes, a + request_bytes))
            got = fs.cat_ranges(paths, starts, ends)
            assert sum(map(len, got)) == shard.x.bytes + shard.y.bytes
            n += shard.count
    return n / (time.perf_counter() - t0)


def client_cpu(run) -> float:
    """CPU seconds this process spends while `run` streams (both cores' worth: all of its threads)."""
    t0 = time.process_time()
    run()
    return time.process_time() - t0


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    return proc, "s3://bench/mnist-like"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=60_000)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3, help="each S3 figure is the best of this many runs")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per S3 figure, reader and plain client alike: a sustained rate, "
                    "in which the reader's one-off set-up (its shuffle buffer's first touch, ~40 ms) weighs what it does in training")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of plain client / shuffled / unshuffled reader")
    ap.add_argument("--ratio-only", action="store_true", help="only the alternating rounds (skip the tuning grid, cache, local figures)")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    x, y = mnist_like(args.samples)
    if args.ratio_only:
        return alternating(x, y, args)
    local = os.path.join(tempfile.mkdtemp(prefix="aae-bench-data-"), "ds")
    write_dataset(local, {"train": (x, y)}, num_classes=10, source="synthetic", shard_size=args.shard_size, progress=False)
    base = rate_numpy(local, args.batch)
    loc = rate_reader(local, args.batch)
    loc_noshuffle = rate_reader(local, args.batch, shuffle=False)
    proc, s3url = start_moto()
    try:
        write_dataset(s3url, {"train": (x, y)}, num_classes=10, source="synthetic", shard_size=args.shard_size, progress=False)
        s3_one = rate_reader(s3url, args.batch, connections=1, request_bytes=1 << 40)  # one GET per shard (before)
        best = lambda f: max(f() for _ in range(args.repeat))  # noqa: E731  (the server's speed varies run to run)
        tuning, plain, ep = {}, {}, args.epochs
        for req in (1 << 20, 4 << 20, 16 << 20):
            plain[req] = best(lambda: rate_plain_ranges(s3url, req, ep))
            for conns in (4, 8):
                tuning[conns, req] = best(lambda: rate_reader(s3url, args.batch, ep, connections=conns, request_bytes=req))
        s3 = best(lambda: rate_reader(s3url, args.batch, ep))  # the defaults
        s3_noshuffle = best(lambda: rate_reader(s3url, args.batch, ep, shuffle=False))
        s3_plain = max(plain.values())
        best_req = max(plain, key=plain.get)
        cpu = {name: client_cpu(f) / (ep * args.samples) for name, f in (("plain client", lambda: rate_plain_ranges(s3url, best_req, ep)),
                                                     ("reader, shuffled", lambda: rate_reader(s3url, args.batch, ep)),
                                                     ("reader, unshuffled", lambda: rate_reader(s3url, args.batch, ep, shuffle=False)))}
        cache = tempfile.mkdtemp(prefix="aae-bench-cache-")
        s3_cached = rate_reader(s3url, args.batch, epochs=3, cache_dir=cache)
        s3_half = rate_reader(s3url, args.batch, world_size=2, rank=1)  # one rank of two: ranged reads
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    sys.argv = sys.argv[:1]
    from bench_throughput import naive_loop

    step = naive_loop(torch.from_numpy(x[:10_000]), args.batch, 20)
    print(f"[data] {args.samples} samples of 1x28x28 uint8, {args.samples // args.shard_size} shards, batch {args.batch}")
    print(f"[data] plain numpy from local disk (baseline): {base:,.0f} samples/s")
    print(f"[data] reader, local, shuffled: {loc:,.0f} samples/s ({loc / base:.2f}x numpy); unshuffled {loc_noshuffle:,.0f} ({loc_noshuffle / base:.2f}x)")
    print(f"[data] S3 (moto on 127.0.0.1), {args.epochs} epochs per figure, best of --repeat runs each: reader against a plain concurrent ranged-read client (fsspec cat_ranges, no checks) in the same run")
    print(f"[data]   one GET per shard, no concurrency (the reader before): {s3_one:,.0f} samples/s")
    for (conns, req), r in tuning.items():
        print(f"[data]   requests of {req >> 20} MiB, reader with {conns} connections: {r:,.0f} samples/s; plain client: {plain[req]:,.0f} -> {r / plain[req]:.2f}x")
    print(f"[data] reader, S3, defaults, shuffled: {s3:,.0f} samples/s = {s3 / s3_plain:.2f}x the plain client at its best request size ({s3_plain:,.0f}) (goal >= 0.8x); "
          f"unshuffled {s3_noshuffle:,.0f} ({s3_noshuffle / s3_plain:.2f}x); {s3 / loc:.2f}x the local reader")
    for name, sec in cpu.items():
        print(f"[data]   client CPU, {name}: {1e6 * sec:.2f} s per million samples (the server needs the rest of the cores)")
    print(f"[data] reader, S3 with local cache over 3 epochs {s3_cached:,.0f} ({s3_cached / loc:.2f}x local reader)")
    print(f"[data] reader, S3, rank 1 of 2 (byte ranges): {s3_half:,.0f} samples/s")
    print(f"[data] training step (paper MLP, batch {args.batch}): {step:,.0f} samples/s -> reader headroom local {loc / step:.0f}x, S3 {s3 / step:.0f}x (goal >= 20x)")


def alternating(x, y, args) -> None:
    """Plain client, shuffled reader, unshuffled reader (and the plain client without the SDK's CRC32, for the
    record), one after the other, --rounds times: the ratios of each round."""
    proc, s3url = start_moto()
    try:
        write_dataset(s3url, {"train": (x, y)}, num_classes=10, source="synthetic", shard_size=args.shard_size, progress=False)
        ratios: dict[str, list[float]] = {"shuffled": [], "unshuffled": []}
        contenders = {"plain": lambda: rate_plain_ranges(s3url, 16 << 20, args.epochs),
                      "shuffled": lambda: rate_reader(s3url, args.batch, args.epochs),
                      "unshuffled": lambda: rate_reader(s3url, args.batch, args.epochs, shuffle=False),
                      "plain, no SDK CRC32": lambda: rate_plain_ranges(s3url, 16 << 20, args.epochs, sdk_checksum=False)}
        names = list(contenders)
        ratios["shuffled / plain without SDK CRC32"] = []
        for r in range(args.rounds):
            k = r % len(names)
            order = names[k:] + names[:k]  # each contender takes each place in turn: no one always runs first
            got = {k: contenders[k]() for k in order}
            plain, lean = got.pop("plain"), got.pop("plain, no SDK CRC32")
            for k, v in got.items():
                ratios[k].append(v / plain)
            ratios["shuffled / plain without SDK CRC32"].append(got["shuffled"] / lean)
            print(f"[data] round {r} ({' > '.join(order)}; load average {os.getloadavg()[0]:.1f}): plain client {plain:,.0f} samples/s; reader shuffled "
                  f"{got['shuffled']:,.0f} ({got['shuffled'] / plain:.2f}x), unshuffled {got['unshuffled']:,.0f} ({got['unshuffled'] / plain:.2f}x); "
                  f"plain client without the SDK's CRC32 {lean:,.0f}")
        for k, v in ratios.items():
            name = k if "/" in k else f"reader {k} / plain client"
            print(f"[data] {name}, median of {len(v)} alternating rounds: {statistics.median(v):.2f}x" + ("" if "/" in k else " (goal >= 0.9x)"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
