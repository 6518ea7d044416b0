"""Issue 26: the information term on y, the adaptive VAT radius, fair clustering baselines."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from aae_dist.config import load_config
from multiprocess import run_processes
from conftest import SMALL_MODEL, read_summary
from test_bad_input_matrix import T, tree_digest, world  # noqa: F401 - world is a fixture

K = 4


def info_loss(logits: torch.Tensor, mu: float = 4.0) -> torch.Tensor:
    from aae_dist.training.phases import entropy_terms

    cond, marg = entropy_terms(logits)
    return cond - mu * marg


def test_information_term_value_on_hand_made_batches():
    """Balanced confident y: H(y|x) = 0, H(mean y) = log K; collapsed y: both 0; uniform y: H(y|x) = log K."""
    from aae_dist.training.phases import entropy_terms

    balanced = 30.0 * torch.eye(K).repeat(3, 1)
    collapsed = 30.0 * torch.eye(K)[[0] * 12]
    cond, marg = entropy_terms(balanced)
    assert cond.item() == pytest.approx(0.0, abs=1e-6) and marg.item() == pytest.approx(math.log(K), abs=1e-5)
    cond, marg = entropy_terms(collapsed)
    assert cond.item() == pytest.approx(0.0, abs=1e-6) and marg.item() == pytest.approx(0.0, abs=1e-5)
    cond, marg = entropy_terms(torch.zeros(12, K))
    assert cond.item() == pytest.approx(math.log(K), abs=1e-6) and marg.item() == pytest.approx(math.log(K), abs=1e-6)
    assert info_loss(balanced).item() < info_loss(collapsed).item()


def test_information_term_gradient_matches_finite_differences_and_spreads_a_collapsed_batch():
    torch.manual_seed(0)
    logits = (torch.randn(6, K) + 3 * torch.eye(K)[[0] * 6]).requires_grad_(True)  # mostly class 0
    (grad,) = torch.autograd.grad(info_loss(logits), logits)
    h = 1e-3
    for i, j in [(0, 0), (2, 1), (5, 3)]:
        e = torch.zeros_like(logits)
        e[i, j] = h
        fd = (info_loss(logits.detach() + e) - info_loss(logits.detach() - e)).item() / (2 * h)
        assert grad[i, j].item() == pytest.approx(fd, rel=2e-2, abs=1e-4)
    assert (grad[:, 0] > 0).all()  # descent lowers the crowded class in every sample
    from aae_dist.training.phases import entropy_terms

    assert entropy_terms(logits.detach() - 0.5 * grad)[1] > entropy_terms(logits.detach())[1]  # the marginal spreads


def _global_batch_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        x, theta = torch.randn(8, 3), torch.randn(3, K, requires_grad=True)
        mine = x[rank * 4 : rank * 4 + 4]  # each rank its half of the global batch
        loss = info_loss(mine @ theta)
        loss.backward()
        dist.all_reduce(theta.grad)
        theta.grad /= world  # what DDP does with the ranks' gradients
        np.save(os.path.join(out, f"rank{rank}.npy"), np.concatenate([[loss.item()], theta.grad.numpy().ravel()]))
    finally:
        dist.destroy_process_group()


def test_information_term_marginal_is_over_the_global_batch(tmp_path):
    """2 gloo processes with half a batch each: DDP's mean gradient equals one process's on the whole batch;
    the marginal entropy's value is the global one."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_global_batch_worker, args=(2, port, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    x, theta = torch.randn(8, 3), torch.randn(3, K, requires_grad=True)
    from aae_dist.training.phases import entropy_terms

    halves = [entropy_terms(x[i : i + 4] @ theta) for i in (0, 4)]
    whole = entropy_terms(x @ theta)
    (grad,) = torch.autograd.grad(info_loss(x @ theta), theta)
    for r in range(2):
        got = np.load(tmp_path / f"rank{r}.npy")
        assert got[0] == pytest.approx((halves[r][0] - 4.0 * whole[1]).item(), abs=1e-5)
        np.testing.assert_allclose(got[1:], grad.numpy().ravel(), rtol=1e-4, atol=1e-6)


