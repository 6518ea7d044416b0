"""Habits users bring: their own networks (class_path/init_args), Hydra-style overrides, misspelt keys,
--version, --fast-dev-run, readable figures and a final table that says what to do next."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from aae_dist.cli import main
from test_bad_input_matrix import T, tree_digest, world  # noqa: F401 - the shared fixture


# ---- networks a user brings (importable as test_habits.X: pytest puts tests/ on sys.path) ----------------

class TinyEncoder(nn.Module):
    """Told its shapes by aae-dist (in_shape, out_features), its width by init_args."""

    def __init__(self, in_shape, out_features, width=8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(in_shape)), width), nn.ReLU(), nn.Linear(width, out_features))

    def forward(self, x):
        return self.net(x)


class TinyDecoder(nn.Module):
    def __init__(self, in_features, out_shape, width=8):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, int(np.prod(out_shape))))

    def forward(self, h):
        return self.net(h).view(-1, *self.out_shape)


class TinyCritic(nn.Module):
    def __init__(self, in_features, width=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, z):
        return self.net(z)


class FixedEncoder(nn.Module):
    """Ignores the shapes it could be told: its output width is whatever init_args says."""

    def __init__(self, features=3):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LazyLinear(features))

    def forward(self, x):
        return self.net(x)


def own(kind: str, cls: str, **init) -> list[str]:
    return [f"model.{kind}.class_path=test_habits.{cls}"] + [f"model.{kind}.init_args.{k}={v}" for k, v in init.items()]


def test_own_networks_train_in_process_and_load(world, tmp_path):  # noqa: F811
    import aae_dist

    sets = own("encoder", "TinyEncoder", width=12) + own("decoder", "TinyDecoder", width=10) + own("discriminator", "TinyCritic")
    argv = T(world, *sets, "train.max_steps=4", "train.parzen_samples=0", "model.variant=semi_supervised", "data.labeled_per_class=5",
             name="own", extra=["--storage", str(tmp_path)])
    assert main(argv) == 0
    model = aae_dist.load(str(tmp_path / "own"))
    assert isinstance(model.aae.nets["encoder"].trunk, TinyEncoder)
    assert model.aae.nets["encoder"].trunk.net[1].out_features == 12  # init_args reached the constructor
    assert isinstance(model.aae.nets["decoder"].body, TinyDecoder)
    assert isinstance(model.aae.nets["discriminator_cat"].net, TinyCritic)  # both discriminators
    x = np.zeros((3, 1, 4, 4), np.uint8)
    assert model.reconstruct(x).shape == (3, 1, 4, 4)


@pytest.mark.parametrize("sets,needle", [
    (own("encoder", "FixedEncoder", features=3),
     "model.encoder (test_habits.FixedEncoder) gives shape (2, 3) for a dummy batch of shape (2, 1, 4, 4); expected (2, 8)"),
    (own("decoder", "TinyEncoder"),
     "model.decoder (test_habits.TinyEncoder) cannot be built"),
    (["model.discriminator.class_path=test_habits.NoSuchNet"], "model.discriminator.class_path 'test_habits.NoSuchNet'"),
    (["model.encoder.class_path=nosuchpkg.Net"], "model.encoder.class_path 'nosuchpkg.Net'"),
    (["model.encoder.class_path=collections.OrderedDict"], "is not a torch.nn.Module"),
])
def test_own_network_mismatch_is_one_line_before_anything_runs(world, capsys, sets, needle):  # noqa: F811
    before = tree_digest(world)
    capsys.readouterr()
    assert main(T(world, *sets, name="mismatch")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aae-dist: error:") and "\n" not in err, err
    assert needle in err, err
    assert tree_digest(world) == before


def test_config_lists_the_network_keys(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key in ("model.encoder.class_path", "model.encoder.init_args", "model.decoder.class_path", "model.discriminator.init_args"):
        assert key in out, key


# ---- the command line -----------------------------------------------------------------------------

def test_version(capsys):
    import aae_dist

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"aae-dist {aae_dist.__version__}"


def test_hydra_style_override_gets_a_hint(capsys):
    assert main(["train", "train.epochs=3", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aae-dist: error:") and "\n" not in err, err
    assert "--set train.epochs=3" in err


def test_misspelt_key_says_did_you_mean(world, capsys):  # noqa: F811
    assert main(T(world, "train.epoch=2")) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train.epochs'" in err and "aae-dist config" in err and "jobs/*.yaml" not in err
    assert main(T(world, "modle.hidden=[3]")) == 2
    assert "did you mean 'model'" in capsys.readouterr().err


def test_fast_dev_run_keeps_nothing_but_the_summary(world, capsys, tmp_path):  # noqa: F811
    import time

    t0 = time.time()
    assert main(T(world, "train.parzen_samples=10000", "train.epochs=50", name="fdr", extra=["--storage", str(tmp_path), "--fast-dev-run"])) == 0
    out = capsys.readouterr().out
    assert time.time() - t0 < 60
    assert "done: 3 steps" in out and "recon_loss" in out and "fast-dev-run" in out
    assert os.listdir(tmp_path) == []  # no run folder, no checkpoint, no TensorBoard


# ---- what the end of a run and the figures say -----------------------------------------------------

SUMMARY = {"steps": 10, "epochs": 1.0, "train_s": 6.0, "samples_per_s": 100.0, "world_size": 1, "baselines": {},
           "metrics": {"recon_loss": 0.2, "parzen_ll": -42.8, "parzen_ll_se": 1.5, "parzen_sigma": 0.2, "parzen_samples": 10000,
                       "parzen_sigma_split": "train", "prior_match": 0.01}}


def test_final_table_separates_details_and_suggests_next_steps():
    from aae_dist.console import final_table

    text = final_table(SUMMARY, {"parzen_ll": "340 +- 2 nats"}, "/r/runs/x", lambda u: u)
    rows = {line.split()[0] for line in text.splitlines() if line.strip()}
    assert "parzen_sigma" not in rows and "parzen_samples" not in rows  # run details, not metrics
    assert "parzen sigma 0.2" in text and "10000 prior samples" in text
    assert "thousands of epochs" in text and "50,000" in text  # the paper's budget beside its figure
    for cmd in ("aae-dist eval /r/runs/x", "aae-dist sample /r/runs/x --out", "aae-dist generate /r/runs/x --n"):
        assert cmd in text, cmd


def test_codes_figure_axes_colours_and_title():
    from matplotlib.colors import to_rgba

    from aae_dist.plots import _plt, codes_figure

    rng = np.random.default_rng(0)
    fig = codes_figure(rng.normal(size=(50, 5)), np.arange(50) % 10, rng.normal(size=(50, 5)), caption="run r, step 7")
    a, b = fig.axes[:2]
    assert a.get_ylabel() == "principal axis 2" and a.get_xlabel() == "principal axis 1"
    tab10 = {to_rgba(c) for c in _plt().get_cmap("tab10").colors}
    prior = {tuple(c) for c in b.collections[0].get_facecolors()}
    assert prior and not prior & tab10  # prior samples are not coloured like any label
    assert "run r, step 7" in fig._suptitle.get_text()
    _plt().close(fig)


def test_eval_figures_name_the_run_and_step(world, tmp_path):  # noqa: F811
    import aae_dist.figures as figures

    seen = []
    real = figures.codes_figure
    figures.codes_figure = lambda *a, **k: seen.append(k.get("caption")) or real(*a, **k)
    try:
        assert main(["eval", str(world / "runs" / "existing"), "--plots", str(tmp_path / "figs")]) == 0
    finally:
        figures.codes_figure = real
    assert seen == ["run existing, step 4"]


# ---- packaging -------------------------------------------------------------------------------------

def test_matplotlib_is_declared_and_pip_list_comes_from_the_package():
    import tomllib

    from aae_dist.submit import runtime_env

    deps = tomllib.load(open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb"))["project"]["dependencies"]
    assert any(d.startswith("matplotlib") for d in deps)
    pip = runtime_env(True, "/tmp")["pip"]
    names = {p.split(">")[0].split("=")[0].split("[")[0].split(";")[0].strip() for p in pip}
    assert {"xxhash", "torch", "ray", "scikit-learn", "s3fs"} <= names and "pytest" not in names and "moto" not in names


def test_submit_py_modules_ships_the_users_module(tmp_path):
    from aae_dist.submit import runtime_env

    mod = tmp_path / "mynets"
    mod.mkdir()
    (mod / "__init__.py").write_text("")
    env = runtime_env(False, str(tmp_path), py_modules=[str(mod)])
    assert str(mod) in env["py_modules"] and len(env["py_modules"]) == 2
    from aae_dist.errors import UserError

    with pytest.raises(UserError, match="--py-modules"):
        runtime_env(False, str(tmp_path), py_modules=[str(tmp_path / "missing")])
