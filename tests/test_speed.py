"""Speed switches that must not change what is trained: fused optimizer kernels, bf16 autocast on the CPU."""

from __future__ import annotations

import pytest
import torch

from aae_dist.cli import main
from aae_dist.config import load_config
from multiprocess import run_processes
from aae_dist.training.session import LocalSession
from aae_dist.training.trainer import Trainer
from conftest import SMALL_MODEL, read_summary
from test_bad_input_matrix import T, tree_digest, world  # noqa: F401  (world: the matrix's module fixture)

SGD_PHASES = ["phases.reconstruction.optimizer=sgd", "phases.reconstruction.lr=0.05", "phases.generator.optimizer=sgd",
              "phases.generator.lr=0.05", "phases.generator.momentum=0.1"]


def trained(tmp_path, data, name, *sets):
    """An in-process run of 12 steps (checkpoint at 6); the Trainer, for its optimizers and weights."""
    cfg = load_config(None, SMALL_MODEL + [f"data.path={data}", "train.max_steps=12", "train.checkpoint_every=6", *sets])
    t = Trainer(cfg, LocalSession(str(tmp_path / name), 1))
    t.fit()
    return t


def weights(t) -> list[torch.Tensor]:
    return [p.detach().clone() for n in sorted(t.aae.nets) for p in t.aae.nets[n].parameters()]


def ddp_whole_split_and_plain(tmp_path, data, sets: list[str]) -> tuple[dict, dict, dict]:
    """Summaries of 2 gloo workers with `sets`: 12 steps whole, 12 split at the step-6 checkpoint; and 12 without them.
    Checks what every such switch must keep: replicas identical, the split run bitwise the whole one."""
    base = SMALL_MODEL + [f"data.path={data}", "train.checkpoint_every=6"]
    run_processes(load_config(None, base + sets + ["train.max_steps=12"]), str(tmp_path / "whole"), world=2)
    run_processes(load_config(None, base + sets + ["train.max_steps=6"]), str(tmp_path / "split"), world=2)
    run_processes(load_config(None, base + sets + ["train.max_steps=12"]), str(tmp_path / "split"), world=2)
    run_processes(load_config(None, base + ["train.max_steps=12"]), str(tmp_path / "plain"), world=2)
    whole, split, plain = (read_summary(tmp_path / n) for n in ("whole", "split", "plain"))
    assert whole["replicas_in_sync"] and split["resumed_from_step"] == 6
    assert split["replica_fingerprints"] == whole["replica_fingerprints"]
    return whole, split, plain


