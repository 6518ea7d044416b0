"""The bad-input matrix: each case ends with ONE line naming the culprit and the fix, a non-zero exit,
and leaves every dataset and run that already existed byte-for-byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from aae_dist.cli import main
from aae_dist.data.format import block_digests, encode_npy, sha256
from aae_dist.data.writer import write_dataset
from conftest import SMALL_MODEL, ident_arrays


def tree_digest(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    x, y = ident_arrays(700)
    good = str(root / "good")
    write_dataset(good, {"train": (x[:600], y[:600]), "test": (x[600:], y[600:])}, num_classes=10, source="t", shard_size=200, progress=False)
    write_dataset(str(root / "nolabels"), {"train": (x[:600], None)}, num_classes=0, source="t", shard_size=200, progress=False)
    write_dataset(str(root / "tiny"), {"train": (x[:3], y[:3])}, num_classes=10, source="t", shard_size=2, progress=False)
    write_dataset(str(root / "empty"), {"train": (x[:0], y[:0])}, num_classes=10, source="t", shard_size=2, progress=False)
    for name, damage in (("sha", "flip"), ("trunc", "cut"), ("shape", "shape")):
        d = str(root / name)
        shutil.copytree(good, d)
        path = os.path.join(d, "train-00001.x.npy")
        data = bytearray(open(path, "rb").read())
        if damage == "flip":
            data[-1] ^= 0xFF
        elif damage == "cut":
            data = data[:-100]
        else:
            data, header = encode_npy(np.zeros((200, 1, 8, 2), np.uint8))
            doc = json.load(open(os.path.join(d, "manifest.json")))
            entry = doc["splits"]["train"]["shards"][1]["x"]  # a consistent manifest: only the shape is wrong
            entry.update(bytes=len(data), sha256=sha256(data), header=header, blocks=block_digests(data, entry["block_bytes"]))
            json.dump(doc, open(os.path.join(d, "manifest.json"), "w"))
        open(path, "wb").write(bytes(data))
    (root / "nomanifest").mkdir()
    os.makedirs(root / "badmanifest")
    (root / "badmanifest" / "manifest.json").write_text('{"format": "something-else"}')
    fake = root / "fakeckpt"
    fake.mkdir()
    (fake / "meta.json").write_text('{"step": 3}')
    (fake / "state.pt").write_bytes(pickle.dumps({"a": 1}) + b"garbage")
    runs = str(root / "runs")
    argv = ["train", "--workers", "0", "--storage", runs, "--name", "existing", "--set", f"data.path={good}", "--set", "train.max_steps=4"]
    for s in SMALL_MODEL:
        argv += ["--set", s]
    assert main(argv) == 0
    return root


def T(world, *sets, name="new", extra=(), data="good"):
    argv = ["train", "--workers", "0", "--storage", str(world / "runs"), "--name", name, *extra]
    if data:
        argv += ["--set", f"data.path={world / data}"]
    for s in SMALL_MODEL + list(sets):
        argv += ["--set", s]
    return argv


CASES = {
    "unknown config key": (lambda w: T(w, "train.epoch=2"), "unknown config key 'train.epoch'"),
    "wrong type": (lambda w: T(w, "train.epochs=ten"), "'train.epochs'"),
    "zero batch size": (lambda w: T(w, "data.batch_size=0"), "'data.batch_size'"),
    "compile mode without compile": (lambda w: T(w, "train.compile_mode=reduce-overhead"),
                                     "train.compile_mode=reduce-overhead applies only with train.compile=true"),
    "compile scope not offered": (lambda w: T(w, "train.compile=true", "train.compile_scope=step"), "'train.compile_scope'"),
    "negative latent size": (lambda w: T(w, "model.latent_dim=-2"), "'model.latent_dim'"),
    "bad --set syntax": (lambda w: T(w, "train.epochs"), "expected KEY=VALUE"),
    "prior incompatible with latent": (lambda w: T(w, "prior.kind=mixture"), "2-D prior but model.latent_dim=8"),
    "shift consistency without a categorical y": (lambda w: T(w, "phases.reconstruction.consistency=1"),
                                                   "phases.reconstruction.consistency needs a variant with a categorical y"),
    "adversarial consistency without a categorical y": (lambda w: T(w, "phases.reconstruction.vat=1"),
                                                         "phases.reconstruction.vat needs a variant with a categorical y"),
    "neighbour consistency without a categorical y": (lambda w: T(w, "phases.reconstruction.neighbours=1"),
                                                       "phases.reconstruction.neighbours needs a variant with a categorical y"),
    "prior that ignores labels with the label-regularised variant": (
        lambda w: T(w, "model.variant=label_regularized", "prior.kind=gaussian"), "prior.kind=gaussian ignores labels"),
    "prior incompatible with variant": (lambda w: T(w, "model.variant=label_regularized", "model.latent_dim=2", "prior.kind=mixture",
                                                    "prior.components=4"), "prior.components=4 must equal the 10 classes"),
    # batch 1: the same run with 1 worker is valid (test_tiny_dataset_trains_with_one_worker); only the worker count is wrong
    "more workers than samples": (lambda w: T(w, "data.batch_size=1", data="tiny", extra=["--workers", "4"]), "4 workers but split 'train'"),
    "--gpu without GPUs": (lambda w: T(w, extra=["--gpu"]), "no CUDA GPU is visible"),
    "unreachable address": (lambda w: T(w, extra=["--workers", "2", "--address", "127.0.0.1:1"]), "cannot reach the Ray cluster at 127.0.0.1:1"),
    "missing manifest": (lambda w: T(w, data="nomanifest"), "manifest.json is missing"),
    "invalid manifest": (lambda w: T(w, data="badmanifest"), "invalid manifest"),
    "checksum mismatch": (lambda w: T(w, data="sha"), "fails its xxh3_64 check"),
    "truncated shard": (lambda w: T(w, data="trunc"), "manifest says"),
    "shard with wrong shape": (lambda w: T(w, data="shape"), "(200, 1, 8, 2)"),
    "labels required but absent": (lambda w: T(w, "model.variant=semi_supervised", data="nolabels"), "needs labels"),
    "empty split": (lambda w: T(w, data="empty"), "split 'train'"),
    "resume of a run that does not exist": (lambda w: T(w, name="ghost", extra=["--resume"]), "no run named 'ghost'"),
    "checkpoint from another architecture": (lambda w: T(w, "model.hidden=[32,32]", "train.max_steps=8", name="existing", extra=["--resume"]),
                                             "different architecture (model.hidden: checkpoint [64, 64], config [32, 32])"),
    "file that is not a checkpoint": (lambda w: ["eval", str(w / "fakeckpt")], "not a valid checkpoint"),
    "overwrite without --resume/--overwrite": (lambda w: T(w, name="existing"), "already exists"),
    "unknown source": (lambda w: ["shard", "tfrecord:/x", str(w / "newds")], "unknown source"),
    "eval of a missing split": (lambda w: ["eval", str(w / "runs" / "existing"), "--split", "validation"], "no split 'validation'"),
    "storage URL with no filesystem": (lambda w: T(w, extra=["--storage", "nosuchproto://bucket/runs"]), "cannot open storage URL"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(world, case, capsys):
    make_argv, needle = CASES[case]
    before = tree_digest(world)
    capsys.readouterr()
    code = main(make_argv(world))
    err = capsys.readouterr().err.strip()
    assert code != 0, case
    assert err.startswith("aae-dist: error:") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, (needle, err)
    after = tree_digest(world)
    # nothing that existed was touched (runs/new holds at most the config.json of failed starts: not a run)
    assert {k: v for k, v in after.items() if k in before and not k.startswith("runs/new")} == {
        k: v for k, v in before.items() if not k.startswith("runs/new")}
    assert not [k for k in after if k not in before and not k.startswith("runs/new")], "stray files"


def test_tiny_dataset_trains_with_one_worker(world):
    """The control for "more workers than samples": the same config and data with one in-process worker trains."""
    argv = T(world, "data.batch_size=1", "train.max_steps=2", "train.parzen_samples=0", name="tiny-ok", data="tiny")
    assert main(argv) == 0


def test_local_storage_refused_on_a_multi_node_cluster():
    from aae_dist.errors import UserError
    from aae_dist.ray_launch import check_shared_storage

    with pytest.raises(UserError, match="local path but the cluster has 2 nodes"):
        check_shared_storage("/tmp/runs", 2)
    check_shared_storage("/tmp/runs", 1)
    check_shared_storage("memory://runs", 3)
