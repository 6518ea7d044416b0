"""One run plan: the steps, workers and resources `--dry-run`, pre-flight, the sweep and the workers use are
computed once (aae_dist/plan.py), so what the driver says is what the workers do."""

from __future__ import annotations

import os

import pytest

from aae_dist import config as config_module
from aae_dist.cli import main
from aae_dist.config import load_config
from aae_dist.data import ShardStream
from conftest import SMALL_MODEL
from test_bad_input_matrix import T, tree_digest, world  # noqa: F401 - the matrix's datasets and existing run
from test_dry_run import argv


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("aae-dist: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_dry_run_counts_optimizer_steps_with_accumulate(tmp_path, make_dataset, capsys):
    """train.accumulate=2: two batches per step, so an epoch of 10 batches per worker is 5 steps (as the workers count)."""
    data, _, _ = make_dataset(1000, 100)
    assert main(argv(tmp_path, data, "--workers", "2", "--dry-run", sets=["train.epochs=3", "train.accumulate=2"])) == 0
    out = capsys.readouterr().out
    assert "batch 50 per worker, 5 steps per epoch" in out and "steps: 15 (3.0 epochs)" in out


def test_accumulate_beyond_an_epoch_is_refused_before_anything_is_written(world, capsys):  # noqa: F811
    """600 samples / batch 50 = 12 batches per epoch: train.accumulate=13 can never make a step; refused in
    pre-flight (it used to start, write config.json, and fail on the worker)."""
    before = tree_digest(world)
    capsys.readouterr()
    assert main(T(world, "train.accumulate=13", name="acc")) == 2
    assert "train.accumulate=13 needs that many batches per epoch per worker, there are 12" in one_error_line(capsys)
    assert tree_digest(world) == before and not os.path.exists(world / "runs" / "acc")


@pytest.mark.parametrize("world_size,accumulate", [(1, 1), (2, 3), (3, 2)])
def test_progress_from_the_plan_counts_what_the_reader_gives(tmp_path, make_dataset, world_size, accumulate):
    """The plan's steps per epoch on any group size = the reader's batches / accumulate (what the trainer steps)."""
    from aae_dist.launch import make_plan
    from aae_dist.training.progress import Progress

    data, _, _ = make_dataset(1000, 100)
    cfg = load_config(None, SMALL_MODEL + [f"data.path={data}", "train.epochs=2", f"train.accumulate={accumulate}", "run.workers=3"])
    plan = make_plan(cfg, str(tmp_path / "r"))
    reader = ShardStream(data, "train", cfg.data.batch_size, world_size=world_size, drop_last=True)
    p = Progress.planned(plan, world_size)
    assert p.steps_per_epoch == len(reader) // accumulate and p.total_steps() == 2 * (len(reader) // accumulate)
    assert plan.total_steps(world_size) == p.total_steps()


def test_torch_trainer_leaves_the_config_alone_and_carries_the_plan(tmp_path, make_dataset):
    """The CPUs each Ray worker asks for come from the plan; the caller's config is not changed."""
    pytest.importorskip("ray.train")
    from aae_dist.launch import make_plan
    from aae_dist.plan import RunPlan
    from aae_dist.ray_launch import torch_trainer

    data, _, _ = make_dataset(1000, 100)
    cfg = load_config(None, SMALL_MODEL + [f"data.path={data}", "run.workers=2", f"run.storage={tmp_path}", "run.name=r"])
    plan = make_plan(cfg, str(tmp_path / "r"))
    trainer = torch_trainer(cfg, plan, 0.0)
    assert cfg.run.cpus_per_worker is None
    payload = trainer.train_loop_config
    assert RunPlan.from_dict(payload["plan"]) == plan and payload["run_url"] == plan.run_url
    assert payload["worker"] == {"threads": plan.threads, "gpu": False, "name": "r"}  # the worker reads no run.* key
    assert payload["config"]["run"]["cpus_per_worker"] is None
    assert trainer.scaling_config.resources_per_worker == plan.resources and plan.resources["CPU"] >= 1


def test_sweep_checks_every_grid_value_without_rereading_the_config(tmp_path, make_dataset, monkeypatch, capsys):
    """A bad grid value is refused before Ray starts, naming the key; the YAML file is read once, not per value."""
    data, _, _ = make_dataset(1000, 100)
    yaml_path = tmp_path / "base.yaml"
    yaml_path.write_text(f"data:\n  path: {data}\n  batch_size: 50\n")
    reads = []
    real = config_module.read_config_file
    monkeypatch.setattr(config_module, "read_config_file", lambda p: reads.append(p) or real(p))
    code = main(["sweep", "--config", str(yaml_path), "--storage", str(tmp_path / "runs"), "--name", "sw",
                 "--grid", "model.latent_dim=2,4,8", "--grid", "phases.reconstruction.lr=1e-3,fast"])
    assert code == 2
    err = one_error_line(capsys)
    assert "phases.reconstruction.lr" in err and "fast" in err
    assert reads == [str(yaml_path)]
    assert not os.path.exists(tmp_path / "runs")
