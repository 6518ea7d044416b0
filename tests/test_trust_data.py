"""Manifests and data sources are untrusted input (issue 21, items 5, 6 and the data cases of 10): a crafted
manifest or a broken source file is ONE line, exit 2, and nothing outside the dataset is read or written."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import shutil
import types

import numpy as np
import pytest

from aae_dist.cli import main
from aae_dist.data.writer import write_dataset
from conftest import ident_arrays
from test_bad_input_matrix import T, tree_digest, world  # noqa: F401 - world is a fixture used here


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def assert_one_line(code: int, err: str, needle: str) -> None:
    assert code == 2, (code, err)
    assert err.startswith("aae-dist: error:") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, (needle, err)


def tampered(world, tmp_path, edit) -> str:
    """A copy of the good dataset whose manifest `edit(doc)` changed (edit returns the new document or None)."""
    d = tmp_path / "ds"
    shutil.copytree(world / "good", d)
    doc = json.loads((d / "manifest.json").read_text())
    doc = edit(doc) or doc
    (d / "manifest.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(d)


def train_argv(world, tmp_path, data, *sets):
    return T(world, f"data.path={data}", *sets, data=None, extra=["--storage", str(tmp_path / "runs")])


def first_x(doc) -> dict:
    return doc["splits"]["train"]["shards"][0]["x"]


# ---- shard file names are the writer's, never paths ---------------------------------------------------------

def _outside_file(doc, tmp_path):
    """The first shard's x moved outside the dataset, the manifest pointing there: the bytes and checksums are right."""
    os.makedirs(tmp_path / "outside", exist_ok=True)
    shutil.move(str(tmp_path / "ds" / first_x(doc)["file"]), tmp_path / "outside" / "x.npy")
    first_x(doc)["file"] = "../outside/x.npy"


@pytest.mark.parametrize("command", ["train", "verify"])
def test_shard_file_outside_the_dataset_is_refused(world, tmp_path, capsys, command):
    d = tmp_path / "ds"
    shutil.copytree(world / "good", d)
    doc = json.loads((d / "manifest.json").read_text())
    _outside_file(doc, tmp_path)
    (d / "manifest.json").write_text(json.dumps(doc))
    before = tree_digest(tmp_path)
    argv = train_argv(world, tmp_path, d) if command == "train" else ["verify", d]
    code, err = run_cli(argv, capsys)
    assert_one_line(code, err, "'file'")
    assert "re-shard" in err
    assert {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("runs/")} == before


@pytest.mark.parametrize("case, edit, needle", [
    ("split name with a path", lambda d: d["splits"].update({"../../X": d["splits"].pop("test")}), "split name '../../X'"),
    ("shard name with a path", lambda d: d["splits"]["train"]["shards"][0].update(name="../train-00000"), "'name'"),
    ("y file of another shard", lambda d: d["splits"]["train"]["shards"][0]["y"].update(file="train-00001.y.npy"), "'file'"),
    ("sha256 not hex", lambda d: first_x(d).update(sha256="../" + "0" * 61), "'sha256'"),
    ("block checksum of the wrong length", lambda d: first_x(d)["blocks"].__setitem__(0, "abc"), "'blocks'"),
    ("manifest that is a list", lambda d: "[]", "not a JSON object"),
    ("count of 1e400", lambda d: json.dumps(d).replace('"count": 200', '"count": 1e400', 1), "'count'"),
    ("block_bytes 0", lambda d: first_x(d).update(block_bytes=0), "'block_bytes'"),
    ("huge shape", lambda d: d.update(shape=[10**9, 10**9]), "'shape'"),
    ("shape of floats", lambda d: d.update(shape=[1.0, 4.0, 4.0]), "'shape'"),
    ("negative bytes", lambda d: first_x(d).update(bytes=-1), "'bytes'"),
    ("object dtype", lambda d: d.update(dtype="O"), "'dtype'"),
])
@pytest.mark.parametrize("command", ["train", "verify"])
def test_crafted_manifest_is_one_line(world, tmp_path, capsys, case, edit, needle, command):
    d = tampered(world, tmp_path, edit)
    before = tree_digest(tmp_path)
    code, err = run_cli(train_argv(world, tmp_path, d) if command == "train" else ["verify", d], capsys)
    assert_one_line(code, err, "invalid manifest")
    assert needle in err, (case, err)
    assert {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("runs/")} == before