# ---- adaptive VAT radius ---------------------------------------------------------------------

def brute_force_kth(x: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return np.sort(d, 1)[:, k - 1]


def _batches(x: torch.Tensor, size: int):
    return lambda: (x[i : i + size] for i in range(0, len(x), size))


def test_adaptive_radius_matches_a_brute_force_neighbour_search():
    from aae_dist.training import neighbours

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((300, 1, 4, 4), dtype=np.float32))
    keys, radii, facts = neighbours.compute(_batches(x, 64), 300, k=10, seed=0, chunk=50)
    assert facts["exact"] and facts["k_used"] == 10
    table = neighbours.RadiusTable(keys, radii, "cpu")
    want = brute_force_kth(x.flatten(1).double().numpy(), 10)
    perm = torch.from_numpy(rng.permutation(300))
    np.testing.assert_allclose(table(x[perm]).numpy(), want[perm.numpy()], rtol=1e-5)  # found again in any order


def test_adaptive_radius_on_a_sample_for_large_data_is_close():
    from aae_dist.training import neighbours

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((1200, 8), dtype=np.float32))
    keys, radii, facts = neighbours.compute(_batches(x, 100), 1200, k=20, seed=0, limit=400)
    assert not facts["exact"] and facts["reference"] == 400 and facts["k_used"] == 7
    want = brute_force_kth(x.double().numpy(), 20)
    got = neighbours.RadiusTable(keys, radii, "cpu")(x).numpy()
    assert abs(np.median(got / want) - 1) < 0.1 and np.corrcoef(got, want)[0, 1] > 0.8


def test_batch_norm_statistics_frozen_in_the_vat_pass():
    from aae_dist.training.phases import batch_stats_frozen

    bn = torch.nn.BatchNorm1d(3).train()
    with batch_stats_frozen([bn]):
        out = bn(torch.randn(8, 3) * 5 + 2)
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    assert out.mean(0).abs().max() < 1e-5  # the batch's own statistics normalised it
    bn(torch.randn(8, 3) + 2)
    assert bn.running_mean.abs().sum() > 0  # and they are tracked again afterwards


IMSAT = ["model.variant=clustering", f"model.num_classes={K}", "model.batch_norm=true", "train.parzen_samples=0",
         "phases.reconstruction.vat=1.0", "phases.reconstruction.vat_alpha=0.25", "phases.reconstruction.vat_neighbours=5",
         "phases.reconstruction.info=0.1"]


def two_workers_whole_and_resumed(tmp_path, base: list[str], table_file: str, also: str | None = None):
    """The same 10 steps on 2 workers in one go and as 5 + 5 with a resume: replicas identical, the resumed run
    bitwise the whole one, and the run folder's table (table_file, and `also`) written once and reused on resume,
    not recomputed.  Returns the whole run's summary and the table's path."""
    run_processes(load_config(None, base + ["train.max_steps=10"]), str(tmp_path / "whole"), world=2)
    run_processes(load_config(None, base + ["train.max_steps=5"]), str(tmp_path / "split"), world=2)
    tables = [tmp_path / "split" / f for f in (table_file, also) if f]
    stamps = [t.stat().st_mtime_ns for t in tables]
    run_processes(load_config(None, base + ["train.max_steps=10"]), str(tmp_path / "split"), world=2)
    whole, split = read_summary(tmp_path / "whole"), read_summary(tmp_path / "split")
    assert whole["replicas_in_sync"] is True and split["resumed_from_step"] == 5
    assert split["replica_fingerprints"] == whole["replica_fingerprints"]
    assert [t.stat().st_mtime_ns for t in tables] == stamps
    return whole, tables[0]


# ---- neighbour consistency (SCAN) --------------------------------------------------------------------

def brute_force_nearest(x: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, 1, kind="stable")[:, :k]


