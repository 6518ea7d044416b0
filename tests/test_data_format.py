"""Sources -> shards -> reader round trips, sample for sample."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from aae_dist.cli import main
from aae_dist.data import ShardStream, read_manifest
from aae_dist.data.sources import load_source
from conftest import ident


def read_all(url, split="train", **kw):
    s = ShardStream(url, split, batch_size=kw.pop("batch_size", 64), shuffle=False, **kw)
    xs, ys = zip(*list(s.iter_epoch(0)))
    return np.concatenate([x.numpy() for x in xs]), np.concatenate([y.numpy() for y in ys])


def write_idx(folder, prefix, x, y, gz):
    def put(name, data):
        path = os.path.join(folder, name + (".gz" if gz else ""))
        with open(path, "wb") as fh:
            fh.write(gzip.compress(data) if gz else data)

    n, h, w = x.shape
    put(f"{prefix}-images-idx3-ubyte", b"\x00\x00\x08\x03" + np.array([n, h, w], ">i4").tobytes() + x.tobytes())
    put(f"{prefix}-labels-idx1-ubyte", b"\x00\x00\x08\x01" + np.array([len(y)], ">i4").tobytes() + y.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    rng = np.random.default_rng(1)
    xtr, ytr = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8), rng.integers(0, 10, 300)
    xte, yte = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), rng.integers(0, 10, 50)
    src = tmp_path / "idx"
    src.mkdir()
    write_idx(src, "train", xtr, ytr, gz)
    write_idx(src, "t10k", xte, yte, gz)
    dest = str(tmp_path / "out")
    assert main(["shard", f"mnist-idx:{src}", dest, "--shard-size", "64", "--quiet"]) == 0
    m = read_manifest(dest)
    assert m.shape == [1, 28, 28] and m.dtype == "uint8" and m.labels and m.num_classes == 10
    assert [s.count for s in m.splits["train"].shards] == [64, 64, 64, 64, 44]
    x, y = read_all(dest, "train")
    np.testing.assert_array_equal(x[:, 0], xtr)
    np.testing.assert_array_equal(y, ytr)
    x, y = read_all(dest, "test")
    np.testing.assert_array_equal(x[:, 0], xte)
    np.testing.assert_array_equal(y, yte)


def test_npz_round_trip_with_holdout(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = rng.integers(0, 3, 200)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    dest = str(tmp_path / "out")
    assert main(["shard", f"npz:{tmp_path / 'a.npz'}", dest, "--shard-size", "50", "--test-fraction", "0.25", "--quiet"]) == 0
    xtr, ytr = read_all(dest, "train")
    xte, yte = read_all(dest, "test")
    got = np.concatenate([xtr, xte])[:, 0]
    assert got.dtype == np.float32 and len(xte) == 50
    # every original row appears exactly once with its label
    order = [int(np.flatnonzero((x == row).all(1))[0]) for row in got]
    assert sorted(order) == list(range(200))
    np.testing.assert_array_equal(np.concatenate([ytr, yte]), y[order])


def test_images_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    expected = {}
    for cls in ("cat", "dog"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "img" / cls / f"{i}.png")
            expected[arr.tobytes()] = cls
    dest = str(tmp_path / "out")
    assert main(["shard", f"images:{tmp_path / 'img'}", dest, "--image-size", "8", "--test-fraction", "0", "--quiet"]) == 0
    m = read_manifest(dest)
    assert m.class_names == ["cat", "dog"] and m.shape == [1, 8, 8]
    x, y = read_all(dest)
    assert len(x) == 12
    for xi, yi in zip(x, y):
        assert expected[xi[0].tobytes()] == m.class_names[yi]


def test_digits_default_source_is_real_mnist(tmp_path):
    src = load_source("digits")
    xtr, ytr = src.splits["train"]
    xte, _ = src.splits["test"]
    assert xtr.shape[1:] == (1, 28, 28) and len(xtr) + len(xte) == 5000
    assert sorted(np.unique(ytr)) == list(range(10))
    assert load_source("digits").splits["test"][0].tobytes() == xte.tobytes()  # fixed split seed
    dest = str(tmp_path / "d")
    assert main(["shard", "digits", dest, "--quiet"]) == 0
    x, y = read_all(dest, "test")
    np.testing.assert_array_equal(x, xte)


def test_refuses_overwrite_and_manifest_is_last(tmp_path, make_dataset, capsys):
    url, _, _ = make_dataset(200, 64)
    np.savez(tmp_path / "b.npz", x=np.zeros((10, 4), np.uint8))
    assert main(["shard", f"npz:{tmp_path / 'b.npz'}", url, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert read_manifest(url).splits["train"].count == 200
    assert main(["shard", f"npz:{tmp_path / 'b.npz'}", url, "--overwrite", "--quiet", "--test-fraction", "0"]) == 0
    m = read_manifest(url)
    assert m.splits["train"].count == 10 and not m.labels
    assert sorted(os.listdir(url)) == ["manifest.json", "train-00000.x.npy"]  # stale shards gone


def test_manifest_written_after_shards(tmp_path, monkeypatch):
    """Kill the writer after the first shard: no manifest, so the folder is not a dataset."""
    from aae_dist import storage
    from aae_dist.data.writer import write_dataset
    from conftest import ident_arrays

    x, y = ident_arrays(300)
    real = storage.write_bytes_atomic
    calls = []

    def dying(url, data):
        calls.append(url)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(url, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", dying)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(str(tmp_path / "k"), {"train": (x, y)}, num_classes=10, source="t", shard_size=100, progress=False)
    assert not (tmp_path / "k" / "manifest.json").exists()


def test_memory_url_round_trip(make_dataset):
    url, x, y = make_dataset(300, 100, url="memory://aae/ds1")
    got_x, got_y = read_all(url)
    np.testing.assert_array_equal(got_x, x)
    np.testing.assert_array_equal(got_y, y)
    assert json.loads(read_manifest(url).to_json())["format"] == "aae-dist-shards"


def test_s3_end_to_end_against_moto(s3_server, tmp_path):
    from conftest import ident_arrays

    x, y = ident_arrays(500)
    np.savez(tmp_path / "s.npz", x=x, y=y)
    url = f"s3://{s3_server['bucket']}/datasets/ident"
    assert main(["shard", f"npz:{tmp_path / 's.npz'}", url, "--shard-size", "128", "--test-fraction", "0", "--quiet"]) == 0
    import boto3

    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_server["bucket"], Prefix="datasets/ident/")["Contents"]]
    assert "datasets/ident/manifest.json" in keys and len(keys) == 1 + 2 * 4
    # two ranks: partial-shard byte ranges go through S3 range requests; plus a local cache
    seen = []
    for rank in range(3):
        s = ShardStream(url, "train", 50, rank=rank, world_size=3, seed=5, cache_dir=str(tmp_path / "cache") if rank == 1 else None)
        for xb, yb in s.iter_epoch(0):
            ids = ident(xb.numpy())
            np.testing.assert_array_equal(yb.numpy(), y[ids])
            seen.extend(ids)
    assert len(seen) == len(set(seen)) == 3 * (500 // 3)  # one sample of 500 left out by the policy
    assert len(os.listdir(tmp_path / "cache")) > 0
