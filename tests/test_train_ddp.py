"""Real DDP with 2 local processes (gloo): replicas stay identical, each phase all-reduces only its networks."""

from __future__ import annotations

import pytest

from aae_dist.config import load_config
from multiprocess import run_processes
from conftest import SMALL_MODEL, read_summary


def param_bytes(cfg, shape, names):
    from aae_dist.models import build_networks

    nets = build_networks(cfg.model, shape)
    return sum(p.numel() * 4 for n in names for p in nets[n].parameters())


@pytest.mark.parametrize("posterior", ["deterministic", "gaussian", "universal"])
def test_two_workers_stay_identical_and_reduce_per_phase(tmp_path, make_dataset, posterior):
    data, _, _ = make_dataset(1000, 100)
    cfg = load_config(None, SMALL_MODEL + [f"data.path={data}", "train.max_steps=12", "train.checkpoint_every=6",
                                           f"model.posterior={posterior}", "phases.discriminator.repeat=2"])
    run = tmp_path / "run"
    run_processes(cfg, str(run), world=2)
    s = read_summary(run)
    assert s["world_size"] == 2 and s["steps"] == 12
    assert len(s["replica_fingerprints"]) == 2 and s["replicas_in_sync"] is True
    comm = s["communication_per_step"]
    shape = (1, 4, 4)
    assert comm["reconstruction"]["networks"] == ["decoder", "encoder"]
    assert comm["reconstruction"]["bytes"] == param_bytes(cfg, shape, ["encoder", "decoder"])
    assert comm["discriminator"]["networks"] == ["discriminator"]
    assert comm["discriminator"]["bytes"] == 2 * param_bytes(cfg, shape, ["discriminator"])  # repeat=2
    assert comm["generator"]["networks"] == ["encoder"]  # D's gradients are never computed nor reduced
    assert comm["generator"]["bytes"] == param_bytes(cfg, shape, ["encoder"])


def test_two_workers_exact_resume(tmp_path, make_dataset):
    data, _, _ = make_dataset(1000, 100)
    base = SMALL_MODEL + [f"data.path={data}", "train.checkpoint_every=7", "model.posterior=gaussian"]
    run_processes(load_config(None, base + ["train.max_steps=20"]), str(tmp_path / "whole"), world=2)
    run_processes(load_config(None, base + ["train.max_steps=7"]), str(tmp_path / "split"), world=2)
    run_processes(load_config(None, base + ["train.max_steps=20"]), str(tmp_path / "split"), world=2)
    whole, split = read_summary(tmp_path / "whole"), read_summary(tmp_path / "split")
    assert split["resumed_from_step"] == 7
    assert split["replica_fingerprints"] == whole["replica_fingerprints"]


def test_bf16_gradient_compression_halves_the_bytes(tmp_path, make_dataset):
    data, _, _ = make_dataset(1000, 100)
    base = SMALL_MODEL + [f"data.path={data}", "train.max_steps=6", "train.checkpoint_every=6"]
    run_processes(load_config(None, base + ["train.grad_compression=bf16"]), str(tmp_path / "c"), world=2)
    s = read_summary(tmp_path / "c")
    cfg = load_config(None, base)
    assert s["replicas_in_sync"]
    assert s["communication_per_step"]["generator"]["bytes"] == param_bytes(cfg, (1, 4, 4), ["encoder"]) // 2


def test_resume_on_a_different_world_size_repartitions_the_epoch(tmp_path, make_dataset):
    """Elastic resize, twice in one epoch: 2 workers use 600 samples, 1 worker 150 more, 2 workers finish
    the epoch on what is left (250: 2 batches of 50 each; 50 samples too few for another step on both).
    Each group's stage is recorded in the checkpoint; which samples each stage used is tested in
    test_data_reader.py::test_elastic_resize_mid_epoch_uses_every_sample_at_most_once."""
    from aae_dist.checkpoint import latest_in_run, read_local

    data, _, _ = make_dataset(1000, 100)
    base = SMALL_MODEL + [f"data.path={data}", "train.checkpoint_every=3", "train.epochs=1"]
    run = str(tmp_path / "e")
    run_processes(load_config(None, base + ["train.max_steps=6"]), run, world=2)  # 6 x 2 x 50 = 600 samples
    assert read_summary(run)["epochs"] == 0.6
    run_processes(load_config(None, base + ["train.max_steps=9"]), run, world=1)  # 3 x 50 = 150 more
    state, _ = read_local(latest_in_run(run))
    assert state["coordinator"]["stages"] == [[2, 6]] and state["coordinator"]["batch"] == 3
    assert read_summary(run)["epochs"] == 0.75
    run_processes(load_config(None, base), run, world=2)
    s = read_summary(run)
    assert s["resumed_from_step"] == 9 and s["steps"] == 11 and s["epochs"] == 1.0 and s["world_size"] == 2