def test_neighbour_positions_match_a_brute_force_search_and_the_table_draws_only_among_them():
    from aae_dist.training import neighbours

    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.random((300, 1, 4, 4), dtype=np.float32))
    keys, positions, pick = neighbours.neighbour_positions(_batches(x, 64), 300, k=5, seed=0, chunk=50)
    assert np.array_equal(pick, np.arange(300)) and positions.shape == (300, 5)
    want = brute_force_nearest(x.flatten(1).double().numpy(), 5)
    table = neighbours.NeighbourTable(keys, positions, x, "cpu")
    flat = x.flatten(1)
    perm = rng.permutation(300)
    got = table(x[perm], torch.Generator().manual_seed(0)).flatten(1)
    for row, i in zip(got, perm):  # each drawn image is one of that sample's 5 nearest, never itself
        match = (flat == row).all(1).nonzero().squeeze(1).tolist()
        assert len(match) == 1 and match[0] in set(want[i]) and match[0] != i
    draws = torch.stack([table(x[:1], torch.Generator().manual_seed(s)) for s in range(40)]).flatten(1)
    assert len({tuple(r.tolist()) for r in draws}) > 1  # a fresh neighbour each draw, not always the nearest
    stranger = torch.full((1, 1, 4, 4), 7.0)
    assert torch.equal(table(stranger, torch.Generator().manual_seed(0)), stranger)  # not in the table: itself


def test_neighbour_positions_on_a_sample_for_large_data_are_the_nearest_in_that_sample():
    from aae_dist.training import neighbours

    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random((600, 8), dtype=np.float32))
    keys, positions, pick = neighbours.neighbour_positions(_batches(x, 100), 600, k=3, seed=0, limit=200)
    assert len(pick) == 200 and np.all(np.diff(pick) > 0) and positions.max() < 200
    order = np.argsort(neighbours.fingerprint(x).numpy(), kind="stable")
    assert np.array_equal(keys, neighbours.fingerprint(x).numpy()[order])
    ref = x[pick].double().numpy()
    for i in range(0, 600, 37):
        d = np.sqrt(((ref - x[i].double().numpy()) ** 2).sum(1))
        if i in set(pick):
            d[np.searchsorted(pick, i)] = np.inf  # itself left out
        assert set(positions[np.searchsorted(keys, neighbours.fingerprint(x[i : i + 1]).numpy()[0])]) == set(np.argsort(d)[:3])


def mutual_filled(nearest: list[list[int]], mutual: list[list[bool]]) -> list[list[int]]:
    """Each row's kept neighbours, nearest first, repeated to fill its k columns; none kept: its nearest."""
    out = []
    for row, keep in zip(nearest, mutual):
        kept = [p for p, m in zip(row, keep) if m] or [row[0]]
        out.append([kept[j % len(kept)] for j in range(len(row))])
    return out


def test_mutual_neighbours_match_a_brute_force_search():
    """neighbours_mutual: p stays among i's k nearest only where i is among p's k nearest too (exact search), the kept
    ones repeated to fill the k columns; a sample with no mutual neighbour keeps its nearest."""
    from aae_dist.training import neighbours

    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.random((300, 1, 4, 4), dtype=np.float32))
    keys, positions, pick = neighbours.neighbour_positions(_batches(x, 64), 300, k=5, seed=0, chunk=50, mutual=True)
    assert np.array_equal(pick, np.arange(300))
    nearest = brute_force_nearest(x.flatten(1).double().numpy(), 5).tolist()
    want = mutual_filled(nearest, [[i in nearest[p] for p in row] for i, row in enumerate(nearest)])
    rows = np.searchsorted(keys, neighbours.fingerprint(x).numpy())
    assert positions[rows].tolist() == want
    kept = [len(set(r)) for r in want]
    assert min(kept) == 1 and max(kept) == 5 and sum(k < 5 for k in kept) > 100  # the filter does something, and not everything
    plain = neighbours.neighbour_positions(_batches(x, 64), 300, k=5, seed=0, chunk=50)[1]
    assert plain[rows].tolist() == nearest  # the default keeps all k


