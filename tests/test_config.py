"""One typed config; YAML + --set; clear errors before any worker starts."""

from __future__ import annotations

import pytest

from aae_dist.cli import main
from aae_dist.config import load_config
from aae_dist.errors import UserError


def test_scripted_keys_exist_with_their_names():
    cfg = load_config(None, [
        "data.path=/x", "data.batch_size=64", "model.kind=conv", "model.hidden=[10, 20]", "model.latent_dim=2",
        "model.posterior=gaussian", "prior.kind=swiss_roll", "train.epochs=2", "train.max_steps=9",
        "train.checkpoint_every=4", "train.max_failures=1", "train.seed=7",
    ])
    assert (cfg.data.path, cfg.data.batch_size, cfg.model.kind, cfg.model.hidden) == ("/x", 64, "conv", [10, 20])
    assert (cfg.model.latent_dim, cfg.model.posterior, cfg.prior.kind) == (2, "gaussian", "swiss_roll")
    assert (cfg.train.epochs, cfg.train.max_steps, cfg.train.checkpoint_every, cfg.train.max_failures, cfg.train.seed) == (2, 9, 4, 1, 7)
    assert load_config(None, []).train.max_failures == 3


def test_yaml_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  latent_dim: 2\nprior:\n  kind: mixture\nphases:\n  generator:\n    lr: 1e-4\n")
    cfg = load_config(str(f), ["model.latent_dim=3"])
    assert cfg.model.latent_dim == 3 and cfg.prior.kind == "mixture" and cfg.phases.generator.lr == 1e-4


@pytest.mark.parametrize(
    "sets, needle",
    [
        (["train.epoch=3"], "unknown config key 'train.epoch'"),
        (["nosuch.key=1"], "unknown config key 'nosuch'"),
        (["train.epochs=three"], "'train.epochs'"),
        (["data.batch_size=0"], "'data.batch_size'"),
        (["model.hidden=[-5]"], "'model.hidden'"),
        (["model.posterior=flow"], "'model.posterior'"),
        (["novalue"], "expected KEY=VALUE"),
    ],
)
def test_bad_config(sets, needle):
    with pytest.raises(UserError) as e:
        load_config(None, sets)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(f))


def test_cli_rejects_before_any_worker(tmp_path, capsys):
    code = main(["train", "--storage", str(tmp_path), "--set", "train.epoch=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown config key 'train.epoch'" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_config_command_lists_every_key_with_type_default_and_meaning(capsys):
    from aae_dist.cli import main
    from aae_dist.config import Config, describe

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in ("resources_per_worker", "init_args", "terms", "options") else [f"{prefix}{k}"]

    leaves = [r for r in describe() if r[1] != "section"]
    assert sorted(r[0] for r in leaves) == sorted(flat(Config().to_dict()))  # generated from the model: nothing missing or extra
    assert all(r[3] for r in describe()), [r[0] for r in describe() if not r[3]]  # every key has a meaning
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert all(r[0] in out for r in leaves)
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("model.batch_norm "))
    assert "bool" in line and "False" in line and "batch norm" in line


def test_every_flag_of_every_command_has_help():
    from aae_dist.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"aae-dist {name} {(action.option_strings or [action.dest])[0]} has no help line"
    assert "aae-dist config" in sub.choices["train"].format_help()
