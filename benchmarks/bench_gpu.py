"""GPU throughput: samples/s of the full three-phase AAE step for the paper MLP and the conv model,
batch 128-4096, fp32 vs bf16 autocast, with and without torch.compile; the time of one 60,000-sample
epoch through the real data path (reader, pinned memory, non-blocking copies, priors on the GPU);
peak GPU memory.  Runs on CPU too (and says so), with smaller settings.

    python benchmarks/bench_gpu.py [--batches 128 512 1024 2048 4096] [--steps 30] [--no-compile]
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

MODELS = {"mlp": PAPER_MLP, "conv": ["model.kind=conv", "model.hidden=[1024]", "model.disc_hidden=[1000,1000]", "model.latent_dim=8"]}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(data, model, batch, steps, amp, compile_, gpu) -> tuple[float, float]:
    cfg = load_config(None, MODELS[model] + [f"data.path={data}", f"data.batch_size={batch}", "train.progress=false",
                                             f"train.amp={str(amp).lower()}", f"train.compile={str(compile_).lower()}",
                                             f"run.gpu={str(gpu).lower()}", "train.parzen_samples=0", "train.sync_every=50"])
    t = Trainer(cfg, LocalSession(tempfile.mkdtemp(prefix="aae-gpu-"), 1))
    x, y = next(iter(t.train_data.iter_epoch(0)))
    x, y = t.aae.normalise(x), y.to(t.device)
    if t.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(5 if not compile_ else 15):  # warm-up (and compilation)
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


def epoch_time(data, model, batch, amp, compile_, gpu) -> float:
    """One full epoch of 60,000 samples through the real loop and data path (start-up excluded)."""
    from aae_dist.training.trainer import train_in_process

    cfg = load_config(None, MODELS[model] + [f"data.path={data}", f"data.batch_size={batch}", "train.progress=false", "train.epochs=2",
                                             f"train.amp={str(amp).lower()}", f"train.compile={str(compile_).lower()}",
                                             f"run.gpu={str(gpu).lower()}", "train.parzen_samples=0", "train.sync_every=50",
                                             "train.checkpoint_every=100000", "train.image_every=100000"])
    s = train_in_process(cfg, tempfile.mkdtemp(prefix="aae-gpu-epoch-"))
    return s["train_s"] / s["epochs"], s["samples_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--models", nargs="+", default=["mlp", "conv"])
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    print(f"machine: {machine()}; device: {torch.cuda.get_device_name(0) if gpu else 'CPU (no GPU here: small settings, figures are CPU figures)'}")
    batches = args.batches or ([128, 512, 1024, 2048, 4096] if gpu else [128, 512])
    data = write_mnist_like()
    precisions = [False, True] if gpu else [False]
    compiles = [False] + ([True] if gpu and not args.no_compile else [])
    print("| model | batch | precision | compile | samples/s | peak MiB |\n|---|---|---|---|---|---|")
    for model in args.models:
        for batch in batches:
            for amp in precisions:
                for comp in compiles:
                    try:
                        rate, peak = step_rate(data, model, batch, args.steps if gpu else 5, amp, comp, gpu)
                        print(f"| {model} | {batch} | {'bf16' if amp else 'fp32'} | {comp} | {rate:,.0f} | {peak:,.0f} |", flush=True)
                    except Exception as exc:  # noqa: BLE001 - report and go on (e.g. a compile failure)
                        print(f"| {model} | {batch} | {'bf16' if amp else 'fp32'} | {comp} | failed: {type(exc).__name__}: {str(exc)[:120]} | |", flush=True)
    if gpu:
        for batch, amp in ((4096, False), (4096, True), (1024, True)):
            secs, rate = epoch_time(data, "mlp", batch, amp, False, gpu)
            print(f"[epoch] paper MLP, batch {batch}, {'bf16' if amp else 'fp32'}: {secs:.3f} s per 60,000-sample epoch "
                  f"({rate:,.0f} samples/s through the reader; goal < 0.5 s)", flush=True)


if __name__ == "__main__":
    main()
