"""Run N workers as plain local processes (gloo) without Ray: for tests and benchmarks that
need real DDP but not Ray's start-up cost.  Users go through Ray (`aae-dist train --workers N`).
Test scaffolding, so it lives under tests/ (benchmarks put this folder on sys.path)."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from aae_dist.config import Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg_dict: dict, run_url: str, threads: int) -> None:
    from aae_dist.training.session import LocalSession
    from aae_dist.training.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = Config.model_validate(cfg_dict)
    from aae_dist.training.trainer import worker_options

    Trainer(cfg, LocalSession(run_url, cfg.train.keep_checkpoints, rank=rank, world_size=world), **worker_options(cfg)).fit()
    dist.barrier()  # rank 0 may still be writing the summary: leave the group together
    dist.destroy_process_group()
    # gloo's threads can abort the interpreter's finalisation ("terminate called without an active
    # exception", seen once in CI): the work is done and saved, so leave without finalising
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_processes(cfg: Config, run_url: str, world: int, threads: int = 1) -> None:
    mp.start_processes(_worker, args=(world, _free_port(), cfg.to_dict(), run_url, threads), nprocs=world, start_method="spawn")
