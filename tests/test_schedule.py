"""The coordinator's schedule and its reduced decisions."""

from __future__ import annotations

import torch

from aae_dist.config import load_config
from aae_dist.training.coordinator import Coordinator
from aae_dist.training.phases import build_phases


def phases_of(cfg):
    return build_phases(cfg.phases, cfg.model, cfg.train.warmup_steps, cfg.data.labeled_per_class, cfg.train.target_recon_loss)


def coordinator(*sets, steps_per_epoch=10):
    cfg = load_config(None, list(sets))
    phases = phases_of(cfg)
    return Coordinator(cfg.train, phases, steps_per_epoch, torch.device("cpu")), phases


def names(coord):
    return [p.name for p in coord.phases_now()]


def test_default_step_runs_three_phases_in_order():
    c, _ = coordinator()
    assert names(c) == ["reconstruction", "discriminator", "generator"]


def test_warmup_then_adversarial():
    c, _ = coordinator("train.warmup_steps=3")
    seen = []
    for _ in range(5):
        seen.append(names(c))
        c.end_step()
    assert seen[:3] == [["reconstruction"]] * 3
    assert seen[3] == ["reconstruction", "discriminator", "generator"]


def test_phase_intervals_and_repeat():
    c, phases = coordinator("phases.generator.every=2", "phases.discriminator.repeat=3")
    runs = []
    for _ in range(4):
        runs.append(names(c))
        c.end_step()
    assert [("generator" in r) for r in runs] == [True, False, True, False]
    assert phases[1].repeat == 3


def test_epochs_and_max_steps():
    c, _ = coordinator("train.epochs=3", steps_per_epoch=7)
    assert c.total_steps() == 21
    c2, _ = coordinator("train.epochs=3", "train.max_steps=5", steps_per_epoch=7)
    assert c2.total_steps() == 5
    for _ in range(8):
        c.end_step()
    assert (c.epoch, c.batch_in_epoch) == (1, 1)


def feed(c, phases, acc, steps):
    d = phases[1]
    for _ in range(steps):
        if d in c.phases_now():
            c.record(d, {"loss": torch.tensor(0.1), "acc_prior": torch.tensor(acc), "acc_codes": torch.tensor(acc)})
        c.record(phases[0], {"loss": torch.tensor(0.5)})
        c.end_step()


def test_discriminator_skipped_while_too_accurate_and_resumes():
    c, phases = coordinator("phases.discriminator.skip_above_accuracy=0.9", "train.sync_every=5")
    feed(c, phases, 0.95, 4)
    assert "discriminator" in names(c)  # no decision before the sync step
    feed(c, phases, 0.95, 1)
    assert "discriminator" not in names(c)
    feed(c, phases, 0.95, 5)  # an interval without D statistics: D runs again to be measured
    assert "discriminator" in names(c)
    feed(c, phases, 0.6, 5)
    assert "discriminator" in names(c)


def test_target_metric_stops_everyone():
    c, phases = coordinator("train.target_recon_loss=0.6", "train.sync_every=2")
    feed(c, phases, 0.5, 2)
    assert c.done() and "target_recon_loss" in c.stop_reason


def test_nonfinite_is_counted_at_sync():
    c, phases = coordinator("train.sync_every=2")
    c.flag_nonfinite(phases[2], torch.tensor(float("nan")))
    c.end_step()
    assert c.nonfinite_steps == 0
    c.end_step()
    assert c.nonfinite_steps == 1 and c.nonfinite_phase == "generator"


def test_state_round_trip():
    c, phases = coordinator("phases.discriminator.skip_above_accuracy=0.9", "train.sync_every=3")
    feed(c, phases, 0.99, 4)
    d, _ = coordinator("phases.discriminator.skip_above_accuracy=0.9", "train.sync_every=3")
    d.load_state_dict(c.state_dict())
    assert d.step == 4 and d.skip == c.skip and torch.equal(d.stats.buffer, c.stats.buffer)
    assert names(d) == names(c)


