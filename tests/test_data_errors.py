"""Each bad input to the data layer: one line naming the URL and the fix, non-zero exit."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from aae_dist.cli import main
from aae_dist.data import ShardStream
from aae_dist.errors import UserError
from test_data_format import write_idx


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def one_line_error(code, err, *needles):
    assert code != 0
    assert err.startswith("aae-dist: error:") and "\n" not in err and "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def test_missing_manifest(tmp_path, capsys):
    one_line_error(*run_cli(capsys, "verify", str(tmp_path)), str(tmp_path), "manifest.json is missing", "aae-dist shard")


def test_invalid_manifest(make_dataset, capsys):
    url, _, _ = make_dataset(100, 50)
    with open(os.path.join(url, "manifest.json"), "w") as fh:
        fh.write("{not json")
    one_line_error(*run_cli(capsys, "verify", url), "invalid manifest", url)


def test_sha256_mismatch(make_dataset, capsys):
    url, _, _ = make_dataset(100, 50)
    path = os.path.join(url, "train-00001.x.npy")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF  # same size, different content
    open(path, "wb").write(bytes(data))
    one_line_error(*run_cli(capsys, "verify", url), "train-00001.x.npy", "sha256")


def flip_byte_in_sample(url: str, shard_file: str, sample: int, count: int, sample_bytes: int = 16) -> None:
    path = os.path.join(url, shard_file)
    data = bytearray(open(path, "rb").read())
    header = len(data) - count * sample_bytes
    data[header + sample * sample_bytes + 3] ^= 0xFF  # same size, different content
    open(path, "wb").write(bytes(data))


def test_ranged_read_verifies_every_byte_it_uses(make_dataset):
    """Rank 1 of 2 reads samples 500-999 of the one shard: a byte flipped there is caught by the block
    checksums of its range; rank 0, whose blocks do not hold it, reads its half and verifies it clean."""
    url, x, _ = make_dataset(1000, 1000, block_bytes=1024)
    flip_byte_in_sample(url, "train-00000.x.npy", 800, 1000)
    with pytest.raises(UserError, match=r"shard .*train-00000\.x\.npy fails its xxh3_64 check in bytes \d+-\d+"):
        list(ShardStream(url, "train", 50, rank=1, world_size=2, shuffle=False).iter_epoch(0))
    got = np.concatenate([b.numpy() for b, _ in ShardStream(url, "train", 50, rank=0, world_size=2, shuffle=False).iter_epoch(0)])
    assert (got == x[:500]).all()


def test_format_1_dataset_is_read_and_checked_whole(make_dataset):
    """A dataset written before block checksums (format 1) still reads; a ranged read checks the whole file."""
    url, x, _ = make_dataset(1000, 1000)
    doc = json.load(open(os.path.join(url, "manifest.json")))
    doc["version"] = 1
    for sp in doc["splits"].values():
        for shard in sp["shards"]:
            for f in ("x", "y"):
                shard[f].pop("block_bytes"), shard[f].pop("blocks")
    json.dump(doc, open(os.path.join(url, "manifest.json"), "w"))
    got = np.concatenate([b.numpy() for b, _ in ShardStream(url, "train", 50, rank=1, world_size=2, shuffle=False).iter_epoch(0)])
    assert (got == x[500:]).all()
    flip_byte_in_sample(url, "train-00000.x.npy", 100, 1000)  # in rank 0's half: rank 1 still sees it
    with pytest.raises(UserError, match=r"train-00000\.x\.npy fails its sha256 check: corrupt"):
        list(ShardStream(url, "train", 50, rank=1, world_size=2, shuffle=False).iter_epoch(0))


def test_format_2_sha256_blocks_still_read_and_checked(make_dataset):
    """Format 2 (sha256 per block, no block_hash key) reads as before; a flipped byte names sha256 and its block."""
    from aae_dist.data.format import block_digests

    url, x, _ = make_dataset(1000, 1000, block_bytes=1024)
    doc = json.load(open(os.path.join(url, "manifest.json")))
    doc["version"] = 2
    for sp in doc["splits"].values():
        for shard in sp["shards"]:
            for f in ("x", "y"):
                entry = shard[f]
                assert entry.pop("block_hash") == "xxh3_64"
                entry["blocks"] = block_digests(open(os.path.join(url, entry["file"]), "rb").read(), entry["block_bytes"], "sha256")
    json.dump(doc, open(os.path.join(url, "manifest.json"), "w"))
    got = np.concatenate([b.numpy() for b, _ in ShardStream(url, "train", 50, rank=1, world_size=2, shuffle=False).iter_epoch(0)])
    assert (got == x[500:]).all()
    flip_byte_in_sample(url, "train-00000.x.npy", 800, 1000)
    with pytest.raises(UserError, match=r"train-00000\.x\.npy fails its sha256 check in bytes \d+-\d+"):
        list(ShardStream(url, "train", 50, rank=1, world_size=2, shuffle=False).iter_epoch(0))
    doc["splits"]["train"]["shards"][0]["x"]["block_hash"] = "md4"
    json.dump(doc, open(os.path.join(url, "manifest.json"), "w"))
    with pytest.raises(UserError, match=r"invalid manifest .*block_hash 'md4' is not one of sha256, xxh3_64"):
        ShardStream(url, "train", 50)


def test_truncated_shard_whole_and_ranged(make_dataset, capsys):
    url, _, _ = make_dataset(100, 100)
    path = os.path.join(url, "train-00000.x.npy")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-40])
    one_line_error(*run_cli(capsys, "verify", url), "train-00000.x.npy", "bytes, manifest says")
    with pytest.raises(UserError, match="truncated"):
        list(ShardStream(url, "train", 10, rank=1, world_size=2).iter_epoch(0))  # ranged read path


def test_shard_that_grew_is_refused(make_dataset, capsys):
    """Blocks intact but bytes appended: the whole-file read asks for one byte past the manifest's size."""
    url, _, _ = make_dataset(100, 100)
    path = os.path.join(url, "train-00000.x.npy")
    open(path, "ab").write(b"\0" * 16)
    one_line_error(*run_cli(capsys, "verify", url), "train-00000.x.npy", "truncated or replaced")


