"""Fault injection: interrupts, atomic checkpoints, storage hiccups, numerical faults, planted secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import re

import faults
from aae_dist import storage
from aae_dist.cli import main
from conftest import SMALL_MODEL, read_summary


def train_argv(tmp_path, data, *sets, name="r", workers="0", extra=()):
    argv = ["train", "--workers", workers, "--storage", str(tmp_path / "runs"), "--name", name, "--set", f"data.path={data}", *extra]
    for s in SMALL_MODEL + list(sets):
        argv += ["--set", s]
    return argv


def test_sigterm_checkpoints_and_resume_continues(tmp_path, make_dataset):
    data, _, _ = make_dataset(2000, 200)
    argv = train_argv(tmp_path, data, "train.epochs=100000", "train.max_steps=1000000", "train.checkpoint_every=100000")
    env = dict(os.environ, TQDM_DISABLE="1")
    proc = subprocess.Popen([sys.executable, "-m", "aae_dist.cli", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "r"
    deadline = time.time() + 120
    while not (run / "config.json").exists() and time.time() < deadline:  # pre-flight done, handlers installed
        time.sleep(0.2)
    time.sleep(8.0)  # well into training
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at step" in err and "--resume" in err
    s = read_summary(run)
    assert s["stop_reason"] == "interrupted" and s["steps"] > 0 and s["steps"] % 5 == 0  # stopped at a sync step
    ckpts = [p.name for p in run.iterdir() if p.name.startswith("checkpoint_")]
    assert f"checkpoint_step_{s['steps']:09d}" in ckpts
    stopped = s["steps"]
    assert main(train_argv(tmp_path, data, "train.epochs=100000", f"train.max_steps={stopped + 10}", "train.checkpoint_every=100000",
                           extra=["--resume"])) == 0
    s2 = read_summary(run)
    assert s2["resumed_from_step"] == stopped and s2["steps"] == stopped + 10 and s2["stop_reason"] == "max_steps"


def test_checkpoint_write_killed_halfway_is_never_resumed(tmp_path, make_dataset, monkeypatch):
    from aae_dist import checkpoint

    data, _, _ = make_dataset(1000, 100)
    assert main(train_argv(tmp_path, data, "train.max_steps=10", "train.checkpoint_every=5", "train.keep_checkpoints=5")) == 0
    run = tmp_path / "runs" / "r"
    real = storage.write_bytes_atomic

    def dying(url, payload):
        if url.endswith("checkpoint_step_000000015/meta.json"):
            raise KeyboardInterrupt  # killed between state.pt and meta.json
        return real(url, payload)

    monkeypatch.setattr(storage, "write_bytes_atomic", dying)
    assert main(train_argv(tmp_path, data, "train.max_steps=20", "train.checkpoint_every=5", "train.keep_checkpoints=5", extra=["--resume"])) == 130
    monkeypatch.setattr(storage, "write_bytes_atomic", real)
    assert (run / "checkpoint_step_000000015" / "state.pt").exists()
    assert checkpoint.latest_in_run(str(run)).endswith("checkpoint_step_000000010")
    assert main(train_argv(tmp_path, data, "train.max_steps=20", "train.checkpoint_every=5", "train.keep_checkpoints=5", extra=["--resume"])) == 0
    assert read_summary(run)["resumed_from_step"] == 10


class Flaky:
    """An fsspec filesystem whose reads and writes fail transiently `fails` times each, then work."""

    def __init__(self, fs, fails):
        self.fs, self.fails, self.errors = fs, fails, 0

    def __getattr__(self, name):
        attr = getattr(self.fs, name)
        if name not in ("cat_file", "pipe_file"):
            return attr

        def flaky(*a, **k):
            if self.fails > 0:
                self.fails -= 1
                self.errors += 1
                raise ConnectionError("injected: connection reset by peer")
            return attr(*a, **k)

        return flaky


def test_transient_storage_errors_are_retried(tmp_path, make_dataset, monkeypatch):
    data, _, _ = make_dataset(600, 100)
    real = storage.filesystem
    flaky = {}

    def wrapped(url, *how):
        fs, path = real(url, *how)
        if str(url).startswith("memory://"):
            flaky.setdefault("fs", Flaky(fs, 3))
            return flaky["fs"], path
        return fs, path

    monkeypatch.setattr(storage, "filesystem", wrapped)
    monkeypatch.setenv("AAE_STORAGE_RETRIES", "3")
    argv = ["train", "--workers", "0", "--storage", "memory://runs", "--name", "flaky", "--set", f"data.path={data}"]
    for s in SMALL_MODEL + ["train.max_steps=6", "train.checkpoint_every=3"]:
        argv += ["--set", s]
    flaky["fs"] = Flaky(real("memory://x")[0], 2)
    assert main(argv) == 0
    assert flaky["fs"].errors >= 2
    assert json.loads(storage.read_bytes("memory://runs/flaky/summary.json"))["steps"] == 6


def test_permanent_storage_failure_is_one_line_and_keeps_last_checkpoint(tmp_path, make_dataset, monkeypatch, capsys):
    data, _, _ = make_dataset(600, 100)
    assert main(train_argv(tmp_path, data, "train.max_steps=6", "train.checkpoint_every=3")) == 0
    run = tmp_path / "runs" / "r"
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoint_step_000000006").iterdir()}
    real = storage.write_bytes_atomic
    monkeypatch.setenv("AAE_STORAGE_RETRIES", "2")

    def down(url, payload):
        if "checkpoint_step" in url:
            raise ConnectionError("injected: endpoint down")
        return real(url, payload)

    monkeypatch.setattr(storage, "write_bytes_atomic", lambda url, payload: storage.with_retries("writing", url, lambda: down(url, payload), base_delay=0.01))
    capsys.readouterr()
    assert main(train_argv(tmp_path, data, "train.max_steps=12", "train.checkpoint_every=3", extra=["--resume"])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aae-dist: error: storage unreachable while writing") and "checkpoint_step_000000009" in err and "\n" not in err
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoint_step_000000006").iterdir()} == before


@pytest.mark.parametrize("workers", ["0", "2"])
def test_nan_policy_stop_within_the_step(tmp_path, make_dataset, capsys, workers):
    """The discriminator's lr turns huge after 10 healthy warm-up steps; its weights overflow and the next
    loss is non-finite.  The run stops inside that very step (not at the next sync: sync_every is 50 here),
    names that step and phase, and its last checkpoint holds finite weights from just before it; with 2
    DDP workers both ranks stop alike (exit 2, one line)."""
    from aae_dist.checkpoint import latest_in_run, read_local
    from aae_dist.config import load_config

    data, _, _ = make_dataset(600, 100)
    sets = ["train.max_steps=40", "train.checkpoint_every=5", "train.sync_every=50", "phases.discriminator.lr=1e30", "train.warmup_steps=10"]
    if workers == "0":
        code = main(train_argv(tmp_path, data, *sets))
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and "Traceback" not in err, err
    else:
        from multiprocess import run_processes

        cfg = load_config(None, SMALL_MODEL + [f"data.path={data}", *sets])
        with pytest.raises(Exception) as info:
            run_processes(cfg, str(tmp_path / "runs" / "r"), world=2)
        err = str(info.value)
    m = re.search(r"non-finite gradients in phase '(\w+)' at step (\d+): stopped before applying it; checkpoint_step_(\d+) holds", err)
    assert m, err
    phase, failing, kept = m.group(1), int(m.group(2)), int(m.group(3))
    assert 10 < failing < 20 and kept == failing - 1 and phase in ("discriminator", "generator", "reconstruction")
    state, meta = read_local(latest_in_run(str(tmp_path / "runs" / "r")))
    assert meta["step"] == kept and meta["stopped_by"]["nonfinite_loss_at_step"] == failing
    assert all(torch.isfinite(v).all() for part in state["models"].values() for v in part.values())


def test_nan_policy_skip_drops_updates_on_every_rank(tmp_path, make_dataset):
    from aae_dist.config import load_config
    from multiprocess import run_processes

    data, _, _ = make_dataset(1000, 100)
    cfg = load_config(None, SMALL_MODEL + [f"data.path={data}", "train.max_steps=12", "train.nan_policy=skip",
                                           "phases.generator.lr=1e30", "phases.discriminator.lr=1e30", "train.checkpoint_every=6"])
    run_processes(cfg, str(tmp_path / "skip"), world=2)
    s = read_summary(tmp_path / "skip")
    assert s["steps"] == 12 and s["skipped_updates"] > 0 and s["replicas_in_sync"]


def test_planted_secret_never_saved_or_logged(tmp_path, s3_server, make_dataset):
    """An S3 run (data and run folder on the moto server) with a planted secret key."""
    import boto3

    data, _, _ = make_dataset(400, 100, url=f"s3://{s3_server['bucket']}/sec/data")
    secret = "PLANTED-SECRET-5f3a9c"
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=secret, TQDM_DISABLE="1")
    # moto accepts any secret; the planted one is what s3fs signs with
    argv = ["train", "--workers", "0", "--storage", f"s3://{s3_server['bucket']}/sec/runs", "--name", "s", "--set", f"data.path={data}"]
    for s in SMALL_MODEL + ["train.max_steps=6", "train.checkpoint_every=3"]:
        argv += ["--set", s]
    proc = subprocess.run([sys.executable, "-m", "aae_dist.cli", *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert secret not in proc.stdout + proc.stderr
    client = boto3.client("s3")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_server["bucket"], Prefix="sec/runs/s/")["Contents"]]
    assert any(k.endswith("summary.json") for k in keys) and any("tensorboard" in k for k in keys) and any("checkpoint_step" in k for k in keys)
    for key in keys:
        body = client.get_object(Bucket=s3_server["bucket"], Key=key)["Body"].read()
        assert secret.encode() not in body, key


def outage_run(tmp_path, s3_server, proxy, name, retries):
    """A run reading its shards from S3 (no cache: every epoch reads them again) and writing checkpoints
    there every 10 steps, through the proxy; it logs each step (AAE_DIST_STEP_LOG)."""
    log = tmp_path / f"{name}.log"
    env = faults.environment(dict(os.environ, AWS_ENDPOINT_URL=proxy.endpoint, TQDM_DISABLE="1", AAE_DIST_STEP_LOG=str(log),
                                  AAE_DIST_STEP_DELAY="0.05", AAE_STORAGE_RETRIES=str(retries)))
    argv = ["train", "--workers", "0", "--storage", f"s3://{s3_server['bucket']}/outage/runs", "--name", name,
            "--set", f"data.path=s3://{s3_server['bucket']}/outage/data"]
    for s in SMALL_MODEL + ["train.max_steps=150", "train.epochs=1000", "train.checkpoint_every=10", "train.keep_checkpoints=100", "train.parzen_samples=0", faults.CALLBACK]:
        argv += ["--set", s]
    proc = subprocess.Popen([sys.executable, "-m", "aae_dist.cli", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, log


def logged_steps(log) -> list[int]:
    from faults import read_step_log

    return [s for _, _, s in read_step_log(str(log))] if os.path.exists(log) else []


def wait_step(proc, log, step, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and (not logged_steps(log) or logged_steps(log)[-1] < step):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.1)


@pytest.mark.slow  # ~70 s against moto; CI keeps the in-process transient and permanent storage failures
def test_storage_outage_is_ridden_out_and_a_permanent_one_is_one_line(tmp_path, s3_server, make_dataset):
    """The S3 endpoint goes away for 8 s mid-run (connections refused and cut) and comes back: the run
    finishes, every step ran once, every checkpoint is complete, and summary.json counts the retries.
    Then a second run loses the endpoint for good: exit 2, one line, and its last checkpoint is intact."""
    from aae_dist.checkpoint import latest_in_run, listing, read_local
    from outage import OutageProxy

    make_dataset(600, 100, url=f"s3://{s3_server['bucket']}/outage/data")
    proxy = OutageProxy(s3_server["port"])
    proc, log = outage_run(tmp_path, s3_server, proxy, "brief", retries=10)
    wait_step(proc, log, 30)
    proxy.down()
    at_down = logged_steps(log)[-1]
    time.sleep(8)
    at_up = logged_steps(log)[-1]
    proxy.up()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert at_up - at_down <= 10, (at_down, at_up)  # training waited for its storage (a checkpoint every 10 steps)
    assert logged_steps(log) == list(range(1, 151))  # no step lost or repeated (in-process: no restart)
    s = json.loads(storage.read_bytes(f"s3://{s3_server['bucket']}/outage/runs/brief/summary.json"))
    assert s["steps"] == 150 and s["storage_retries"] > 0, s.get("storage_retries")
    run = f"s3://{s3_server['bucket']}/outage/runs/brief"
    found = listing(run)
    assert [step for step, _ in found] == list(range(10, 151, 10)), found  # every checkpoint complete, none lost
    for step, url in found:
        assert read_local(storage_fetch(url))[1]["step"] == step

    proc, log = outage_run(tmp_path, s3_server, proxy, "lost", retries=2)
    wait_step(proc, log, 35)
    proxy.down()
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proxy.up()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert proc.returncode == 2 and last.startswith("aae-dist: error: storage unreachable while") and "Traceback" not in err, err[-3000:]
    state, meta = read_local(storage_fetch(latest_in_run(f"s3://{s3_server['bucket']}/outage/runs/lost")))
    assert meta["step"] >= 30 and meta["step"] % 10 == 0 and meta["step"] <= logged_steps(log)[-1]
    assert all(torch.isfinite(v).all() for part in state["models"].values() for v in part.values())


def storage_fetch(url):
    from aae_dist.checkpoint import fetch

    return fetch(url)
