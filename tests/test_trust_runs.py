"""A user's runs are never at risk: run names stay one folder, a run folder has one owner at a time,
--overwrite keeps the old run until the new one has a checkpoint, and failures leave no temp files."""

from __future__ import annotations

import errno
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from aae_dist import runfolder, storage
from aae_dist.cli import main
from conftest import SMALL_MODEL, read_summary
from test_bad_input_matrix import tree_digest

FAST = SMALL_MODEL + ["train.parzen_samples=0", "train.max_steps=6", "train.checkpoint_every=3"]


def argv_for(storage_dir, data, name, *sets, extra=()):
    argv = ["train", "--workers", "0", "--storage", str(storage_dir), "--name", name, "--set", f"data.path={data}", *extra]
    for s in FAST + list(sets):
        argv += ["--set", s]
    return argv


def one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.startswith("aae-dist: error:") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, (needle, err)
    return err


@pytest.fixture
def yard(tmp_path, make_dataset):
    """S/runs holding a finished run 'old' (two checkpoints, a summary), another run, and a user's notes file."""
    data, _, _ = make_dataset(600, 200)
    runs = tmp_path / "S" / "runs"
    assert main(argv_for(runs, data, "old")) == 0
    assert main(argv_for(runs, data, "other")) == 0
    (runs / "notes.txt").write_text("my notes")
    (tmp_path / "S" / "summary.json").write_text("{}")  # what `--name ..` used to take for a run
    (tmp_path / "S" / "keep.txt").write_text("keep me")
    return {"root": tmp_path / "S", "runs": runs, "data": data}


NAMES = [".", "..", "a/b", "../x", "", "x" * 300, "_x", "a b", "name\n"]


@pytest.mark.parametrize("name", NAMES)
def test_bad_run_names_are_refused_and_touch_nothing(yard, name, capsys):
    before = tree_digest(yard["root"])
    capsys.readouterr()
    assert main(argv_for(yard["runs"], yard["data"], name, extra=["--overwrite"])) == 2
    one_line_error(capsys, "is not a valid name")
    assert tree_digest(yard["root"]) == before


@pytest.mark.parametrize("name", [".", "../x", "x" * 300])
def test_sweep_and_submit_refuse_bad_names(tmp_path, name, capsys):
    assert main(["sweep", "--storage", str(tmp_path), "--name", name, "--grid", "train.seed=0,1"]) == 2
    one_line_error(capsys, "is not a valid name")
    assert main(["submit", "--address", "http://127.0.0.1:1", "--name", name, "--dry-run"]) == 2
    one_line_error(capsys, "is not a valid name")
    assert not os.listdir(tmp_path)


def test_valid_names_are_accepted():
    for name in ("run", "a.b_c-1", "7", "x" * 128):
        assert runfolder.check_name(name) == name


@pytest.mark.parametrize("failure", ["corrupt shard", "worker-only value"])
def test_failed_overwrite_keeps_the_old_run_whole(yard, tmp_path, make_dataset, failure, capsys):
    data = yard["data"]
    sets = []
    if failure == "corrupt shard":
        bad = tmp_path / "bad"
        import shutil

        shutil.copytree(data, bad)
        for shard in (p for p in os.listdir(bad) if p.startswith("train-") and p.endswith(".x.npy")):  # fails at the first read
            raw = bytearray((bad / shard).read_bytes())
            raw[-1] ^= 0xFF
            (bad / shard).write_bytes(bytes(raw))
        data = str(bad)
    else:
        sets = ["train.accumulate=1000"]  # only the worker knows the batches per epoch
    before = tree_digest(yard["root"])
    capsys.readouterr()
    assert main(argv_for(yard["runs"], data, "old", *sets, extra=["--overwrite"])) == 2
    one_line_error(capsys, "xxh3_64" if failure == "corrupt shard" else "train.accumulate=1000")
    assert tree_digest(yard["root"]) == before  # every checkpoint, the summary, the events: as they were
    assert not (yard["runs"] / "old" / runfolder.ASIDE).exists() and not (yard["runs"] / "old" / runfolder.LEASE).exists()


def test_overwrite_replaces_only_what_a_run_writes(yard, capsys):
    old = yard["runs"] / "old"
    assert all(runfolder.is_run_file(n) for n in os.listdir(old)), os.listdir(old)  # overwrite knows all a run writes
    old_summary = read_summary(old)
    (old / ".validate_storage_marker").write_text("")  # what Ray Train writes first; sorts before the rest
    assert main(argv_for(yard["runs"], yard["data"], "old", "train.max_steps=3", extra=["--overwrite"])) == 0
    new = read_summary(old)
    assert new["steps"] == 3 and old_summary["steps"] == 6
    assert sorted(p.name for p in old.iterdir() if p.name.startswith("checkpoint_")) == ["checkpoint_step_000000003"]
    assert not (old / runfolder.ASIDE).exists() and not (old / runfolder.LEASE).exists()
    assert (yard["runs"] / "notes.txt").read_text() == "my notes" and (yard["runs"] / "other" / "summary.json").exists()
    # a folder holding a user's file is not a run to replace
    (old / "analysis.ipynb").write_text("{}")
    before = tree_digest(yard["root"])
    capsys.readouterr()
    assert main(argv_for(yard["runs"], yard["data"], "old", extra=["--overwrite"])) == 2
    one_line_error(capsys, "holds files aae-dist did not write (analysis.ipynb)")
    assert tree_digest(yard["root"]) == before


