"""Start-up and final evaluation of the default run (`aae-dist train`, fresh local Ray, embedded
digits), broken down by stage from `summary.json["startup_stages_s"]`, beside what Ray and torch cost
on their own in the same run: a bare `ray.init` and a TorchTrainer whose function does nothing.

    python benchmarks/bench_startup.py [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()
    env = dict(os.environ, TQDM_DISABLE="1")
    print(f"machine: {machine()}")
    py = sys.executable
    print(f"[floor] python -c 'import torch': {timed([py, '-c', 'import torch']):.2f} s; "
          f"+ torch._dynamo (torch's optimizers import it on first use): {timed([py, '-c', 'import torch, torch._dynamo']):.2f} s")
    bare = json.loads(subprocess.run([py, "-c", BARE_RAY], check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1])
    for k, v in bare.items():
        print(f"[floor] bare Ray, same options: {k}: {v:.2f} s")
    for i in range(a.runs):
        storage = tempfile.mkdtemp(prefix="aae-bench-startup-")
        t0 = time.time()
        subprocess.run([py, "-m", "aae_dist.cli", "train", "--storage", storage, "--name", "default"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        total = time.time() - t0
        s = json.load(open(os.path.join(storage, "default", "summary.json")))
        print(f"[run {i}] aae-dist train (defaults): start-up to the first step {s['startup_s']:.2f} s (goal <= 12 s); "
              f"training {s['train_s']:.1f} s; final evaluation {s['eval_s']:.2f} s = {s['eval_s'] / s['wall_s']:.1%} of the run's "
              f"{s['wall_s']:.1f} s (goal <= 10%); command {total:.1f} s in all")
        for stage, sec in s["startup_stages_s"].items():
            print(f"[run {i}]   {stage}: {sec:.2f} s")


if __name__ == "__main__":
    main()
