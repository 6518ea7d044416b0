"""What a submitted job carries: the aae_dist package alone (py_modules) and a working folder holding
only the resolved config; local data paths are refused before anything is sent."""

from __future__ import annotations

import argparse
import os

import pytest
import yaml

from aae_dist.errors import UserError
from aae_dist.submit import JOB_CONFIG, PACKAGE_DIR, job_folder, runtime_env, train_entrypoint


def args(**kw):
    base = dict(command_to_run="train", config=None, overrides=[], workers="2", storage="s3://b/runs", name="r", gpu=False,
                extra=[], pip=False)
    return argparse.Namespace(**{**base, **kw})


def test_the_job_ships_the_package_alone_and_the_resolved_config(tmp_path):
    cfg_file = tmp_path / "elsewhere.yaml"  # a config outside the package: folded into the job's own copy
    cfg_file.write_text("model: {latent_dim: 3}\ntrain: {epochs: 2}\n")
    a = args(config=str(cfg_file), overrides=["data.path=s3://b/mnist", "train.seed=7"])
    folder = job_folder(a)
    assert os.listdir(folder) == [JOB_CONFIG]
    cfg = yaml.safe_load(open(os.path.join(folder, JOB_CONFIG)))
    assert cfg["model"]["latent_dim"] == 3 and cfg["train"]["epochs"] == 2 and cfg["train"]["seed"] == 7
    env = runtime_env(False, folder)
    assert env["working_dir"] == folder and env["py_modules"] == [PACKAGE_DIR]
    assert os.path.basename(PACKAGE_DIR) == "aae_dist" and os.path.exists(os.path.join(PACKAGE_DIR, "cli.py"))
    shipped = [os.path.join(r, f) for r, _, fs in os.walk(PACKAGE_DIR) for f in fs if "__pycache__" not in r]
    assert all(p.endswith((".py", ".typed")) for p in shipped), shipped  # source files only: no site-packages, data or runs
    assert sum(os.path.getsize(p) for p in shipped) < 1_000_000
    entry = train_entrypoint(a)
    assert f"--config {JOB_CONFIG}" in entry and "--set" not in entry and "elsewhere.yaml" not in entry
    assert entry.endswith("--address auto") and "--workers 2" in entry


def test_a_sweep_job_runs_the_sweep_on_its_cluster_with_the_folded_config(tmp_path):
    a = args(command_to_run="sweep", workers=None, overrides=["data.path=s3://b/mnist", "train.max_steps=50"],
             extra=["--grid", "phases.reconstruction.lr=1e-3,1e-4", "--workers-per-trial", "2"])
    folder = job_folder(a)
    assert yaml.safe_load(open(os.path.join(folder, JOB_CONFIG)))["train"]["max_steps"] == 50
    entry = train_entrypoint(a)
    assert entry.startswith("python -m aae_dist.cli sweep --config config.yaml --storage s3://b/runs --name r --grid")
    assert "--workers-per-trial 2" in entry and entry.endswith("--address auto") and " --workers 2" not in entry


def test_a_local_data_path_is_refused_with_a_hint(tmp_path):
    with pytest.raises(UserError, match="local path the cluster's workers cannot read: shard the data"):
        job_folder(args(overrides=[f"data.path={tmp_path}/mnist"]))


def dry_run_plan(py: str, address: str, cwd) -> tuple[str, float, str]:
    """(py_modules folder, its size in kB, the whole plan) that `submit --dry-run` prints from interpreter `py`."""
    import subprocess

    r = subprocess.run([py, "-m", "aae_dist.cli", "submit", "--address", address, "--dry-run", "--workers", "2",
                        "--set", "data.path=s3://bucket/mnist"], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("py_modules:"))
    return line.split("py_modules:")[1].split(" (")[0].strip(), float(line.rsplit(",", 1)[1].split("kB")[0]), r.stdout


def test_submit_dry_run_from_a_non_editable_install_ships_no_site_packages(regular_install, tmp_path):
    """`pip install .` (not editable) into a fresh virtual environment, then `aae-dist submit --dry-run`
    from it: the package that would travel is that install's aae_dist folder alone, a few hundred kB."""
    import socket

    py, site, where = regular_install
    with socket.socket() as srv:  # something listening where the job API would be (the dry run only checks it answers)
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        module, kb, out = dry_run_plan(py, f"http://127.0.0.1:{srv.getsockname()[1]}", tmp_path)
    assert module == os.path.dirname(where) and module.startswith(site)
    assert kb < 1000  # the package alone; site-packages with torch would be gigabytes
    assert "working_dir:" in out and f": {JOB_CONFIG}" in out and "nothing was submitted" in out