def test_split_name_cannot_send_encode_outside_its_folder(world, tmp_path, capsys):
    d = tampered(world, tmp_path, lambda doc: doc["splits"].update({"../../X": doc["splits"].pop("test")}))
    out = tmp_path / "a" / "b" / "codes"
    code, err = run_cli(["encode", world / "runs" / "existing", "--data", d, "--out", out], capsys)
    assert_one_line(code, err, "split name '../../X'")
    assert not (tmp_path / "a").exists() and not list(tmp_path.rglob("*.parquet"))


def test_crafted_checksum_cannot_write_outside_the_cache(world, tmp_path, capsys):
    d = tampered(world, tmp_path, lambda doc: first_x(doc).update(sha256="../../escape"))
    cache = tmp_path / "c" / "cache"
    code, err = run_cli(train_argv(world, tmp_path, d, f"data.cache_dir={cache}"), capsys)
    assert_one_line(code, err, "'sha256'")
    assert not list(tmp_path.rglob("escape*")) and not cache.exists()


# ---- the cache is checked on a hit --------------------------------------------------------------------------

def forget_checked_cache(reader) -> None:
    """What a new process knows: no cache file checked yet."""
    getattr(reader, "_CACHE_CHECKED", set()).clear()


def test_corrupt_cache_hit_is_fetched_again_with_one_warning(s3_server, tmp_path, capsys):
    from aae_dist.data import read_manifest, reader
    from aae_dist.data.reader import ShardStream

    x, y = ident_arrays(300)
    url = f"s3://{s3_server['bucket']}/trust/cached"
    write_dataset(url, {"train": (x, y)}, num_classes=10, source="t", shard_size=100, progress=False, block_bytes=256)
    cache = tmp_path / "cache"

    def epoch():
        s = ShardStream(url, "train", 50, shuffle=False, cache_dir=str(cache))
        return np.concatenate([b.numpy() for b, _ in s.iter_epoch(0)])

    assert (epoch() == x).all()
    files = sorted(cache.glob("*.npy"))
    m = read_manifest(url)
    assert [f.name for f in files] == sorted({f"{a.sha256}.npy" for s in m.splits["train"].shards for a in (s.x, s.y)})
    assert not [f for f in cache.iterdir() if ".tmp" in f.name]
    victim = files[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    forget_checked_cache(reader)
    capsys.readouterr()
    assert (epoch() == x).all()  # trained on the right bytes, not the flipped one
    err = capsys.readouterr().err.strip()
    assert err.startswith("aae-dist: warning:") and "\n" not in err and victim.name in err, err
    assert victim.read_bytes() != bytes(data)  # the cache holds the good copy again
    assert (epoch() == x).all() and capsys.readouterr().err == ""  # checked once per process
    victim.write_bytes(victim.read_bytes()[:-5])  # a short file is caught by its size too
    forget_checked_cache(reader)
    assert (epoch() == x).all() and "aae-dist: warning:" in capsys.readouterr().err


# ---- shard --overwrite removes only what the old manifest lists ----------------------------------------------

def test_shard_overwrite_keeps_files_the_manifest_never_listed(tmp_path, capsys):
    x, y = ident_arrays(300)
    np.savez(tmp_path / "src.npz", x=x[:, 0], y=y)
    dest = tmp_path / "ds"
    write_dataset(str(dest), {"train": (x, y)}, num_classes=10, source="t", shard_size=50, progress=False)
    np.save(dest / "mine.npy", np.arange(3))
    np.save(dest / "train-00099.x.npy", np.arange(3))  # looks like a shard, but no manifest listed it
    (dest / "notes.txt").write_text("keep")
    keep = {k: v for k, v in tree_digest(dest).items() if k in ("mine.npy", "train-00099.x.npy", "notes.txt")}
    code, _ = run_cli(["shard", f"npz:{tmp_path / 'src.npz'}", dest, "--overwrite", "--shard-size", "200", "--quiet"], capsys)
    assert code == 0
    after = tree_digest(dest)
    assert {k: after.get(k) for k in keep} == keep
    assert "train-00005.x.npy" not in after  # listed by the old manifest: removed
    assert main(["verify", str(dest)]) == 0


def test_generate_overwrite_keeps_files_the_manifest_never_listed(world, tmp_path, capsys):
    out = tmp_path / "gen"
    run = world / "runs" / "existing"
    assert run_cli(["generate", run, "--n", "30", "--out", out, "--shard-size", "10"], capsys)[0] == 0
    np.save(out / "mine.npy", np.arange(3))
    code, _ = run_cli(["generate", run, "--n", "10", "--out", out, "--shard-size", "10", "--overwrite"], capsys)
    assert code == 0
    assert (out / "mine.npy").exists() and not (out / "train-00002.x.npy").exists()
    assert main(["verify", str(out)]) == 0


# ---- sources ---------------------------------------------------------------------------------------------------

def _idx(path, arr: np.ndarray) -> None:
    head = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(head + arr.astype(np.uint8).tobytes())


def _idx_folder(root, n_train: int):
    root.mkdir()
    _idx(root / "train-images-idx3-ubyte.gz", np.zeros((n_train, 28, 28)))
    _idx(root / "train-labels-idx1-ubyte.gz", np.zeros(n_train))
    _idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    _idx(root / "t10k-labels-idx1-ubyte.gz", np.zeros(2))
    return f"mnist-idx:{root}"


SOURCES = {
    "empty npz": (lambda p: (np.savez(p / "s.npz"), f"npz:{p / 's.npz'}")[1], "has no array 'x'"),
    "npz with no samples": (lambda p: (np.savez(p / "s.npz", x=np.zeros((0, 4), np.uint8)), f"npz:{p / 's.npz'}")[1], "no samples"),
    "npz whose x is 1-D": (lambda p: (np.savez(p / "s.npz", x=np.arange(10, dtype=np.uint8)), f"npz:{p / 's.npz'}")[1], "1-D"),
    "npz with a badly shaped x_test": (lambda p: (np.savez(p / "s.npz", x=np.zeros((10, 4, 4), np.uint8), x_test=np.zeros((3, 5), np.uint8)),
                                                   f"npz:{p / 's.npz'}")[1], "x_test"),
    "npz with labels of another shape": (lambda p: (np.savez(p / "s.npz", x=np.zeros((10, 4), np.uint8), y=np.zeros((10, 2))),
                                                     f"npz:{p / 's.npz'}")[1], "'y'"),
    "IDX file with 0 samples": (lambda p: _idx_folder(p / "idx", 0), "0 samples"),
}


@pytest.mark.parametrize("case", list(SOURCES))
def test_bad_source_is_one_line(tmp_path, capsys, case):
    make, needle = SOURCES[case]
    spec = make(tmp_path)
    before = tree_digest(tmp_path)
    code, err = run_cli(["shard", spec, tmp_path / "out", "--quiet"], capsys)
    assert_one_line(code, err, needle)
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()


# ---- generate / sample / encode ------------------------------------------------------------------------------

def test_generate_shard_size_zero_is_one_line(world, tmp_path, capsys):
    code, err = run_cli(["generate", world / "runs" / "existing", "--n", "10", "--out", tmp_path / "g", "--shard-size", "0"], capsys)
    assert_one_line(code, err, "--shard-size")
    assert not (tmp_path / "g").exists()


def test_sample_n_over_the_limit_is_one_line(world, tmp_path, capsys):
    code, err = run_cli(["sample", world / "runs" / "existing", "--n", "1000000000", "--out", tmp_path / "s.png"], capsys)
    assert_one_line(code, err, "--n 1000000000: a grid holds 1 to at most 10000 samples")
    assert list(tmp_path.iterdir()) == []


def test_sample_out_that_is_a_folder_leaves_nothing(world, tmp_path, capsys):
    out = tmp_path / "pics"
    out.mkdir()
    (out / "old.png").write_bytes(b"x")
    before = tree_digest(tmp_path)
    code, err = run_cli(["sample", world / "runs" / "existing", "--n", "4", "--out", out], capsys)
    assert_one_line(code, err, "is a folder")
    assert tree_digest(tmp_path) == before and sorted(os.listdir(out)) == ["old.png"]


def test_generate_jobs_are_a_lazy_stream():
    from aae_dist.inference import generate_jobs

    jobs = generate_jobs("run", 10**12, "out", 10_000, 7)
    assert isinstance(jobs, types.GeneratorType)
    assert list(itertools.islice(jobs, 2)) == [("run", "out", 0, 10_000, 7), ("run", "out", 1, 10_000, 7)]
    assert [j[3] for j in generate_jobs("run", 25, "out", 10, 0)] == [10, 10, 5]


def test_generate_hands_a_stream_to_the_workers(world, tmp_path, monkeypatch, capsys):
    """A huge --n never becomes a list: the tasks get an iterator they consume as they go."""
    import aae_dist.parallel as parallel

    seen = {}

    def fake_map(fn, items, workers, address=None):
        seen["lazy"] = not isinstance(items, (list, tuple))
        seen["first"] = [fn(j) for j in itertools.islice(items, 2)]
        raise KeyboardInterrupt

    monkeypatch.setattr(parallel, "map_tasks", fake_map)
    code, err = run_cli(["generate", world / "runs" / "existing", "--n", str(10**7), "--out", tmp_path / "g", "--shard-size", "10"], capsys)
    assert code == 130 and seen["lazy"] and len(seen["first"]) == 2
    assert (tmp_path / "g" / "train-00001.x.npy").exists()  # writing began at once


def test_encode_jobs_are_a_lazy_stream(world):
    from aae_dist.data import read_manifest
    from aae_dist.inference import encode_jobs

    good = str(world / "good")
    jobs = encode_jobs("run", good, read_manifest(good), None, "out")
    assert isinstance(jobs, types.GeneratorType)
    assert [(j[2], j[3]) for j in jobs] == [("train", 0), ("train", 1), ("train", 2), ("test", 0)]


def test_sample_out_on_object_storage(world, s3_server, capsys):
    """On S3 a "folder" is a prefix holding objects: refused the same way; a new key is written."""
    import s3fs

    base = f"s3://{s3_server['bucket']}/trust/pics"
    fs = s3fs.S3FileSystem()
    fs.pipe(f"{base}/old.png", b"x")
    code, err = run_cli(["sample", world / "runs" / "existing", "--n", "4", "--out", base], capsys)
    assert_one_line(code, err, "is a folder")
    assert fs.ls(base) == [f"{s3_server['bucket']}/trust/pics/old.png"]
    assert run_cli(["sample", world / "runs" / "existing", "--n", "4", "--out", f"{base}/new.png"], capsys)[0] == 0
    fs.invalidate_cache()
    assert fs.cat(f"{base}/new.png")[:4] == b"\x89PNG"


def test_a_failed_shard_overwrite_leaves_the_old_dataset_whole(tmp_path, capsys):
    """Images decode while shards are written: a bad image found half-way must not cost the old dataset."""
    from PIL import Image

    src = tmp_path / "img"
    for label in ("a", "b"):
        (src / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((8, 8), 20 * i, np.uint8)).save(src / label / f"{i:02d}.png")
    dest = str(tmp_path / "ds")
    argv = ["shard", f"images:{src}", dest, "--image-size", "8", "--shard-size", "4", "--quiet"]
    assert main(argv) == 0
    before = tree_digest(dest)
    (src / "b" / "11.png").write_bytes(b"not a png")  # sorted last: found after shards were written
    code, err = run_cli(argv + ["--overwrite"], capsys)
    assert code == 2 and "11.png" in err, err
    assert tree_digest(dest) == before
    assert main(["verify", dest]) == 0