def test_mutual_neighbours_on_a_sample_for_large_data_use_the_references_own_kth_distance():
    """Above the exact limit the reference is a sample: p is kept for i where i's distance to p is within p's own
    k-th neighbour distance in that sample (for i in the sample that is exactly "p lists i")."""
    from aae_dist.training import neighbours

    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.random((600, 8), dtype=np.float32))
    keys, positions, pick = neighbours.neighbour_positions(_batches(x, 100), 600, k=3, seed=0, limit=200, mutual=True)
    ref = x[pick].double().numpy()
    own = np.sqrt(((ref[:, None] - ref[None]) ** 2).sum(-1))
    np.fill_diagonal(own, np.inf)
    kth = np.sort(own, 1)[:, 2]
    for i in range(0, 600, 29):
        d = np.sqrt(((ref - x[i].double().numpy()) ** 2).sum(1))
        if i in set(pick):
            d[np.searchsorted(pick, i)] = np.inf
        row = np.argsort(d)[:3].tolist()
        want = mutual_filled([row], [[d[p] <= kth[p] for p in row]])[0]
        assert positions[np.searchsorted(keys, neighbours.fingerprint(x[i : i + 1]).numpy()[0])].tolist() == want


def test_neighbour_term_is_the_kl_to_the_neighbours_y_and_moves_the_neighbour_only_when_asked():
    """The term's value is KL(y(x) || y(n)) for the neighbour the table hands out (here: the batch reversed);
    neighbours_moved moves n first (another value on the same seed); table rows cannot be moved: one line."""
    import torch.nn.functional as F

    from aae_dist.errors import UserError
    from aae_dist.models import AAE
    from aae_dist.preflight import check_against_data
    from aae_dist.training.phases import StepContext, build_phases

    def term_value(*extra):
        cfg = load_config(None, ["model.variant=clustering", "model.num_classes=4", "model.hidden=[16]", "model.disc_hidden=[8]",
                                 "model.latent_dim=2", "phases.reconstruction.neighbours=1", *extra])
        torch.manual_seed(0)
        aae = AAE(cfg.model, cfg.prior, (1, 8, 8), "uint8", 4).eval()
        x = torch.rand(6, 1, 8, 8)
        ctx = StepContext(dict(aae.nets), aae, torch.Generator().manual_seed(0), neighbour=lambda v, g: v.flip(0))
        rec = [p for p in build_phases(cfg.phases, cfg.model) if p.name == "reconstruction"][0]
        with torch.no_grad():
            got = float(rec.loss(ctx, x, torch.zeros(6, dtype=torch.long))[1]["neighbours"])
            want = F.kl_div(F.log_softmax(aae.nets["encoder"](x.flip(0)).y_logits, 1), torch.softmax(aae.nets["encoder"](x).y_logits, 1),
                            reduction="batchmean")
        return got, float(want), cfg

    got, want, _ = term_value()
    assert got == pytest.approx(want, rel=1e-5) and got > 0
    moved, _, cfg = term_value("phases.reconstruction.neighbours_moved=true", "phases.reconstruction.consistency_rotate=30")
    assert moved != pytest.approx(got, rel=1e-3)

    class Rows:  # what a table's manifest says: samples are flat rows
        labels, num_classes, shape = True, 4, (12,)

    with pytest.raises(UserError, match=r"phases.reconstruction.neighbours_moved moves images.*set it to false"):
        check_against_data(cfg, Rows())
    _, _, cfg = term_value("phases.reconstruction.neighbours_space=deskewed")
    with pytest.raises(UserError, match=r"phases.reconstruction.neighbours_space=deskewed deskews images.*set it to input"):
        check_against_data(cfg, Rows())


