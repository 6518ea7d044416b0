"""Framework tax and scaling: aae-dist's training loop vs a minimal hand-written PyTorch loop of the
same three phases and model (paper MLP 784-1000-1000-8), in one run; then 1 vs 2 workers (1 thread each).

    python benchmarks/bench_throughput.py [--steps 200] [--batch 128 512] [--no-scaling]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import PAPER_MLP, HandWrittenAAE, machine, write_mnist_like  # noqa: E402

from aae_dist.config import load_config  # noqa: E402


def naive_loop(x_all: torch.Tensor, batch: int, steps: int) -> float:
    """The textbook AAE step, written by hand (common.HandWrittenAAE), in this process."""
    aae = HandWrittenAAE()
    n = len(x_all) // batch
    t0 = None
    for step in range(steps + 5):
        if step == 5:
            t0 = time.perf_counter()  # after warm-up, like the framework's figure (start-up excluded)
        i = step % n
        aae.step(x_all[i * batch : (i + 1) * batch].float().div(255).view(batch, -1))
    return steps * batch / (time.perf_counter() - t0)


def framework(data: str, batch: int, steps: int, extra=()) -> float:
    from aae_dist.training.trainer import train_in_process

    cfg = load_config(None, PAPER_MLP + [f"data.path={data}", f"data.batch_size={batch}", f"train.max_steps={steps}",
                                         "train.checkpoint_every=100000", "train.image_every=100000", "train.progress=false", *extra])
    os.environ["TQDM_DISABLE"] = "1"
    s = train_in_process(cfg, tempfile.mkdtemp(prefix="aae-bench-run-"))
    return s["samples_per_s"], s


def scaling(data: str, batch: int, steps: int) -> dict:
    from aae_dist.training.multiprocess import run_processes

    out = {}
    for world in (1, 2):
        run = tempfile.mkdtemp(prefix=f"aae-bench-w{world}-")
        cfg = load_config(None, PAPER_MLP + [f"data.path={data}", f"data.batch_size={batch}", f"train.max_steps={steps}",
                                             "train.checkpoint_every=100000", "train.image_every=100000", "train.progress=false"])
        run_processes(cfg, run, world=world, threads=1)
        with open(os.path.join(run, "summary.json")) as fh:
            s = json.load(fh)
        out[world] = s
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-scaling", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["TQDM_DISABLE"] = "1"
    print(f"machine: {machine()}")
    data = write_mnist_like()

    import numpy as np

    x_all = torch.from_numpy(np.concatenate([np.load(os.path.join(data, f"train-0000{i}.x.npy")) for i in range(2)]))
    for batch in args.batch:
        naive = naive_loop(x_all, batch, args.steps)
        fw, s = framework(data, batch, args.steps + 5)
        print(f"[tax] batch {batch}: hand-written loop {naive:,.0f} samples/s | aae-dist 1 worker {fw:,.0f} samples/s | ratio {fw / naive:.3f}")
    if not args.no_scaling:
        batch = args.batch[0]
        res = scaling(data, batch, args.steps)
        r1, r2 = res[1]["samples_per_s"], res[2]["samples_per_s"]
        print(f"[scaling] batch {batch}/worker, 1 thread each: 1 worker {r1:,.0f} samples/s | 2 workers {r2:,.0f} samples/s | speed-up {r2 / r1:.2f}x")
        comm = res[2]["communication_per_step"]
        for phase, c in comm.items():
            print(f"[comm] {phase}: {c['allreduce_calls']:.1f} all-reduce calls/step, {c['bytes'] / 1e6:.2f} MB/step, networks {','.join(c['networks'])}")
        co = res[2]["coordinator"]
        print(f"[coordinator] {co['syncs']} syncs, {co['sync_ms_mean']:.3f} ms each, {100 * co['fraction_of_train_time']:.3f}% of training time")


if __name__ == "__main__":
    main()
