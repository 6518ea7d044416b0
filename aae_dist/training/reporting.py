"""Rank 0's view of a run for people: progress posted to the driver's board (the driver draws the
bar), TensorBoard scalars, images and the final hparams.  The trainer hands it what it measured;
nothing here changes training."""

from __future__ import annotations

import time

import torch
from .. import seeds
from ..config import Config
from ..data import ShardStream
from ..models import AAE
from ..figures import as_images, paper_figures
from ..plots import image_grid, to_array
from .tensorboard import TensorBoardLogger, flatten_config
from .trackers import Trackers


class Reporter:
    def __init__(self, cfg: Config, aae: AAE, phases, run_url: str, eval_split: str, manifest, resumed_step: int = 0, feed=None,
                 run_name: str = ""):
        self.cfg, self.aae, self.phases, self.run_name = cfg, aae, phases, run_name
        self.feed = feed
        self.trackers = Trackers(cfg, run_url, resumed=bool(resumed_step), warn=self.warn)  # log.mlflow, log.wandb; first: the one likely to refuse
        self.logger = TensorBoardLogger(run_url, purge_step=resumed_step or None)
        try:
            data = ShardStream(cfg.data.path, eval_split, 512, shuffle=False, manifest=manifest)
            x, y = next(iter(data.iter_epoch(0)))
        except BaseException:  # a bad shard: the trainer never gets a reporter to close
            self.logger.close()
            raise
        self.viz = aae.normalise(x), y.numpy()
        self.generator = torch.Generator(device=aae.device)

    # ---- progress for the driver's bar ---------------------------------------------------------
    def start(self, step: int, total: int) -> None:
        if self.feed is not None:
            self.feed.put({"start": step, "step": step, "total": total})

    def warn(self, text: str) -> None:
        """A warning the user can act on: the driver shows each text once."""
        if self.feed is not None:
            self.feed.warn(text)

    # ---- per sync ---------------------------------------------------------------------------
    def step(self, coord, means: dict | None, phase_seconds: dict, t_first: float, start_step: int, world: int) -> None:
        if means is None:
            return
        step, lg = coord.step, self.logger
        # every reduced statistic: a phase's loss as loss/<phase>, anything else a term reports under its own name
        scalars = {(f"loss/{k.split('/')[0]}" if k.endswith("/loss") else k): v for k, v in means.items()}
        for ph in self.phases:
            scalars[f"lr/{ph.name}"] = ph.optimizer.param_groups[0]["lr"]
            scalars[f"time/{ph.name}_ms_per_step"] = 1000 * phase_seconds[ph.name] / max(1, step - start_step)
        elapsed = time.perf_counter() - t_first
        scalars["perf/samples_per_s"] = (step - start_step) * self.cfg.data.batch_size * self.cfg.train.accumulate * world / max(elapsed, 1e-9)
        if self.feed is not None:
            self.feed.put({"step": step, "total": coord.total_steps(), "epoch": coord.epochs_done, "samples_per_s": scalars["perf/samples_per_s"],
                           "losses": {k.split("/")[0][:5]: v for k, v in means.items() if k.endswith("/loss")}})
        for name in ["discriminator"] + [ph.name for ph in self.phases if ph.skip_policy is not None]:
            scalars[f"coordinator/skip_{name}"] = float(coord.skip.get(name, False))
        lg.scalars(scalars, step)
        self.trackers.scalars(scalars, step)
        if step % self.cfg.train.image_every < coord.sync_every or coord.done():
            self.log_images(step)
        lg.maybe_upload()

    def log_images(self, step: int) -> None:
        with self.aae.evaluating():
            self._log_images(step)

    def _log_images(self, step: int) -> None:
        x, y = self.viz
        aae = self.aae
        self.generator.manual_seed(seeds.evaluation(self.cfg.train.seed) + step)
        c = aae.encode(x, self.generator)
        ydec = aae.decoder_y(c, torch.from_numpy(y).to(aae.device))
        recon = aae.decode(c.z[:32], None if ydec is None else ydec[:32]).float().cpu()
        pairs = torch.stack([x[:32].cpu(), recon], 1).flatten(0, 1).numpy()
        self.image("images/inputs_and_reconstructions", image_grid(as_images(aae, pairs), cols=16), step)
        samples = aae.sample(64, self.generator).float().cpu().numpy()
        self.image("images/prior_samples", image_grid(as_images(aae, samples), cols=8), step)
        if aae.rows is not None:  # a table run: real beside synthetic rows, per column
            from ..inference import table_column_figures

            caption = f"run {self.run_name}, step {step}"
            for name, fig in table_column_figures(aae, x.cpu(), seeds.evaluation(self.cfg.train.seed) + step, caption).items():
                self.image(f"figures/{name}", to_array(fig), step)
        for name, fig in paper_figures(aae, x, y, self.generator, caption=f"run {self.run_name}, step {step}").items():
            self.image(f"figures/{name}", to_array(fig), step)
        if c.y_logits is not None:
            self.logger.histogram("codes/y_argmax", c.y_logits.argmax(1), step)
        self.logger.histogram("codes/z", c.z, step)

    def image(self, tag: str, img, step: int) -> None:
        """A (C, H, W) image to TensorBoard and the trackers."""
        self.logger.image(tag, img, step)
        self.trackers.image(tag, img, step)

    # ---- at the end -------------------------------------------------------------------------
    def finish(self, step: int, metrics: dict, summary: dict) -> None:
        lg = self.logger
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lg.scalars({f"final/{k}": v for k, v in metrics.items()}, step)
        lg.writer.add_text("run/topology", f"world size {summary['world_size']}, {summary['nodes']} node(s): " + ", ".join(
            f"rank {w['rank']} on {w['node']} ({w['device']})" for w in summary["workers"]), step)
        if metrics:
            self.log_images(step)
            lg.hparams(flatten_config({k: summary["config"][k] for k in ("model", "prior", "train")}), metrics)
        self.trackers.finish(metrics, step)
        self.trackers.close()
        lg.close()

    def abort(self) -> None:
        """On a failed run: the curves so far are uploaded, the trackers' runs marked failed."""
        try:
            self.trackers.close(failed=True)
        finally:
            self.logger.close()

