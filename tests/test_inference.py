"""eval / sample / encode / generate on a trained run, through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from aae_dist.cli import main
from aae_dist.data import ShardStream, read_manifest


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_url):
    root = tmp_path_factory.mktemp("inf")
    argv = ["train", "--workers", "0", "--storage", str(root), "--name", "semi", "--set", f"data.path={digits_url}"]
    for s in ["model.hidden=[64,64]", "model.disc_hidden=[64,64]", "train.max_steps=60", "train.progress=false",
              "model.variant=semi_supervised", "data.labeled_per_class=10", "train.parzen_samples=500", "model.latent_dim=4"]:
        argv += ["--set", s]
    assert main(argv) == 0
    return root / "semi"


def test_eval_prints_summary_metrics(trained, capsys, digits_url):
    capsys.readouterr()
    assert main(["eval", str(trained)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    whole = json.loads((trained / "summary.json").read_text())
    summary = whole["metrics"]
    baselines = metrics.pop("baselines")
    # the floor beside the figure: logistic regression on exactly the 100 labelled digits the run used
    assert baselines["labelled_samples"] == 100 and 0 < baselines["logistic_classify_error"] < 0.9
    assert baselines == pytest.approx(whole["baselines"])
    assert set(metrics) == set(summary) >= {"recon_loss", "classify_error", "parzen_ll", "parzen_ll_se", "prior_match"}
    assert metrics["recon_loss"] == pytest.approx(summary["recon_loss"], rel=1e-5)
    assert metrics["classify_error"] == pytest.approx(summary["classify_error"])


def test_sample_grid_png(trained, tmp_path):
    out = tmp_path / "g.png"
    assert main(["sample", str(trained), "--n", "16", "--out", str(out), "--label", "3"]) == 0
    img = Image.open(out)
    assert img.size == (4 * 29 - 1, 4 * 29 - 1)
    arr = np.asarray(img)
    assert arr.std() > 10  # not blank
    assert main(["sample", str(trained), "--n", "8", "--out", str(tmp_path / "i.png"), "--interpolate"]) == 0
    assert Image.open(tmp_path / "i.png").size == (8 * 29 - 1, 28)


def test_encode_parquet(trained, tmp_path, digits_url):
    out = tmp_path / "codes"
    assert main(["encode", str(trained), "--data", digits_url, "--out", str(out), "--split", "test"]) == 0
    table = pq.read_table(out / "test-00000.parquet")
    assert table.num_rows == 500 and set(table.column_names) >= {"z", "y_pred", "label"}
    assert len(table.column("z")[0]) == 4
    labels = np.asarray(table.column("label"))
    _, y = next(iter(ShardStream(digits_url, "test", 500, shuffle=False).iter_epoch(0)))
    np.testing.assert_array_equal(labels, y.numpy())


def test_generate_dataset_in_issue2_format(trained, tmp_path, capsys):
    out = str(tmp_path / "gen")
    assert main(["generate", str(trained), "--n", "250", "--out", out, "--shard-size", "100"]) == 0
    m = read_manifest(out)
    assert m.splits["train"].count == 250 and [s.count for s in m.splits["train"].shards] == [100, 100, 50]
    assert m.dtype == "uint8" and m.shape == [1, 28, 28] and m.labels
    assert main(["verify", out]) == 0
    assert main(["generate", str(trained), "--n", "10", "--out", out]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_eval_of_nothing(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_not_a_checkpoint_is_never_unpickled(tmp_path, capsys):
    import pickle

    ck = tmp_path / "checkpoint_x"
    ck.mkdir()
    (ck / "meta.json").write_text(json.dumps({"step": 1}))

    class Boom:
        def __reduce__(self):
            return (exec, ("open('" + str(tmp_path / "pwned") + "', 'w').write('x')",))

    (ck / "state.pt").write_bytes(pickle.dumps(Boom()))
    assert main(["eval", str(ck)]) == 2
    assert "not a valid checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_eval_writes_the_papers_figures(trained, tmp_path, capsys):
    out = tmp_path / "figs"
    assert main(["eval", str(trained), "--plots", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["clusters.png", "codes.png", "style_by_label.png"]  # semi-supervised: no 2-D representation
    style = Image.open(out / "style_by_label.png")
    clusters = Image.open(out / "clusters.png")
    assert style.size[0] > 300 and clusters.size[1] > 300  # 10 labels across; 10 cluster rows down
    assert len(np.unique(np.asarray(style.convert("L")))) > 20  # drawn images, not a blank canvas