def test_a_killed_overwrite_is_settled_by_the_next_start(yard, capsys):
    """The driver died after setting the old run aside and before the new one wrote a checkpoint."""
    run = yard["runs"] / "old"
    before = tree_digest(run)
    runfolder.set_aside(str(run))
    (run / "config.json").write_text("{}")  # what the dead new run had written
    assert main(argv_for(yard["runs"], yard["data"], "old", "train.max_steps=9", extra=["--resume"])) == 0
    assert "old run was put back" in capsys.readouterr().err
    s = read_summary(run)
    assert s["resumed_from_step"] == 6 and s["steps"] == 9
    assert not (run / runfolder.ASIDE).exists()
    assert all(k in tree_digest(run) for k in before if k.startswith("checkpoint_step_000000006"))


def spawn_train(storage_dir, data, name, *sets, extra=()):
    argv = argv_for(storage_dir, data, name, *sets, extra=extra)
    return subprocess.Popen([sys.executable, "-m", "aae_dist.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TQDM_DISABLE="1"))


def test_a_run_in_use_is_refused_naming_its_owner(tmp_path, make_dataset, capsys):
    data, _, _ = make_dataset(600, 200)
    runs = tmp_path / "runs"
    first = spawn_train(runs, data, "x", "train.max_steps=100000", "train.epochs=100000", "train.checkpoint_every=5")
    lease = runs / "x" / runfolder.LEASE
    try:
        deadline = time.time() + 120
        # any checkpoint: the first (step 5) is pruned once three newer ones exist, which a fast step outruns
        while not any((runs / "x").glob("checkpoint_step_*")) and time.time() < deadline:
            time.sleep(0.2)
        assert time.time() < deadline, "no checkpoint within 120 s"
        assert lease.exists(), first.stderr.read() if first.poll() is not None else "no lease"
        capsys.readouterr()
        assert main(argv_for(runs, data, "x")) == 2
        one_line_error(capsys, "already exists")
        for extra in (["--resume"], ["--overwrite"]):
            assert main(argv_for(runs, data, "x", extra=extra)) == 2
            one_line_error(capsys, f"run 'x' is in use by pid {first.pid} on {socket.gethostname()}")
        assert first.poll() is None  # the owner kept running
    finally:
        first.terminate()
        first.communicate(timeout=120)
    assert first.returncode == 130 and not lease.exists()  # an interrupted run releases its lease
    assert main(argv_for(runs, data, "x", "train.max_steps=12", extra=["--resume"])) == 0


def test_two_runs_started_together_one_wins(tmp_path, make_dataset):
    data, _, _ = make_dataset(600, 200)
    runs = tmp_path / "runs"
    procs = [spawn_train(runs, data, "same", "train.max_steps=40", f"train.seed={i}") for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    errs = [e for _, e in outs]
    assert codes == [0, 2], errs  # never both: a second start is refused (in use) or finds the run (already exists)
    loser = errs[[p.returncode for p in procs].index(2)]
    assert "is in use by" in loser or "already exists" in loser, loser
    winner = [p.returncode for p in procs].index(0)
    assert read_summary(runs / "same")["config"]["train"]["seed"] == winner
    assert json.loads((runs / "same" / "config.json").read_text())["train"]["seed"] == winner


def test_stale_leases_are_taken_over(tmp_path, make_dataset, capsys):
    data, _, _ = make_dataset(600, 200)
    runs = tmp_path / "runs"
    assert main(argv_for(runs, data, "r")) == 0
    lease = runs / "r" / runfolder.LEASE
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lease.write_text(json.dumps({"owner": "x", "host": socket.gethostname(), "pid": dead.pid, "heartbeat": time.time()}))
    capsys.readouterr()
    assert main(argv_for(runs, data, "r", "train.max_steps=9", extra=["--resume"])) == 0
    assert "that process is gone" in capsys.readouterr().err and not lease.exists()
    # another host: refused while renewed, taken over once stale
    lease.write_text(json.dumps({"owner": "y", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 5}))
    assert main(argv_for(runs, data, "r", "train.max_steps=12", extra=["--resume"])) == 2
    one_line_error(capsys, "in use by pid 1 on elsewhere")
    lease.write_text(json.dumps({"owner": "y", "host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600}))
    assert main(argv_for(runs, data, "r", "train.max_steps=12", extra=["--resume"])) == 0
    assert "not renewed for" in capsys.readouterr().err


def test_lease_on_object_storage(s3_server, make_dataset, capsys):
    data, _, _ = make_dataset(600, 200)
    runs = "s3://aae-test/lease-runs"
    url = storage.join(runs, "r")
    first = runfolder.Lease(url, "r").acquire()
    try:
        assert not runfolder._create_exclusive(storage.join(url, runfolder.LEASE), b"{}")  # the conditional PUT refuses
        capsys.readouterr()
        assert main(argv_for(runs, data, "r")) == 2
        one_line_error(capsys, f"run 'r' is in use by pid {os.getpid()}")
    finally:
        first.release()
    assert not storage.exists(storage.join(url, runfolder.LEASE))
    assert main(argv_for(runs, data, "r")) == 0
    assert not storage.exists(storage.join(url, runfolder.LEASE))


def test_resume_clears_temp_files_left_by_a_kill(tmp_path, make_dataset):
    data, _, _ = make_dataset(600, 200)
    runs = tmp_path / "runs"
    assert main(argv_for(runs, data, "r")) == 0
    run = runs / "r"
    planted = [run / "config.json.tmp-1a2b3c4d", run / "checkpoint_step_000000006" / "state.pt.tmp-5e6f7a8b"]
    for p in planted:
        p.write_bytes(b"half")
    assert main(argv_for(runs, data, "r", "train.max_steps=9", extra=["--resume"])) == 0
    assert not [p for p in planted if p.exists()]
    assert not glob.glob(str(run / "**" / "*.tmp-*"), recursive=True)


def test_full_disk_is_one_line_keeps_the_checkpoint_and_leaves_no_temp_files(tmp_path, make_dataset, monkeypatch, capsys):
    data, _, _ = make_dataset(600, 200)
    runs = tmp_path / "runs"
    real_fsync, calls = os.fsync, {"n": 0}
    assert main(argv_for(runs, data, "r")) == 0

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 3:  # the new run's config.json and its first checkpoint go through; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    capsys.readouterr()
    assert main(argv_for(runs, data, "r", "train.max_steps=30", extra=["--resume"])) == 2
    one_line_error(capsys, "No space left on device")
    monkeypatch.setattr(os, "fsync", real_fsync)
    run = runs / "r"
    assert not glob.glob(str(run / "**" / "*.tmp-*"), recursive=True)
    assert (run / "checkpoint_step_000000006" / "state.pt").exists() and (run / "checkpoint_step_000000006" / "meta.json").exists()
    assert main(argv_for(runs, data, "r", "train.max_steps=12", extra=["--resume"])) == 0


def test_a_failed_run_still_uploads_its_tensorboard_events(tmp_path, make_dataset, monkeypatch, capsys):
    """The worker fails at step 8 (a storage write refused); the curves up to then reach the run folder and
    no local scratch folder stays behind.  A scratch folder of a killed process is removed by the next run."""
    from aae_dist.training import trainer as trainer_mod

    orphan = tempfile.mkdtemp(prefix="aae-tb-999999999-")  # no such pid
    ours = set(glob.glob(os.path.join(tempfile.gettempdir(), f"aae-tb-{os.getpid()}-*")))  # earlier tests' in this process
    data, _, _ = make_dataset(600, 200)
    real_step = trainer_mod.Trainer.train_step

    def step(self, batches):
        if self.coord.step == 8:
            raise OSError(errno.EACCES, "Permission denied", "/somewhere")
        return real_step(self, batches)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", step)
    assert main(argv_for(tmp_path / "runs", data, "r", "train.max_steps=20", "train.sync_every=2")) == 2
    one_line_error(capsys, "Permission denied")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "r" / "tensorboard"))
    acc.Reload()
    steps = {e.step for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert steps and max(steps) >= 6, steps
    assert not os.path.exists(orphan)
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), f"aae-tb-{os.getpid()}-*"))) <= ours


def test_storage_that_is_a_file_or_read_only(tmp_path, make_dataset, capsys):
    data, _, _ = make_dataset(600, 200)
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(argv_for(f, data, "r")) == 2
    one_line_error(capsys, "is a file, not a folder")
    assert main(argv_for(f / "sub", data, "r")) == 2
    one_line_error(capsys, "is a file, not a folder")
    try:
        os.makedirs("/sys/aae-dist-probe")
        read_only = None
    except OSError:
        read_only = "/sys/aae-dist-runs"  # read-only even for root
    if read_only is None:
        pytest.skip("no read-only location on this machine")
    assert main(argv_for(read_only, data, "r")) == 2
    one_line_error(capsys, "choose a writable --storage")
