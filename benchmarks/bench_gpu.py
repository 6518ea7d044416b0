"""GPU throughput: samples/s of the full three-phase AAE step for the paper MLP and the conv model,
batch 128-4096, fp32 vs bf16 autocast, eager vs torch.compile (each network's forward; or each phase's whole
loss replayed as CUDA graphs: train.compile_scope=phases, train.compile_mode=reduce-overhead); the time of one 60,000-sample
epoch through the real data path (reader, pinned memory, non-blocking copies, priors on the GPU);
peak GPU memory.  Runs on CPU too (and says so), with smaller settings.

    python benchmarks/bench_gpu.py [--batches 128 512 1024 2048 4096] [--steps 30] [--compiles off networks graphs]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import PAPER_MLP, machine, write_mnist_like  # noqa: E402

from aae_dist.config import load_config  # noqa: E402
from aae_dist.training.session import LocalSession  # noqa: E402
from aae_dist.training.trainer import Trainer  # noqa: E402

COMPILES = {"off": ["train.compile=false"], "networks": ["train.compile=true"],
            "graphs": ["train.compile=true", "train.compile_scope=phases", "train.compile_mode=reduce-overhead"]}
MODELS = {"mlp": PAPER_MLP, "conv": ["model.kind=conv", "model.hidden=[1024]", "model.disc_hidden=[1000,1000]", "model.latent_dim=8"]}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(data, model, batch, steps, amp, compile_, gpu) -> tuple[float, float]:
    cfg = load_config(None, MODELS[model] + COMPILES[compile_] + [f"data.path={data}", f"data.batch_size={batch}", "train.progress=false",
                                             f"train.amp={str(amp).lower()}",
                                             f"run.gpu={str(gpu).lower()}", "train.parzen_samples=0", "train.sync_every=50"])
    t = Trainer(cfg, LocalSession(tempfile.mkdtemp(prefix="aae-gpu-"), 1))
    x, y = next(iter(t.train_data.iter_epoch(0)))
    x, y = t.aae.normalise(x), y.to(t.device)
    if t.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(5 if compile_ == "off" else 15):  # warm-up (and compilation)
        t.train_step([(x, y)])
    sync(t.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        t.train_step([(x, y)])
    sync(t.device)
    rate = steps * batch / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if t.device.type == "cuda" else float("nan")
    t.reporter.logger.close()
    return rate, peak


def epoch_time(data, model, batch, amp, compile_, gpu) -> tuple[float, float]:
    """One full epoch of 60,000 samples through the trainer's step and the real data path (reader, non-blocking
    copies): the second of two, so start-up and compilation (in the first) are not in it."""
    cfg = load_config(None, MODELS[model] + COMPILES[compile_] + [f"data.path={data}", f"data.batch_size={batch}", "train.progress=false",
                                             f"train.amp={str(amp).lower()}", f"run.gpu={str(gpu).lower()}",
                                             "train.parzen_samples=0", "train.sync_every=50"])
    t = Trainer(cfg, LocalSession(tempfile.mkdtemp(prefix="aae-gpu-epoch-"), 1))
    for epoch in (0, 1):
        sync(t.device)
        t0, n = time.perf_counter(), 0
        for x, y in t.train_data.iter_epoch(epoch):
            t.train_step([(t.aae.normalise(x), y.to(t.device, non_blocking=True))])
            n += len(x)
        sync(t.device)
        secs = time.perf_counter() - t0
    t.reporter.logger.close()
    return secs, n / secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true", help="eager only (as --compiles off)")
    ap.add_argument("--compiles", nargs="+", choices=sorted(COMPILES), help="default: off on a CPU; off networks graphs on a GPU")
    ap.add_argument("--models", nargs="+", default=["mlp", "conv"])
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    print(f"machine: {machine()}; device: {torch.cuda.get_device_name(0) if gpu else 'CPU (no GPU here: small settings, figures are CPU figures)'}")
    batches = args.batches or ([128, 512, 1024, 2048, 4096] if gpu else [128, 512])
    data = write_mnist_like()
    precisions = [False, True] if gpu else [False]
    compiles = ["off"] if args.no_compile else args.compiles or (["off", "networks", "graphs"] if gpu else ["off"])
    print("| model | batch | precision | compile | samples/s | ms per step | peak MiB |\n|---|---|---|---|---|---|---|")
    for model in args.models:
        for batch in batches:
            for amp in precisions:
                for comp in compiles:
                    try:
                        rate, peak = step_rate(data, model, batch, args.steps if gpu else 5, amp, comp, gpu)
                        print(f"| {model} | {batch} | {'bf16' if amp else 'fp32'} | {comp} | {rate:,.0f} | {1000 * batch / rate:.2f} | "
                              f"{peak:,.0f} |", flush=True)
                    except Exception as exc:  # noqa: BLE001 - report and go on (e.g. a compile failure)
                        print(f"| {model} | {batch} | {'bf16' if amp else 'fp32'} | {comp} | failed: {type(exc).__name__}: {str(exc)[:120]} | |", flush=True)
    if gpu:
        for batch, amp in ((4096, False), (4096, True), (1024, True)):
            for comp in compiles:
                secs, rate = epoch_time(data, "mlp", batch, amp, comp, gpu)
                print(f"[epoch] paper MLP, batch {batch}, {'bf16' if amp else 'fp32'}, compile {comp}: {secs:.3f} s per 60,000-sample "
                      f"epoch ({rate:,.0f} samples/s through the reader; goal <= 0.2 s)", flush=True)


if __name__ == "__main__":
    main()
