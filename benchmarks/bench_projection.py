"""Projected scaling on a GPU cluster, from what is measured here: the exact FLOPs and gradient bytes of
each phase (FLOP counter, parameter sizes = what the DDP hooks count), the all-reduce latency and
bandwidth of gloo on this machine (2 processes), and a ring all-reduce model.  Checked against the
measured 2-worker run on this machine.

    python benchmarks/bench_projection.py [--gpu-tflops 200] [--skip-check]

No GPU was available to this benchmark: GPU compute time per step is FLOPs / --gpu-tflops, an
assumption stated in the output (H100 bf16 dense peak is ~990 TFLOP/s; small MLP GEMMs reach far less).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # multiprocess.py: test scaffolding
from common import PAPER_MLP, machine, write_mnist_like  # noqa: E402

from aae_dist.config import load_config  # noqa: E402

MODELS = {"mlp": PAPER_MLP, "conv": ["model.kind=conv", "model.hidden=[1024]", "model.disc_hidden=[1000,1000]", "model.latent_dim=8"]}
PHASE_NETS = {"reconstruction": ["encoder", "decoder"], "discriminator": ["discriminator"], "generator": ["encoder"]}


def network_bytes(model: str) -> dict:
    """fp32 bytes of each network's parameters."""
    from aae_dist.models import build_networks

    nets = build_networks(load_config(None, MODELS[model]).model, (1, 28, 28))
    return {n: sum(p.numel() * 4 for p in m.parameters()) for n, m in nets.items()}


def phase_bytes(model: str) -> dict:
    size = network_bytes(model)
    return {ph: sum(size[n] for n in names) for ph, names in PHASE_NETS.items()}


def parameter_bytes(model: str) -> int:
    """All three networks: what local SGD averages."""
    return sum(network_bytes(model).values())


