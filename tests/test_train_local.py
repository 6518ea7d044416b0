"""In-process training runs end to end: summary.json, checkpoints, TensorBoard, resume."""

from __future__ import annotations


import pytest

from aae_dist.cli import main
from conftest import SMALL_MODEL, read_summary


def train(tmp_path, data, *extra, name="r"):
    argv = ["train", "--workers", "0", "--storage", str(tmp_path / "runs"), "--name", name, "--set", f"data.path={data}"]
    for s in SMALL_MODEL + list(extra):
        argv += ["--set", s]
    return main(argv)


def test_one_worker_run_to_completion_with_tensorboard(tmp_path, digits_url):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train(tmp_path, digits_url, "train.epochs=2", "train.checkpoint_every=40", "train.image_every=40") == 0
    run = tmp_path / "runs" / "r"
    s = read_summary(run)
    assert s["steps"] == 2 * (4500 // 50) and s["epochs"] == 2.0
    assert s["samples_per_s"] > 0 and s["wall_s"] >= s["train_s"] > 0
    assert 0 < s["metrics"]["recon_loss"] < 0.3  # BCE per pixel; an untrained decoder gives ~0.69
    assert s["config"]["data"]["path"] == digits_url and s["config"]["train"]["epochs"] == 2
    ckpts = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_"))
    assert ckpts == ["checkpoint_step_000000120", "checkpoint_step_000000160", "checkpoint_step_000000180"]
    assert (run / "config.json").exists()

    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    for tag in ["loss/reconstruction", "loss/discriminator", "loss/generator", "discriminator/acc_prior", "discriminator/acc_codes",
                "lr/reconstruction", "lr/discriminator", "lr/generator", "perf/samples_per_s", "time/generator_ms_per_step",
                "final/recon_loss"]:
        assert tag in tags["scalars"], tag
    for tag in ["images/inputs_and_reconstructions", "images/prior_samples", "figures/codes"]:
        assert tag in tags["images"], tag
    codes = ea.Images("figures/codes")[-1]  # matplotlib: codes beside prior samples, with a colour bar
    assert codes.width > 1.5 * codes.height > 300
    assert "codes/z" in tags["histograms"]
    recon = [e.value for e in ea.Scalars("loss/reconstruction")]
    assert recon[-1] < recon[0]  # it learns
    assert [e.step for e in ea.Scalars("loss/reconstruction")][-1] == 180
    assert ea.Scalars("final/recon_loss")[-1].value == pytest.approx(s["metrics"]["recon_loss"], rel=1e-6)
    assert all(0 <= e.value <= 1 for e in ea.Scalars("discriminator/acc_prior"))
    assert ea.Scalars("lr/generator")[0].value == pytest.approx(2e-4)
    img = ea.Images("images/inputs_and_reconstructions")[-1]
    assert (img.width, img.height) == (16 * 29 - 1, 4 * 29 - 1)  # 32 pairs, 16 per row, 28 px + gaps


def test_resume_continues_exactly(tmp_path, make_dataset):
    data, _, _ = make_dataset(1000, 128)
    # 20 steps per epoch: the split at step 15 is mid-epoch
    common = ["train.checkpoint_every=5", "train.sync_every=5", "phases.discriminator.skip_above_accuracy=0.8", "model.posterior=gaussian"]
    assert train(tmp_path, data, "train.max_steps=40", *common, name="whole") == 0
    whole = read_summary(tmp_path / "runs" / "whole")
    assert train(tmp_path, data, "train.max_steps=15", *common, name="split") == 0
    assert train(tmp_path, data, "train.max_steps=15", *common, name="split") == 2  # exists, no --resume
    argv = ["train", "--workers", "0", "--storage", str(tmp_path / "runs"), "--name", "split", "--resume", "--set", f"data.path={data}"]
    for s in SMALL_MODEL + ["train.max_steps=40"] + common:
        argv += ["--set", s]
    assert main(argv) == 0
    split = read_summary(tmp_path / "runs" / "split")
    assert split["resumed_from_step"] == 15 and split["steps"] == 40
    assert split["replica_fingerprints"] == whole["replica_fingerprints"]  # same parameters, bit for bit


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path, make_dataset, monkeypatch):
    from aae_dist.training import trainer as worker

    data, _, _ = make_dataset(1000, 128)
    common = ["train.checkpoint_every=7", "train.max_steps=30"]
    assert train(tmp_path, data, *common, name="whole") == 0
    real = worker.Trainer.train_step

    def dying(self, batches):
        if self.coord.step == 25:
            raise KeyboardInterrupt  # killed mid-run between checkpoints
        return real(self, batches)

    monkeypatch.setattr(worker.Trainer, "train_step", dying)
    assert train(tmp_path, data, *common, name="cut") == 130
    monkeypatch.setattr(worker.Trainer, "train_step", real)
    argv = ["train", "--workers", "0", "--storage", str(tmp_path / "runs"), "--name", "cut", "--resume", "--set", f"data.path={data}"]
    for s in SMALL_MODEL + common:
        argv += ["--set", s]
    assert main(argv) == 0
    cut, whole = read_summary(tmp_path / "runs" / "cut"), read_summary(tmp_path / "runs" / "whole")
    assert cut["resumed_from_step"] == 21
    assert cut["replica_fingerprints"] == whole["replica_fingerprints"]