def test_deskewing_makes_a_slanted_bar_upright_and_centred_and_the_search_keys_stay_the_inputs():
    from aae_dist.training import neighbours

    x = torch.zeros(3, 1, 20, 20)
    for r in range(4, 16):  # a bar slanted by 0.5 columns per row, off centre; one upright; one blank image
        x[0, 0, r, 3 + r // 2] = 1.0
        x[1, 0, r, 9] = 1.0
    out = neighbours.deskewed(x)

    def column_spread(img):
        cols = img[0].sum(0)
        c = torch.arange(len(cols), dtype=torch.float32)
        mean = (cols * c).sum() / cols.sum()
        return float(((cols * (c - mean) ** 2).sum() / cols.sum()).sqrt()), float(mean)

    spread, centre = column_spread(out[0])
    assert column_spread(x[0])[0] > 1.5 and spread < 0.6 and abs(centre - 9.5) < 0.6
    assert torch.allclose(out[0].sum(), x[0].sum(), rtol=0.1) and torch.equal(out[2], x[2])
    keys, _, _ = neighbours.neighbour_positions(_batches(x, 2), 3, k=1, seed=0, space=neighbours.deskewed)
    assert np.array_equal(keys, np.sort(neighbours.fingerprint(x).numpy()))  # found again by the input's own values


NEIGHBOURS = ["model.variant=clustering", f"model.num_classes={K}", "train.parzen_samples=0", "phases.reconstruction.neighbours=1.0",
              "phases.reconstruction.neighbours_k=3"]


def test_imsat_terms_and_the_neighbour_term_on_two_workers_stay_identical_and_resume_exactly(tmp_path, make_dataset):
    """One pair of 2-worker runs for both run-folder tables (CI time): the information term, adaptive VAT and the
    neighbour term together; the VAT radius table and the neighbour table are each written once and reused."""
    data, _, _ = make_dataset(400, 100)
    base = SMALL_MODEL + IMSAT + NEIGHBOURS[3:] + [f"data.path={data}", "train.checkpoint_every=5",
                                                   "phases.reconstruction.neighbours_mutual=true"]
    _, table = two_workers_whole_and_resumed(tmp_path, base, "neighbours.npz", also="vat_radius.npz")
    with np.load(table, allow_pickle=False) as f:
        assert f["positions"].shape == (400, 3) and f["keys"].dtype == np.int64 and bool(f["mutual"])
    with np.load(table.parent / "vat_radius.npz", allow_pickle=False) as f:
        assert len(f["radii"]) == 400 and f["keys"].dtype == np.int64


def test_a_damaged_neighbour_table_is_one_line_and_keeps_the_checkpoint(tmp_path, make_dataset, capsys):
    from aae_dist.cli import main

    data, _, _ = make_dataset(200, 50)
    argv = ["train", "--workers", "0", "--storage", str(tmp_path), "--name", "r", "--set", f"data.path={data}"]
    for s in SMALL_MODEL + NEIGHBOURS + ["train.checkpoint_every=2"]:
        argv += ["--set", s]
    assert main(argv + ["--set", "train.max_steps=2"]) == 0
    (tmp_path / "r" / "neighbours.npz").write_bytes(b"not an npz")
    before = {k: v for k, v in tree_digest(tmp_path / "r").items() if k != "config.json"}  # a resume records its own config
    capsys.readouterr()
    assert main(argv + ["--set", "train.max_steps=4", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neighbours.npz is not a valid neighbour table" in err[0] and "delete it and resume" in err[0]
    assert {k: v for k, v in tree_digest(tmp_path / "r").items() if k != "config.json"} == before  # checkpoints and all else kept


def test_resuming_with_other_neighbour_settings_than_the_stored_table_is_one_line(tmp_path, make_dataset, capsys):
    """The table is searched once per run; a resume that asks for other neighbours (mutual, or another k) is refused
    in one line naming the file and both settings, and keeps the run; with the table's own settings it resumes."""
    from aae_dist.cli import main

    data, _, _ = make_dataset(200, 50)
    argv = ["train", "--workers", "0", "--storage", str(tmp_path), "--name", "r", "--set", f"data.path={data}"]
    for s in SMALL_MODEL + NEIGHBOURS + ["train.checkpoint_every=2"]:
        argv += ["--set", s]
    assert main(argv + ["--set", "train.max_steps=2"]) == 0
    before = {k: v for k, v in tree_digest(tmp_path / "r").items() if k != "config.json"}
    for other, said in ((["phases.reconstruction.neighbours_mutual=true"], "asks for 3, true"),
                        (["phases.reconstruction.neighbours_k=4"], "asks for 4, false")):
        capsys.readouterr()
        assert main(argv + ["--set", "train.max_steps=4", "--resume"] + [a for o in other for a in ("--set", o)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "neighbours.npz was searched with phases.reconstruction.neighbours_k=3, neighbours_mutual=false" in err[0], err
        assert said in err[0] and "delete the file to search again" in err[0] and "Traceback" not in err[0]
        assert {k: v for k, v in tree_digest(tmp_path / "r").items() if k != "config.json"} == before
    assert main(argv + ["--set", "train.max_steps=4", "--resume"]) == 0


# ---- fair baselines ----------------------------------------------------------------------------

def test_autoencoder_kmeans_baseline_in_summary_and_eval(tmp_path, make_dataset):
    """train.autoencoder_baseline: k-means on a plain autoencoder's codes, scored both ways, beside k-means on
    pixels; the autoencoder is stored with the run and `aae-dist eval` scores the same one again."""
    from aae_dist.inference import evaluate
    from aae_dist.training.trainer import train_in_process

    data, _, _ = make_dataset(400, 100)
    cfg = load_config(None, SMALL_MODEL + [f"data.path={data}", "model.variant=clustering", f"model.num_classes={K}",
                                           "train.max_steps=8", "train.parzen_samples=0", "train.autoencoder_baseline=true"])
    run = tmp_path / "run"
    base = train_in_process(cfg, str(run))["baselines"]
    for key in ("autoencoder_kmeans_cluster_error", "autoencoder_kmeans_cluster_error_majority", "kmeans_cluster_error"):
        assert 0.0 <= base[key] <= 1.0, key
    assert (run / "baseline_autoencoder.pt").exists()
    again = evaluate(str(run), None, "test")["baselines"]
    assert again["autoencoder_kmeans_cluster_error"] == base["autoencoder_kmeans_cluster_error"]
    assert again["autoencoder_kmeans_cluster_error_majority"] == base["autoencoder_kmeans_cluster_error_majority"]


# ---- several y heads on one encoder trunk (model.cluster_heads) ------------------------------------

HEADS = ["model.variant=clustering", f"model.num_classes={K}", "train.parzen_samples=0", "model.cluster_heads=3",
         "phases.reconstruction.info=0.1"]


def _relabelled(tmp_path, url: str) -> str:
    """The same images with their labels destroyed (redrawn at random)."""
    from aae_dist.data import ShardStream, read_manifest
    from aae_dist.data.writer import write_dataset

    manifest, splits, rng = read_manifest(url), {}, np.random.default_rng(7)
    for split in ("train", "test"):
        xs, ys = zip(*((x.numpy(), y.numpy()) for x, y in ShardStream(url, split, 100, shuffle=False, manifest=manifest).iter_epoch(0)))
        splits[split] = (np.concatenate(xs), rng.integers(0, 10, sum(map(len, ys))))
    out = str(tmp_path / "relabelled")
    write_dataset(out, splits, num_classes=10, source="test", shard_size=128, progress=False)
    return out


def test_head_selection_never_reads_labels(tmp_path, make_dataset):
    """Three heads: every head's error is reported, the reported one is the chosen head's, and scoring the same
    run on the same images with every label changed changes the errors but not the chosen head."""
    from aae_dist.inference import evaluate
    from aae_dist.training.trainer import train_in_process

    data, _, _ = make_dataset(400, 100)
    cfg = load_config(None, SMALL_MODEL + HEADS + [f"data.path={data}", "train.max_steps=12", "train.autoencoder_baseline=true"])
    summary = train_in_process(cfg, str(tmp_path / "run"))
    metrics = summary["metrics"]
    assert 0.0 <= summary["baselines"]["autoencoder_kmeans_cluster_error"] <= 1.0  # the plain autoencoder has no y heads
    head = metrics["cluster_head"]
    assert len(metrics["cluster_error_heads"]) == 3 and len(metrics["cluster_head_objectives"]) == 3
    assert head == int(np.argmin(metrics["cluster_head_objectives"]))
    assert metrics["cluster_error"] == metrics["cluster_error_heads"][head]
    assert metrics["cluster_error_majority"] == metrics["cluster_error_majority_heads"][head]
    same = evaluate(str(tmp_path / "run"), None, "test")
    other = evaluate(str(tmp_path / "run"), _relabelled(tmp_path, data), "test")
    assert same["cluster_head_objectives"] == other["cluster_head_objectives"] and other["cluster_head"] == head
    assert same["cluster_error_heads"] != other["cluster_error_heads"]  # the labels did change what is scored


def test_encode_reports_the_chosen_head(tmp_path, make_dataset):
    """`encode`'s y_pred is the head the metrics report (chosen label-free again), every head's in y_pred_heads."""
    import pyarrow.parquet as pq

    from aae_dist.cli import main
    from aae_dist.training.trainer import train_in_process

    data, _, _ = make_dataset(400, 100)
    cfg = load_config(None, SMALL_MODEL + HEADS + [f"data.path={data}", "train.max_steps=12", "train.seed=1"])
    head = train_in_process(cfg, str(tmp_path / "run"))["metrics"]["cluster_head"]
    assert head != 0  # this seed's choice: with head 0 the check below could not tell the reported head from the first
    assert main(["encode", str(tmp_path / "run"), "--data", str(data), "--out", str(tmp_path / "codes")]) == 0
    t = pq.read_table(tmp_path / "codes" / "test-00000.parquet")
    preds = np.array(t.column("y_pred_heads").to_pylist())
    assert preds.shape[1] == 3 and np.array_equal(np.array(t.column("y_pred").to_pylist()), preds[:, head])
    assert (preds[:, head] != preds[:, 0]).any()


@pytest.mark.slow  # ~40 s; CI keeps head selection in-process and the IMSAT terms on two workers
def test_cluster_heads_on_two_workers_stay_identical_and_resume_exactly(tmp_path, make_dataset):
    data, _, _ = make_dataset(400, 100)
    base = SMALL_MODEL + HEADS + ["model.batch_norm=true", "phases.reconstruction.vat=1.0", f"data.path={data}",
                                  "train.checkpoint_every=5"]
    run_processes(load_config(None, base + ["train.max_steps=10"]), str(tmp_path / "whole"), world=2)
    run_processes(load_config(None, base + ["train.max_steps=5"]), str(tmp_path / "split"), world=2)
    run_processes(load_config(None, base + ["train.max_steps=10"]), str(tmp_path / "split"), world=2)
    whole, split = read_summary(tmp_path / "whole"), read_summary(tmp_path / "split")
    assert whole["replicas_in_sync"] is True and split["resumed_from_step"] == 5
    assert split["replica_fingerprints"] == whole["replica_fingerprints"]
    assert split["metrics"]["cluster_head"] == whole["metrics"]["cluster_head"]
    assert split["metrics"]["cluster_error_heads"] == whole["metrics"]["cluster_error_heads"]


def test_cluster_heads_without_a_categorical_y_is_one_line(world, capsys):
    """model.cluster_heads on a variant without y: one line naming the key and the fix, nothing touched."""
    from aae_dist.cli import main

    before = tree_digest(world)
    capsys.readouterr()
    assert main(T(world, "model.cluster_heads=3", "train.max_steps=2", name="heads")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aae-dist: error:") and "\n" not in err and "Traceback" not in err, err
    assert "model.cluster_heads=3" in err and "model.cluster_heads=1" in err
    assert {k: v for k, v in tree_digest(world).items() if k in before} == before


# ---- IMSAT without the categorical adversary (phases.generator.categorical=0) ---------------------

def test_categorical_adversary_off_runs_no_categorical_phase_and_leaves_its_d_untouched(tmp_path, make_dataset):
    """phases.generator.categorical=0: y is shaped by the information term alone; the categorical D is never
    trained (no optimizer for it, its weights do not move) while the encoder does train."""
    from aae_dist.training.trainer import train_in_process

    data, _, _ = make_dataset(400, 100)
    base = SMALL_MODEL + [f"data.path={data}", "model.variant=clustering", f"model.num_classes={K}", "train.max_steps=6",
                          "train.parzen_samples=0", "train.checkpoint_every=3", "phases.reconstruction.info=0.1"]
    states = {}
    for name, extra in (("off", ["phases.generator.categorical=0"]), ("on", [])):
        summary = train_in_process(load_config(None, base + extra), str(tmp_path / name))
        assert 0.0 <= summary["metrics"]["cluster_error"] <= 1.0
        states[name] = [torch.load(tmp_path / name / f"checkpoint_step_00000000{s}" / "state.pt", weights_only=True) for s in (3, 6)]
    (off3, off6), (on3, on6) = states["off"], states["on"]
    assert "discriminator_cat" not in off6["optimizers"] and "discriminator_cat" in on6["optimizers"]

    def moved(a, b, net):
        return any(not torch.equal(a["models"][net][k], b["models"][net][k]) for k in a["models"][net])

    assert not moved(off3, off6, "discriminator_cat") and moved(off3, off6, "encoder")
    assert moved(on3, on6, "discriminator_cat")  # the control: with the adversary on, the same check sees it train


# ---- deskewed input (model.deskew) -------------------------------------------------------------

def test_deskewed_input_is_what_training_search_and_evaluation_see(tmp_path, make_dataset, monkeypatch, capsys):
    """model.deskew: normalise() deskews the stored pixels before scaling, so training, the neighbour search
    (every row a step reads is found again: the fingerprints are of the deskewed input), evaluation and the
    baselines all see the same images; a resume that turns it off is refused (the weights learnt upright
    digits), and table rows are refused up front."""
    from aae_dist.cli import main
    from aae_dist.errors import UserError
    from aae_dist.models import AAE
    from aae_dist.models.deskew import deskewed
    from aae_dist.preflight import check_against_data
    from aae_dist.training import neighbours

    cfg = load_config(None, ["model.deskew=true", "model.hidden=[16]", "model.latent_dim=2"])
    x = torch.zeros(2, 1, 20, 20, dtype=torch.uint8)
    for r in range(4, 16):
        x[0, 0, r, 3 + r // 2] = 255  # a slanted bar off centre
    got = AAE(cfg.model, cfg.prior, (1, 20, 20), "uint8", 10).normalise(x)
    assert torch.equal(got, deskewed(x.float()) / 255) and not torch.equal(got, x.float() / 255)

    class Rows:  # what a table's manifest says: samples are flat rows
        labels, num_classes, shape = True, 4, (12,)

    with pytest.raises(UserError, match=r"model.deskew deskews images.*set it to false"):
        check_against_data(cfg, Rows())

    found, draw = [], neighbours.NeighbourTable.__call__

    def counting(self, xs, generator):
        found.append(bool(torch.isin(neighbours.fingerprint(xs), self.keys).all()))
        return draw(self, xs, generator)

    monkeypatch.setattr(neighbours.NeighbourTable, "__call__", counting)
    data, _, _ = make_dataset(200, 50)
    argv = ["train", "--workers", "0", "--storage", str(tmp_path), "--name", "r", "--set", f"data.path={data}"]
    for s in SMALL_MODEL + NEIGHBOURS + ["model.deskew=true", "train.checkpoint_every=2"]:
        argv += ["--set", s]
    assert main(argv + ["--set", "train.max_steps=6"]) == 0
    assert len(found) == 6 and all(found)
    summary = read_summary(tmp_path / "r")
    assert summary["config"]["model"]["deskew"] is True and 0 <= summary["metrics"]["cluster_error"] <= 1
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r")]) == 0
    assert json.loads(capsys.readouterr().out)["cluster_error"] == summary["metrics"]["cluster_error"]  # eval deskews as training did
    assert main(argv + ["--set", "train.max_steps=8", "--set", "model.deskew=false", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deskew" in err[0], err