def step_flops(model: str, batch: int, data: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from aae_dist.training.session import LocalSession
    from aae_dist.training.trainer import Trainer

    cfg = load_config(None, MODELS[model] + [f"data.path={data}", f"data.batch_size={batch}", "train.progress=false"])
    t = Trainer(cfg, LocalSession(tempfile.mkdtemp(), 1))
    x, y = next(iter(t.train_data.iter_epoch(0)))
    x = t.aae.normalise(x)
    with FlopCounterMode(display=False) as fc:
        t.train_step([(x, y)])
    t.reporter.logger.close()
    return float(fc.get_total_flops())


def _bw_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    res = {}
    for n in (1_000, 4_000_000):
        buf = torch.ones(n)
        for _ in range(3):
            dist.all_reduce(buf)
        t0 = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(buf)
        res[n * 4] = (time.perf_counter() - t0) / 10
    if rank == 0:
        json.dump(res, open(out, "w"))
    dist.destroy_process_group()


def gloo_alpha_beta() -> tuple[float, float]:
    """Latency (s) and bandwidth (bytes/s) of a 2-process gloo all-reduce on this machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tempfile.mktemp()
    mp.start_processes(_bw_worker, args=(port, out), nprocs=2, start_method="spawn")
    res = {int(k): v for k, v in json.load(open(out)).items()}
    small, large = min(res), max(res)
    alpha = res[small]
    # ring all-reduce of B bytes over N=2: 2(N-1)/N * B = B bytes on the wire
    beta = large / max(res[large] - alpha, 1e-9)
    return alpha, beta


def ring_time(bytes_: float, calls: float, n: int, alpha: float, bw: float) -> float:
    if n == 1:
        return 0.0
    return 2 * (n - 1) / n * bytes_ / bw + 2 * (n - 1) * alpha * calls


OPTIONS = {  # name: (what one all-reduce round sends: "gradients" or "parameters", bytes factor, steps per round, micro-batches per step)
    "none": ("gradients", 1.0, 1, 1), "grad_compression=bf16 (or fp16)": ("gradients", 0.5, 1, 1),
    "accumulate=4": ("gradients", 1.0, 1, 4), "accumulate=4 + bf16": ("gradients", 0.5, 1, 4),
    "accumulate=16 + bf16": ("gradients", 0.5, 1, 16),
    "average_every=16 (local SGD)": ("parameters", 1.0, 16, 1), "average_every=64 (local SGD)": ("parameters", 1.0, 64, 1)}


def options_table(args, data: str, model: str = "mlp", batch: int = 1024) -> None:
    """What each communication option buys at 8-512 GPUs: efficiency and speed-up over one GPU."""
    total_bytes = sum(phase_bytes(model).values())
    tc = args.step_ms / 1000 if args.step_ms else step_flops(model, batch, data) / (args.gpu_tflops * 1e12)
    print(f"\n[options] {model}, batch {batch}/GPU, per micro-batch compute {tc * 1000:.3f} ms, {total_bytes / 1e6:.1f} MB of fp32 "
          "gradients per optimizer step; efficiency (speed-up over 1 GPU) per option")
    nets = (100, 400)
    print("| option | bytes/sample vs none | " + " | ".join(f"{n} GPUs, {g} Gb/s" for n in (8, 64, 512) for g in nets) + " |")
    print("|---|---|" + "---|" * (3 * len(nets)))
    params = parameter_bytes(model)
    for name, (sends, factor, h, k) in OPTIONS.items():
        cells = []
        # gradients: one all-reduce per phase per step (4 calls); local SGD: all parameters in one call every h steps
        round_bytes, calls = (total_bytes * factor, 4) if sends == "gradients" else (params * factor, 1)
        for n in (8, 64, 512):
            for gbps in nets:
                tcomm = ring_time(round_bytes, calls, n, args.latency_us * 1e-6, gbps * 1e9 / 8) / h
                eff = k * tc / (k * tc + tcomm)
                cells.append(f"{eff:.0%} ({n * eff:.1f}x)")
        print(f"| {name} | {round_bytes / (h * k * total_bytes):.3f} | " + " | ".join(cells) + " |")
    print("Casts to bf16 are taken as free on a GPU (on gloo/CPU here fp16 bought no speed: bench_comm.py). accumulate=K changes "
          "the optimisation (K times fewer optimizer steps per sample); local SGD keeps the steps but lets replicas drift between "
          "averages: bench_comm.py measures the loss of both after the same samples.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu-tflops", type=float, default=200.0, help="assumed achieved GPU throughput")
    ap.add_argument("--latency-us", type=float, default=10.0, help="assumed per-hop latency of the GPU network")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--step-ms", type=float, help="a measured GPU step time (bench_gpu.py) for the options table instead of FLOPs / --gpu-tflops")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    data = write_mnist_like(n=20_000)
    alpha, beta = gloo_alpha_beta()
    print(f"[measured] gloo all-reduce, 2 processes on this machine: latency {alpha * 1e6:.0f} us, bandwidth {beta / 1e9:.2f} GB/s")

    if not args.skip_check:
        from multiprocess import run_processes

        summaries = {}
        for w in (1, 2):
            run = tempfile.mkdtemp()
            cfg = load_config(None, PAPER_MLP + [f"data.path={data}", "data.batch_size=128", "train.max_steps=60", "train.progress=false",
                                                 "train.parzen_samples=0", "train.checkpoint_every=100000", "train.image_every=100000"])
            run_processes(cfg, run, world=w, threads=1)
            summaries[w] = json.load(open(os.path.join(run, "summary.json")))
        t1 = 128 / summaries[1]["samples_per_s"]
        comm = summaries[2]["communication_per_step"]
        b = sum(c["bytes"] for c in comm.values())
        calls = sum(c["allreduce_calls"] for c in comm.values())
        predicted = 2 * t1 / (t1 + ring_time(b, calls, 2, alpha, beta))
        measured = summaries[2]["samples_per_s"] / summaries[1]["samples_per_s"]
        print(f"[check] paper MLP, batch 128/worker, 1 thread: step {t1 * 1000:.0f} ms, {b / 1e6:.1f} MB in {calls:.0f} all-reduces per step; "
              f"2-worker speed-up predicted {predicted:.2f}x (no overlap), measured {measured:.2f}x")

    print(f"\n[projection] assumptions: GPU compute = FLOPs / {args.gpu_tflops:.0f} TFLOP/s, per-hop latency {args.latency_us:.0f} us, "
          "ring all-reduce, no overlap of communication with backward (conservative)")
    print("| model | batch/GPU | step compute (ms) | MB/step | GPUs | 25 Gb/s | 100 Gb/s | 400 Gb/s |\n|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        pb = phase_bytes(model)
        total_bytes = sum(pb.values())
        for batch in (128, 1024, 4096):
            flops = step_flops(model, batch, data)
            tc = flops / (args.gpu_tflops * 1e12)
            for n in (8, 64, 512):
                effs = []
                for gbps in (25, 100, 400):
                    tcomm = ring_time(total_bytes, 4, n, args.latency_us * 1e-6, gbps * 1e9 / 8)
                    effs.append(tc / (tc + tcomm))
                print(f"| {model} | {batch} | {tc * 1000:.3f} | {total_bytes / 1e6:.1f} | {n} | " + " | ".join(f"{e:.0%}" for e in effs) + " |")
    options_table(args, data)
    print("\nBelow ~50% a run is communication-bound. What aae-dist offers against it: a larger per-worker batch "
          "(compute grows, bytes per step do not); train.grad_compression=bf16 (half the bytes, measured by the "
          "comm counters); per-network DDP buckets (25 MB default) that overlap the reduction with the backward pass; "
          "phases that reduce only the networks they train (no discriminator bytes in the generator phase).")


if __name__ == "__main__":
    main()
