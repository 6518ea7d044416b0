"""Tables at scale (issue 25): `shard` of a large Parquet table in bounded memory, and the streaming reader's
throughput on a table dataset against an image dataset of the same bytes.

    python benchmarks/bench_tables.py memory --sizes-mb 250,1000 [--chunk-rows 65536] [--work /tmp/t1/bench]
    python benchmarks/bench_tables.py reader [--mb 200] [--rounds 5]

memory: a synthetic table (40 numeric columns, two modes each, 8 with 10% nulls; 5 string columns of 3-20
categories, one with nulls; row groups of 100,000 rows) is written at each size, then sharded by
`aae-dist shard` in a child process; its peak RSS (os.wait4's ru_maxrss: that child only) is printed beside
the file size, the chunk, and the RSS of a child that only imports what shard imports.  Bounded memory
means the peak does not grow with the file.

reader: the table is sharded once more (a slice of `--mb` of encoded rows), an image dataset (uint8 1x28x28,
random pixels) of the same number of bytes is written beside it, and ShardStream reads each for --epochs epochs,
shuffled (or --no-shuffle), at the same batch in bytes, alternating table and images in --rounds rounds of one process; the
ratio (table over images, MB/s) is taken within each round and its median printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import machine  # noqa: E402

ROW_GROUP = 100_000
NUMERIC, CATEGORICAL = 40, 5


def table_chunk(rows: int, rng: np.random.Generator):
    """One row group of the synthetic table: bimodal numbers with nulls, string categories with nulls."""
    import pyarrow as pa

    cols = {}
    for i in range(NUMERIC):
        mode = rng.random(rows) < 0.3
        v = np.where(mode, rng.normal(5 + i, 1.0, rows), rng.normal(-i, 2.0, rows))
        cols[f"num_{i:02d}"] = pa.array(v, mask=rng.random(rows) < 0.1 if i % 5 == 0 else None)
    for j in range(CATEGORICAL):
        k = 3 + 4 * j
        names = np.array([f"c{j}_{v}" for v in range(k)])
        idx = np.minimum(rng.geometric(0.3, rows) - 1, k - 1)
        cols[f"cat_{j}"] = pa.array(names[idx].tolist(), mask=rng.random(rows) < 0.05 if j == 0 else None)
    return pa.table(cols)


def write_table(path: str, target_bytes: int, seed: int = 0) -> tuple[int, int]:
    """Row groups appended until the file holds `target_bytes`; memory holds one row group."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows, writer = 0, None
    try:
        while True:
            t = table_chunk(ROW_GROUP, rng)
            writer = writer or pq.ParquetWriter(path, t.schema)
            writer.write_table(t, row_group_size=ROW_GROUP)
            rows += t.num_rows
            if os.path.getsize(path) >= target_bytes:
                break
    finally:
        if writer is not None:
            writer.close()
    return rows, os.path.getsize(path)


