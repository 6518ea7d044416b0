"""Seams of issue 22: a checkpoint written before the refactor resumes after it, bit for bit; loss terms,
priors and callbacks are added in one place; skip policies attach to the phase that carries them."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from aae_dist.cli import main
from conftest import ident_arrays, read_summary

LEGACY = os.path.join(os.path.dirname(__file__), "data", "legacy_run")


def legacy_dataset(root) -> str:
    """The dataset tests/data/legacy_run was trained on (written the same way: the writer is deterministic)."""
    from aae_dist.data.writer import write_dataset

    x, y = ident_arrays(300)
    url = str(root / "ds")
    write_dataset(url, {"train": (x[:240], y[:240]), "test": (x[240:], y[240:])}, num_classes=10, source="test",
                  shard_size=128, progress=False)
    return url


@pytest.mark.parametrize("case", ["basic", "semi"])
def test_checkpoint_from_before_the_refactor_resumes_exactly(tmp_path, case):
    expected = json.load(open(os.path.join(LEGACY, "expected.json")))[case]
    data = legacy_dataset(tmp_path)
    shutil.copytree(os.path.join(LEGACY, case), tmp_path / "runs" / "old")
    argv = ["train", "--workers", "0", "--storage", str(tmp_path / "runs"), "--name", "old", "--resume",
            "--set", f"data.path={data}", "--set", f"train.max_steps={expected['whole_steps']}"]
    for s in expected["sets"]:
        argv += ["--set", s]
    # one thread, as the recording had: the semi-supervised run's rounding depends on the thread count, which would
    # otherwise be whatever an earlier test in this process left
    argv += ["--set", "train.threads=1"]
    assert main(argv) == 0
    s = read_summary(tmp_path / "runs" / "old")
    assert s["resumed_from_step"] == 3 and s["steps"] == expected["whole_steps"]
    # bit for bit what the old code made of this checkpoint, recorded per CPU kernel family (ATen and oneDNN pick their
    # kernels by it, and the float32 rounding with them): on AVX-512 the old code's uninterrupted run, on AVX2 the old
    # code (a1d0d0c) resuming this same checkpoint, one thread
    cpu = torch.backends.cpu.get_cpu_capability()
    if cpu not in expected["fingerprints_on"]:
        pytest.skip(f"no fingerprints recorded for CPU capability {cpu} (recorded: {', '.join(expected['fingerprints_on'])}); "
                    "test_a_checkpoint_from_before_the_refactor_is_read_whole checks the restore itself")
    assert s["replica_fingerprints"] == expected["fingerprints_on"][cpu]


@pytest.mark.parametrize("case", ["basic", "semi"])
def test_a_checkpoint_from_before_the_refactor_is_read_whole(tmp_path, case):
    """On any CPU: every tensor of the old checkpoint (weights, optimizer moments and steps, schedulers, the
    coordinator's counters) is, after the restore, exactly the state the trainer resumes from."""
    from aae_dist.config import load_config
    from aae_dist.training.session import LocalSession
    from aae_dist.training.trainer import Trainer

    expected = json.load(open(os.path.join(LEGACY, "expected.json")))[case]
    data = legacy_dataset(tmp_path)
    shutil.copytree(os.path.join(LEGACY, case), tmp_path / "old")
    cfg = load_config(None, expected["sets"] + [f"data.path={data}", f"train.max_steps={expected['whole_steps']}"])
    trainer = Trainer(cfg, LocalSession(str(tmp_path / "old"), cfg.train.keep_checkpoints))
    assert trainer.resumed_from == 3
    saved = dict(_leaves(torch.load(os.path.join(LEGACY, case, "checkpoint_step_000000003", "state.pt"), weights_only=True)))
    restored = dict(_leaves(trainer.checkpointer.state()))
    tensors = [k for k, v in saved.items() if torch.is_tensor(v)]
    assert len(tensors) > 50 and any("/optimizers/" in k and k.endswith("exp_avg_sq") for k in tensors)
    # the old statistics buffer has no slot names, and is empty (written right after a reduction): it restores as zeros
    assert not saved.pop("/coordinator/buffer").any() and not restored["/coordinator/buffer"].any()
    for key, value in saved.items():
        assert key in restored, key
        if torch.is_tensor(value):
            assert torch.equal(restored[key].cpu(), value), key
        else:
            assert restored[key] == value, key


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


PLUGIN = '''
import torch
from aae_dist.models.priors import Prior, prior
from aae_dist.training.terms import term

CALLS = {"term": 0, "prior": 0}


@term("reconstruction", weight="code_l2", stats=("code_norm",))
def code_l2(ctx, b, s):
    """A new loss term: the codes' mean squared norm (the weight is phases.reconstruction.terms.code_l2)."""
    CALLS["term"] += 1
    z = ctx.wrapped["encoder"](b.x, generator=ctx.generator).z
    norm = z.pow(2).sum(1).mean()
    return norm, {"code_norm": norm.detach()}


@prior("laplace", params=("b",))
class Laplace(Prior):
    """A new prior: i.i.d. Laplace(0, b), b from prior.options.b."""
    defaults = {"b": 1.0}

    @classmethod
    def check(cls, params, dim):
        from aae_dist.errors import UserError
        if params.b <= 0:
            raise UserError(f"prior.options.b must be above 0, got {params.b}")

    def sample(self, n, generator, device, labels=None):
        CALLS["prior"] += 1
        u = torch.rand(n, self.dim, generator=generator, device=device) - 0.5
        return -self.cfg.b * torch.sign(u) * torch.log1p(-2 * u.abs())
'''


def plugin(tmp_path, monkeypatch, name):
    """A module of the test's own, importable by name (as train.imports needs)."""
    (tmp_path / f"{name}.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def train_argv(tmp_path, data, name, *sets):
    argv = ["train", "--workers", "0", "--storage", str(tmp_path / "runs"), "--name", name, "--set", f"data.path={data}"]
    for s in ["model.hidden=[16,16]", "model.disc_hidden=[16,16]", "data.batch_size=20", "train.sync_every=2",
              "train.parzen_samples=0", "train.progress=false", "train.max_steps=6", *sets]:
        argv += ["--set", s]
    return argv


def test_a_loss_term_and_a_prior_added_in_one_module_train(tmp_path, monkeypatch):
    """A module registers a term and a prior; train.imports names it; the run trains with both and the
    term's statistic reaches TensorBoard with no other change."""
    import importlib

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mod = plugin(tmp_path, monkeypatch, "seams_plugin_a")
    data = legacy_dataset(tmp_path)
    argv = train_argv(tmp_path, data, "p", f"train.imports=[{mod}]", "phases.reconstruction.terms.code_l2=0.1",
                      "prior.kind=laplace", "prior.options.b=0.5")
    assert main(argv) == 0
    calls = importlib.import_module(mod).CALLS
    assert calls["term"] >= 6 and calls["prior"] >= 6  # every step's reconstruction and discriminator used them
    s = read_summary(tmp_path / "runs" / "p")
    assert s["steps"] == 6 and s["config"]["prior"]["kind"] == "laplace"
    ea = EventAccumulator(str(tmp_path / "runs" / "p" / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert "reconstruction/code_norm" in ea.Tags()["scalars"]


def test_a_plugin_term_or_prior_badly_named_is_one_line(tmp_path, monkeypatch, capsys):
    mod = plugin(tmp_path, monkeypatch, "seams_plugin_b")
    data = legacy_dataset(tmp_path)
    cases = [(["phases.reconstruction.terms.code_l3=0.1"], "phases.reconstruction.terms.code_l3"),
             (["prior.kind=laplace", "prior.options.b=-1"], "prior.options.b must be above 0"),
             (["prior.kind=laplas"], "'laplas' is not a prior")]
    for sets, said in cases:
        assert main(train_argv(tmp_path, data, "bad", f"train.imports=[{mod}]", *sets)) == 2
        err = capsys.readouterr().err
        assert err.startswith("aae-dist: error:") and err.count("\n") == 1 and said in err, err
        assert not (tmp_path / "runs" / "bad" / "summary.json").exists()


def test_skip_above_accuracy_works_on_discriminator_cat():
    """phases.discriminator_cat.skip_above_accuracy is attached to that phase (it used to be accepted and ignored)."""
    import torch

    from aae_dist.config import load_config
    from aae_dist.training.coordinator import Coordinator
    from aae_dist.training.phases import build_phases

    cfg = load_config(None, ["model.variant=clustering", "phases.discriminator_cat.skip_above_accuracy=0.9", "train.sync_every=2"])
    phases = build_phases(cfg.phases, cfg.model)
    c = Coordinator(cfg.train, phases, 10, torch.device("cpu"))
    cat = next(ph for ph in phases if ph.name == "discriminator_cat")
    for _ in range(2):
        c.record(cat, {"loss": torch.tensor(0.1), "acc_prior": torch.tensor(0.97), "acc_codes": torch.tensor(0.95)})
        c.end_step()
    assert [p.name for p in c.phases_now()] == ["reconstruction", "discriminator", "generator"]
    assert c.skip == {"discriminator_cat": True}


def test_callbacks_in_process_and_from_the_config(tmp_path, monkeypatch):
    """Trainer callbacks: given in-process, and named by train.callbacks (how Ray workers get them)."""
    from aae_dist.config import load_config
    from aae_dist.training.trainer import train_in_process

    (tmp_path / "seams_hooks.py").write_text("EVENTS = []\n\ndef record(event, **info):\n    EVENTS.append((event, info))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import seams_hooks

    seen = []
    data = legacy_dataset(tmp_path)
    cfg = load_config(None, [f"data.path={data}", "model.hidden=[16,16]", "model.disc_hidden=[16,16]", "data.batch_size=20",
                             "train.parzen_samples=0", "train.progress=false", "train.max_steps=4", "train.checkpoint_every=2",
                             "run.name=hooked", "train.callbacks=[seams_hooks:record]"])
    train_in_process(cfg, str(tmp_path / "runs" / "hooked"), callbacks=[lambda event, **info: seen.append((event, info))])
    assert [i["step"] for e, i in seen if e == "step"] == [1, 2, 3, 4]
    assert [(i["step"], i["run_name"]) for e, i in seen if e == "checkpoint_written"] == [(2, "hooked"), (4, "hooked")]
    assert seams_hooks.EVENTS == seen  # the configured callback saw the same events


def test_product_holds_no_test_scaffolding():
    import importlib.util

    assert importlib.util.find_spec("aae_dist.training.faults") is None
    assert importlib.util.find_spec("aae_dist.training.multiprocess") is None
