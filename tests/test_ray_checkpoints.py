"""Ray-native checkpoints (Result.checkpoint is the run folder's checkpoint, no second copy) and
train.keep_best / train.keep_best_mode (the best checkpoint kept besides the newest N)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from aae_dist import checkpoint
from aae_dist.cli import main
from conftest import SMALL_MODEL


def ckpt_steps(run) -> list[int]:
    return sorted(int(p.name.rsplit("_", 1)[1]) for p in run.iterdir() if p.name.startswith("checkpoint_step_"))


def train(tmp_path, data, *extra, name="r"):
    argv = ["train", "--workers", "0", "--storage", str(tmp_path / "runs"), "--name", name, "--set", f"data.path={data}"]
    for s in SMALL_MODEL + ["train.parzen_samples=0"] + list(extra):
        argv += ["--set", s]
    return main(argv)


def test_keep_best_keeps_the_best_checkpoint_besides_the_newest(tmp_path, make_dataset):
    data, _, _ = make_dataset(500, 100)
    # the lowest step is the best "min" of `step`: kept from step 5 on, beside the newest 2
    assert train(tmp_path, data, "train.max_steps=20", "train.checkpoint_every=5", "train.keep_checkpoints=2", "train.keep_best=step",
                 name="low") == 0
    run = tmp_path / "runs" / "low"
    assert ckpt_steps(run) == [5, 15, 20]
    saved = json.loads((run / "checkpoint_step_000000005" / "metrics.json").read_text())
    assert saved["step"] == 5 and "reconstruction/loss" in saved  # what the trainer reported at that checkpoint
    # by the reconstruction loss, highest first (max): the kept one is the worst of every checkpoint the run wrote
    assert train(tmp_path, data, "train.max_steps=20", "train.checkpoint_every=5", "train.keep_checkpoints=1",
                 "train.keep_best=reconstruction/loss", "train.keep_best_mode=max", name="loss") == 0
    run = tmp_path / "runs" / "loss"
    kept = ckpt_steps(run)
    assert len(kept) == 2 and kept[-1] == 20, kept
    losses = {s: json.loads((run / f"checkpoint_step_{s:09d}" / "metrics.json").read_text())["reconstruction/loss"] for s in kept}
    assert losses[kept[0]] > losses[20]


def test_pruning_reads_metrics_json_as_untrusted_input(tmp_path):
    """A metrics.json that is not an object, holds text, nan or a bool is no candidate; none of them breaks pruning."""
    run = tmp_path / "run"
    local = tmp_path / "local"
    checkpoint.write_local(str(local), {"models": {}}, {"step": 0})
    values = {1: 0.5, 2: "0.1", 3: float("nan"), 4: True, 5: 0.9, 6: 0.7}
    for step, value in values.items():
        checkpoint.write_local(str(local), {"models": {}}, {"step": step})
        checkpoint.persist(str(local), str(run), step, keep=100, metrics={"m": value})
    (run / "checkpoint_step_000000002" / "metrics.json").write_text('["not", "an", "object"]')
    (run / "checkpoint_step_000000004" / "metrics.json").write_text("{not json")
    checkpoint.prune(str(run), keep=1, best=("m", "min"))
    assert ckpt_steps(run) == [1, 6]
    checkpoint.prune(str(run), keep=1, best=("m", "max"))  # 1 (0.5) is no longer best by max; 6 is also newest
    assert ckpt_steps(run) == [6]


RAY_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from aae_dist.config import load_config
    from aae_dist.launch import make_plan
    from aae_dist.ray_launch import torch_trainer
    from aae_dist.ray_connect import connect_ray

    storage, data = sys.argv[1], sys.argv[2]
    sets = {small} + ["data.path=" + data, "train.checkpoint_every=5", "train.keep_checkpoints=1", "train.keep_best=step",
                      "train.parzen_samples=0", "run.name=r", "run.storage=" + storage, "run.workers=1"]
    connect_ray(None)
    out = []
    for steps in (15, 20):  # the second fit resumes the same run (same RunConfig name and storage)
        cfg = load_config(None, sets + ["train.max_steps=%d" % steps])
        result = torch_trainer(cfg, make_plan(cfg, storage + "/r"), time.time()).fit()
        out.append({{"error": repr(result.error) if result.error else None,
                     "checkpoint": result.checkpoint.path if result.checkpoint else None,
                     "best": [c.path for c, _ in result.best_checkpoints]}})
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.ray
@pytest.mark.slow  # ~80 s; CI keeps a Ray run's checkpoints in its run folder (test_train_ray.py) and pruning in-process (this module)
def test_ray_result_checkpoint_is_the_run_folders_checkpoint_and_a_resume_after_pruning_starts(tmp_path, make_dataset):
    """One Ray worker: Result.checkpoint points into the run folder (no copy of the bytes elsewhere), Ray deletes
    none of aae-dist's folders, and a second fit of the same run starts although aae-dist pruned checkpoints
    Ray's snapshot had listed (Ray would refuse it as a corrupted run folder)."""
    data, _, _ = make_dataset(500, 100)
    storage = str(tmp_path / "runs")
    script = RAY_SCRIPT.format(small=repr(SMALL_MODEL))
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, "-c", script, storage, data], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    first, second = json.loads(r.stdout.split("RESULT ", 1)[1].splitlines()[0])
    run = tmp_path / "runs" / "r"
    assert first["error"] is None and second["error"] is None, (first, second)
    assert first["checkpoint"] == str(run / "checkpoint_step_000000015")
    assert second["checkpoint"] == str(run / "checkpoint_step_000000020")
    assert str(run / "checkpoint_step_000000005") in first["best"]  # Ray ranks them by keep_best too
    assert second["best"] == [second["checkpoint"]]  # each launch starts Ray's list anew: aae-dist's run folder is the record
    assert ckpt_steps(run) == [5, 20]  # keep_best=step (min) keeps step 5, keep_checkpoints=1 the newest
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == [  # no copy of the bytes in Ray's own folders
        "checkpoint_manager_snapshot.json", "checkpoint_step_000000005", "checkpoint_step_000000020"]
