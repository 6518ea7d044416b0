"""The public Python API: `aae_dist.train` (the CLI's code path) and `aae_dist.load` (an nn.Module that
takes and gives data as the dataset holds it)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import SMALL_MODEL
from test_bad_input_matrix import tree_digest


def small(**more) -> dict:
    """SMALL_MODEL as an `overrides` dict (values as Python objects, the way a notebook writes them)."""
    import yaml

    out = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in SMALL_MODEL)}
    out.update(more)
    return out


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    import aae_dist
    from aae_dist.data.writer import write_dataset
    from conftest import ident_arrays

    root = tmp_path_factory.mktemp("api")
    x, y = ident_arrays(700)
    data = str(root / "ds")
    write_dataset(data, {"train": (x[:600], y[:600]), "test": (x[600:], y[600:])}, num_classes=10, source="t", shard_size=200,
                  progress=False)
    result = aae_dist.train({"data": {"path": data}}, overrides=small(**{"train.max_steps": 8, "train.checkpoint_every": 4}),
                            workers=0, storage=str(root / "runs"), name="nb")
    return root, data, x[600:], result


def test_train_returns_a_result_of_the_cli_code_path(api_run):
    import aae_dist

    root, data, _, result = api_run
    assert isinstance(result, aae_dist.Result)
    assert result.run_dir == str(root / "runs" / "nb")
    assert os.path.exists(os.path.join(result.run_dir, "config.json"))  # written by the same path as `aae-dist train`
    saved = json.load(open(os.path.join(result.run_dir, "config.json")))
    assert saved["train"]["max_steps"] == 8 and saved["model"]["hidden"] == [64, 64] and saved["data"]["path"] == data
    assert result.summary["steps"] == 8 and result.metrics == result.summary["metrics"] and result.metrics["recon_loss"] > 0
    assert result.baselines == result.summary["baselines"]
    assert result.checkpoint.endswith("checkpoint_step_000000008") and os.path.isdir(result.checkpoint)


def test_train_refuses_bad_input_with_a_user_error_and_touches_nothing(api_run):
    import aae_dist

    root, data, _, _ = api_run
    before = tree_digest(root)
    with pytest.raises(aae_dist.UserError, match="already exists"):
        aae_dist.train({"data": {"path": data}}, overrides=small(), workers=0, storage=str(root / "runs"), name="nb")
    with pytest.raises(aae_dist.UserError, match="did you mean 'train.epochs'"):
        aae_dist.train(overrides={"train.epoch": 3}, workers=0, storage=str(root / "runs"), name="other")
    with pytest.raises(aae_dist.UserError, match="data.batch_size"):  # pre-flight: 600 samples, batch 5000
        aae_dist.train({"data": {"path": data, "batch_size": 5000}}, workers=0, storage=str(root / "runs"), name="other")
    assert tree_digest(root) == before


def test_train_takes_a_yaml_file_or_a_config(api_run, tmp_path):
    import yaml

    import aae_dist

    _, data, _, _ = api_run
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": data}, "train": {"max_steps": 2}}))
    a = aae_dist.train(str(path), overrides=small(**{"train.parzen_samples": 0}), workers=0, storage=str(tmp_path / "runs"), name="y")
    cfg = aae_dist.Config.model_validate(a.summary["config"])
    b = aae_dist.train(cfg, workers=0, storage=str(tmp_path / "runs"), name="y", overwrite=True)
    assert a.summary["steps"] == b.summary["steps"] == 2 and b.summary["config"]["model"]["hidden"] == [64, 64]


def test_load_gives_a_module_that_takes_raw_data(api_run):
    import aae_dist

    _, _, x_test, result = api_run
    model = aae_dist.load(result.run_dir)
    assert isinstance(model, torch.nn.Module) and isinstance(model, aae_dist.AAEModel)
    assert sum(p.numel() for p in model.parameters()) > 0 and not model.training
    z = model.encode(x_test[:5])  # raw uint8 numpy, as the dataset holds it
    assert z.shape == (5, 8) and z.dtype == torch.float32
    assert torch.equal(z, model.encode(torch.from_numpy(x_test[:5])))
    assert torch.allclose(model.encode(x_test[0]), z[:1], atol=1e-6)  # one sample without its batch axis
    assert torch.allclose(model.encode(x_test[:5, 0]), z, atol=1e-6)  # grey images without their channel axis
    rec = model.reconstruct(x_test[:5])
    assert rec.dtype == torch.uint8 and rec.shape == (5, 1, 4, 4)  # images out in the same scale
    out = model.decode(z)
    assert out.dtype == torch.uint8 and torch.equal(out, rec)
    s = model.sample(6)
    assert s.dtype == torch.uint8 and s.shape == (6, 1, 4, 4)
    assert torch.equal(s, model.sample(6)) and not torch.equal(s, model.sample(6, seed=1))  # seeded, like `aae-dist sample`
    ckpt = aae_dist.load(result.checkpoint)  # a checkpoint folder works too
    assert torch.equal(ckpt.encode(x_test[:5]), z)


def test_load_refuses_bad_input_with_one_line(api_run, tmp_path):
    import aae_dist

    _, _, x_test, result = api_run
    model = aae_dist.load(result.run_dir)
    with pytest.raises(aae_dist.UserError, match=r"samples shaped \(1, 4, 4\)"):
        model.encode(np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(aae_dist.UserError, match="label"):
        model.sample(3, label=2)  # the basic variant has no classes
    with pytest.raises(aae_dist.UserError):
        aae_dist.load(str(tmp_path / "nothing"))


@pytest.mark.ray
@pytest.mark.slow  # ~40 s; CI keeps the API in-process and training on Ray workers through the CLI (test_train_ray.py)
def test_train_with_ray_workers(api_run, tmp_path):
    """workers=1: the same call runs under Ray Train (a fresh local Ray), and its Result is the run's."""
    import aae_dist

    _, data, x_test, _ = api_run
    result = aae_dist.train({"data": {"path": data}}, overrides=small(**{"train.max_steps": 4, "train.parzen_samples": 0}),
                            workers=1, storage=str(tmp_path / "runs"), name="ray")
    assert result.summary["world_size"] == 1 and result.summary["steps"] == 4
    assert result.checkpoint.endswith("checkpoint_step_000000004")
    assert aae_dist.load(result.checkpoint).reconstruct(x_test[:2]).shape == (2, 1, 4, 4)


@pytest.mark.ray
def test_another_address_is_never_the_cluster_already_joined(api_run, tmp_path, capsys):
    """A notebook that trained on a local Ray and then asks for --address X must reach X or be refused,
    not train on the local Ray it is still joined to."""
    import ray

    from aae_dist.cli import main
    from aae_dist.ray_connect import connect_ray

    _, data, _, _ = api_run
    connect_ray(None)
    assert ray.is_initialized()
    capsys.readouterr()
    argv = ["train", "--workers", "2", "--address", "127.0.0.1:1", "--storage", str(tmp_path / "runs"), "--name", "elsewhere",
            "--set", f"data.path={data}", "--set", "train.max_steps=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aae-dist: error:") and "cannot reach the Ray cluster at 127.0.0.1:1" in err, err
    assert not (tmp_path / "runs" / "elsewhere").exists()