@pytest.mark.parametrize("optim", ["adam", "sgd"])
def test_fused_and_loop_optimizers_train_alike(tmp_path, make_dataset, optim):
    """Fused kernels are the default (the optimizers' flags say which kernel ran) and change only the rounding:
    after 12 steps every weight is within float32 noise of the per-parameter loop's."""
    data, _, _ = make_dataset(1000, 100)
    extra = SGD_PHASES if optim == "sgd" else []
    fused, loop = trained(tmp_path, data, "fused", *extra), trained(tmp_path, data, "loop", *extra, "train.fused=false")
    assert all(g["fused"] for ph in fused.phases for g in ph.optimizer.param_groups)
    assert not any(g["fused"] for ph in loop.phases for g in ph.optimizer.param_groups)
    a, b = weights(fused), weights(loop)
    assert all(torch.allclose(x, y, rtol=1e-3, atol=1e-5) for x, y in zip(a, b))
    losses = [read_summary(tmp_path / n)["metrics"]["recon_loss"] for n in ("fused", "loop")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def counted_run(tmp_path, data, name, *sets) -> tuple[Trainer, int]:
    """An in-process run of 12 steps, and how many training-mode forwards its encoder ran."""
    cfg = load_config(None, SMALL_MODEL + [f"data.path={data}", "train.max_steps=12", "train.checkpoint_every=6", *sets])
    t = Trainer(cfg, LocalSession(str(tmp_path / name), 1))
    calls = []
    t.aae.nets["encoder"].register_forward_hook(lambda m, i, o: calls.append(1) if m.training else None)
    t.fit()
    return t, len(calls)


@pytest.mark.parametrize("variant, forwards_per_step", [("basic", (3, 2)), ("clustering", (4, 2)), ("label_regularized", (3, 2))])
def test_shared_codes_train_bit_for_bit_like_a_forward_per_phase(tmp_path, make_dataset, variant, forwards_per_step):
    """train.share_codes (the default): the discriminators and the generator use one encoder forward of the step's
    batch; the weights after 12 steps (a checkpoint between) are bitwise those of a forward per phase."""
    data, _, _ = make_dataset(1000, 100)
    sets = [f"model.variant={variant}"]
    shared, n_shared = counted_run(tmp_path, data, "shared", *sets)
    separate, n_separate = counted_run(tmp_path, data, "separate", *sets, "train.share_codes=false")
    assert shared.shares_codes and not separate.shares_codes
    assert (n_separate, n_shared) == (12 * forwards_per_step[0], 12 * forwards_per_step[1])
    assert all(torch.equal(x, y) for x, y in zip(weights(shared), weights(separate)))


@pytest.mark.parametrize("sets", [["model.input_noise=0.1"], ["model.posterior=gaussian"], ["model.batch_norm=true"],
                                  ["train.accumulate=2"], ["model.regularizer=kl", "model.posterior=gaussian"], ["train.share_codes=off"],
                                  ["train.share_codes=noisy", "train.accumulate=2"],
                                  ["train.share_codes=noisy", "model.encoder.class_path=test_habits.TinyEncoder"]])
def test_codes_are_not_shared_where_a_second_forward_differs_or_ddp_needs_its_own(tmp_path, make_dataset, sets):
    """A random draw, batch-norm statistics or micro-batches (DDP pairs each forward with its backward): no sharing;
    the noisy mode neither with micro-batches nor with a user's own encoder (what it computes is not known)."""
    data, _, _ = make_dataset(300, 100)
    t = Trainer(load_config(None, SMALL_MODEL + [f"data.path={data}", *sets]), LocalSession(str(tmp_path / "r"), 1))
    assert not t.shares_codes


NOISY_ENCODER = ["model.variant=clustering", "model.input_noise=0.3", "model.input_dropout=0.2", "model.batch_norm=true"]


def test_noisy_shared_codes_share_one_draw_of_a_noisy_encoder(tmp_path, make_dataset):
    """train.share_codes=noisy: an encoder with input noise, dropout and batch norm (the shipped clustering
    recipe's) runs once for the discriminators and the generator: 2 training forwards per step instead of 4, and a
    different training than a draw per phase (so the switch really changed something)."""
    data, _, _ = make_dataset(1000, 100)
    noisy, n_noisy = counted_run(tmp_path, data, "noisy", *NOISY_ENCODER, "train.share_codes=noisy")
    exact, n_exact = counted_run(tmp_path, data, "exact", *NOISY_ENCODER)
    assert noisy.shares_codes and not exact.shares_codes
    assert (n_exact, n_noisy) == (12 * 4, 12 * 2)
    assert not all(torch.equal(x, y) for x, y in zip(weights(noisy), weights(exact)))
    assert read_summary(tmp_path / "noisy")["metrics"]["recon_loss"] < 1.0


def test_noisy_shared_codes_on_two_ddp_workers_identical_replicas_and_exact_resume(tmp_path, make_dataset):
    """The noisy mode on 2 gloo workers: replicas identical (batch-norm buffers included), a run split at the
    step-6 checkpoint bitwise the whole one (ddp_whole_split_and_plain checks both)."""
    data, _, _ = make_dataset(1000, 100)
    whole, split, _ = ddp_whole_split_and_plain(tmp_path, data, NOISY_ENCODER + ["train.share_codes=noisy"])
    assert whole["steps"] == split["steps"] == 12


def test_shared_codes_on_two_ddp_workers_are_bitwise_a_forward_per_phase_and_resume_exactly(tmp_path, make_dataset):
    """On 2 gloo workers the generator's backward goes through the discriminator phase's DDP forward: the same
    all-reduced gradients.  A run of 12 steps sharing (the default) ends bitwise like one that ran its first 6
    steps with a forward per phase and resumed at that checkpoint sharing: so both paths give the same weights,
    and resume is exact with sharing on."""
    data, _, _ = make_dataset(1000, 100)
    base = SMALL_MODEL + [f"data.path={data}", "train.checkpoint_every=6", "model.variant=clustering"]
    run_processes(load_config(None, base + ["train.max_steps=12"]), str(tmp_path / "shared"), world=2)
    run_processes(load_config(None, base + ["train.max_steps=6", "train.share_codes=false"]), str(tmp_path / "switched"), world=2)
    run_processes(load_config(None, base + ["train.max_steps=12"]), str(tmp_path / "switched"), world=2)
    shared, switched = read_summary(tmp_path / "shared"), read_summary(tmp_path / "switched")
    assert shared["replicas_in_sync"] and switched["resumed_from_step"] == 6
    assert shared["replica_fingerprints"] == switched["replica_fingerprints"]


def test_a_loop_checkpoint_resumes_into_fused_kernels(tmp_path, make_dataset):
    """A checkpoint written by the per-parameter loop (every run before fused kernels) resumes with the kernels
    the config asks for: load_state_dict would otherwise copy the saved fused=None back in."""
    data, _, _ = make_dataset(1000, 100)
    base = SMALL_MODEL + [f"data.path={data}", "train.checkpoint_every=6"]
    Trainer(load_config(None, base + ["train.max_steps=6", "train.fused=false"]), LocalSession(str(tmp_path / "r"), 1)).fit()
    t = Trainer(load_config(None, base + ["train.max_steps=12"]), LocalSession(str(tmp_path / "r"), 1))
    assert t.resumed_from == 6
    assert all(g["fused"] for ph in t.phases for g in ph.optimizer.param_groups)
    t.fit()
    assert read_summary(tmp_path / "r")["steps"] == 12


def test_fused_in_process_resume_is_exact(tmp_path, make_dataset):
    """Stop at the checkpoint and resume: bitwise the weights of the run that did not stop (fused Adam, both)."""
    data, _, _ = make_dataset(1000, 100)
    whole = trained(tmp_path, data, "whole")
    cfg = lambda n: load_config(None, SMALL_MODEL + [f"data.path={data}", f"train.max_steps={n}", "train.checkpoint_every=6"])  # noqa: E731
    Trainer(cfg(6), LocalSession(str(tmp_path / "split"), 1)).fit()
    split = Trainer(cfg(12), LocalSession(str(tmp_path / "split"), 1))
    split.fit()
    assert split.resumed_from == 6 and all(g["fused"] for ph in split.phases for g in ph.optimizer.param_groups)
    assert all(torch.equal(x, y) for x, y in zip(weights(whole), weights(split)))


@pytest.mark.skipif(not __import__("aae_dist.training.precision", fromlist=["x"]).cpu_has_native_bf16(), reason="CPU without native bf16")
def test_bf16_on_two_ddp_workers_identical_replicas_and_exact_resume(tmp_path, make_dataset):
    """train.precision=bf16 on the CPU: 2 gloo workers stay identical, a run split at a checkpoint ends bitwise
    like a whole one, the weights differ from fp32's (autocast really ran) and the loss stays where fp32's is."""
    data, _, _ = make_dataset(1000, 100)
    whole, _, fp32 = ddp_whole_split_and_plain(tmp_path, data, ["train.precision=bf16"])
    assert whole["replica_fingerprints"] != fp32["replica_fingerprints"]
    assert whole["metrics"]["recon_loss"] == pytest.approx(fp32["metrics"]["recon_loss"], rel=0.02)


@pytest.mark.skipif(not __import__("aae_dist.training.precision", fromlist=["x"]).cpu_has_native_bf16(), reason="CPU without native bf16")
def test_bf16_keeps_weights_and_losses_in_fp32(tmp_path, make_dataset):
    data, _, _ = make_dataset(300, 100)
    t = Trainer(load_config(None, SMALL_MODEL + [f"data.path={data}", "train.precision=bf16"]), LocalSession(str(tmp_path / "a"), 1))
    assert t.autocast_dtype == torch.bfloat16
    x, y = next(iter(t.train_data.iter_epoch(0)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = t.phases[0].loss(t.ctx, t.aae.normalise(x), y)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in stats.values())
    t.train_step([(t.aae.normalise(x), y)])
    params = list(t.aae.nets["encoder"].parameters())
    assert all(p.dtype == torch.float32 for p in params) and all(p.grad.dtype == torch.float32 for p in params if p.grad is not None)


def test_bf16_refused_on_a_cpu_without_it(world, monkeypatch, capsys):  # noqa: F811
    """One line naming the key and the fix, exit 2, nothing touched; the same config in fp32 trains."""
    from aae_dist.training import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    before = tree_digest(world)
    capsys.readouterr()
    code = main(T(world, "train.precision=bf16", "train.max_steps=2", name="bf16-refused"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("aae-dist: error:") and "\n" not in err and "Traceback" not in err, err
    assert "train.precision=bf16 needs a CPU with native bf16" in err and "set train.precision=fp32" in err
    assert tree_digest(world) == before


def test_the_cpu_probe_reads_the_flags(monkeypatch, tmp_path):
    """oneDNN says yes on any AVX-512 CPU (it would emulate bf16, slower than fp32): the flags decide."""
    import builtins

    from aae_dist.training import precision

    real_open = builtins.open
    for flags, expected in (("fpu avx512f avx512bw", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True)):
        fake = tmp_path / "cpuinfo"
        fake.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(fake if p == "/proc/cpuinfo" else p, *a, **k))
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
        assert precision.cpu_has_native_bf16() is expected, flags


@pytest.mark.slow  # torch.compile's first build costs ~30 s of CPU; the compile path is unchanged by this project
def test_compiled_forwards_train_like_eager(tmp_path, make_dataset):
    """train.compile on the CPU (the path GPUs take too, there with CUDA graphs worth having): the same
    training as eager to float32 tolerance, the weights' names unchanged (checkpoints stay plain)."""
    data, _, _ = make_dataset(1000, 100)
    eager, compiled = trained(tmp_path, data, "eager"), trained(tmp_path, data, "compiled", "train.compile=true")
    assert [k for k in compiled.aae.state_dict()] == [k for k in eager.aae.state_dict()]
    assert all(torch.allclose(x, y, rtol=1e-3, atol=1e-4) for x, y in zip(weights(eager), weights(compiled)))


@pytest.mark.slow  # ~55 s of compiling; torch is pinned in CI, and every compile test runs with -m slow
def test_compiled_phases_train_like_eager(tmp_path, make_dataset):
    """train.compile_scope=phases with compile_mode=reduce-overhead on the CPU (the path a GPU takes, there replayed
    as CUDA graphs; on a CPU inductor alone): each phase's whole loss is compiled (dynamo really built graphs for
    it), and 12 steps with a checkpoint train as eager to float32 tolerance, weights' names unchanged."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    data, _, _ = make_dataset(1000, 100)
    eager = trained(tmp_path, data, "eager")
    compiled = trained(tmp_path, data, "compiled", "train.compile=true", "train.compile_scope=phases", "train.compile_mode=reduce-overhead")
    assert all(getattr(compiled.losses[ph.name], "_torchdynamo_orig_callable", None) is not None for ph in compiled.phases)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= len(compiled.phases)
    assert [k for k in compiled.aae.state_dict()] == [k for k in eager.aae.state_dict()]
    assert all(torch.allclose(x, y, rtol=1e-3, atol=1e-5) for x, y in zip(weights(eager), weights(compiled)))
    losses = [read_summary(tmp_path / n)["metrics"]["recon_loss"] for n in ("eager", "compiled")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


@pytest.mark.slow  # three compiled 2-process runs: ~75 s of CPU
def test_compiled_phases_on_two_ddp_workers_identical_replicas_and_exact_resume(tmp_path, make_dataset):
    """train.compile_scope=phases under DDP (gloo): replicas identical, a run split at its checkpoint ends bitwise
    like a whole one, and the loss is eager's to float32 tolerance."""
    data, _, _ = make_dataset(1000, 100)
    whole, _, eager = ddp_whole_split_and_plain(tmp_path, data, ["train.compile=true", "train.compile_scope=phases",
                                                                 "train.compile_mode=reduce-overhead"])
    assert whole["metrics"]["recon_loss"] == pytest.approx(eager["metrics"]["recon_loss"], rel=1e-4)