def test_the_papers_recipe_options_on_two_workers(tmp_path, make_dataset):
    """SGD with momentum and lr steps, input noise and dropout, batch norm in the encoder (y and z
    outputs included), widths per network, a small init, the shift/rotation/shear/thickness-consistency and the adversarial-consistency (VAT) terms on y: trains on
    2 DDP workers, replicas identical
    (batch-norm running statistics included), and exact resume still holds."""
    data, _, _ = make_dataset(1000, 100)
    recipe = SMALL_MODEL + [f"data.path={data}", "train.checkpoint_every=5", "model.variant=semi_supervised",
                            "data.labeled_per_class=3", "model.batch_norm=true", "model.input_noise=0.3", "model.input_dropout=0.2",
                            "model.encoder_hidden=[24,12]", "model.decoder_hidden=[20]", "model.init_std=0.01",
                            "phases.reconstruction.optimizer=sgd", "phases.reconstruction.lr=0.01",
                            "phases.reconstruction.decay_epochs=[1]", "phases.generator.optimizer=sgd", "phases.generator.lr=0.1",
                            "phases.generator.momentum=0.1", "phases.classification.optimizer=sgd", "phases.classification.lr=0.1",
                            "phases.reconstruction.consistency=1", "phases.reconstruction.consistency_rotate=10",
                            "phases.reconstruction.consistency_scale=0.1", "phases.reconstruction.consistency_shear=15",
                            "phases.reconstruction.consistency_thickness=0.5", "phases.reconstruction.vat=1",
                            "phases.reconstruction.consistency_target=clean"]
    run_processes(load_config(None, recipe + ["train.max_steps=14"]), str(tmp_path / "whole"), world=2)
    whole = read_summary(tmp_path / "whole")
    assert whole["steps"] == 14 and whole["replicas_in_sync"] and whole["metrics"]["recon_loss"] > 0
    run_processes(load_config(None, recipe + ["train.max_steps=5"]), str(tmp_path / "split"), world=2)
    run_processes(load_config(None, recipe + ["train.max_steps=14"]), str(tmp_path / "split"), world=2)
    assert read_summary(tmp_path / "split")["replica_fingerprints"] == whole["replica_fingerprints"]



def test_gradient_accumulation_reduces_once_per_step_and_resumes_exactly(tmp_path, make_dataset):
    """train.accumulate=2 on 2 workers: each step takes two micro-batches of 25 per worker and all-reduces
    once (as many all-reduce calls per step as without accumulation: half as many per sample); the epoch
    has half the steps; replicas stay identical; a run split at a checkpoint ends bitwise like a whole one."""
    data, _, _ = make_dataset(1000, 100)
    base = SMALL_MODEL + [f"data.path={data}", "data.batch_size=25", "train.checkpoint_every=6"]
    run_processes(load_config(None, base + ["train.max_steps=12"]), str(tmp_path / "plain"), world=2)
    run_processes(load_config(None, base + ["train.max_steps=12", "train.accumulate=2"]), str(tmp_path / "acc"), world=2)
    plain, acc = read_summary(tmp_path / "plain"), read_summary(tmp_path / "acc")
    assert acc["steps"] == 12 and acc["replicas_in_sync"]
    assert plain["epochs"] == 12 / 20 and acc["epochs"] == 12 / 10  # 500 samples per worker: 20 batches, 10 steps of 2
    for phase in ("reconstruction", "discriminator", "generator"):
        assert acc["communication_per_step"][phase]["allreduce_calls"] == plain["communication_per_step"][phase]["allreduce_calls"]
        assert acc["communication_per_step"][phase]["bytes"] == plain["communication_per_step"][phase]["bytes"]
    run_processes(load_config(None, base + ["train.max_steps=6", "train.accumulate=2"]), str(tmp_path / "split"), world=2)
    run_processes(load_config(None, base + ["train.max_steps=12", "train.accumulate=2"]), str(tmp_path / "split"), world=2)
    assert read_summary(tmp_path / "split")["replica_fingerprints"] == acc["replica_fingerprints"]