def test_translated_moves_each_image_by_its_own_whole_pixel_offset():
    """The consistency option's augmentation: every image moves by an offset in [-2, 2] per axis, whole
    pixels (values unchanged), offsets differ across the batch, and the same generator seed repeats them."""
    from aae_dist.training.phases import translated

    x = torch.zeros(64, 1, 12, 12)
    x[:, 0, 5, 6] = 1.0
    moved = translated(x, 2, torch.Generator().manual_seed(3))
    where = [(m[0] == 1).nonzero().tolist() for m in moved]
    assert all(len(w) == 1 for w in where) and set(moved.unique().tolist()) == {0.0, 1.0}
    offsets = {(w[0][0] - 5, w[0][1] - 6) for w in where}
    assert offsets <= {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)} and len(offsets) > 10
    assert torch.equal(moved, translated(x, 2, torch.Generator().manual_seed(3)))


def test_consistency_term_is_reported_and_bounded_by_zero():
    """With phases.reconstruction.consistency > 0 on the clustering variant the reconstruction loss
    carries a KL between y(x) and y(x shifted): non-negative, and zero when the shift cannot move
    anything (an all-zero image batch gives identical inputs)."""
    from aae_dist.models import AAE
    from aae_dist.training.phases import StepContext

    cfg = load_config(None, ["model.variant=clustering", "model.num_classes=4", "model.hidden=[16]", "model.disc_hidden=[8]",
                             "model.latent_dim=2", "phases.reconstruction.consistency=2"])
    aae = AAE(cfg.model, cfg.prior, (1, 8, 8), "uint8", 4)
    recon = phases_of(cfg)[0]
    ctx = StepContext(dict(aae.nets), aae, torch.Generator().manual_seed(0))
    x = torch.rand(16, 1, 8, 8)
    _, stats = recon.loss(ctx, x, torch.zeros(16, dtype=torch.long))
    assert stats["consistency"] > 0
    aae.eval()  # no input noise or dropout: a blank image and its shifted copy are the same input
    _, stats = recon.loss(ctx, torch.zeros(16, 1, 8, 8), torch.zeros(16, dtype=torch.long))
    assert stats["consistency"].abs() < 1e-6


