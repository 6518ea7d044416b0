"""A real two-node Ray cluster on this machine with a moto S3 server as shared storage: a job submitted
with `aae-dist submit`, a worker killed mid-run, local storage refused.  Everything started here is
stopped by process group, also on failure.

The nodes listen on 127.0.0.2 and 127.0.0.3 (see raycluster.py): all traffic stays on loopback."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import faults
from conftest import SMALL_MODEL
from raycluster import LocalCluster, loopback_env

pytestmark = pytest.mark.ray


FAULT_MARKER = f"/tmp/aae-fault-{os.getpid()}"
STEP_LOG = f"/tmp/aae-steps-{os.getpid()}.log"  # every rank of every run here appends "world rank step"


@pytest.fixture(scope="module")
def cluster(s3_server):
    bin_dir = os.path.dirname(sys.executable)
    # run "kill": rank 0 dies (SIGKILL) halfway through writing its step-10 checkpoint
    c = LocalCluster(faults.environment({"PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                                         "AAE_DIST_FAULT": f"kill:10:{FAULT_MARKER}", "AAE_DIST_STEP_LOG": STEP_LOG,
                                         "AAE_DIST_STEP_DELAY": "0.05"}))
    try:
        c.start_head(1, {"head_node": 1})
        c.add_node(1, {"worker_node": 1})
        assert sorted(c.wait_nodes(2)) == ["127.0.0.2", "127.0.0.3"]  # a real two-node cluster, all on loopback
        yield c
    finally:
        c.stop()
        for left in (STEP_LOG, FAULT_MARKER):  # files outside tmp_path: this module's to remove
            if os.path.exists(left):
                os.remove(left)


@pytest.fixture(scope="module")
def s3_data(s3_server):
    from aae_dist.data.writer import write_dataset
    from conftest import ident_arrays

    x, y = ident_arrays(1200)
    url = f"s3://{s3_server['bucket']}/cluster/data"
    write_dataset(url, {"train": (x[:1000], y[:1000]), "test": (x[1000:], y[1000:])}, num_classes=10, source="t", shard_size=250, progress=False)
    return url


def cli(*argv, env=None, timeout=400):
    env = loopback_env({"TQDM_DISABLE": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "aae_dist.cli", *argv], env=env, capture_output=True, text=True, timeout=timeout)


def s3_json(s3_server, key):
    import boto3

    return json.loads(boto3.client("s3").get_object(Bucket=s3_server["bucket"], Key=key)["Body"].read())


def s3_keys(s3_server, prefix):
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=s3_server["bucket"], Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def sets(*extra):
    out = []
    for s in SMALL_MODEL + [faults.CALLBACK] + list(extra):  # inert unless the cluster's AAE_DIST_* variables ask
        out += ["--set", s]
    return out


def test_submit_two_workers_on_two_nodes(cluster, s3_server, s3_data):
    storage = f"s3://{s3_server['bucket']}/cluster/runs"
    proc = cli("submit", "--address", cluster.job_api, "--workers", "2", "--storage", storage, "--name", "twonode", "--follow",
               *sets(f"data.path={s3_data}", "train.max_steps=12", "train.checkpoint_every=4", "run.placement=SPREAD"))
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-2000:])
    job_id = proc.stdout.splitlines()[0].strip()
    assert job_id.startswith("raysubmit_")
    s = s3_json(s3_server, "cluster/runs/twonode/summary.json")
    assert s["world_size"] == 2 and s["nodes"] == 2 and s["replicas_in_sync"] and s["steps"] == 12
    assert len({w["node"] for w in s["workers"]}) == 2
    keys = s3_keys(s3_server, "cluster/runs/twonode/")
    assert any("/checkpoint_" in k and k.endswith("state.pt") for k in keys)
    assert any("/tensorboard/" in k and "tfevents" in k for k in keys)
    status = cli("jobs", "status", job_id, "--address", cluster.job_api)
    assert status.returncode == 0 and status.stdout.strip() == "SUCCEEDED"
    listed = cli("jobs", "list", "--address", cluster.job_api)
    assert job_id in listed.stdout
    # the nodes hold the S3 secret in their environment: it reaches neither the job's output nor its Ray log
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    job_logs = glob.glob(f"/tmp/ray/session_*/logs/job-driver-{job_id}.log")
    assert job_logs and secret not in proc.stdout + proc.stderr
    assert all(secret.encode() not in open(p, "rb").read() for p in job_logs)


def ray_checkpoint_steps(s3_server, run):
    return sorted(s3_json(s3_server, k)["step"] for k in s3_keys(s3_server, f"cluster/runs/{run}/")
                  if "/checkpoint_" in k and k.endswith("meta.json"))


@pytest.mark.slow  # ~50 s; CI keeps a job submitted to the two-node cluster
def test_sweep_submitted_from_a_regular_install_spreads_over_two_nodes(cluster, s3_server, s3_data, regular_install, tmp_path):
    """A sweep job submitted from a non-editable install runs on the cluster: what travels is that
    install's aae_dist folder alone (the dry run from the same interpreter lists it) and the resolved
    config; its 1-worker trials (1 CPU each) run two at once, one per node, each an ordinary run on S3."""
    from test_submit import dry_run_plan

    py, site, where = regular_install
    module, kb, _ = dry_run_plan(py, cluster.job_api, tmp_path)
    assert module == os.path.dirname(where) and kb < 1000
    storage = f"s3://{s3_server['bucket']}/cluster/runs"
    env = loopback_env({"TQDM_DISABLE": "1"})
    proc = subprocess.run([py, "-m", "aae_dist.cli", "submit", "--address", cluster.job_api, "--command", "sweep", "--storage", storage,
                           "--name", "sweep", "--follow", *sets(f"data.path={s3_data}", "train.max_steps=4", "run.cpus_per_worker=1"),
                           "--", "--grid", "train.seed=1,2", "--workers-per-trial", "1", "--metric", "recon_loss", "--mode", "min"],
                          env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-2000:])
    import boto3

    rows = boto3.client("s3").get_object(Bucket=s3_server["bucket"], Key="cluster/runs/sweep/sweep.csv")["Body"].read().decode()
    header, *lines = rows.strip().splitlines()
    assert len(lines) == 2 and "recon_loss" in header and "train.seed" in header, rows
    trials = sorted({k.split("/")[3] for k in s3_keys(s3_server, "cluster/runs/sweep/") if k.endswith("/summary.json")})
    summaries = [s3_json(s3_server, f"cluster/runs/sweep/{t}/summary.json") for t in trials]
    assert len(summaries) == 2 and all(s["steps"] == 4 for s in summaries)
    assert len({s["workers"][0]["node"] for s in summaries}) == 2, [s["workers"] for s in summaries]  # Ray node ids: one trial per node
    # Tune would copy the driver's AWS credentials into each trial's runtime env, which Ray logs: not one file of the logs holds it
    job_id = proc.stdout.splitlines()[0].strip()
    logs = os.path.dirname(glob.glob(f"/tmp/ray/session_*/logs/job-driver-{job_id}.log")[0])
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    leaks = [os.path.join(r, f) for r, _, fs in os.walk(logs) for f in fs if secret in open(os.path.join(r, f), "rb").read()]
    assert not leaks, leaks


@pytest.mark.slow  # ~2 min; CI keeps a killed trial retried (test_sweep.py) and a checkpoint write killed halfway (test_reliability.py)
def test_workers_killed_twice_resume_from_checkpoints(cluster, s3_server, s3_data):
    """Kill 1: rank 0 SIGKILLs itself while uploading its step-10 checkpoint (fault injection).
    Kill 2: the test SIGKILLs a randomly chosen worker at a random step after that.  From the per-step
    log: each restart redid at most checkpoint_every steps, every step 1..40 ran, the last is 40, and
    the half-written checkpoint was never resumed from."""
    import random

    from faults import read_step_log

    every, rng = 5, random.Random()
    kill_at = rng.randint(18, 32)
    storage = f"s3://{s3_server['bucket']}/cluster/runs"
    argv = ["train", "--workers", "2", "--address", cluster.address, "--storage", storage, "--name", "kill",
            *sets(f"data.path={s3_data}", "train.max_steps=40", f"train.checkpoint_every={every}", "run.placement=SPREAD",
                  "data.batch_size=25", "train.epochs=1000")]
    env = loopback_env({"TQDM_DISABLE": "1"})
    if os.path.exists(STEP_LOG):
        os.remove(STEP_LOG)

    def rank0():
        return [s for w, r, s in read_step_log(STEP_LOG) if r == 0] if os.path.exists(STEP_LOG) else []

    proc = subprocess.Popen([sys.executable, "-m", "aae_dist.cli", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not os.path.exists(FAULT_MARKER):
            time.sleep(0.2)
        assert os.path.exists(FAULT_MARKER), "the injected fault did not fire"
        first_group = set(cluster.worker_pids())  # what is left of the group that lost rank 0: not to be killed again
        seen = len(rank0())
        while time.time() < deadline and kill_at not in rank0()[seen:]:
            time.sleep(0.05)  # the restarted group reaches the random step
        pids = [p for p in cluster.worker_pids() if p not in first_group]
        while time.time() < deadline and len(pids) != 2:  # the restarted group's two workers
            time.sleep(0.1)
            pids = [p for p in cluster.worker_pids() if p not in first_group]
        assert len(pids) == 2, (pids, first_group)
        os.kill(rng.choice(pids), signal.SIGKILL)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
        if os.path.exists(FAULT_MARKER):
            os.remove(FAULT_MARKER)
    assert proc.returncode == 0, out[-3000:]
    rows = [(s, pid) for w, r, s, pid in read_step_log(STEP_LOG, pids=True) if r == 0]
    steps = [s for s, _ in rows]
    # a restart = rank 0 in a new process (a kill right after a checkpoint resumes at the very next step)
    restarts = [(a, b) for (a, p), (b, q) in zip(rows, rows[1:]) if q != p]
    assert len(restarts) == 2, (kill_at, restarts)
    assert all(b == a + 1 for (a, p), (b, q) in zip(rows, rows[1:]) if q == p), steps  # within a process: one step at a time
    for a, b in restarts:  # went back to the step after the latest complete checkpoint: at most `every` redone
        assert b <= a + 1 and a - (b - 1) <= every and (b - 1) % every == 0, (kill_at, a, b)
    assert restarts[0] == (10, 6), restarts  # the step-10 checkpoint was half-written: resumed from step 5
    assert steps[-1] == 40 and set(steps) == set(range(1, 41)), (kill_at, steps)
    s = s3_json(s3_server, "cluster/runs/kill/summary.json")
    assert s["steps"] == 40 and s["replicas_in_sync"] and s["resumed_from_step"] == restarts[1][1] - 1


@pytest.mark.slow  # ~2 min; CI keeps the single-node SIGTERM and resume (test_reliability.py)
def test_sigterm_to_a_ray_driver_checkpoints_on_every_rank(cluster, s3_server, s3_data):
    storage = f"s3://{s3_server['bucket']}/cluster/runs"
    argv = ["train", "--workers", "2", "--address", cluster.address, "--storage", storage, "--name", "term",
            *sets(f"data.path={s3_data}", "train.epochs=1000", "train.checkpoint_every=7", "run.placement=SPREAD", "data.batch_size=25")]
    env = loopback_env({"TQDM_DISABLE": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "aae_dist.cli", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 200
        while time.time() < deadline and not ray_checkpoint_steps(s3_server, "term"):
            time.sleep(0.5)  # a first checkpoint: training is under way
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    s = s3_json(s3_server, "cluster/runs/term/summary.json")
    assert s["stop_reason"] == "interrupted" and s["replicas_in_sync"] and s["steps"] in ray_checkpoint_steps(s3_server, "term")
    assert s["steps"] % 5 == 0 or s["steps"] % 7 == 0  # a sync step (every 5, and at checkpoints): the same on both ranks
    assert "STOP" not in [k.rsplit("/", 1)[-1] for k in s3_keys(s3_server, "cluster/runs/term/")]
    # --resume through Ray (Ray Train finds the run by name and storage) continues from that checkpoint
    stopped = s["steps"]
    again = cli("train", "--workers", "2", "--address", cluster.address, "--storage", storage, "--name", "term", "--resume",
                *sets(f"data.path={s3_data}", f"train.max_steps={stopped + 5}", "train.checkpoint_every=7", "run.placement=SPREAD",
                      "data.batch_size=25"))
    assert again.returncode == 0, again.stderr[-2000:]
    s2 = s3_json(s3_server, "cluster/runs/term/summary.json")
    assert s2["resumed_from_step"] == stopped and s2["steps"] == stopped + 5 and s2["replicas_in_sync"]


def test_generate_spread_over_ray_tasks(cluster, s3_server):
    out = f"s3://{s3_server['bucket']}/cluster/generated"
    proc = cli("generate", f"s3://{s3_server['bucket']}/cluster/runs/twonode", "--n", "300", "--shard-size", "100", "--out", out,
               "--workers", "2", "--address", cluster.address)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from aae_dist.data import read_manifest

    m = read_manifest(out)
    assert [s.count for s in m.splits["train"].shards] == [100, 100, 100]
    assert cli("verify", out).returncode == 0


def test_local_storage_refused_on_two_nodes(cluster, tmp_path, s3_data):
    proc = cli("train", "--workers", "2", "--address", cluster.address, "--storage", str(tmp_path / "runs"), *sets(f"data.path={s3_data}"))
    assert proc.returncode == 2
    assert "local path but the cluster has 2 nodes" in proc.stderr


def test_token_authentication(tmp_path):
    """A head with Ray's token authentication: no token or a wrong one is one clear line; the right one works."""
    token = "aae-test-token-0123456789abcdef0123"
    c = LocalCluster({"HOME": str(tmp_path / "head-home"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    try:
        c.start_head(1)
        base = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        base["HOME"] = str(tmp_path / "client-home")  # no token file to fall back on
        for env in (base, {**base, "RAY_AUTH_TOKEN": "wrong-token"}):
            p = subprocess.run([sys.executable, "-m", "aae_dist.cli", "jobs", "list", "--address", c.job_api], env=env,
                               capture_output=True, text=True, timeout=120)
            assert p.returncode == 2 and p.stderr.count("\n") == 1
            assert "authentication token missing or wrong" in p.stderr and "RAY_AUTH_TOKEN" in p.stderr
            assert "wrong-token" not in p.stderr
        ok = subprocess.run([sys.executable, "-m", "aae_dist.cli", "jobs", "list", "--address", c.job_api],
                            env={**base, "RAY_AUTH_TOKEN": token}, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr[-1000:]
        assert token not in ok.stdout + ok.stderr
    finally:
        c.stop()