def test_compression_per_network(tmp_path, make_dataset):
    """fp16 for the encoder and decoder, D uncompressed: replicas stay identical, each phase sends what its
    networks' methods send, and the loss stays where the uncompressed run's is."""
    data, _, _ = make_dataset(1000, 100)
    base = SMALL_MODEL + [f"data.path={data}", "train.max_steps=12", "train.checkpoint_every=6"]
    cfg = load_config(None, base + ["train.grad_compression={encoder: fp16, decoder: fp16}"])
    run_processes(cfg, str(tmp_path / "c"), world=2)
    s = read_summary(tmp_path / "c")
    assert s["replicas_in_sync"] and s["steps"] == 12
    comm = s["communication_per_step"]
    full = param_bytes(cfg, (1, 4, 4), ["encoder", "decoder"])
    assert comm["reconstruction"]["bytes"] == full // 2 and comm["generator"]["bytes"] == param_bytes(cfg, (1, 4, 4), ["encoder"]) // 2
    assert comm["discriminator"]["bytes"] == param_bytes(cfg, (1, 4, 4), ["discriminator"])  # not listed: uncompressed
    run_processes(load_config(None, base), str(tmp_path / "plain"), world=2)
    plain = read_summary(tmp_path / "plain")
    assert abs(s["metrics"]["recon_loss"] / plain["metrics"]["recon_loss"] - 1) < 0.05  # quality kept on this short run


def test_powersgd_per_network(tmp_path, make_dataset):
    """PowerSGD on the encoder and decoder (two networks reduced in one phase), fp16 on D: replicas stay
    identical, the reconstruction phase sends the low-rank factors (far fewer bytes), D's phase half."""
    data, _, _ = make_dataset(1000, 100)
    base = SMALL_MODEL + [f"data.path={data}", "train.max_steps=12", "train.checkpoint_every=6"]
    cfg = load_config(None, base + ["train.grad_compression={encoder: powersgd, decoder: powersgd, discriminator: fp16}",
                                    "train.powersgd_rank=2"])
    run_processes(cfg, str(tmp_path / "p"), world=2)
    s = read_summary(tmp_path / "p")
    assert s["replicas_in_sync"] and s["steps"] == 12
    comm = s["communication_per_step"]
    full = param_bytes(cfg, (1, 4, 4), ["encoder", "decoder"])
    assert comm["reconstruction"]["bytes"] < full / 3, (comm, full)  # low rank after the first step
    assert comm["discriminator"]["bytes"] == param_bytes(cfg, (1, 4, 4), ["discriminator"]) // 2
    run_processes(load_config(None, base), str(tmp_path / "plain"), world=2)
    plain = read_summary(tmp_path / "plain")
    assert abs(s["metrics"]["recon_loss"] / plain["metrics"]["recon_loss"] - 1) < 0.1, (s["metrics"], plain["metrics"])


def test_local_sgd_averages_every_h_steps_and_resumes_exactly(tmp_path, make_dataset):
    """train.average_every=4 on 2 workers: no gradient is all-reduced, the parameters are averaged every 4
    steps and at checkpoints (far fewer bytes than DDP's per step), the replicas end identical, a run split
    at a checkpoint ends bitwise like a whole one (the optimizers' state is averaged there too), and the
    loss stays near the DDP run's."""
    data, _, _ = make_dataset(1000, 100)
    base = SMALL_MODEL + [f"data.path={data}", "data.batch_size=25", "train.checkpoint_every=6"]
    cfg = load_config(None, base + ["train.max_steps=12", "train.average_every=4"])
    run_processes(cfg, str(tmp_path / "local"), world=2)
    s = read_summary(tmp_path / "local")
    assert s["steps"] == 12 and s["replicas_in_sync"]
    comm = s["communication_per_step"]
    assert set(comm) == {"parameter_average"}, comm  # no phase all-reduces gradients
    params = param_bytes(cfg, (1, 4, 4), ["encoder", "decoder", "discriminator"])
    # averages at steps 4, 6, 8 and 12 (6 and 12 are checkpoints: optimizer state too, two more calls)
    assert comm["parameter_average"]["allreduce_calls"] == 6 / 12
    assert 4 * params / 12 < comm["parameter_average"]["bytes"] < params, (comm, params)
    run_processes(load_config(None, base + ["train.max_steps=6", "train.average_every=4"]), str(tmp_path / "split"), world=2)
    run_processes(load_config(None, base + ["train.max_steps=12", "train.average_every=4"]), str(tmp_path / "split"), world=2)
    assert read_summary(tmp_path / "split")["replica_fingerprints"] == s["replica_fingerprints"]
    run_processes(load_config(None, base + ["train.max_steps=12"]), str(tmp_path / "ddp"), world=2)
    ddp = read_summary(tmp_path / "ddp")
    assert abs(s["metrics"]["recon_loss"] / ddp["metrics"]["recon_loss"] - 1) < 0.1, (s["metrics"], ddp["metrics"])
