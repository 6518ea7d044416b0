"""Issue 21, items 9 and 10 (config and checkpoints): non-finite and out-of-range config values are
refused at load naming the key; a non-finite stop never saves non-finite weights and blames the phase
whose update broke them; checkpoint folders are untrusted input (meta.json, state.pt, folder names)."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from aae_dist.cli import main
from aae_dist.config import describe, load_config
from aae_dist.errors import UserError
from conftest import SMALL_MODEL, read_summary
from test_bad_input_matrix import T, tree_digest, world  # noqa: F401 - world is a fixture

NON_FINITE = (".inf", "-.inf", ".nan", "inf", "nan", "-Infinity")


def refused(world, argv, needle, capsys):
    """The house check: exit 2, ONE line naming the culprit, no traceback, nothing existing touched."""
    before = tree_digest(world)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("aae-dist: error:") and "\n" not in err and "Traceback" not in err, err
    assert needle in err, (needle, err)
    after = tree_digest(world)
    assert {k: v for k, v in after.items() if not k.startswith("runs/new")} == {k: v for k, v in before.items() if not k.startswith("runs/new")}
    return err


def leaf_keys(kind: str) -> list[str]:
    return [key for key, typ, _, _ in describe() if typ != "section" and re.search(rf"\b{kind}\b", typ)]


# ---- config: non-finite and out-of-range values ------------------------------------------------

@pytest.mark.parametrize("value", NON_FINITE)
def test_every_float_key_refuses_non_finite(value):
    keys = leaf_keys("float")
    assert "phases.reconstruction.lr" in keys and "model.init_std" in keys and "run.resources_per_worker" in keys
    types = {r[0]: r[1] for r in describe()}
    for key in keys:
        item = f"{key}={{slot: {value}}}" if types[key].startswith("dict") else f"{key}={value}"
        with pytest.raises(UserError, match=re.escape(f"'{key}")) as info:
            load_config(None, [item])
        assert "finite" in str(info.value), (key, str(info.value))


def test_every_int_key_has_an_upper_bound():
    """2**70 overflows torch and numpy: every integer key refuses it at load, naming the key."""
    keys = leaf_keys("int")
    assert "train.seed" in keys and "model.hidden" in keys and "data.shuffle_buffer" in keys
    for key in keys:
        value = f"[{2**70}]" if "list" in dict((r[0], r[1]) for r in describe())[key] else str(2**70)
        with pytest.raises(UserError, match=re.escape(f"'{key}")):
            load_config(None, [f"{key}={value}"])


def test_non_finite_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("phases:\n  reconstruction:\n    lr: .inf\n")
    with pytest.raises(UserError, match=r"'phases\.reconstruction\.lr' in .*c\.yaml.*finite"):
        load_config(str(path))


RANGE_CASES = {
    "lr of infinity (issue item 9)": ("phases.reconstruction.lr=.inf", "'phases.reconstruction.lr'"),
    "init_std of infinity (issue item 9)": ("model.init_std=.inf", "'model.init_std'"),
    "beta1 NaN": ("phases.generator.beta1=.nan", "'phases.generator.beta1'"),
    "beta1 of 2": ("phases.generator.beta1=2", "'phases.generator.beta1'"),
    "beta2 of 1": ("phases.discriminator.beta2=1", "'phases.discriminator.beta2'"),
    "negative beta1": ("phases.reconstruction.beta1=-0.1", "'phases.reconstruction.beta1'"),
    "negative seed": ("train.seed=-5", "'train.seed'"),
    "seed of 2**70": (f"train.seed={2**70}", "'train.seed'"),
    "huge hidden width": ("model.hidden=[100000000000]", "65536"),
    "huge latent_dim": ("model.latent_dim=100000000", "4096"),
    "huge shuffle_buffer": ("data.shuffle_buffer=10000000000000", "'data.shuffle_buffer'"),
    "non-finite target loss": ("train.target_recon_loss=.nan", "'train.target_recon_loss'"),
}


@pytest.mark.parametrize("case", list(RANGE_CASES))
def test_out_of_range_value_is_one_line(world, case, capsys):
    item, needle = RANGE_CASES[case]
    refused(world, T(world, item), needle, capsys)


def test_config_file_that_is_a_directory(world, tmp_path, capsys):
    refused(world, T(world, extra=["--config", str(tmp_path)]), "is a directory", capsys)


def test_config_file_that_is_not_utf8(world, tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  epochs: 2 # caf\xe9\n".encode("latin-1"))
    refused(world, T(world, extra=["--config", str(path)]), "UTF-8", capsys)


def test_config_file_that_is_not_a_mapping(world, tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    refused(world, T(world, extra=["--config", str(path)]), "must hold a mapping", capsys)


def test_large_seed_in_range_trains(world, tmp_path):
    """Seeds up to 2**63-1 are accepted, so they must train: the derived per-step seed once overflowed torch."""
    argv = T(world, "train.seed=9000000000000000000", "train.max_steps=2", "train.parzen_samples=0", extra=["--storage", str(tmp_path)])
    assert main(argv) == 0


# ---- the non-finite stop --------------------------------------------------------------------------

def own_argv(world, tmp_path, *sets, name="r", extra=()):
    return T(world, *sets, name=name, extra=["--storage", str(tmp_path / "runs"), *extra])


def checkpoints(run) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_"))


def all_finite(run) -> bool:
    from aae_dist.checkpoint import read_local

    for name in checkpoints(run):
        state, _ = read_local(str(run / name))
        stack = [state]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                stack += list(node.values())
            elif isinstance(node, (list, tuple)):
                stack += list(node)
            elif torch.is_tensor(node) and node.is_floating_point() and not torch.isfinite(node).all():
                return False
    return True


def test_nonfinite_first_update_saves_nothing_and_blames_its_phase(world, tmp_path, capsys):
    """lr=1e30 and weight=1e12 are finite, but SGD's first reconstruction update turns weights infinite; the
    discriminator's gradients are the first to show it.  Nothing is saved (there are no finite weights
    since the start) and the message blames reconstruction, not the discriminator."""
    sets = ["phases.reconstruction.optimizer=sgd", "phases.reconstruction.lr=1e30", "phases.reconstruction.weight=1e12", "train.max_steps=10"]
    err = refused(world, own_argv(world, tmp_path, *sets), "'reconstruction'", capsys)
    assert "phases.reconstruction.lr" in err and "no checkpoint" in err, err
    assert "holds the last finite weights" not in err, err
    assert checkpoints(tmp_path / "runs" / "r") == []


def test_nonfinite_after_a_checkpoint_names_the_last_good_one(world, tmp_path, capsys):
    """Warm-up steps 1-5 are healthy (checkpoint at 3); the generator's first update (step 6) breaks the
    encoder; step 7's reconstruction sees it.  checkpoint_step_6 is not written, checkpoint_step_3 is named."""
    run = tmp_path / "runs" / "r"
    sets = ["phases.generator.optimizer=sgd", "phases.generator.lr=1e30", "phases.generator.weight=1e12", "train.warmup_steps=5", "train.checkpoint_every=3", "train.max_steps=20"]
    err = refused(world, own_argv(world, tmp_path, *sets), "'generator'", capsys)
    assert "checkpoint_step_000000003" in err and "phases.generator.lr" in err, err
    assert checkpoints(run) == ["checkpoint_step_000000003"] and all_finite(run)


