"""Pre-flight: everything that can be refused before a worker starts or a byte of the run folder is
written -- the run folder's state against --resume/--overwrite, the plan against the data, the config
against the dataset and the checkpoint it would resume."""

from __future__ import annotations

import json

from . import runfolder, storage
from .config import Config
from .errors import UserError
from .plan import RunPlan
from .variants import variant


def preflight(cfg: Config, plan: RunPlan | None = None, manifest=None) -> None:
    """Everything that can be checked before a worker starts (the manifest and the plan: read and made here if not given)."""
    from .data import read_manifest

    m = manifest or read_manifest(cfg.data.path)
    plan = plan or RunPlan.of(cfg, "", m.split("train", cfg.data.path).count)
    check_plan(cfg, plan, m)
    check_models(cfg, m)


def check_plan(cfg: Config, plan: RunPlan, m) -> None:
    """The checks that need no torch: `train` runs them before a local Ray starts beside check_models."""
    from .training.trackers import check as check_trackers

    plan.check()
    check_against_data(cfg, m)
    check_trackers(cfg)  # log.mlflow / log.wandb: their clients are installed


def check_models(cfg: Config, m) -> None:
    """The checks that import torch (~1.5 s): the prior, the device, the networks built on torch's meta
    device (shapes and options checked, no weights drawn)."""
    from .models.priors import build_prior

    prior = build_prior(cfg.prior, cfg.model.latent_dim)
    if variant(cfg.model.variant).label_tag and not prior.takes_labels:
        raise UserError(f"model.variant={cfg.model.variant} conditions the prior on each label, but prior.kind={cfg.prior.kind} ignores labels "
                        "(the codes would not be regularised by label): use prior.kind=mixture or swiss_roll")
    check_device(cfg)
    check_networks(cfg, m)


def check_networks(cfg: Config, m) -> None:
    """build_networks refuses what the data cannot feed; on the meta device it allocates and draws nothing."""
    import torch

    from .models.networks import build_networks

    args = (cfg.model, tuple(m.shape), cfg.model.num_classes or m.num_classes)
    try:
        with torch.device("meta"):
            build_networks(*args)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - a layer the meta device cannot build: build it for real
        build_networks(*args)


def check_device(cfg: Config) -> None:
    """--gpu where no GPU is visible, bf16 on local CPU workers without native bf16: refused before any starts."""
    if cfg.run.gpu:
        import torch

        if cfg.run.address is None and not torch.cuda.is_available():
            raise UserError("--gpu given but no CUDA GPU is visible here: drop --gpu or run on a GPU node (--address)")
    if cfg.train.precision == "bf16" and not cfg.run.gpu and cfg.run.address is None:
        import torch

        from .training.precision import autocast_dtype

        autocast_dtype(cfg.train, torch.device("cpu"))


def check_against_data(cfg: Config, m) -> None:
    """The variant, labels, classes and per-variant options against what the dataset holds."""
    where = storage.redact(cfg.data.path)
    if cfg.data.labeled_per_class and not m.labels:
        raise UserError(f"data.labeled_per_class needs labels, but {where} has none: shard a labelled source")
    row = variant(cfg.model.variant)
    if row.needs_labels and not m.labels:
        raise UserError(f"model.variant={cfg.model.variant} needs labels, but {where} has none: shard a labelled source")
    k = cfg.model.num_classes or m.num_classes
    for option in ("consistency", "vat", "neighbours"):
        if getattr(cfg.phases.reconstruction, option) and not row.categorical:
            raise UserError(f"phases.reconstruction.{option} needs a variant with a categorical y (clustering, semi_supervised, "
                            f"dim_reduction), not model.variant={cfg.model.variant}: set it to 0")
    if cfg.phases.reconstruction.consistency and len(m.shape) != 3:
        raise UserError(f"phases.reconstruction.consistency translates images, but samples of {where} are "
                        f"shaped {tuple(m.shape)}, not (channels, height, width): set it to 0")
    if cfg.model.deskew and len(m.shape) != 3:
        raise UserError(f"model.deskew deskews images, but samples of {where} are shaped {tuple(m.shape)}, not "
                        "(channels, height, width): set it to false")
    rc = cfg.phases.reconstruction
    if rc.neighbours and rc.neighbours_moved and len(m.shape) != 3:
        raise UserError(f"phases.reconstruction.neighbours_moved moves images, but samples of {where} are "
                        f"shaped {tuple(m.shape)}, not (channels, height, width): set it to false")
    if rc.neighbours and rc.neighbours_space == "deskewed" and len(m.shape) != 3:
        raise UserError(f"phases.reconstruction.neighbours_space=deskewed deskews images, but samples of {where} are "
                        f"shaped {tuple(m.shape)}, not (channels, height, width): set it to input")
    c = cfg.phases.classification
    if c.moves and len(m.shape) != 3:
        moved = ", ".join(f"phases.classification.{k}" for k in ("shift", "rotate", "scale") if getattr(c, k))
        raise UserError(f"{moved} move{'s' if ',' not in moved else ''} images, but samples of {where} are shaped "
                        f"{tuple(m.shape)}, not (channels, height, width): set {'it' if ',' not in moved else 'them'} to 0")
    if row.label_tag and cfg.prior.kind in ("mixture", "swiss_roll") and cfg.prior.components != k:
        raise UserError(f"model.variant={cfg.model.variant}: prior.components={cfg.prior.components} must equal the {k} classes")
    if row.uses_labels(cfg.data.labeled_per_class) and k < m.num_classes:
        raise UserError(f"model.num_classes={k} is fewer than the {m.num_classes} classes of {where}: raise it or drop it")


def run_exists(run_url: str) -> bool:
    """A run exists once it has a checkpoint or a summary (a config.json alone is a start that failed),
    or while an --overwrite has it set aside."""
    from .checkpoint import PREFIX

    return any(n.startswith(PREFIX) or n in ("summary.json", runfolder.ASIDE) for n in storage.listdir(run_url))


def check_resume(run_url: str, cfg: Config) -> None:
    """Refuse, before anything is written, to resume with a config the checkpoint's weights do not fit."""
    from . import checkpoint

    found = checkpoint.listing(run_url)
    if not found:
        return
    meta = json.loads(storage.read_bytes(storage.join(found[-1][1], checkpoint.META)))
    checkpoint.check_architecture(meta, cfg.to_dict())


def check_flags(cfg: Config, run_url: str, resume: bool, overwrite: bool) -> bool:
    """Whether the run exists, refusing a start that --resume / --overwrite do not allow."""
    exists = run_exists(run_url)
    if resume and not exists:
        raise UserError(f"--resume: no run named '{cfg.run.name}' at {storage.redact(cfg.run.storage)}: check --name/--storage or drop --resume")
    if exists and not resume and not overwrite:
        raise UserError(f"run '{cfg.run.name}' already exists at {storage.redact(cfg.run.storage)}: pass --resume to continue it or --overwrite to replace it")
    if exists and overwrite and not resume:
        runfolder.check_overwritable(run_url)
    return exists
