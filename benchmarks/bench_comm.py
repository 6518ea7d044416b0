"""Fewer bytes per sample on 2 workers: gradient accumulation (with and without learning rates scaled
with K), half-precision and PowerSGD gradients, and local SGD (parameters averaged every H steps) against no option and against a hand-written DDP loop, side by side in one run on this machine (paper MLP 784-1000-1000-8, batch 128 per worker,
1 thread per process), each run for the same number of samples of the embedded real digits; plus the machine's ceiling for 2
workers: one single-thread process alone, and two independent ones at once (no communication).

    python benchmarks/bench_comm.py [--samples 38400]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # multiprocess.py: test scaffolding
from common import PAPER_MLP, HandWrittenAAE, machine  # noqa: E402

from aae_dist.config import load_config  # noqa: E402
from multiprocess import run_processes  # noqa: E402

BATCH = 128
LRS = {"reconstruction": 1e-3, "discriminator": 2e-4, "generator": 2e-4}  # the defaults


def scaled_lr(factor: float) -> list[str]:
    return [f"phases.{p}.lr={lr * factor:g}" for p, lr in LRS.items()]


OPTIONS = {"none": [], "fp16": ["train.grad_compression=fp16"], "powersgd (rank 2)": ["train.grad_compression=powersgd"],
           "powersgd (rank 8)": ["train.grad_compression=powersgd", "train.powersgd_rank=8"],
           "accumulate=2": ["train.accumulate=2"], "accumulate=2, lr x2": ["train.accumulate=2", *scaled_lr(2)],
           "accumulate=2, lr x2 + fp16": ["train.accumulate=2", *scaled_lr(2), "train.grad_compression=fp16"],
           "accumulate=4": ["train.accumulate=4"], "accumulate=4, lr x2": ["train.accumulate=4", *scaled_lr(2)],
           "accumulate=4 + fp16": ["train.accumulate=4", "train.grad_compression=fp16"],
           "local SGD, average every 4": ["train.average_every=4"], "local SGD, average every 8": ["train.average_every=8"],
           "local SGD, average every 16": ["train.average_every=16"], "local SGD, average every 32": ["train.average_every=32"]}


def sets(data: str, steps: int, extra=()) -> list[str]:
    return PAPER_MLP + [f"data.path={data}", f"data.batch_size={BATCH}", f"train.max_steps={steps}", "train.checkpoint_every=100000",
                        "train.image_every=100000", "train.progress=false", "train.parzen_samples=0", "train.threads=1", *extra]


def two_workers(data: str, samples: int, extra: list[str]) -> dict:
    k = int(next((e.split("=")[1] for e in extra if e.startswith("train.accumulate=")), 1))
    run = tempfile.mkdtemp(prefix="aae-bench-comm-")
    run_processes(load_config(None, sets(data, samples // (2 * BATCH * k), extra)), run, world=2, threads=1)
    return json.load(open(os.path.join(run, "summary.json")))


def _hand_ddp(rank: int, world: int, port: int, data: str, steps: int, out: str) -> None:
    """The textbook AAE step written by hand, one DDP per network, gloo: the reference for the framework."""
    import time

    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    files = sorted(f for f in os.listdir(data) if f.startswith("train-") and f.endswith(".x.npy"))
    x_all = torch.from_numpy(np.concatenate([np.load(os.path.join(data, f), allow_pickle=False) for f in files])[rank::world])

    aae = HandWrittenAAE(wrap=DDP)  # one DDP per network
    n, t0 = len(x_all) // BATCH, None
    for step in range(steps + 5):
        if step == 5:
            dist.barrier()
            t0 = time.perf_counter()  # after warm-up, like the framework's figure
        aae.step(x_all[(step % n) * BATCH : (step % n + 1) * BATCH].float().div(255).view(BATCH, -1))
    dist.barrier()
    if rank == 0:
        with open(out, "w") as fh:
            fh.write(str(world * steps * BATCH / (time.perf_counter() - t0)))
    dist.destroy_process_group()


def hand_written(data: str, samples: int) -> float:
    import torch.multiprocessing as mp

    from multiprocess import _free_port

    out = os.path.join(tempfile.mkdtemp(prefix="aae-bench-hand-"), "rate")
    mp.start_processes(_hand_ddp, args=(2, _free_port(), data, samples // (2 * BATCH), out), nprocs=2, start_method="spawn")
    return float(open(out).read())


def independent(data: str, samples: int, n: int) -> float:
    """Samples/s of n single-thread in-process runs at once, summed."""
    code = ("import sys,json; from aae_dist.config import load_config; from aae_dist.training.trainer import train_in_process; "
            "import tempfile; s=train_in_process(load_config(None, json.loads(sys.argv[1])), tempfile.mkdtemp()); print(s['samples_per_s'])")
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(sets(data, samples // (n * BATCH)))], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(n)]
    return sum(float(p.communicate()[0].strip().splitlines()[-1]) for p in procs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=38_400)
    ap.add_argument("--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS), help="the rows to run ('none' always runs first)")
    a = ap.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    from aae_dist.launch import ensure_default_data

    data = ensure_default_data()  # real digits (4,500 train): the loss comparison means something on them
    one, ceiling = independent(data, a.samples // 2, 1), independent(data, a.samples, 2)
    print(f"machine: {machine()}; paper MLP, batch {BATCH} per worker, {a.samples} samples per run, 1 thread per process")
    hand = hand_written(data, a.samples)
    print(f"one process alone: {one:.0f} samples/s; two independent processes at once (ceiling): {ceiling:.0f} ({ceiling / one:.2f}x)")
    print(f"hand-written 2-process DDP loop (gloo, one DDP per network): {hand:.0f} samples/s ({hand / one:.2f}x one process, {hand / ceiling:.2f} of the ceiling)")
    print("| 2 workers | samples/s | x one process | / ceiling | / hand-written | recon loss after the same samples | vs none | bytes per sample |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for name in ["none"] + [o for o in a.options if o != "none"]:
        extra = OPTIONS[name]
        s = two_workers(data, a.samples, extra)
        k = int(next((e.split("=")[1] for e in extra if e.startswith("train.accumulate=")), 1))
        loss = s["metrics"]["recon_loss"]
        base = base or loss
        sent = sum(p["bytes"] for p in s["communication_per_step"].values()) / (BATCH * k * 2)
        print(f"| {name} | {s['samples_per_s']:.0f} | {s['samples_per_s'] / one:.2f} | {s['samples_per_s'] / ceiling:.2f} | "
              f"{s['samples_per_s'] / hand:.2f} | {loss:.4f} | {100 * (loss / base - 1):+.1f}% | {sent:.0f} |")


if __name__ == "__main__":
    main()