def child(argv: list[str]) -> dict:
    """Run a child process; its own peak RSS (MiB), CPU seconds and wall seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    out, err = p.stdout.read().decode(), p.stderr.read().decode()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"child failed ({p.returncode}): {' '.join(argv)}\n{err[-2000:]}")
    return {"rss_mib": ru.ru_maxrss / 1024, "cpu_s": ru.ru_utime + ru.ru_stime, "wall_s": wall, "out": out.strip()}


IMPORTS = ("import aae_dist.cli, aae_dist.data.tables, aae_dist.data.writer, aae_dist.data.sources, pyarrow.parquet, pyarrow.compute, "
           "sklearn.mixture, threadpoolctl")


def bench_memory(args) -> None:
    from aae_dist.data.tables import CHUNK_ROWS

    os.makedirs(args.work, exist_ok=True)
    base = child([sys.executable, "-c", IMPORTS])
    chunk = args.chunk_rows or CHUNK_ROWS
    print(f"machine: {machine()}; load: {os.getloadavg()}")
    print(f"table: {NUMERIC} numeric (bimodal, 8 with 10% nulls) + {CATEGORICAL} string columns (3-19 categories, one with nulls), "
          f"row groups of {ROW_GROUP:,} rows, seed 0; chunk {chunk:,} rows")
    print(f"import-only child (what shard imports, no work): peak RSS {base['rss_mib']:.0f} MiB")
    print(f"{'file MB':>8} {'rows':>10} {'shards MB':>10} {'peak RSS MiB':>13} {'over imports':>13} {'wall s':>7} {'cpu s':>6} "
          f"{'rows/s':>8} {'MB/s':>6}")
    rows_out = []
    for mb in args.sizes_mb:
        src, dest = os.path.join(args.work, f"table-{mb}mb.parquet"), os.path.join(args.work, f"ds-{mb}mb")
        shutil.rmtree(dest, ignore_errors=True)
        if not os.path.exists(src):
            write_table(src, mb * 1_000_000)
        import pyarrow.parquet as pq

        rows, size = pq.ParquetFile(src).metadata.num_rows, os.path.getsize(src)
        argv = [sys.executable, "-m", "aae_dist.cli", "shard", f"parquet:{src}", dest, "--quiet"]
        if args.chunk_rows:  # shard's own code with another chunk (the CLI has no flag for it)
            argv = [sys.executable, "-c", "import sys; from aae_dist.data.tables import TableOptions, shard_table; "
                    f"m = shard_table('parquet', sys.argv[1], sys.argv[2], TableOptions(chunk_rows={chunk}), shard_size=10_000, "
                    "overwrite=False, progress=False); print(m.splits['train'].count, 'training rows')", src, dest]
        r = child(argv)
        out_mb = sum(os.path.getsize(os.path.join(dest, f)) for f in os.listdir(dest)) / 1e6
        rows_out.append((size, r["rss_mib"]))
        print(f"{size / 1e6:8.0f} {rows:10,} {out_mb:10.0f} {r['rss_mib']:13.0f} {r['rss_mib'] - base['rss_mib']:13.0f} {r['wall_s']:7.1f} "
              f"{r['cpu_s']:6.1f} {rows / r['wall_s']:8,.0f} {size / 1e6 / r['wall_s']:6.1f}")
        print(f"         {r['out'][:200]}")
        if not args.keep:
            shutil.rmtree(dest, ignore_errors=True)
    if len(rows_out) > 1:
        (s0, m0), (s1, m1) = rows_out[0], rows_out[-1]
        print(f"file {s1 / s0:.1f}x larger -> peak RSS {m1 / m0:.2f}x ({m1 - m0:+.0f} MiB)")


def bench_reader(args) -> None:
    import pyarrow.parquet as pq

    from aae_dist.cli import main
    from aae_dist.data import ShardStream, read_manifest
    from aae_dist.data.writer import write_dataset

    os.makedirs(args.work, exist_ok=True)
    src = os.path.join(args.work, "reader-table.parquet")
    table_ds, image_ds = os.path.join(args.work, "reader-table-ds"), os.path.join(args.work, "reader-image-ds")
    if not os.path.exists(os.path.join(table_ds, "manifest.json")):
        rows = int(args.mb * 1e6 / 1400)  # about 340 float32 per encoded row; the image side matches what it really is
        pq.write_table(table_chunk(rows, np.random.default_rng(0)), src, row_group_size=ROW_GROUP)
        assert main(["shard", f"parquet:{src}", table_ds, "--quiet", "--test-fraction", "0.01"]) == 0
    m = read_manifest(table_ds)
    row_bytes, rows = m.sample_bytes, m.splits["train"].count
    total = row_bytes * rows
    n_img = total // 784
    if not os.path.exists(os.path.join(image_ds, "manifest.json")):
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (n_img, 1, 28, 28), dtype=np.uint8)
        write_dataset(image_ds, {"train": (x, None)}, num_classes=0, source="random pixels", shard_size=max(1, 10_000 * row_bytes // 784),
                      progress=False, overwrite=True)
        del x
    batch_rows = args.batch
    batch_img = max(1, batch_rows * row_bytes // 784)
    print(f"machine: {machine()}; load: {os.getloadavg()}")
    print(f"table dataset: {rows:,} rows of {row_bytes} bytes (float32 1x{m.shape[-1]}), shards of 10,000 rows; "
          f"image dataset: {n_img:,} samples of 784 bytes (uint8 1x28x28), same bytes ({total / 1e6:.0f} MB) and shard bytes")
    print(f"batches: {batch_rows} rows / {batch_img} images (same bytes), {'in order' if args.no_shuffle else 'shuffled'}, {args.epochs} epochs per figure, "
          f"{args.rounds} alternating rounds")

    def rate(url: str, batch: int) -> tuple[float, float]:
        """Samples per wall second and per CPU second of this process (its reader threads included): on a
        shared machine the second is what the reader costs, the first also what the neighbours take."""
        s = ShardStream(url, "train", batch, seed=0, shuffle=not args.no_shuffle)
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        for e in range(args.epochs):
            for x, _ in s.iter_epoch(e):
                n += len(x)
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0)

    ratios, cpu_ratios = [], []
    print(f"{'round':>5} {'table rows/s':>13} {'table MB/s':>11} {'image samples/s':>16} {'image MB/s':>11} {'ratio MB/s':>11} "
          f"{'table MB/cpu-s':>15} {'image MB/cpu-s':>15} {'ratio':>6}")
    for r in range(args.rounds):
        (t_sps, t_cps), (i_sps, i_cps) = rate(table_ds, batch_rows), rate(image_ds, batch_img)
        t_mbs, i_mbs, t_mbc, i_mbc = t_sps * row_bytes / 1e6, i_sps * 784 / 1e6, t_cps * row_bytes / 1e6, i_cps * 784 / 1e6
        ratios.append(t_mbs / i_mbs)
        cpu_ratios.append(t_mbc / i_mbc)
        print(f"{r:5d} {t_sps:13,.0f} {t_mbs:11.1f} {i_sps:16,.0f} {i_mbs:11.1f} {t_mbs / i_mbs:11.2f} {t_mbc:15.1f} {i_mbc:15.1f} "
              f"{t_mbc / i_mbc:6.2f}")
    print(f"median ratio table / images: {statistics.median(ratios):.2f} (MB per wall second), {statistics.median(cpu_ratios):.2f} "
          "(MB per CPU second)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    mem = sub.add_parser("memory", help="peak RSS of shard against the table's size")
    mem.add_argument("--sizes-mb", type=lambda s: [int(v) for v in s.split(",")], default=[250, 1000])
    mem.add_argument("--chunk-rows", type=int, default=0, help="rows per pyarrow batch (default: shard's own)")
    mem.add_argument("--keep", action="store_true", help="keep the sharded datasets")
    rd = sub.add_parser("reader", help="ShardStream on a table dataset against an image dataset of the same bytes")
    rd.add_argument("--mb", type=float, default=200, help="about this many MB of encoded rows")
    rd.add_argument("--batch", type=int, default=500, help="rows per batch (images: the same bytes)")
    rd.add_argument("--rounds", type=int, default=9)
    rd.add_argument("--epochs", type=int, default=4, help="epochs per figure")
    rd.add_argument("--no-shuffle", action="store_true")
    for p in (mem, rd):
        p.add_argument("--work", default="/tmp/t1/bench", help="scratch folder (tables, datasets)")
    args = ap.parse_args()
    (bench_memory if args.what == "memory" else bench_reader)(args)


if __name__ == "__main__":
    main()
