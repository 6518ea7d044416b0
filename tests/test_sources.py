"""Sources are a registry (issue 22, item 4): one module per source, chunks streamed into shards, the manifest's
feature kind, statistics and input scaling, and a source added in one place (an entry point) that shards and trains."""

from __future__ import annotations

import gzip
import hashlib
import json
import textwrap

import numpy as np
import pytest

from aae_dist.cli import main
from aae_dist.data import read_manifest
from conftest import SMALL_MODEL
from test_bad_input_matrix import tree_digest
from test_trust_data import assert_one_line, run_cli


# ---- the same shards, byte for byte, as the writer before the registry --------------------------------------------

def shards_digest(manifest_path) -> str:
    """Every shard's name, count and checksums, the sample type and the classes: what 'the same dataset' means."""
    doc = json.loads(open(manifest_path).read())
    parts = [f"{k}:{sp['count']}:" + ",".join(f"{s['name']}/{s['count']}/{s['x']['sha256']}/{(s['y'] or {}).get('sha256')}" for s in sp["shards"])
             for k, sp in doc["splits"].items()]
    return hashlib.sha256(("|".join(parts) + f"|{doc['dtype']}|{doc['shape']}|{doc['num_classes']}|{doc['class_names']}").encode()).hexdigest()


def make_inputs(root):
    from PIL import Image

    rng = np.random.default_rng(7)
    np.savez(root / "vec.npz", x=rng.normal(size=(300, 6)).astype(np.float32), y=rng.integers(0, 3, 300))
    np.savez(root / "img.npz", x=rng.integers(0, 256, (120, 8, 8), dtype=np.uint8), y=rng.integers(0, 4, 120),
             x_test=rng.integers(0, 256, (30, 64), dtype=np.uint8), y_test=rng.integers(0, 4, 30))
    np.savez(root / "nolab.npz", x=rng.integers(0, 256, (90, 5), dtype=np.uint8))
    for cls in ("cat", "dog"):
        (root / "img" / cls).mkdir(parents=True)
        for i in range(7):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / "img" / cls / f"{i}.png")
    (root / "idx").mkdir()
    for prefix, n in (("train", 150), ("t10k", 40)):
        x, y = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)
        (root / "idx" / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03" + np.array([n, 6, 6], ">i4").tobytes() + x.tobytes()))
        (root / "idx" / f"{prefix}-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + np.array([n], ">i4").tobytes() + y.tobytes())


# (arguments, digest of the dataset the writer wrote before sources became a registry, at commit 15806a0)
BEFORE = {
    "digits": (lambda r: ["digits", "--validation-size", "500", "--shard-size", "1000"],
               "772334d710e96492688e4fb57e8009eeb2d481a3355c1af369cbd0da4f6f2b35"),
    "npz-vectors": (lambda r: [f"npz:{r / 'vec.npz'}", "--test-fraction", "0.25", "--validation-size", "20", "--shard-size", "64"],
                    "42cc50a815e0127b08ee443e691d5e960375017a41a3ddb91abb0a692b831193"),
    "npz-x-test": (lambda r: [f"npz:{r / 'img.npz'}", "--shard-size", "50"], "0d9b0a3931c8cad38d5803e411df988e2badbcbdc3bed8cb348141b2408e7af2"),
    "npz-no-labels": (lambda r: [f"npz:{r / 'nolab.npz'}", "--test-fraction", "0.2", "--shard-size", "32"],
                      "1456864e605415a278fd43dadd199574860957ff8d224a5bb98b355b9c67bfc2"),
    "images": (lambda r: [f"images:{r / 'img'}", "--image-size", "8", "--channels", "3", "--test-fraction", "0.3", "--shard-size", "4"],
               "11dfd538161a739be053d520bc8c1bd9375c0e622c017c44e897ab80dd841747"),
    "mnist-idx": (lambda r: [f"mnist-idx:{r / 'idx'}", "--validation-size", "30", "--shard-size", "64"],
                  "e52e593fdbd756769f7a84f89a052015ac297bb962e33b479d4bec48091d29a6"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    make_inputs(root)
    return root


@pytest.mark.parametrize("case", list(BEFORE))
def test_shards_are_byte_for_byte_those_written_before_the_registry(inputs, tmp_path, case):
    argv, digest = BEFORE[case]
    spec, *opts = argv(inputs)
    assert main(["shard", spec, str(tmp_path / "out"), *opts, "--quiet"]) == 0
    assert shards_digest(tmp_path / "out" / "manifest.json") == digest


# ---- what the manifest now says ----------------------------------------------------------------------------------

def test_manifest_records_feature_kind_statistics_and_scaling(inputs, tmp_path):
    assert main(["shard", f"npz:{inputs / 'vec.npz'}", str(tmp_path / "v"), "--test-fraction", "0.25", "--validation-size", "20",
                 "--shard-size", "64", "--quiet"]) == 0
    m = read_manifest(str(tmp_path / "v"))
    assert m.feature_kind == "vector" and m.input_scaling == {"offset": 0.0, "divide": 1.0} and m.custom_scaling is None
    train = np.concatenate([np.load(tmp_path / "v" / s.x.file) for s in m.splits["train"].shards]).reshape(-1, 6).astype(np.float64)
    assert m.stats["count"] == len(train) == 205  # the train split only: neither test nor validation
    np.testing.assert_allclose(m.stats["mean"], train.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m.stats["std"], train.std(0), rtol=1e-9)
    np.testing.assert_array_equal(m.stats["min"], train.min(0))
    assert main(["shard", "digits", str(tmp_path / "d"), "--quiet"]) == 0
    d = read_manifest(str(tmp_path / "d"))
    assert d.feature_kind == "image" and d.stats is None and d.input_scaling == {"offset": 0.0, "divide": 255.0}


def test_manifest_from_before_reads_as_pixels_scaled_by_255(inputs, tmp_path):
    """Absent fields: image and uint8 / 255 as always, so old datasets and old checkpoints give the same numbers."""
    import torch

    from aae_dist.config import Config
    from aae_dist.models import AAE

    assert main(["shard", f"npz:{inputs / 'img.npz'}", str(tmp_path / "o"), "--quiet"]) == 0
    doc = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert {"features", "scaling"} <= set(doc)
    for key in ("features", "scaling", "stats"):
        doc.pop(key, None)
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(doc))
    m = read_manifest(str(tmp_path / "o"))
    assert m.feature_kind == "image" and m.input_scaling == {"offset": 0.0, "divide": 255.0} and m.custom_scaling is None
    cfg = Config()
    x = torch.from_numpy(np.load(tmp_path / "o" / m.splits["train"].shards[0].x.file))
    aae = AAE.from_config(cfg.model, cfg.prior, m)
    assert aae.scale == 255.0 and torch.equal(aae.normalise(x), x.float().div_(255.0))


def test_bad_scaling_in_a_manifest_is_one_line(inputs, tmp_path, capsys):
    assert main(["shard", f"npz:{inputs / 'vec.npz'}", str(tmp_path / "v"), "--quiet"]) == 0
    doc = json.loads((tmp_path / "v" / "manifest.json").read_text())
    doc["scaling"] = {"offset": 0, "divide": [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]}
    (tmp_path / "v" / "manifest.json").write_text(json.dumps(doc))
    assert_one_line(*run_cli(["verify", tmp_path / "v"], capsys), "'scaling' divide")


# ---- a source added in one place ---------------------------------------------------------------------------------

PLUGIN = '''
"""A source written outside aae-dist: SCHEME sine:K, K classes of noisy sine waves as vectors."""
import numpy as np

from aae_dist.data.sources import Opened, Option, Source

WIDTH = 12


def open_sine(arg, opts):
    k, rows = int(arg), opts["rows"]
    rng = np.random.default_rng(0)
    y = rng.integers(0, k, rows)
    t = np.linspace(0, 2 * np.pi, WIDTH)
    x = (100 * np.sin(t[None] * (1 + y[:, None])) + 50 + rng.normal(size=(rows, WIDTH))).astype(np.float32)[:, None]
    n_test = rows // 5

    def chunks(split):
        lo, hi = (n_test, rows) if split == "train" else (0, n_test)
        for i in range(lo, hi, 37):
            yield x[i:min(i + 37, hi)], y[i:min(i + 37, hi)]

    mean, std = x[n_test:].mean(0).ravel(), x[n_test:].std(0).ravel()
    return Opened(name=f"sine:{k}", dtype=x.dtype, shape=(1, WIDTH), counts={"train": rows - n_test, "test": n_test}, chunks=chunks,
                  num_classes=k, labels=True, features="vector",
                  scaling={"offset": mean.tolist(), "divide": std.tolist()})


SOURCE = Source(scheme="sine", usage="sine:K", open=open_sine, options=(Option("--rows", "sine: how many rows", int, 100),))
'''


@pytest.fixture
def sine_plugin(tmp_path, monkeypatch):
    """The plug-in as a user ships it: a module and one entry point (`aae_dist.sources: sine = sinesource:SOURCE`)."""
    site = tmp_path / "site"
    (site / "sinesource-0.1.dist-info").mkdir(parents=True)
    (site / "sinesource.py").write_text(textwrap.dedent(PLUGIN))
    (site / "sinesource-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: sinesource\nVersion: 0.1\n")
    (site / "sinesource-0.1.dist-info" / "entry_points.txt").write_text("[aae_dist.sources]\nsine = sinesource:SOURCE\n")
    monkeypatch.syspath_prepend(str(site))
    yield
    from aae_dist.data.sources import base

    base._REGISTRY.pop("sine", None)


def test_a_source_plugged_in_by_entry_point_shards_and_trains(sine_plugin, tmp_path):
    import torch

    from aae_dist.inference import load_run

    dest = tmp_path / "sine"
    assert main(["shard", "sine:3", str(dest), "--rows", "400", "--shard-size", "100", "--quiet"]) == 0
    m = read_manifest(str(dest))
    assert m.source == "sine:3" and m.feature_kind == "vector" and m.splits["train"].count == 320 and m.num_classes == 3
    assert [s.count for s in m.splits["train"].shards] == [100, 100, 100, 20]
    assert isinstance(m.custom_scaling["divide"], list)  # the source's own per-feature scaling
    argv = ["train", "--workers", "0", "--storage", str(tmp_path / "runs"), "--name", "s", "--set", f"data.path={dest}",
            "--set", "train.max_steps=6", "--set", "train.checkpoint_every=6", "--set", "data.batch_size=40"]
    for s in SMALL_MODEL[:2] + SMALL_MODEL[3:]:
        argv += ["--set", s]
    assert main(argv) == 0
    _, aae = load_run(str(tmp_path / "runs" / "s"))  # the checkpoint remembers the scaling: eval reads as training did
    x = torch.from_numpy(np.load(dest / m.splits["test"].shards[0].x.file))
    off = torch.tensor(m.scaling["offset"]).view(1, 12)
    div = torch.tensor(m.scaling["divide"]).view(1, 12)
    z = aae.normalise(x)
    torch.testing.assert_close(z, (x - off) / div)
    assert abs(float(z.mean())) < 0.5 and 0.5 < float(z.std()) < 1.5  # standardised, not raw values around 50 +- 100


def test_unknown_source_names_the_plugged_in_ones(sine_plugin, tmp_path, capsys):
    before = tree_digest(tmp_path)
    assert_one_line(*run_cli(["shard", "tfrecord:/x", tmp_path / "o"], capsys), "sine:K")
    assert tree_digest(tmp_path) == before


# ---- streaming: the writer holds a chunk and a shard, not the dataset --------------------------------------------

def test_writer_writes_shards_while_the_source_is_still_yielding(tmp_path):
    from aae_dist.data.sources import Opened, Source, base, register
    from aae_dist.data.writer import write_source

    dest = tmp_path / "big"
    seen = []

    def chunks(split):
        for k in range(10):
            seen.append(sorted(p.name for p in dest.glob("*.x.npy")) if dest.exists() else [])
            yield np.full((100, 1, 4), k, np.float32), None

    register(Source(scheme="counting", usage="counting", needs_arg=False,
                    open=lambda arg, opts: Opened(name="counting", dtype=np.float32, shape=(1, 4), counts={"train": 1000}, chunks=chunks,
                                                  features="vector")))
    try:
        from aae_dist.data.sources import open_source

        m = write_source(str(dest), open_source("counting"), shard_size=100, progress=False)
    finally:
        base._REGISTRY.pop("counting", None)
    assert seen[5] == [f"train-{i:05d}.x.npy" for i in range(5)]  # chunk 5 is asked for after shards 0-4 are on disk
    assert m.splits["train"].count == 1000 and m.stats["max"] == [9.0] * 4 and m.stats["count"] == 1000


def test_a_source_that_breaks_its_promise_is_one_line(tmp_path, capsys):
    from aae_dist.data.sources import Opened, Source, base, register

    def chunks(split):
        yield np.zeros((5, 1, 4), np.float64), None  # announced float32

    register(Source(scheme="liar", usage="liar", needs_arg=False,
                    open=lambda arg, opts: Opened(name="liar", dtype=np.float32, shape=(1, 4), counts={"train": 5}, chunks=chunks)))
    try:
        assert_one_line(*run_cli(["shard", "liar", tmp_path / "o", "--quiet"], capsys), "announced float32")
    finally:
        base._REGISTRY.pop("liar", None)
    assert not (tmp_path / "o" / "manifest.json").exists()  # no dataset that looks complete
