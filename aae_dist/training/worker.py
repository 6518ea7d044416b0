"""The per-worker training loop: a small Trainer over data, networks, phases, coordinator, checkpoints, metrics."""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import storage
from ..config import Config
from ..data import ShardStream, read_manifest
from ..errors import UserError
from ..evaluation import Evaluator
from ..models import build_networks, build_prior
from ..models.latents import sample_latents
from . import checkpoint, faults
from .comm import CommStats
from .coordinator import Coordinator
from .distributed import distributed, wrap
from .metrics import TensorBoardLogger, flatten_config, image_grid, scatter_image
from .phases import StepContext, build_phases, make_optimizer
from .session import LocalSession, RaySession, Session, scratch_dir


class Trainer:
    def __init__(self, cfg: Config, session: Session):
        self.cfg, self.session = cfg, session
        self.rank, self.world = session.rank, session.world_size
        threads = cfg.train.threads or cfg.run.cpus_per_worker
        if threads:
            torch.set_num_threads(threads)
        self.device = session.device(cfg.run.gpu)
        self.amp = cfg.train.amp and self.device.type == "cuda"
        d = cfg.data
        self.manifest = read_manifest(d.path)
        self.train_data = ShardStream(
            d.path, "train", d.batch_size, rank=self.rank, world_size=self.world, seed=cfg.train.seed,
            shuffle_buffer=d.shuffle_buffer, drop_last=True, cache_dir=d.cache_dir, prefetch=d.prefetch,
            labeled_per_class=d.labeled_per_class, manifest=self.manifest,
        )
        self.eval_split = d.eval_split if d.eval_split in self.manifest.splits else "train"
        shape = tuple(self.manifest.shape)
        self.scale = 255.0 if self.manifest.dtype == "uint8" else 1.0
        self.output = cfg.model.output if cfg.model.output != "auto" else ("bernoulli" if self.manifest.dtype == "uint8" else "gaussian")
        self.num_classes = cfg.model.num_classes or self.manifest.num_classes

        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (DDP also broadcasts)
        self.plain = {n: m.to(self.device) for n, m in build_networks(cfg.model, shape, self.num_classes).items()}
        if cfg.train.compile:
            for m in self.plain.values():  # compile forward only: state_dict keys stay plain
                m.forward = torch.compile(m.forward)
        self.comm = CommStats(cfg.train.grad_compression)
        if distributed():
            self.wrapped = {n: wrap(m, self.device) for n, m in self.plain.items()}
            for n, m in self.wrapped.items():
                self.comm.attach(n, m)
        else:
            self.wrapped = dict(self.plain)
        self.prior = build_prior(cfg.prior, cfg.model.latent_dim)
        self.generator = torch.Generator(device=self.device)
        self.phases = build_phases(cfg)
        labelled = self._labelled_sampler() if any(ph.name == "classification" for ph in self.phases) else None
        self.ctx = StepContext(self.wrapped, self.plain, self.prior, self.generator, self.output, cfg, self.num_classes, labelled)
        probe = session.stop_requested if self.rank == 0 else None
        self.coord = Coordinator(cfg, self.phases, len(self.train_data), self.device, stop_probe=probe, world_size=self.world)
        for ph in self.phases:
            make_optimizer(ph, self.plain, self.coord.total_steps())
        self.phase_seconds = {ph.name: 0.0 for ph in self.phases}
        self.check_grads = cfg.train.nan_policy == "skip"  # one host sync per phase: only when asked for
        self.resumed_from = self._restore()
        self.logger = TensorBoardLogger(session.run_url, purge_step=self.coord.step or None) if self.rank == 0 else None
        self.viz = self._viz_batch() if self.rank == 0 else None

    def _labelled_sampler(self):
        """Semi-supervised with few labels: every step draws a labelled minibatch from the (small,
        identical on every rank) labelled set; with all labels, the batch's own labels serve."""
        if not self.cfg.data.labeled_per_class:
            return None
        x, y = self.train_data.labelled_samples()
        x, y = self.to_device(torch.from_numpy(x)), torch.from_numpy(y).to(self.device)
        n = min(self.cfg.data.batch_size, len(x))

        def draw():
            idx = torch.randint(0, len(x), (n,), generator=self.generator, device=self.device)
            return x[idx], y[idx]

        return draw

    # ---- one step -------------------------------------------------------------------------------
    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.float().div_(self.scale) if self.scale != 1.0 else x.float()

    def seed_step(self) -> None:
        """Randomness is a function of (seed, rank, step): exact resume needs no RNG state."""
        self.generator.manual_seed((self.cfg.train.seed * 1_000_003 + self.rank) * 1_000_033 + self.coord.step)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict | None:
        self.seed_step()
        for ph in self.coord.phases_now():
            t0 = time.perf_counter()
            self.comm.phase = ph.name
            for _ in range(ph.repeat):
                ph.optimizer.zero_grad(set_to_none=True)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    loss, stats = ph.loss(self.ctx, x, y)
                (loss * ph.cfg.weight if ph.cfg.weight != 1.0 else loss).backward()
                if self.check_grads and not self._grads_finite(ph):
                    ph.optimizer.zero_grad(set_to_none=True)  # drop this update on every rank alike
                    self.coord.skipped_updates += 1
                    if self.rank == 0:
                        print(f"aae-dist: warning: non-finite gradients in phase '{ph.name}' at step {self.coord.step}: update skipped", flush=True)
                    continue
                ph.optimizer.step()
                self.coord.record(ph, stats)
                self.coord.flag_nonfinite(ph, loss)
            ph.scheduler.step()
            self.phase_seconds[ph.name] += time.perf_counter() - t0
        return self.coord.end_step()

    def _grads_finite(self, ph) -> bool:
        """Gradients are all-reduced by DDP before this check, so every rank gets the same answer."""
        grads = [p.grad for p in ph.optimizer.param_groups[0]["params"] if p.grad is not None]
        if not grads:
            return True
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, coord = self.cfg, self.coord
        total = coord.total_steps()
        bar = tqdm(total=total, initial=coord.step, desc="train", unit="step", disable=self.rank != 0 or not cfg.train.progress, dynamic_ncols=True)
        self.start_step, t_first = coord.step, None
        start_step = self.start_step
        while not coord.done():
            epoch, skip = coord.epoch, coord.batch_in_epoch
            for x, y in self.train_data.iter_epoch(epoch, skip=skip):
                if t_first is None:
                    t_first = time.perf_counter()
                    self.startup_s = time.time() - float(os.environ.get("AAE_DIST_T0", time.time()))
                x = self.to_device(x)
                means = self.train_step(x, y.to(self.device, non_blocking=True))
                bar.update(1)
                if means is not None:
                    self._check_numerics()
                    self._log(means, x, t_first, start_step)
                    bar.set_postfix({k.split("/")[0][:5]: f"{v:.3f}" for k, v in means.items() if k.endswith("loss")})
                if coord.step % cfg.train.checkpoint_every == 0 and not coord.done():
                    self.save_checkpoint()
                if coord.done() or coord.epoch != epoch:
                    break
        bar.close()
        train_s = time.perf_counter() - t_first if t_first else 0.0
        samples = (coord.step - start_step) * cfg.data.batch_size * self.world
        metrics = self.evaluate() if coord.stop_reason != "interrupted" else {}
        self.save_checkpoint(final=True, metrics=metrics)
        return self._finish(metrics, samples / train_s if train_s else 0.0, train_s)

    def _check_numerics(self) -> None:
        if self.coord.nonfinite_steps and self.cfg.train.nan_policy == "stop":
            raise UserError(
                f"non-finite loss in phase '{getattr(self.coord, 'nonfinite_phase', '?')}' before step {self.coord.step}: "
                "the last checkpoint is kept; lower that phase's lr or set train.nan_policy=skip"
            )

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, final: bool = False, metrics: dict | None = None) -> None:
        coord = self.coord
        report = {"step": coord.step, "epoch": coord.epoch, **{k: v for k, v in coord.last_means.items()}, **(metrics or {})}
        folder = None
        if self.rank == 0:
            folder = scratch_dir()
            state = {
                "models": {n: m.state_dict() for n, m in self.plain.items()},
                "optimizers": {ph.name: ph.optimizer.state_dict() for ph in self.phases},
                "schedulers": {ph.name: ph.scheduler.state_dict() for ph in self.phases},
                "coordinator": coord.state_dict(),
            }
            meta = {"format": 1, "step": coord.step, "epoch": coord.epoch, "final": final, "world_size": self.world,
                    "architecture": checkpoint.architecture(self.cfg.to_dict()), "config": self.cfg.to_dict(redact=True),
                    "shape": list(self.manifest.shape), "dtype": self.manifest.dtype, "num_classes": self.num_classes,
                    "output": self.output}
            checkpoint.write_local(folder, state, meta)
            faults.maybe_die_writing_checkpoint(self.cfg.run.name, coord.step)
        try:
            self.session.report(report, folder)
        finally:
            if folder:
                checkpoint.remove_local(folder)

    def _restore(self) -> int | None:
        with self.session.latest_checkpoint() as folder:
            if folder is None:
                return None
            state, meta = checkpoint.read_local(folder, self.cfg.to_dict())
        for n, m in self.plain.items():
            m.load_state_dict(state["models"][n])
        for ph in self.phases:
            ph.optimizer.load_state_dict(state["optimizers"][ph.name])
            ph.scheduler.load_state_dict(state["schedulers"][ph.name])
        self.coord.load_state_dict(state["coordinator"])
        return int(meta["step"])

    # ---- evaluation, logging, summary -------------------------------------------------------------
    def evaluate(self) -> dict:
        ev = Evaluator(self.cfg, self.plain, self.prior, self.num_classes, self.output, self.manifest, self.device,
                       self.scale, rank=self.rank, world=self.world)
        return ev.run(self.eval_split)

    def _viz_batch(self):
        data = ShardStream(self.cfg.data.path, self.eval_split, 512, shuffle=False, manifest=self.manifest)
        x, y = next(iter(data.iter_epoch(0)))
        return self.to_device(x), y.numpy()

    def _log(self, means: dict, x: torch.Tensor, t_first: float, start_step: int) -> None:
        if self.logger is None:
            return
        step, lg = self.coord.step, self.logger
        scalars = {f"loss/{k.split('/')[0]}": v for k, v in means.items() if k.endswith("/loss")}
        scalars.update({k: v for k, v in means.items() if "/acc" in k or k.endswith("/kl")})
        for ph in self.phases:
            scalars[f"lr/{ph.name}"] = ph.optimizer.param_groups[0]["lr"]
            scalars[f"time/{ph.name}_ms_per_step"] = 1000 * self.phase_seconds[ph.name] / max(1, step - start_step)
        elapsed = time.perf_counter() - t_first
        scalars["perf/samples_per_s"] = (step - start_step) * self.cfg.data.batch_size * self.world / max(elapsed, 1e-9)
        scalars["coordinator/skip_discriminator"] = float(self.coord.skip.get("discriminator", False))
        lg.scalars(scalars, step)
        if step % self.cfg.train.image_every < self.cfg.train.sync_every or self.coord.done():
            self.log_images(step)
        lg.maybe_upload()

    @torch.no_grad()
    def log_images(self, step: int) -> None:
        x, y = self.viz
        enc, dec = self.plain["encoder"], self.plain["decoder"]
        c = enc(x, generator=self.generator)
        codes = c.z
        ydec = self.ctx.decoder_y(c, torch.from_numpy(y).to(self.device))
        recon = self._as_image(dec(codes[:32], None if ydec is None else ydec[:32]))
        pairs = torch.stack([x[:32].cpu(), recon], 1).flatten(0, 1).numpy()
        self.logger.image("images/inputs_and_reconstructions", image_grid(self._displayable(pairs), cols=16), step)
        z, ys = sample_latents(self.cfg.model, self.prior, self.num_classes, 64, self.generator, self.device)
        samples = self._as_image(dec(z, ys))
        self.logger.image("images/prior_samples", image_grid(self._displayable(samples.numpy()), cols=8), step)
        pts = codes[:, :2].float().cpu().numpy() if codes.shape[1] >= 2 else np.c_[codes.float().cpu().numpy(), np.zeros(len(codes))]
        self.logger.image("codes/scatter", scatter_image(pts, y), step)
        if c.y_logits is not None:
            self.logger.histogram("codes/y_argmax", c.y_logits.argmax(1), step)
        self.logger.histogram("codes/z", codes, step)

    def _as_image(self, out: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(out) if self.output == "bernoulli" else out).float().cpu()

    def _displayable(self, imgs: np.ndarray) -> np.ndarray:
        if imgs.ndim == 3:  # (N, 1, D) vectors: show as a 1-pixel-high strip
            imgs = imgs[:, :, None, :]
        lo, hi = imgs.min(), imgs.max()
        return imgs if self.output == "bernoulli" else (imgs - lo) / max(hi - lo, 1e-9)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for n in sorted(self.plain):
            for k, v in self.plain[n].state_dict().items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _finish(self, metrics: dict, samples_per_s: float, train_s: float) -> dict:
        mine = {"fingerprint": self.fingerprint(), "node": self.session.node(), "device": str(self.device)}
        everyone = [None] * self.world
        if distributed():
            dist.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        prints = [e["fingerprint"] for e in everyone]
        if self.rank != 0:
            return {}
        coord = self.coord
        summary = {
            "steps": coord.step,
            "epochs": coord.epochs_done,
            "samples_per_s": samples_per_s,
            "wall_s": time.time() - float(os.environ.get("AAE_DIST_T0", time.time())),
            "train_s": train_s,
            "startup_s": getattr(self, "startup_s", None),  # process start (driver) to first step
            "metrics": metrics,
            "world_size": self.world,
            "device": str(self.device),
            "workers": [{"rank": r, "node": e["node"], "device": e["device"]} for r, e in enumerate(everyone)],
            "nodes": len({e["node"] for e in everyone}),
            "resumed_from_step": self.resumed_from,
            "stop_reason": coord.stop_reason or ("max_steps" if self.cfg.train.max_steps and coord.step >= self.cfg.train.max_steps else "epochs"),
            "nonfinite_steps": coord.nonfinite_steps,
            "skipped_updates": coord.skipped_updates,
            "coordinator": {
                "syncs": coord.syncs,
                "sync_every": coord.sync_every,
                "sync_s": coord.sync_seconds,
                "sync_ms_mean": 1000 * coord.sync_seconds / max(1, coord.syncs),
                "fraction_of_train_time": coord.sync_seconds / train_s if train_s else 0.0,
            },
            "communication_per_step": self.comm.per_step(coord.step - self.start_step),
            "replica_fingerprints": prints,
            "replicas_in_sync": len(set(prints)) == 1,
            "config": self.cfg.to_dict(redact=True),
        }
        self.logger.scalars({f"final/{k}": v for k, v in metrics.items()}, coord.step)
        self.logger.writer.add_text("run/topology", f"world size {self.world}, {summary['nodes']} node(s): " + ", ".join(
            f"rank {w['rank']} on {w['node']} ({w['device']})" for w in summary["workers"]), coord.step)
        if metrics:
            self.log_images(coord.step)
            self.logger.hparams(flatten_config({k: summary["config"][k] for k in ("model", "prior", "train")}), metrics)
        self.logger.close()
        storage.write_bytes_atomic(storage.join(self.session.run_url, "summary.json"), json.dumps(summary, indent=1).encode())
        return summary


def train_worker(payload: dict) -> None:
    """Ray Train's train_loop_per_worker: payload = {"config": dict, "run_url": str}."""
    cfg = Config.model_validate(payload["config"])
    os.environ["AAE_DIST_T0"] = payload.get("t0", str(time.time()))  # the driver's start, for startup_s / wall_s
    session = RaySession(payload["run_url"], cfg.train.keep_checkpoints)
    Trainer(cfg, session).fit()


def train_in_process(cfg: Config, run_url: str) -> dict:
    return Trainer(cfg, LocalSession(run_url, cfg.train.keep_checkpoints)).fit()
