"""No local scratch folder outlives the command that made it: a submitted job's working folder, a sweep
trial's hparams events, a fetched checkpoint (one a killed process left is removed by the next fetch)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

from aae_dist.cli import main


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """tempfile's folder, here an empty one of this test's own."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_submit_removes_its_job_folder_after_a_dry_run_and_after_a_refusal(scratch, capsys):
    with socket.socket() as head:  # --dry-run probes the address: something must listen there
        head.bind(("127.0.0.1", 0))
        head.listen()
        address = "127.0.0.1:%d" % head.getsockname()[1]
        assert main(["submit", "--address", address, "--dry-run", "--workers", "2", "--set", "data.path=s3://bucket/mnist"]) == 0
    out = capsys.readouterr().out
    assert "working_dir: " + str(scratch) in out and "config.yaml" in out  # the plan was made from a folder in scratch
    assert main(["submit", "--address", address, "--workers", "2", "--set", f"data.path={scratch}/mnist"]) == 2
    assert "local path the cluster's workers cannot read" in capsys.readouterr().err
    assert os.listdir(scratch) == []


def test_a_trials_hparams_events_reach_its_run_folder_and_leave_no_scratch(scratch, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aae_dist.sweep import write_hparams

    run = tmp_path / "sweep" / "trial_0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"metrics": {"recon": 0.5}}))
    write_hparams(str(run), {"phases.reconstruction.lr": 1e-3}, "recon")
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert events.Scalars("hparams/recon")[0].value == 0.5
    assert os.listdir(scratch) == []


def test_a_fetched_checkpoint_left_by_a_killed_process_is_removed_by_the_next_fetch(scratch, tmp_path):
    from aae_dist import checkpoint

    saved = tmp_path / "checkpoint_step_000000001"
    checkpoint.write_local(str(saved), {"models": {}}, {"step": 1})
    killed = subprocess.run([sys.executable, "-c", "import os, sys, tempfile; tempfile.tempdir = sys.argv[2]; "
                             "from aae_dist import checkpoint; checkpoint.fetch(sys.argv[1]); os._exit(9)", str(saved), str(scratch)])
    assert killed.returncode == 9
    [left] = os.listdir(scratch)  # the killed process's copy
    assert left.startswith("aae-ckpt-") and sorted(os.listdir(scratch / left)) == ["meta.json", "state.pt"]
    local = checkpoint.fetch(str(saved))
    assert os.listdir(scratch) == [os.path.basename(local)]  # the orphan is gone, this process's copy is there
    checkpoint.remove_local(local)
    assert os.listdir(scratch) == []