def test_resume_of_missing_run(tmp_path, capsys):
    assert main(["train", "--workers", "0", "--storage", str(tmp_path), "--name", "ghost", "--resume"]) == 2
    assert "no run named 'ghost'" in capsys.readouterr().err


def test_checkpoint_from_other_architecture_is_refused(tmp_path, make_dataset, capsys):
    data, _, _ = make_dataset(500, 128)
    assert train(tmp_path, data, "train.max_steps=5", name="a") == 0
    capsys.readouterr()
    argv = ["train", "--workers", "0", "--storage", str(tmp_path / "runs"), "--name", "a", "--resume", "--set", f"data.path={data}"]
    for s in SMALL_MODEL + ["model.latent_dim=4", "train.max_steps=10"]:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "different architecture" in err and "model.latent_dim: checkpoint 8, config 4" in err


def test_phase_weight_zero_freezes_what_only_that_phase_trains(tmp_path, make_dataset):
    """phases.*.weight scales a phase's loss: weight 0 on the discriminator leaves D at its initial weights."""
    import torch

    from aae_dist.config import load_config
    from aae_dist.training.session import LocalSession
    from aae_dist.training.trainer import Trainer

    data, _, _ = make_dataset(500, 100)
    cfg = load_config(None, SMALL_MODEL + [f"data.path={data}", "train.max_steps=3", "phases.discriminator.weight=0", "train.progress=false"])
    t = Trainer(cfg, LocalSession(str(tmp_path / "w"), 1))
    before = [p.detach().clone() for p in t.aae.nets["discriminator"].parameters()]
    enc_before = [p.detach().clone() for p in t.aae.nets["encoder"].parameters()]
    for x, y in t.train_data.iter_epoch(0):
        t.train_step([(t.aae.normalise(x), y)])
        if t.coord.step == 3:
            break
    assert all(torch.equal(a, b) for a, b in zip(before, t.aae.nets["discriminator"].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(enc_before, t.aae.nets["encoder"].parameters()))


def test_bf16_autocast_is_a_gpu_only_flag(tmp_path, make_dataset):
    from aae_dist.config import load_config
    from aae_dist.training.session import LocalSession
    from aae_dist.training.trainer import Trainer

    data, _, _ = make_dataset(300, 100)
    t = Trainer(load_config(None, SMALL_MODEL + [f"data.path={data}", "train.amp=true"]), LocalSession(str(tmp_path / "a"), 1))
    assert t.device.type == "cpu" and t.amp is False  # on CPU the flag is ignored: fp32
    x, y = next(iter(t.train_data.iter_epoch(0)))
    t.train_step([(t.aae.normalise(x), y)])
    assert all(p.dtype == __import__("torch").float32 for p in t.aae.nets["encoder"].parameters())


def test_startup_stages_of_an_in_process_run(tmp_path):
    """Without Ray the stages that exist are timed; marks of an earlier run in the same process are not reused."""
    from aae_dist import timeline

    timeline.mark("worker_started", 1.0)  # stale: from long before this run
    code = main(["train", "--workers", "0", "--storage", str(tmp_path), "--name", "s", *sum((["--set", s] for s in SMALL_MODEL), []),
                     "--set", "train.max_steps=3"])
    assert code == 0
    s = read_summary(tmp_path / "s")
    stages = s["startup_stages_s"]
    assert "Ray start / connect" not in stages and "dataset open (manifest, label subset)" in stages
    assert all(v >= 0 for v in stages.values()) and abs(sum(stages.values()) - s["startup_s"]) < 0.05