# ---- checkpoints as untrusted input ----------------------------------------------------------------

def copy_of_existing(world, tmp_path):
    dest = tmp_path / "runs" / "existing"
    shutil.copytree(world / "runs" / "existing", dest)
    return dest, dest / "checkpoint_step_000000004"


def test_meta_json_that_is_a_list(world, tmp_path, capsys):
    run, ckpt = copy_of_existing(world, tmp_path)
    (ckpt / "meta.json").write_text("[1, 2]")
    refused(world, ["eval", str(ckpt)], "meta.json", capsys)
    refused(world, ["sample", str(ckpt), "--out", str(tmp_path / "grid.png")], "meta.json", capsys)


def test_meta_json_that_is_a_list_in_a_run_folder(world, tmp_path, capsys):
    run, ckpt = copy_of_existing(world, tmp_path)
    (ckpt / "meta.json").write_text("[1, 2]")
    refused(world, ["eval", str(run)], "no checkpoint", capsys)


def test_state_without_models(world, tmp_path, capsys):
    run, ckpt = copy_of_existing(world, tmp_path)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["models"]
    torch.save(state, ckpt / "state.pt")
    refused(world, ["eval", str(ckpt)], "'models'", capsys)
    refused(world, own_argv(world, tmp_path, "train.max_steps=6", name="existing", extra=["--resume"]), "'models'", capsys)


def test_state_with_a_network_missing(world, tmp_path, capsys):
    run, ckpt = copy_of_existing(world, tmp_path)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["models"]["decoder"]
    torch.save(state, ckpt / "state.pt")
    refused(world, ["eval", str(ckpt)], "decoder", capsys)
    refused(world, own_argv(world, tmp_path, "train.max_steps=6", name="existing", extra=["--resume"]), "decoder", capsys)


def test_tampered_state_names_the_original_file(world, tmp_path, capsys):
    run, ckpt = copy_of_existing(world, tmp_path)
    data = (ckpt / "state.pt").read_bytes()
    (ckpt / "state.pt").write_bytes(data[: len(data) // 2])
    for argv in (["eval", str(run)], own_argv(world, tmp_path, "train.max_steps=6", name="existing", extra=["--resume"])):
        err = refused(world, argv, "not a valid checkpoint", capsys)
        assert str(ckpt / "state.pt") in err and "aae-ckpt-" not in err, err


def test_crafted_meta_step_cannot_make_pruning_delete_the_newest(world, tmp_path):
    """The step of a checkpoint is its folder name: a meta.json claiming step 999 in checkpoint_step_4
    is not taken for the newest, so resume starts at 6 and pruning keeps checkpoint_step_8."""
    run = tmp_path / "runs" / "r"
    sets = ["train.checkpoint_every=2", "train.keep_checkpoints=2", "train.parzen_samples=0"]
    assert main(own_argv(world, tmp_path, *sets, "train.max_steps=6")) == 0
    assert checkpoints(run) == ["checkpoint_step_000000004", "checkpoint_step_000000006"]
    meta = json.loads((run / "checkpoint_step_000000004" / "meta.json").read_text())
    meta["step"] = 999
    (run / "checkpoint_step_000000004" / "meta.json").write_text(json.dumps(meta))
    assert main(own_argv(world, tmp_path, *sets, "train.max_steps=8", extra=["--resume"])) == 0
    assert read_summary(run)["resumed_from_step"] == 6
    assert "checkpoint_step_000000008" in checkpoints(run)


def test_checkpoint_folder_whose_meta_disagrees_is_refused(world, tmp_path, capsys):
    run, ckpt = copy_of_existing(world, tmp_path)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["step"] = 999
    (ckpt / "meta.json").write_text(json.dumps(meta))
    refused(world, ["eval", str(ckpt)], "999", capsys)
    assert os.path.exists(ckpt / "state.pt")
