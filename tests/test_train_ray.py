"""Through a real local Ray cluster: 2 Ray Train workers, DDP over gloo, Ray's checkpoints, resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from aae_dist import timeline
from conftest import SMALL_MODEL, read_summary

pytestmark = pytest.mark.ray


def aae(*argv, cwd, bar=False):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", TQDM_DISABLE="" if bar else "1")
    return subprocess.run([sys.executable, "-m", "aae_dist.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def test_two_ray_workers_on_a_fresh_local_ray(tmp_path, make_dataset):
    """No --address: a fresh local Ray starts; Ray-mode resume is tested on the cluster (test_cluster.py)."""
    data, _, _ = make_dataset(1000, 100)
    sets = []
    for s in SMALL_MODEL + [f"data.path={data}", "train.checkpoint_every=5", "model.posterior=gaussian"]:
        sets += ["--set", s]
    first = aae("train", "--workers", "2", "--storage", str(tmp_path / "runs"), "--name", "r", *sets, "--set", "train.max_steps=10",
                "--set", "train.progress=true", cwd=tmp_path, bar=True)
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    s = read_summary(run)
    assert s["world_size"] == 2 and s["replicas_in_sync"] and len(set(s["replica_fingerprints"])) == 1
    assert s["communication_per_step"]["generator"]["networks"] == ["encoder"]
    # where the seconds before the first step went: every stage of a Ray run, in order, adding up to startup_s
    stages = s["startup_stages_s"]
    assert list(stages) == [label for _, label in timeline.STAGES[1:]], stages
    assert all(v >= 0 for v in stages.values()) and abs(sum(stages.values()) - s["startup_s"]) < 0.05
    assert 0 < s["eval_s"] < s["wall_s"]
    # Ray runs store checkpoints like in-process runs: checkpoint_step_N in the run folder, complete
    ckpts = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_step_"))
    assert ckpts == ["checkpoint_step_000000005", "checkpoint_step_000000010"]
    assert all((run / c / "state.pt").exists() and (run / c / "meta.json").exists() for c in ckpts)
    assert (run / "tensorboard").is_dir() and any((run / "tensorboard").iterdir())
    # the console: a start line, the bar (updated in place), the metrics table and where things are; no Ray internals
    out = first.stdout + first.stderr
    lines = first.stdout.splitlines()
    assert first.stdout.count("\n") <= 20, out  # stdout: start line, table, where things are (the bar is on stderr)
    for noise in ("(TrainController", "(RayTrainWorker", "PlacementGroupCleaner", "PreemptionWatcher", "Traceback", "INFO", "WARNING"):
        assert noise not in out, noise
    assert lines[0].startswith("aae-dist: training basic AAE") and "2 Ray workers" in lines[0]
    assert any(line.startswith("recon_loss ") for line in lines) and lines[-2].startswith("tensorboard --logdir ")
    assert lines[-1].startswith("Ray's logs")
    assert "10/10" in first.stderr, first.stderr[-2000:]  # the bar reached the last step: rank 0's posts came through the progress file



@pytest.mark.slow  # ~55 s; CI keeps every corrupt-shard case in-process (test_data_errors.py)
def test_a_corrupt_shard_under_ray_ends_the_run_once(tmp_path, make_dataset):
    """One byte flipped (same size) inside the samples only rank 1 reads, under 2 Ray workers: rank 1's
    block checksums catch it; a deterministic error is not retried: exit 2, the shard named in the last
    line, one attempt (no restart reported), even with train.max_failures=3."""
    data, _, _ = make_dataset(1000, 1000, block_bytes=1024)  # one shard: rank 0 reads samples 0-499, rank 1 500-999
    path = os.path.join(data, "train-00000.x.npy")
    blob = bytearray(open(path, "rb").read())
    header = len(blob) - 1000 * 16
    blob[header + 800 * 16 + 5] ^= 0xFF  # inside sample 800, a block rank 0 never reads
    open(path, "wb").write(bytes(blob))
    sets = []
    for s in SMALL_MODEL + [f"data.path={data}", "train.max_steps=10", "train.max_failures=3"]:
        sets += ["--set", s]
    r = aae("train", "--workers", "2", "--storage", str(tmp_path / "runs"), "--name", "bad", *sets, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("aae-dist: error:") and "train-00000.x.npy" in last and "xxh3_64 check" in last, last
    assert "restarted" not in out and "Traceback" not in out, out[-3000:]
    assert len(out.splitlines()) <= 3, out[-3000:]  # the start line, the progress bar, the error
