"""--dry-run plans without writing; --overwrite deletes only after every check; impossible requests are refused up front."""

from __future__ import annotations

import os

from aae_dist.cli import main
from conftest import SMALL_MODEL


def argv(tmp_path, data, *extra, name="r", sets=()):
    out = ["train", "--storage", str(tmp_path / "runs"), "--name", name, *extra, "--set", f"data.path={data}"]
    for s in SMALL_MODEL + list(sets):
        out += ["--set", s]
    return out


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, make_dataset, capsys):
    data, _, _ = make_dataset(1000, 100)
    assert main(argv(tmp_path, data, "--workers", "2", "--dry-run", sets=["train.epochs=3"])) == 0
    out = capsys.readouterr().out
    assert "plan (--dry-run: nothing was written)" in out and "2 Ray worker(s)" in out
    assert "1000 training samples, batch 50 per worker, 10 steps per epoch" in out and "steps: 30 (3.0 epochs)" in out
    assert "batch_size: 50" in out  # the resolved config
    assert not os.path.exists(tmp_path / "runs")


def test_overwrite_keeps_the_old_run_when_a_check_fails(tmp_path, make_dataset, capsys):
    data, _, _ = make_dataset(1000, 100)
    assert main(argv(tmp_path, data, "--workers", "0", sets=["train.max_steps=3"])) == 0
    before = sorted(os.listdir(tmp_path / "runs" / "r"))
    assert "summary.json" in before
    # a typo'd data path with --overwrite: refused by the pre-flight check, the good run untouched
    assert main(argv(tmp_path, str(tmp_path / "no-such-data"), "--workers", "0", "--overwrite")) == 2
    assert "no-such-data" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "runs" / "r")) == before


def test_workers_the_machine_cannot_place_are_refused_before_anything_starts(tmp_path, make_dataset, capsys):
    data, _, _ = make_dataset(1000, 100)
    assert main(argv(tmp_path, data, "--workers", "2", sets=["run.cpus_per_worker=4096"])) == 2
    err = capsys.readouterr().err.strip()
    assert "can place 0 of the 2 workers asked for (CPU 4096 each" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "runs" / "r")
