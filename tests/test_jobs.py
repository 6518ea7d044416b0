"""Every experiment config in jobs/ loads, passes the pre-flight checks on the embedded data, and trains a step."""

from __future__ import annotations

import glob
import os

import pytest

from aae_dist.config import load_config
from aae_dist.launch import preflight
from aae_dist.training.trainer import train_in_process

HERE = os.path.join(os.path.dirname(__file__), "..", "jobs")
JOBS = sorted(glob.glob(os.path.join(HERE, "*.yaml")) + glob.glob(os.path.join(HERE, "cpu", "*.yaml")))
PAPER = ["mnist_aae", "mnist_mixture2d", "mnist_supervised", "mnist_semisupervised_100", "mnist_clustering_16", "mnist_dimreduction_2d"]


def test_all_paper_experiments_have_a_config_at_both_scales():
    for folder in (HERE, os.path.join(HERE, "cpu")):
        names = {os.path.basename(p)[:-5] for p in glob.glob(os.path.join(folder, "*.yaml"))}
        assert set(PAPER) <= names, folder


@pytest.mark.parametrize("path", JOBS, ids=lambda p: os.path.relpath(p, HERE))
def test_job_config_trains_on_embedded_data(path, digits_url, tmp_path):
    cfg = load_config(path, [f"data.path={digits_url}", "train.max_steps=2", "train.parzen_samples=100", "train.progress=false",
                             "model.hidden=[32]", "model.disc_hidden=[32]"])
    preflight(cfg)
    s = train_in_process(cfg, str(tmp_path / "r"))
    assert s["steps"] == 2 and s["metrics"]["recon_loss"] > 0


def test_paper_scale_clustering_carries_the_cpu_recipe():
    """jobs/mnist_clustering_16.yaml is the measured CPU recipe at the paper's network size and data: everything but
    the networks' widths, the checkpoint interval and the data size stays the same, so a change to the recipe
    that is not made in both files fails here."""
    paper = load_config(os.path.join(HERE, "mnist_clustering_16.yaml")).model_dump()
    cpu = load_config(os.path.join(HERE, "cpu", "mnist_clustering_16.yaml")).model_dump()
    assert paper["model"]["hidden"] == paper["model"]["disc_hidden"] == [3000, 3000]
    for c in (paper, cpu):
        del c["model"]["hidden"], c["model"]["disc_hidden"], c["train"]["checkpoint_every"]
    assert paper == cpu