def test_shard_with_wrong_shape(make_dataset, capsys):
    url, _, _ = make_dataset(100, 100)
    from aae_dist.data.format import block_digests, encode_npy, sha256

    bad, header = encode_npy(np.zeros((100, 1, 2, 8), np.uint8))
    path = os.path.join(url, "train-00000.x.npy")
    open(path, "wb").write(bad)
    doc = json.load(open(os.path.join(url, "manifest.json")))
    entry = doc["splits"]["train"]["shards"][0]["x"]  # a consistent manifest: only the shape is wrong
    entry.update(bytes=len(bad), sha256=sha256(bad), header=header, blocks=block_digests(bad, entry["block_bytes"]))
    json.dump(doc, open(os.path.join(url, "manifest.json"), "w"))
    one_line_error(*run_cli(capsys, "verify", url), "train-00000.x.npy", "(100, 1, 2, 8)", "manifest says")


def test_missing_shard_file(make_dataset, capsys):
    url, _, _ = make_dataset(100, 50)
    os.remove(os.path.join(url, "train-00001.y.npy"))
    one_line_error(*run_cli(capsys, "verify", url), "missing file", "train-00001.y.npy")


def test_unknown_source(tmp_path, capsys):
    one_line_error(*run_cli(capsys, "shard", "cifar:/x", str(tmp_path / "o")), "unknown source 'cifar:/x'", "mnist-idx:DIR")


def test_idx_wrong_magic(tmp_path, capsys):
    src = tmp_path / "idx"
    src.mkdir()
    write_idx(src, "train", np.zeros((5, 28, 28), np.uint8), np.zeros(5), gz=False)
    write_idx(src, "t10k", np.zeros((5, 28, 28), np.uint8), np.zeros(5), gz=False)
    p = src / "t10k-images-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x09\x03" + p.read_bytes()[4:])
    one_line_error(*run_cli(capsys, "shard", f"mnist-idx:{src}", str(tmp_path / "o")), "t10k-images-idx3-ubyte", "wrong magic number")


def test_idx_mismatched_counts(tmp_path, capsys):
    src = tmp_path / "idx"
    src.mkdir()
    write_idx(src, "train", np.zeros((5, 28, 28), np.uint8), np.zeros(4), gz=True)
    write_idx(src, "t10k", np.zeros((5, 28, 28), np.uint8), np.zeros(5), gz=True)
    one_line_error(*run_cli(capsys, "shard", f"mnist-idx:{src}", str(tmp_path / "o")), "count mismatch", "5 images", "4 labels")


def test_idx_truncated(tmp_path, capsys):
    src = tmp_path / "idx"
    src.mkdir()
    write_idx(src, "train", np.zeros((5, 28, 28), np.uint8), np.zeros(5), gz=False)
    p = src / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-10])
    one_line_error(*run_cli(capsys, "shard", f"mnist-idx:{src}", str(tmp_path / "o")), "train-images-idx3-ubyte", "truncated")


def test_unreachable_storage(monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTEDSECRET")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AAE_STORAGE_RETRIES", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    try:
        code, err = run_cli(capsys, "verify", "s3://no-bucket/data")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    one_line_error(code, err, "storage unreachable", "s3://no-bucket/data")
    assert "planted-secret" not in err and "AKIAPLANTED" not in err


def test_more_ranks_than_samples(make_dataset):
    url, _, _ = make_dataset(3, 2, test=0)
    with pytest.raises(UserError, match="4 ranks but split 'train'.*only 3 samples: use fewer workers"):
        ShardStream(url, "train", 1, rank=0, world_size=4)


def test_labels_required_but_absent(make_dataset):
    url, _, _ = make_dataset(50, 25, labels=False)
    with pytest.raises(UserError, match="labeled_per_class needs labels"):
        ShardStream(url, "train", 5, labeled_per_class=2)


def test_unknown_split(make_dataset):
    url, _, _ = make_dataset(50, 25, test=0)
    with pytest.raises(UserError, match="no split 'test'"):
        ShardStream(url, "test", 5)
