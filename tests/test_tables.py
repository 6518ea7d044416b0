"""Tables (issue 25): shard parquet:/csv: sources (local and S3), train a row model in-process and on 2 DDP
workers, resume exactly, generate Parquet and CSV in the source's schema, the report's scores, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from aae_dist.cli import main
from conftest import SMALL_MODEL, read_summary
from test_bad_input_matrix import tree_digest

NULL_COLUMNS = {"alcohol": 0.15, "magnesium": 0.1}


def wine_table(seed: int = 0) -> pa.Table:
    """scikit-learn's wine table (178 rows), with nulls in two columns, an integer column and a text target."""
    from sklearn.datasets import load_wine

    d = load_wine()
    rng = np.random.default_rng(seed)
    cols = {}
    for i, name in enumerate(d.feature_names):
        v = d.data[:, i]
        mask = rng.random(len(v)) < NULL_COLUMNS.get(name, 0.0)
        cols[name] = pa.array(np.rint(v).astype(np.int64) if name == "magnesium" else v, mask=mask)
    cols["cultivar"] = pa.array(np.array(d.target_names)[d.target].tolist())
    return pa.table(cols)


def shard(*args) -> int:
    return main(["shard", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    t = wine_table()
    pq.write_table(t, root / "wine.parquet")
    assert shard(f"parquet:{root / 'wine.parquet'}", root / "ds", "--target", "cultivar") == 0
    return root, t


def train_argv(root, name, data, *sets, workers="0"):
    argv = ["train", "--workers", workers, "--storage", str(root / "runs"), "--name", name, "--set", f"data.path={data}"]
    for s in SMALL_MODEL + ["train.parzen_samples=0", "train.image_every=1000000", *sets]:
        argv += ["--set", s]
    return argv


@pytest.fixture(scope="module")
def trained(tables):
    root, _ = tables
    assert main(train_argv(root, "sup", root / "ds", "model.variant=supervised", "train.max_steps=60")) == 0
    return root / "runs" / "sup"


def test_shard_parquet_infers_kinds_nulls_and_target(tables):
    root, t = tables
    doc = json.loads((root / "ds" / "manifest.json").read_text())
    cols = {c["name"]: c for c in doc["table"]["columns"]}
    assert [c["name"] for c in doc["table"]["columns"]] == t.column_names  # the source's order
    assert cols["cultivar"]["kind"] == "categorical" and cols["cultivar"]["categories"] == ["class_1", "class_0", "class_2"]
    assert cols["proline"]["kind"] == "continuous" and 1 <= len(cols["proline"]["means"]) <= 10
    assert cols["magnesium"]["dtype"] == "int64" and cols["magnesium"]["nullable"]
    assert abs(cols["alcohol"]["null_rate"] - t.column("alcohol").null_count / t.num_rows) < 1e-9
    assert not cols["hue"]["nullable"]
    assert doc["labels"] and doc["num_classes"] == 3 and doc["splits"]["train"]["count"] + doc["splits"]["test"]["count"] == t.num_rows
    assert main(["verify", str(root / "ds")]) == 0


def test_shard_csv_folder_on_s3(s3_server, tmp_path):
    import s3fs

    t = wine_table(1)
    fs = s3fs.S3FileSystem()
    for i, part in enumerate((t.slice(0, 100), t.slice(100))):
        path = tmp_path / f"p{i}.csv"
        pcsv.write_csv(part, path)
        fs.put(str(path), f"aae-test/wine-csv/part-{i}.csv")
    dest = "s3://aae-test/wine-ds"
    assert shard("csv:s3://aae-test/wine-csv/", dest, "--drop", "hue", "--categorical", "magnesium", "--max-categories", "200",
                 "--test-fraction", "0") == 0
    doc = json.loads(fs.cat_file("aae-test/wine-ds/manifest.json"))
    names = [c["name"] for c in doc["table"]["columns"]]
    assert "hue" not in names and len(names) == t.num_columns - 1
    assert {c["name"]: c["kind"] for c in doc["table"]["columns"]}["magnesium"] == "categorical"
    assert doc["splits"]["train"]["count"] == t.num_rows and not doc["labels"]


def test_generate_parquet_and_csv_in_the_source_schema(trained, tables, tmp_path, capsys):
    _, t = tables
    assert main(["generate", str(trained), "--n", "600", "--out", str(tmp_path / "pq"), "--format", "parquet", "--shard-size", "250"]) == 0
    files = sorted(os.listdir(tmp_path / "pq"))
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    g = pa.concat_tables([pq.read_table(tmp_path / "pq" / f) for f in files])
    assert g.schema.equals(t.schema) and g.num_rows == 600
    assert set(g.column("cultivar").to_pylist()) <= {"class_0", "class_1", "class_2"}
    assert 0 < g.column("alcohol").null_count / 600 < 0.6  # nulls come back (real rate 0.15; 60 steps do not reach it)
    assert g.column("hue").null_count == 0
    assert main(["generate", str(trained), "--n", "50", "--out", str(tmp_path / "csv"), "--format", "csv", "--label", "class_2"]) == 0
    c = pcsv.read_csv(tmp_path / "csv" / "part-00000.csv")
    assert c.column_names == t.column_names and c.num_rows == 50 and set(c.column("cultivar").to_pylist()) == {"class_2"}
    capsys.readouterr()
    assert main(["sample", str(trained), "--n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].split()[0] == "alcohol"


def test_eval_reports_quality_efficacy_privacy(trained, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained)]) == 0
    rep = json.loads(capsys.readouterr().out)["table"]
    q = rep["quality"]
    for k in ("quality_score", "column_shapes", "column_pair_trends"):
        assert 0.3 <= q[k] <= 1.0, (k, q[k])
    assert set(q["column_shape_scores"]) == set(wine_table().column_names)
    e = rep["efficacy"]
    assert 0 <= e["train_on_synthetic"]["accuracy"] <= 1 and e["train_on_real"]["accuracy"] > 0.7
    p = rep["privacy"]
    assert 0 <= p["synthetic_identical_to_train"] <= 1 and p["synthetic_median_dcr"] > 0


def test_quality_of_real_rows_against_themselves_is_one(tables):
    from aae_dist.tabular_report import quality

    root, t = tables
    cols = json.loads((root / "ds" / "manifest.json").read_text())["table"]["columns"]
    q = quality(t, t, cols)
    assert q["quality_score"] == pytest.approx(1.0)
    i = t.column_names.index("hue")
    shuffled = t.set_column(i, "hue", pa.array(np.random.default_rng(0).permutation(t.column("hue").to_numpy())))
    q = quality(t, shuffled, cols)  # the same column, its links to the others broken
    assert q["column_shapes"] == pytest.approx(1.0) and q["column_pair_trends"] < 0.99


def test_basic_variant_trains_with_only_data_path_and_resumes_exactly(tables):
    root, _ = tables
    assert main(train_argv(root, "whole", root / "ds", "train.max_steps=12", "train.checkpoint_every=6")) == 0
    assert main(train_argv(root, "split", root / "ds", "train.max_steps=6", "train.checkpoint_every=6")) == 0
    assert main(train_argv(root, "split", root / "ds", "train.max_steps=12", "train.checkpoint_every=6") + ["--resume"]) == 0
    whole, split = read_summary(root / "runs" / "whole"), read_summary(root / "runs" / "split")
    assert split["resumed_from_step"] == 6 and split["replica_fingerprints"] == whole["replica_fingerprints"]


def test_two_ddp_workers_train_a_table(tables, tmp_path):
    from aae_dist.config import load_config
    from multiprocess import run_processes

    root, _ = tables
    cfg = load_config(None, SMALL_MODEL + [f"data.path={root / 'ds'}", "train.max_steps=8", "train.checkpoint_every=8",
                                           "train.parzen_samples=0", "data.batch_size=40"])
    run_processes(cfg, str(tmp_path / "run"), world=2)
    s = read_summary(tmp_path / "run")
    assert s["world_size"] == 2 and s["steps"] == 8 and s["replicas_in_sync"] is True


# ---- bad input: one line, exit 2, nothing written ---------------------------------------------

def _csv(path, text):
    path.write_text(text)
    return f"csv:{path}"


def _bad_sources(root):
    n = 40
    one = pa.table({"a": np.arange(n, dtype=np.float64), "y": ["same"] * n})
    pq.write_table(one, root / "oneclass.parquet")
    pq.write_table(pa.table({"a": np.arange(n, dtype=np.float64), "empty": pa.nulls(n, pa.float64())}), root / "allnull.parquet")
    pq.write_table(pa.table({"a": np.arange(500, dtype=np.float64), "id": [f"c{i}" for i in range(500)]}), root / "many.parquet")
    os.makedirs(root / "schemas", exist_ok=True)
    pq.write_table(pa.table({"a": np.arange(n, dtype=np.float64)}), root / "schemas" / "p0.parquet")
    pq.write_table(pa.table({"a": [str(i) for i in range(n)]}), root / "schemas" / "p1.parquet")
    pq.write_table(pa.table({"a": np.arange(n, dtype=np.float64),
                             "when": pa.array(np.arange(n).astype("datetime64[D]"))}), root / "dates.parquet")
    return {
        "mixed types": (_csv(root / "mixed.csv", "a,b\n1,x\n2,y\nthree,x\n4,y\n"), [], "column 'a' has mixed types"),
        "all-null column": (f"parquet:{root / 'allnull.parquet'}", [], "column 'empty' is null in every row: pass --drop empty"),
        "one-class target": (f"parquet:{root / 'oneclass.parquet'}", ["--target", "y"], "--target y has one class"),
        "too many categories": (f"parquet:{root / 'many.parquet'}", [], "column 'id' has more than 100 distinct values"),
        "ragged CSV row": (_csv(root / "ragged.csv", "a,b\n1,2\n3,4,5\n6,7\n"), [], "ragged row"),
        "parquet schema differs": (f"parquet:{root / 'schemas'}", [], "p1.parquet has columns (a: string)"),
        "dates": (f"parquet:{root / 'dates.parquet'}", [], "column 'when' holds dates/times"),
        "unknown --drop column": (f"parquet:{root / 'oneclass.parquet'}", ["--drop", "nope"], "column 'nope'"),
    }


BAD = ["mixed types", "all-null column", "one-class target", "too many categories", "ragged CSV row", "parquet schema differs", "dates",
       "unknown --drop column"]


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("badtables")
    return root, _bad_sources(root)


@pytest.mark.parametrize("case", BAD)
def test_bad_table_input(bad_root, case, capsys):
    root, cases = bad_root
    source, extra, needle = cases[case]
    before = tree_digest(root)
    capsys.readouterr()
    code = main(["shard", source, str(root / "out"), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("aae-dist: error:") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, (needle, err)
    assert tree_digest(root) == before  # no output folder, no file changed


def test_too_many_categories_names_the_override(bad_root, tmp_path, capsys):
    root, cases = bad_root
    source, _, _ = cases["too many categories"]
    assert main(["shard", source, str(root / "out"), "--quiet"]) == 2
    assert "--max-categories N" in capsys.readouterr().err
    assert main(["shard", source, str(tmp_path / "ok"), "--quiet", "--drop", "id"]) == 0


# ---- defaults, null rate, report (issue 25, second part) -----------------------------------------

def test_generated_nulls_come_back_at_the_real_rate_after_a_short_run(trained, tables, tmp_path):
    """60 steps are enough for the null indicators: the decoder starts from the columns' real rates."""
    _, t = tables
    assert main(["generate", str(trained), "--n", "3000", "--out", str(tmp_path / "g"), "--format", "parquet"]) == 0
    g = pq.read_table(tmp_path / "g" / "part-00000.parquet")
    for name in NULL_COLUMNS:
        real = t.column(name).null_count / t.num_rows
        assert abs(g.column(name).null_count / g.num_rows - real) < 0.05, (name, g.column(name).null_count / g.num_rows, real)


def dry_run_config(root, data, *sets) -> dict:
    import contextlib
    import io

    import yaml

    out = io.StringIO()
    argv = ["train", "--dry-run", "--workers", "0", "--storage", str(root / "runs"), "--name", "plan", "--set", f"data.path={data}"]
    with contextlib.redirect_stdout(out):
        assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    return yaml.safe_load(out.getvalue().split("\nplan (--dry-run")[0])


def test_table_dataset_gets_row_sized_defaults_where_the_config_is_silent(tables, digits_url):
    root, _ = tables
    cfg = dry_run_config(root, root / "ds")
    assert cfg["model"]["hidden"] == [256, 256] and cfg["model"]["latent_dim"] == 8 and cfg["model"]["posterior"] == "gaussian"
    assert cfg["train"]["parzen_samples"] == 0 and cfg["train"]["threads"] == 1
    assert cfg["phases"]["reconstruction"]["lr"] == 3e-3 and cfg["phases"]["generator"]["lr"] == 5e-4  # the tuned table rates
    rows = json.loads((root / "ds" / "manifest.json").read_text())["splits"]["train"]["count"]
    assert cfg["data"]["batch_size"] == rows // 4 and cfg["train"]["epochs"] == 300  # a quarter of the rows: 4 steps an epoch
    kept = dry_run_config(root, root / "ds", "model.hidden=[64,64]", "train.parzen_samples=100", "data.batch_size=20",
                          "phases.generator.lr=1e-4")
    assert kept["model"]["hidden"] == [64, 64] and kept["train"]["parzen_samples"] == 100 and kept["data"]["batch_size"] == 20
    assert kept["phases"]["generator"]["lr"] == 1e-4 and kept["phases"]["discriminator"]["lr"] == 5e-4
    assert kept["train"]["epochs"] == 300 and kept["model"]["disc_hidden"] == [256, 256]
    image = dry_run_config(root, digits_url)  # images keep the paper's defaults
    assert image["model"]["hidden"] == [1000, 1000] and image["train"]["parzen_samples"] == 10_000 and image["train"]["threads"] is None
    assert image["phases"]["reconstruction"]["lr"] == 1e-3


def test_run_summary_and_tensorboard_hold_the_row_report_and_column_figures(trained, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = read_summary(trained)
    rep = s["metrics"]["table"]
    assert 0.3 <= rep["quality"]["quality_score"] <= 1.0 and set(rep["quality"]["column_shape_scores"]) == set(wine_table().column_names)
    assert s["metrics"]["table/quality_score"] == rep["quality"]["quality_score"]
    assert 0 <= s["metrics"]["table/train_on_synthetic_accuracy"] <= 1 and "parzen_ll" not in s["metrics"]
    ea = EventAccumulator(str(trained / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    for tag in ("final/table/quality_score", "final/table/column_shapes", "final/table/efficacy_gap", "final/table/synthetic_median_dcr"):
        assert tag in ea.Tags()["scalars"], tag
    assert "figures/columns" in ea.Tags()["images"]
    assert ea.Images("figures/columns")[-1].width > 600
    assert main(["eval", str(trained), "--plots", str(tmp_path / "figs")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "figs" / "columns.png") as im:  # 14 columns: 4 x 4 panels, real beside synthetic
        assert im.width > 600 and im.height > 600


# ---- encode a table, with its key column (shard --keep / encode --keep) -----------------------------

@pytest.fixture(scope="module")
def kept(tables):
    """The wine table with a customer id: kept raw beside each shard at shard time, never a feature."""
    root, t = tables
    ids = pa.array([f"cust-{i:04d}" for i in range(t.num_rows)])
    pq.write_table(t.append_column("customer_id", ids), root / "wine-ids.parquet")
    assert shard(f"parquet:{root / 'wine-ids.parquet'}", root / "kept", "--target", "cultivar", "--keep", "customer_id",
                 "--shard-size", "60") == 0
    return root / "kept", t, ids


def test_shard_keep_stores_the_key_beside_each_shard_not_as_a_feature(kept, tables):
    ds, t, _ = kept
    doc = json.loads((ds / "manifest.json").read_text())
    plain = json.loads((tables[0] / "ds" / "manifest.json").read_text())
    assert doc["table"]["keep"] == ["customer_id"] and "customer_id" not in [c["name"] for c in doc["table"]["columns"]]
    assert doc["shape"] == plain["shape"]  # the key adds nothing to the model's input
    shards = [s for sp in doc["splits"].values() for s in sp["shards"]]
    assert len(shards) >= 3
    for s in shards:
        assert s["keys"]["file"] == f"{s['name']}.keys.parquet" and len(s["keys"]["sha256"]) == 64
        assert pq.read_table(ds / s["keys"]["file"]).num_rows == s["count"]
    assert "keys" not in plain["splits"]["train"]["shards"][0]  # datasets without --keep are unchanged
    assert main(["verify", str(ds)]) == 0


def test_encode_a_table_with_its_key_column_in_row_order(kept, trained, tmp_path):
    ds, t, ids = kept
    out = tmp_path / "codes"
    assert main(["encode", str(trained), "--data", str(ds), "--out", str(out), "--keep", "customer_id"]) == 0
    doc = json.loads((ds / "manifest.json").read_text())
    cultivar = dict(zip(ids.to_pylist(), t.column("cultivar").to_pylist()))
    seen = []
    for split, sp in doc["splits"].items():
        for i, s in enumerate(sp["shards"]):
            codes = pq.read_table(out / f"{split}-{i:05d}.parquet")
            assert codes.num_rows == s["count"]
            z = np.stack(codes.column("z").to_numpy(zero_copy_only=False))
            assert np.isfinite(z).all() and z.std(0).min() > 0  # a code per row, not one code for all
            keys = codes.column("customer_id").to_pylist()
            assert keys == sorted(keys)  # the source's row order within a shard
            names = doc["class_names"]
            assert [cultivar[k] for k in keys] == [names[v] for v in codes.column("label").to_pylist()]  # each key beside its own row
            seen += keys
    assert sorted(seen) == ids.to_pylist()  # every row once
    assert main(["encode", str(trained), "--data", str(tables_ds(kept)), "--out", str(tmp_path / "plain")]) == 0  # --keep is optional
    assert "customer_id" not in pq.read_table(tmp_path / "plain" / "train-00000.parquet").column_names


def tables_ds(kept):
    return kept[0].parent / "ds"


def test_encode_keep_of_a_column_not_kept_names_the_reshard(kept, trained, tmp_path, capsys):
    ds, _, _ = kept
    for data, col in ((tables_ds(kept), "customer_id"), (ds, "hue")):
        capsys.readouterr()
        assert main(["encode", str(trained), "--data", str(data), "--out", str(tmp_path / "o"), "--keep", col]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("aae-dist: error:") and "\n" not in err and f"re-shard with --keep {col}" in err, err
    assert not (tmp_path / "o").exists()


def test_shard_keep_bad_input_is_one_line(tables, tmp_path, capsys):
    root, _ = tables
    src = f"parquet:{root / 'wine.parquet'}"
    for extra, needle in ((["--keep", "nope"], "column 'nope' (from --drop/--categorical/--keep/--target)"),
                          (["--keep", "cultivar", "--target", "cultivar"], "given to --keep and to --target")):
        capsys.readouterr()
        assert main(["shard", src, str(tmp_path / "x"), "--quiet", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and needle in err, err
    assert not (tmp_path / "x").exists()


def test_key_files_are_untrusted_input(kept, trained, tmp_path, capsys):
    """A manifest naming a key file outside the dataset is refused; a replaced key file fails its checksum."""
    import shutil

    ds = tmp_path / "copy"
    shutil.copytree(kept[0], ds)
    doc = json.loads((ds / "manifest.json").read_text())
    good = json.dumps(doc)
    doc["splits"]["train"]["shards"][0]["keys"]["file"] = "../../etc/passwd"
    (ds / "manifest.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["encode", str(trained), "--data", str(ds), "--out", str(tmp_path / "o"), "--keep", "customer_id"]) == 2
    assert "expected 'train-00000.keys.parquet'" in capsys.readouterr().err
    (ds / "manifest.json").write_text(good)
    pq.write_table(pa.table({"customer_id": ["x"] * 3}), ds / "train-00000.keys.parquet")
    assert main(["encode", str(trained), "--data", str(ds), "--out", str(tmp_path / "o"), "--keep", "customer_id"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "fails its sha256 check" in err, err


def test_shard_overwrite_replaces_key_files_with_the_rest(kept, tmp_path):
    import shutil

    ds = tmp_path / "copy"
    shutil.copytree(kept[0], ds)
    src = kept[0].parent / "wine-ids.parquet"
    assert shard(f"parquet:{src}", ds, "--target", "cultivar", "--keep", "customer_id", "--shard-size", "200", "--overwrite") == 0
    doc = json.loads((ds / "manifest.json").read_text())
    listed = {f["file"] for sp in doc["splits"].values() for s in sp["shards"] for f in (s["x"], s["y"], s["keys"])}
    assert set(os.listdir(ds)) == listed | {"manifest.json"}  # the old shards' key files went with them


# ---- the labelled variants on a table: few labels, segments ---------------------------------------

def test_semi_supervised_with_few_labels_reports_its_error_and_generates_a_given_class(tables, tmp_path):
    root, t = tables
    assert main(train_argv(root, "semi", root / "ds", "model.variant=semi_supervised", "data.labeled_per_class=5", "train.max_steps=30")) == 0
    m = read_summary(root / "runs" / "semi")["metrics"]
    assert 0 <= m["classify_error"] <= 1 and 0 <= m["table/quality_score"] <= 1 and 0 <= m["table/train_on_synthetic_accuracy"] <= 1
    for value in ("class_0", "class_2"):
        out = tmp_path / value
        assert main(["generate", str(root / "runs" / "semi"), "--n", "200", "--out", str(out), "--format", "parquet", "--label", value]) == 0
        g = pq.read_table(out / "part-00000.parquet")
        assert g.schema.equals(t.schema) and g.column("cultivar").to_pylist() == [value] * 200


def test_clustering_on_a_table_reports_segments_and_never_writes_a_segment_as_the_target(tables, tmp_path, capsys):
    """Six segments on a three-class target: the segments are not target values (before, segment 3 crashed the report)."""
    root, t = tables
    assert main(train_argv(root, "segments", root / "ds", "model.variant=clustering", "model.num_classes=6", "train.max_steps=30")) == 0
    m = read_summary(root / "runs" / "segments")["metrics"]
    assert 0 <= m["cluster_error"] <= 1 and 1 <= m["clusters_used"] <= 6 and 0 <= m["table/quality_score"] <= 1
    run = str(root / "runs" / "segments")
    assert main(["generate", run, "--n", "300", "--out", str(tmp_path / "all"), "--format", "parquet"]) == 0
    g = pq.read_table(tmp_path / "all" / "part-00000.parquet")
    assert g.schema.equals(t.schema) and set(g.column("cultivar").to_pylist()) <= {"class_0", "class_1", "class_2"}
    assert main(["generate", run, "--n", "50", "--out", str(tmp_path / "seg5"), "--format", "csv", "--label", "5"]) == 0  # one segment
    assert pcsv.read_csv(tmp_path / "seg5" / "part-00000.csv").num_rows == 50
    capsys.readouterr()
    assert main(["generate", run, "--n", "50", "--out", str(tmp_path / "bad"), "--format", "csv", "--label", "class_0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "segment number 0 to 5" in err, err


def test_segments_of_a_table_with_the_neighbour_term_search_the_rows_themselves(tables, monkeypatch):
    """phases.reconstruction.neighbours on table rows: the nearest rows are searched in the encoded feature space
    (every training row has its k nearest, and every row a step reads is found in the table: none falls back to
    itself), and the run trains and reports segments as without it."""
    import torch

    from aae_dist.training import neighbours

    found, draw = [], neighbours.NeighbourTable.__call__

    def counting(self, x, generator):
        f = neighbours.fingerprint(x)
        found.append(bool(torch.isin(f, self.keys).all()))
        return draw(self, x, generator)

    monkeypatch.setattr(neighbours.NeighbourTable, "__call__", counting)
    root, _ = tables
    assert main(train_argv(root, "segments_nb", root / "ds", "model.variant=clustering", "model.num_classes=6", "train.max_steps=20",
                           "phases.reconstruction.neighbours=1", "phases.reconstruction.neighbours_k=4")) == 0
    m = read_summary(root / "runs" / "segments_nb")["metrics"]
    assert 0 <= m["cluster_error"] <= 1 and 1 <= m["clusters_used"] <= 6
    with np.load(root / "runs" / "segments_nb" / "neighbours.npz", allow_pickle=False) as f:
        positions, keys = f["positions"], f["keys"]
    assert positions.shape == (len(keys), 4) and len(np.unique(keys)) == len(keys)
    assert len(found) == 20 and all(found)  # every row of every step found again by its own values


def test_parquet_is_read_row_group_by_row_group_in_chunks_and_in_order(tmp_path):
    """shard's reader takes one row group at a time (iter_batches over a whole file held memory growing with the
    file: benchmarks/bench_tables.py memory), in batches of at most the chunk, every row once, in the file's order."""
    from aae_dist.data.tables import iter_batches

    t = pa.table({"a": np.arange(100, dtype=np.float64), "b": [f"v{i % 7}" for i in range(100)]})
    pq.write_table(t, tmp_path / "t.parquet", row_group_size=30)
    assert pq.ParquetFile(tmp_path / "t.parquet").num_row_groups == 4
    batches = [b for _, b in iter_batches([str(tmp_path / "t.parquet")], "parquet", 16)]
    assert max(b.num_rows for b in batches) <= 16
    assert pa.Table.from_batches(batches).equals(t)


def test_verify_checks_key_files(kept, tmp_path, capsys):
    """`aae-dist verify` reads the key files too: a replaced one is one line, exit 2."""
    import shutil

    ds = tmp_path / "copy"
    shutil.copytree(kept[0], ds)
    assert main(["verify", str(ds)]) == 0
    pq.write_table(pa.table({"customer_id": ["x"] * 3}), ds / "train-00000.keys.parquet")
    capsys.readouterr()
    assert main(["verify", str(ds)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "train-00000.keys.parquet" in err and "fails its sha256 check" in err, err