def test_vat_perturbation_has_norm_eps_and_moves_y_more_than_noise():
    """phases.reconstruction.vat: the power iteration's perturbation has L2 norm vat_eps per sample, moves y
    further than random perturbations of the same norm, and leaves no gradient on the encoder's parameters."""
    from aae_dist.models import AAE
    from aae_dist.training.phases import StepContext, _kl_y, _per_sample_unit, adversarial_perturbation

    cfg = load_config(None, ["model.variant=clustering", "model.num_classes=4", "model.hidden=[32]", "model.disc_hidden=[8]",
                             "model.latent_dim=2", "phases.reconstruction.vat=1", "phases.reconstruction.vat_eps=0.5"])
    torch.manual_seed(0)
    aae = AAE(cfg.model, cfg.prior, (1, 8, 8), "uint8", 4)
    enc = aae.nets["encoder"]
    enc.eval()  # deterministic encoder, so the KLs compare perturbations only
    ctx = StepContext(dict(aae.nets), aae, torch.Generator().manual_seed(0))
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        target = torch.softmax(enc(x).y_logits, 1)
    r = adversarial_perturbation(ctx, x, target, 0.5)
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((32,), 0.5), atol=1e-5)
    assert all(p.grad is None for p in enc.parameters()) and all(p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        adversarial = _kl_y(target, enc(x + r).y_logits)
        noise = [_kl_y(target, enc(x + 0.5 * _per_sample_unit(torch.randn_like(x))).y_logits) for _ in range(5)]
    assert adversarial > 3 * max(noise)
    recon = phases_of(cfg)[0]
    enc.train()
    _, stats = recon.loss(ctx, x, torch.zeros(32, dtype=torch.long))
    assert stats["vat"] > 0


def test_translated_with_rotation_and_zoom_turns_each_image_its_own_way():
    """consistency_rotate / consistency_scale: a bar turned by up to 30 degrees stays a bar of about the same ink
    (bilinear), turns differently per image (its principal axis), and the same seed repeats the draw."""
    from aae_dist.training.phases import translated

    x = torch.zeros(32, 1, 21, 21)
    x[:, 0, 4:17, 10] = 1.0  # a vertical bar through the centre
    moved = translated(x, 1, torch.Generator().manual_seed(1), rotate=30.0, scale=0.1)
    ink = moved.sum((1, 2, 3))
    assert torch.all((ink > 0.7 * 13) & (ink < 1.3 * 13))
    yy, xx = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")

    def tilt(img):  # angle of the bar's principal axis from vertical, degrees
        w = img[0] / img[0].sum()
        my, mx = (w * yy).sum(), (w * xx).sum()
        cyy, cxx, cxy = (w * (yy - my) ** 2).sum(), (w * (xx - mx) ** 2).sum(), (w * (yy - my) * (xx - mx)).sum()
        return float(torch.rad2deg(0.5 * torch.atan2(2 * cxy, cyy - cxx)))

    tilts = [tilt(m) for m in moved]
    assert max(abs(t) for t in tilts) <= 32 and max(tilts) - min(tilts) > 20
    assert torch.equal(moved, translated(x, 1, torch.Generator().manual_seed(1), rotate=30.0, scale=0.1))
    assert abs(tilt(translated(x, 1, torch.Generator().manual_seed(1))[0])) < 1e-6  # no rotate: shifts only


def test_clean_consistency_target_skips_the_input_corruption_only():
    """consistency_target=clean: y(x) is read without the encoder's input noise and dropout (still in training
    mode), so it is the same on every call, while the corrupted reading differs call to call."""
    from aae_dist.models import AAE
    from aae_dist.training.phases import StepContext

    cfg = load_config(None, ["model.variant=clustering", "model.num_classes=4", "model.hidden=[16]", "model.disc_hidden=[8]",
                             "model.latent_dim=2", "model.input_noise=0.5", "model.input_dropout=0.2", "model.batch_norm=true",
                             "phases.reconstruction.consistency=1", "phases.reconstruction.consistency_target=clean"])
    aae = AAE(cfg.model, cfg.prior, (1, 8, 8), "uint8", 4)
    enc, g = aae.nets["encoder"], torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    assert enc.training
    assert torch.equal(enc(x, generator=g, corrupt=False).y_logits, enc(x, generator=g, corrupt=False).y_logits)
    assert not torch.equal(enc(x, generator=g).y_logits, enc(x, generator=g).y_logits)
    _, stats = phases_of(cfg)[0].loss(StepContext(dict(aae.nets), aae, g), x, torch.zeros(16, dtype=torch.long))
    assert stats["consistency"] > 0


def test_pseudo_label_loss_counts_only_confident_targets_over_the_whole_batch():
    """consistency_threshold > 0 (FixMatch): a moved copy learns its target's most likely class only where the
    target is at least that confident; the sum is divided by the whole batch, and nothing confident gives 0."""
    import torch.nn.functional as F

    from aae_dist.training.phases import _pseudo_label_loss

    target = torch.tensor([[0.97, 0.01, 0.02], [0.4, 0.3, 0.3], [0.01, 0.01, 0.98], [0.5, 0.49, 0.01]])
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = _pseudo_label_loss(target, logits, 0.95)
    by_hand = (F.cross_entropy(logits[0:1], torch.tensor([0])) + F.cross_entropy(logits[2:3], torch.tensor([2]))) / 4
    assert torch.allclose(loss, by_hand)
    loss.backward()
    assert torch.all(logits.grad[[1, 3]] == 0) and torch.all(logits.grad[[0, 2]].abs().sum(1) > 0)
    assert _pseudo_label_loss(target, logits.detach(), 0.99) == 0
    assert torch.allclose(_pseudo_label_loss(target, logits.detach(), 0.3),  # every row kept: plain cross-entropy on argmax
                          F.cross_entropy(logits.detach(), target.argmax(1)))


def test_consistency_threshold_switches_the_term_to_pseudo_labels():
    """The same batch and seed: a threshold no target reaches gives a zero term, a threshold every target reaches
    the cross-entropy against the target's argmax, which differs from the KL of the default."""
    from aae_dist.models import AAE
    from aae_dist.training.phases import StepContext

    def term(*extra):
        cfg = load_config(None, ["model.variant=clustering", "model.num_classes=4", "model.hidden=[16]", "model.disc_hidden=[8]",
                                 "model.latent_dim=2", "phases.reconstruction.consistency=1", *extra])
        torch.manual_seed(0)
        aae = AAE(cfg.model, cfg.prior, (1, 8, 8), "uint8", 4)
        ctx = StepContext(dict(aae.nets), aae, torch.Generator().manual_seed(0))
        _, stats = phases_of(cfg)[0].loss(ctx, torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
                                          torch.zeros(16, dtype=torch.long))
        return float(stats["consistency"])

    kl, none_kept, all_kept = term(), term("phases.reconstruction.consistency_threshold=0.999"), \
        term("phases.reconstruction.consistency_threshold=0.01")
    assert none_kept == 0 and all_kept > 0 and abs(all_kept - kl) > 1e-4


def test_classification_moves_the_labelled_images_only_when_asked():
    """phases.classification.shift/rotate/scale: the labelled minibatch is moved before the encoder reads it
    (a different loss from the unmoved one on the same seed), and a dataset of table rows is refused in one line."""
    import pytest

    from aae_dist.errors import UserError
    from aae_dist.models import AAE
    from aae_dist.preflight import check_against_data
    from aae_dist.training.phases import StepContext

    def loss(*extra):
        cfg = load_config(None, ["model.variant=semi_supervised", "model.num_classes=4", "model.hidden=[16]", "model.disc_hidden=[8]",
                                 "model.latent_dim=2", "data.labeled_per_class=2", *extra])
        torch.manual_seed(0)
        aae = AAE(cfg.model, cfg.prior, (1, 8, 8), "uint8", 4)
        xl = torch.zeros(8, 1, 8, 8)
        xl[:, 0, 2:6, 3] = 1.0
        yl = torch.arange(8) % 4
        ctx = StepContext(dict(aae.nets), aae, torch.Generator().manual_seed(0), labelled=lambda: (xl, yl))
        aae.eval()
        classify = [p for p in phases_of(cfg) if p.name == "classification"][0]
        return float(classify.loss(ctx, xl, yl)[1]["loss"]), cfg

    plain, _ = loss()
    assert plain == loss()[0]
    moved, cfg = loss("phases.classification.shift=2", "phases.classification.rotate=20")
    assert moved != plain

    class Rows:  # what a table's manifest says: samples are flat rows
        labels, num_classes, shape = True, 4, (12,)

    with pytest.raises(UserError, match=r"phases.classification.shift, phases.classification.rotate move images.*set them to 0"):
        check_against_data(cfg, Rows())


def test_shear_slants_and_thickness_thickens_or_thins_each_image_its_own_way():
    """consistency_shear slants a vertical bar by its own draw (its column span grows, the ink stays); consistency_thickness
    makes strokes thicker or thinner (ink up or down, per image); with both off the draws are those of before."""
    from aae_dist.training.phases import translated

    x = torch.zeros(16, 1, 21, 21)
    x[:, 0, 4:17, 10] = 1.0
    slanted = translated(x, 1, torch.Generator().manual_seed(5), shear=30.0)
    spans = [int(c.max() - c.min()) for c in ((m[0] > 0.3).nonzero()[:, 1] for m in slanted)]
    assert max(spans) >= 6 and min(spans) <= 3  # up to tan(30 deg) x 12 rows of slant, some nearly none
    assert torch.allclose(slanted.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.05)
    ink = translated(x, 1, torch.Generator().manual_seed(5), thickness=1.0).sum((1, 2, 3)) / 13
    assert ink.max() > 1.5 and ink.min() < 0.7  # dilated towards 3 columns, eroded towards none
    assert torch.equal(translated(x, 2, torch.Generator().manual_seed(3), 15.0, 0.1),
                       translated(x, 2, torch.Generator().manual_seed(3), 15.0, 0.1, 0.0, 0.0))


def test_max3x3_is_max_pool():
    """The thickness move's dilation: the shifted-views maximum equals max_pool2d(3, 1, 1) exactly, borders included."""
    import torch.nn.functional as F

    from aae_dist.training.phases import _max3x3

    x = torch.randn(5, 2, 9, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_max3x3(x), F.max_pool2d(x, 3, 1, 1)) and torch.equal(-_max3x3(-x), -F.max_pool2d(-x, 3, 1, 1))
