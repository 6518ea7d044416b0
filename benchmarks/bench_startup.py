"""Start-up and final evaluation of the default run (`aae-dist train`, fresh local Ray, embedded
digits), broken down by stage from `summary.json["startup_stages_s"]`, beside what Ray and torch cost
on their own in the same run: a bare `ray.init` and a TorchTrainer whose function does nothing.
aae-dist's own share of the start-up = start-up to the first step - bare Ray start - bare worker group
(`import ray` counts as ours).  --before DIR alternates, round by round, with the code of an older
checkout (e.g. `git worktree add /tmp/before HEAD~1`); --steps N shortens the training (start-up only);
--dead-record writes Ray's record of a last `ray start` cluster that is gone (a head killed rather than
stopped: /tmp/ray/ray_current_cluster) for the rounds, as a machine that ran one has, and restores it after.

    python benchmarks/bench_startup.py [--runs 1] [--steps N] [--before DIR] [--dead-record]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import machine  # noqa: E402

BARE_RAY = r'''
import json, logging, sys, tempfile, time
t0 = time.time()
import ray
from aae_dist.ray_connect import connect_ray
t_import = time.time()
connect_ray(None)
t_init = time.time()
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

def entry(config):
    import time as _t
    with open(config["out"], "w") as fh:
        fh.write(str(_t.time()))

out = tempfile.mktemp()
t_fit = time.time()
TorchTrainer(entry, train_loop_config={"out": out}, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
             torch_config=TorchConfig(backend="gloo"), run_config=RunConfig(storage_path=tempfile.mkdtemp())).fit()
t_done = time.time()
print(json.dumps({"import ray": t_import - t0, "ray start": t_init - t_import,
                  "fit() to the worker function (controller, worker group, process group)": float(open(out).read()) - t_fit,
                  "worker function return to fit() return": t_done - float(open(out).read())}))
'''


def timed(cmd: list[str], env=None) -> float:
    t0 = time.time()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.time() - t0


FIT = "fit() to the worker function (controller, worker group, process group)"


def bare_ray(env) -> dict:
    out = subprocess.run([sys.executable, "-c", BARE_RAY], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def aae_run(env, steps: int | None, tree: str | None) -> tuple[dict, float]:
    """One `aae-dist train` with the defaults (fresh local Ray); tree: run that checkout's code instead."""
    storage = tempfile.mkdtemp(prefix="aae-bench-startup-")
    extra = ["--set", f"train.max_steps={steps}", "--set", "train.parzen_samples=100"] if steps else []
    if tree:
        env = dict(env, PYTHONPATH=tree)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "aae_dist.cli", "train", "--storage", storage, "--name", "default", *extra], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tree)
    return json.load(open(os.path.join(storage, "default", "summary.json"))), time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps of each run (default: the full default run)")
    ap.add_argument("--before", default=None, help="a checkout of older code to alternate with, round by round")
    ap.add_argument("--dead-record", action="store_true", help="Ray's record of the last `ray start` cluster names one that is gone")
    a = ap.parse_args()
    if a.dead_record:
        with dead_cluster_on_record():
            rounds(a)
    else:
        rounds(a)


@contextlib.contextmanager
def dead_cluster_on_record():
    import socket

    from ray._private.utils import get_ray_address_file

    record = get_ray_address_file(None)
    before = open(record).read() if os.path.exists(record) else None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record, "w") as fh:
        fh.write(dead)
    print(f"Ray's record of the last `ray start` cluster: {dead}, where nothing listens")
    try:
        yield
    finally:
        if before is None:
            os.remove(record)
        else:
            with open(record, "w") as fh:
                fh.write(before)


def rounds(a) -> None:
    env = dict(os.environ, TQDM_DISABLE="1")
    print(f"machine: {machine()}")
    py = sys.executable
    print(f"[floor] python -c 'import torch': {timed([py, '-c', 'import torch']):.2f} s; "
          f"+ torch._dynamo (torch's optimizers import it on first use): {timed([py, '-c', 'import torch, torch._dynamo']):.2f} s")
    own: dict[str, list[float]] = {}
    for i in range(a.runs):
        bare = bare_ray(env)
        print(f"[round {i}] load average {os.getloadavg()[0]:.1f}")
        for k, v in bare.items():
            print(f"[round {i}] [floor] bare Ray, same options: {k}: {v:.2f} s")
        contenders = ([("before", a.before)] if a.before else []) + [("now", None)]
        for label, tree in contenders[::-1] if i % 2 else contenders:  # each goes first in every other round
            s, total = aae_run(env, a.steps, tree)
            share = s["startup_s"] - bare["ray start"] - bare[FIT]
            own.setdefault(label, []).append(share)
            print(f"[round {i}] [{label}] aae-dist train (defaults{f', {a.steps} steps' if a.steps else ''}): start-up to the first step "
                  f"{s['startup_s']:.2f} s, of which aae-dist's own {share:.2f} s (goal <= 1.5 s); training {s['train_s']:.1f} s; "
                  f"final evaluation {s['eval_s']:.2f} s = {s['eval_s'] / s['wall_s']:.1%} of the run's {s['wall_s']:.1f} s; command {total:.1f} s, "
                  f"of which {total - s['wall_s']:.1f} s after the run's summary (Ray's teardown)")
            for stage, sec in s["startup_stages_s"].items():
                print(f"[round {i}] [{label}]   {stage}: {sec:.2f} s")
    for label, v in own.items():
        print(f"[summary] {label}: aae-dist's own share of the start-up, median of {len(v)}: {statistics.median(v):.2f} s ({', '.join(f'{x:.2f}' for x in v)})")


if __name__ == "__main__":
    main()
