"""Experiment trackers beside TensorBoard: a real MLflow store read back with MlflowClient, W&B offline."""

from __future__ import annotations

import json
import sys

import pytest

from aae_dist.cli import main
from conftest import SMALL_MODEL, read_summary
from test_bad_input_matrix import T, tree_digest, world  # noqa: F401 - the fixture is used by name

mlflow = pytest.importorskip("mlflow")


def train(tmp_path, data, *extra, name="r", flags=()):
    argv = ["train", "--workers", "0", "--storage", str(tmp_path / "runs"), "--name", name, "--set", f"data.path={data}", *flags]
    for s in SMALL_MODEL + ["train.image_every=10", "train.checkpoint_every=10"] + list(extra):
        argv += ["--set", s]
    return main(argv)


@pytest.fixture
def file_store(tmp_path, monkeypatch):
    """MLflow's file store (MLflow 3 asks for this opt-in: sqlite and servers need the full mlflow package)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_gets_the_scalars_hparams_final_metrics_and_figures_and_a_resume_continues_the_run(tmp_path, make_dataset, file_store):
    from mlflow.tracking import MlflowClient

    data, _, _ = make_dataset(500, 100)
    sets = [f"log.mlflow.tracking_uri={file_store}", "log.mlflow.experiment=aae-test"]
    assert train(tmp_path, data, "train.max_steps=20", *sets) == 0
    client = MlflowClient(tracking_uri=file_store)
    exp = client.get_experiment_by_name("aae-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["model.latent_dim"] == "8" and run.data.params["train.max_steps"] == "20"
    recon = client.get_metric_history(run.info.run_id, "loss/reconstruction")
    assert sorted(m.step for m in recon) == [5, 10, 15, 20]  # every sync, as in TensorBoard
    for tag in ("loss/discriminator", "lr/generator", "perf/samples_per_s", "discriminator/acc_prior"):
        assert client.get_metric_history(run.info.run_id, tag), tag
    summary = read_summary(tmp_path / "runs" / "r")
    assert run.data.metrics["final/recon_loss"] == pytest.approx(summary["metrics"]["recon_loss"])
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/figures_codes.png", "figures/images_prior_samples.png", "figures/images_inputs_and_reconstructions.png"} <= figures
    png = client.download_artifacts(run.info.run_id, "figures/figures_codes.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # --resume continues the same MLflow run (its curves go on), it does not start a second one
    assert train(tmp_path, data, "train.max_steps=30", *sets, flags=["--resume"]) == 0
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/reconstruction")) == [5, 10, 15, 20, 25, 30]


def test_a_tracking_uri_with_credentials_is_never_printed_or_stored(tmp_path, make_dataset, capsys):
    data, _, _ = make_dataset(500, 100)
    assert train(tmp_path, data, "log.mlflow.tracking_uri=http://alice:s3cret@127.0.0.1:9/", flags=["--dry-run"]) == 0
    out = capsys.readouterr()
    assert "s3cret" not in out.out + out.err and "http://***@127.0.0.1:9/" in out.out


def test_a_tracker_whose_store_refuses_is_one_line_before_training(world, monkeypatch, capsys):  # noqa: F811
    """MLflow 3 refuses its file store unless opted in: the user gets MLflow's reason and the key to fix."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    before = tree_digest(world)
    capsys.readouterr()
    code = main(T(world, f"log.mlflow.tracking_uri={(world / 'mlruns').as_uri()}", name="tracked"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("aae-dist: error: log.mlflow.tracking_uri=file://") and "\n" not in err, err
    assert "MLFLOW_ALLOW_FILE_STORE=true" in err and "sqlite:///" in err and "Traceback" not in err
    after = tree_digest(world)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [k for k in after if k not in before and not k.startswith("runs/tracked")]
    assert not [k for k in after if k.startswith("runs/tracked/checkpoint_")]


def test_a_tracker_without_its_client_is_refused_in_preflight(world, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import raises ImportError
    before = tree_digest(world)
    capsys.readouterr()
    code = main(T(world, "log.wandb.project=p", name="nowandb"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("aae-dist: error: log.wandb is set but the wandb package is not installed"), err
    assert "pip install 'aae-dist[wandb]'" in err and "\n" not in err
    assert tree_digest(world) == before  # refused before the run folder was made


def wandb_records(path) -> list:
    """The protobuf records of an offline run's .wandb file (W&B's leveldb-style log: 7-byte header, 32 KiB
    blocks, each chunk `crc:u32 length:u16 type:u8` with type 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # block trailer padding
            pos += left
            continue
        buf = (b"" if kind in (1, 2) else buf) + data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def test_wandb_offline_run_holds_the_scalars_config_final_metrics_and_figures(tmp_path, make_dataset, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data, _, _ = make_dataset(500, 100)
    assert train(tmp_path, data, "train.max_steps=20", "log.wandb.project=aae-test", "log.wandb.mode=offline") == 0
    runs = list((tmp_path / "runs" / "r" / "wandb").glob("offline-run-*"))  # `wandb sync` uploads it later
    assert len(runs) == 1
    records = wandb_records(next(runs[0].glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in records]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records if r.HasField("history")]
    assert [h["_step"] for h in history if "loss/reconstruction" in h] == [5, 10, 15, 20]  # every sync, as in TensorBoard
    assert {"lr/generator", "perf/samples_per_s", "discriminator/acc_prior"} <= set(history[0])
    last = history[-1]
    summary = read_summary(tmp_path / "runs" / "r")
    assert last["final/recon_loss"] == pytest.approx(summary["metrics"]["recon_loss"])
    assert {"figures/codes/path", "images/prior_samples/path"} <= set(last)  # figures logged as images
    assert list((runs[0] / "files" / "media" / "images" / "figures").glob("codes_20_*.png"))
    run = next(r.run for r in records if r.HasField("run"))
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["model.latent_dim"] == 8 and config["train.max_steps"] == 20 and run.display_name == "r"
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0
