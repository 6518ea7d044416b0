"""The per-worker training loop: a small Trainer calling stateful components (model, phases,
coordinator, checkpointer) and handing what it measures to rank 0's reporter."""

from __future__ import annotations

import collections
import contextlib
import time

import torch

from .. import checkpoint, seeds, timeline
from ..checkpoint import Checkpointer
from ..config import Config
from ..data import ShardStream, read_manifest
from ..distributed import all_reduce_, average_, average_buffers, distributed, wrap
from ..errors import UserError
from ..evaluation import Evaluator
from ..models import AAE
from . import precision
from .callbacks import Callbacks, import_modules
from .comm import CommStats
from .coordinator import Coordinator
from .phases import PhaseStates, StepContext, build_phases, make_optimizer
from .reporting import Reporter
from .session import LocalSession, RaySession, Session, scratch_dir
from .summary import RunRecord, write_summary


class Trainer:
    """One worker's training: a short list of builds, each component from its own config section."""

    def __init__(self, cfg: Config, session: Session, started_at: float | None = None, feed=None, *, threads: int | None = None,
                 gpu: bool = False, name: str = "", callbacks=()):
        self.cfg, self.session, self.name = cfg, session, name
        self.rank, self.world = session.rank, session.world_size
        self.started_at = started_at if started_at is not None else time.time()
        timeline.reset(since=self.started_at)
        session.retain_best(cfg.train.keep_best, cfg.train.keep_best_mode)
        import_modules(cfg.train.imports)
        self.callbacks = Callbacks(callbacks, cfg.train.callbacks)
        self.device, self.autocast_dtype = self._build_device(threads, gpu)
        self.manifest, self.train_data, self.eval_split = self._build_data()
        self.aae, self.wrapped, self.comm = self._build_model()
        self.average_every = cfg.train.average_every if distributed() else 1  # > 1: local SGD (see _average_replicas)
        self.generator = torch.Generator(device=self.device)
        t = cfg.train
        self.phases = build_phases(cfg.phases, cfg.model, t.warmup_steps, cfg.data.labeled_per_class, t.target_recon_loss)
        self.ctx = self._build_context()
        # the discriminators and the generator share one encoder forward per step where that gives the same values
        # (codes_of), or, with share_codes=noisy, one draw of the noise; not with micro-batches: DDP must see each
        # micro-batch's forward right before its own backward
        encoder = self.aae.nets["encoder"]
        shareable = {"exact": getattr(encoder, "repeatable", False), "noisy": not getattr(encoder, "own", True), "off": False}
        self.shares_codes = (shareable[t.share_codes] and not t.compile and t.accumulate == 1
                             and any(ph.name == "generator" for ph in self.phases))
        self.losses = self._build_losses()
        self.micro = t.accumulate
        self.coord = self._build_coordinator()
        for ph in self.phases:
            make_optimizer(ph, self.aae.nets, self.coord.total_steps(), len(self.train_data), fused=t.fused)
        self.phase_seconds = {ph.name: 0.0 for ph in self.phases}
        self.nan_policy = t.nan_policy  # both check every all-reduced gradient before each update (_grads_finite)
        self.recent_updates = collections.deque(maxlen=2 * sum(ph.repeat for ph in self.phases))  # what _broken_by searches
        self.checkpointer = self._build_checkpointer()
        self.resumed_from = self.last_saved_step = self._restore()
        timeline.mark("models_ready")
        self.reporter = self._build_reporter(feed) if self.rank == 0 else None

    # ---- the builds -------------------------------------------------------------------------------
    def _build_device(self, threads: int | None, gpu: bool):
        """Torch threads, the device, and the autocast dtype (None: fp32; refuses bf16 on a CPU without it)."""
        if threads:
            torch.set_num_threads(threads)
        device = self.session.device(gpu)
        return device, precision.autocast_dtype(self.cfg.train, device)

    @property
    def amp(self) -> bool:
        return self.autocast_dtype is not None

    def _build_data(self):
        d = self.cfg.data
        manifest = read_manifest(d.path)
        stream = ShardStream.from_config(d, self.rank, self.world, seed=self.cfg.train.seed, manifest=manifest)
        timeline.mark("data_opened")
        return manifest, stream, d.eval_split if d.eval_split in manifest.splits else "train"

    def _build_model(self):
        """The AAE (identical initial weights on every rank: seeded; DDP also broadcasts), compiled if asked,
        each network wrapped in DDP with its comm hook when distributed."""
        t = self.cfg.train
        torch.manual_seed(t.seed)
        aae = AAE.from_config(self.cfg.model, self.cfg.prior, self.manifest).to(self.device)
        if t.compile and t.compile_scope == "networks":
            for m in aae.nets.values():  # compile forward only: state_dict keys stay plain
                m.forward = torch.compile(m.forward, mode=t.compile_mode)
        comm, wrapped = CommStats(t.grad_compression, t.powersgd_rank), dict(aae.nets)
        if distributed():
            wrapped = {n: wrap(m, self.device) for n, m in aae.nets.items()}
            for n, m in wrapped.items():
                comm.attach(n, m)
        return aae, wrapped, comm

    def _build_losses(self) -> dict:
        """Each phase's loss as the step calls it: with train.compile_scope=phases compiled whole (all its forwards and
        terms; the backward follows through AOTAutograd), so reduce-overhead can replay a phase as CUDA graphs; the
        optimizer steps, the finite-gradient check and the coordinator's reductions stay outside, eager."""
        t = self.cfg.train
        if not (t.compile and t.compile_scope == "phases"):
            return {ph.name: ph.loss for ph in self.phases}
        # every phase's loss is the one Python function Phase.loss, so their compiled variants share one cache (one entry
        # per phase and input shape): room for all of them, or the later phases would silently run eager
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 4 * len(self.phases))
        return {ph.name: torch.compile(ph.loss, mode=t.compile_mode, dynamic=False) for ph in self.phases}

    def _build_context(self) -> StepContext:
        labelled = self._labelled_sampler() if any(ph.name == "classification" for ph in self.phases) else None
        return StepContext(self.wrapped, self.aae, self.generator, labelled, radius=self._vat_radius(), neighbour=self._neighbour_table())

    def _build_coordinator(self) -> Coordinator:
        if len(self.train_data) < self.micro:
            raise UserError(f"train.accumulate={self.micro} needs that many batches per epoch per worker, there are {len(self.train_data)}: "
                            "lower train.accumulate or data.batch_size")
        probe = self.session.stop_requested if self.rank == 0 else None
        return Coordinator(self.cfg.train, self.phases, len(self.train_data) // self.micro, self.device, stop_probe=probe,
                           world_size=self.world, stage_length=self.train_data.stage_batches)

    def _build_checkpointer(self) -> Checkpointer:
        m, cfg = self.manifest, self.cfg
        return Checkpointer(
            {"models": self.aae, "optimizers": PhaseStates(self.phases, "optimizer"),
             "schedulers": PhaseStates(self.phases, "scheduler"), "coordinator": self.coord},
            meta={"world_size": self.world, "architecture": cfg.model.architecture(), "config": cfg.to_dict(redact=True),
                  "shape": list(m.shape), "dtype": m.dtype, "num_classes": self.aae.num_classes,
                  "output": self.aae.output, **({"table": m.table} if m.table else {}),
                  **({"scaling": m.custom_scaling} if m.custom_scaling else {})},
        )

    def _build_reporter(self, feed) -> Reporter:
        return Reporter(self.cfg, self.aae, self.phases, self.session.run_url, self.eval_split, self.manifest,
                        resumed_step=self.coord.step, feed=feed, run_name=self.name)

    def _labelled_sampler(self):
        """Few labels: every step draws a labelled minibatch from the (small, identical on every
        rank) labelled set; with all labels, the batch's own labels serve."""
        if not self.cfg.data.labeled_per_class:
            return None
        x, y = self.train_data.labelled_samples()
        x, y = self.aae.normalise(torch.from_numpy(x)), torch.from_numpy(y).to(self.device)
        n = min(self.cfg.data.batch_size, len(x))

        def draw():
            idx = torch.randint(0, len(x), (n,), generator=self.generator, device=self.device)
            return x[idx], y[idx]

        return draw

    def _vat_radius(self):
        """Adaptive VAT (phases.reconstruction.vat_alpha): the neighbour distances of the training samples,
        read from the run folder, else computed (every rank alike, deterministic) and written by rank 0."""
        rc = self.cfg.phases.reconstruction
        if not (rc.vat and rc.vat_alpha):
            return None
        from . import neighbours
        from .. import storage

        url = storage.join(self.session.run_url, neighbours.FILE)
        if storage.exists(url):
            keys, radii = neighbours.from_bytes(storage.read_bytes(url), url)
        else:
            keys, radii, facts = neighbours.compute(self._training_samples, self.manifest.splits["train"].count, rc.vat_neighbours,
                                                    self.cfg.train.seed)
            if self.rank == 0:
                storage.write_bytes_atomic(url, neighbours.to_bytes(keys, radii, facts))
        return neighbours.RadiusTable(keys, radii, self.device)

    def _training_samples(self):
        """Every training sample once, normalised, in the dataset's stored order (the same on every rank)."""
        d = self.cfg.data
        stream = ShardStream(d.path, "train", 1000, shuffle=False, cache_dir=d.cache_dir, manifest=self.manifest)
        return (self.aae.normalise(x).cpu() for x, _ in stream.iter_epoch(0))

    def _neighbour_table(self):
        """The neighbour term (phases.reconstruction.neighbours): each training sample's nearest training samples,
        read from the run folder, else searched (every rank alike, deterministic) and written by rank 0; the
        reference images themselves are read again from the data (they are the data)."""
        rc = self.cfg.phases.reconstruction
        if not rc.neighbours:
            return None
        from . import neighbours
        from .. import storage

        n = self.manifest.splits["train"].count
        url = storage.join(self.session.run_url, neighbours.NEIGHBOUR_FILE)
        if storage.exists(url):
            keys, positions, pick, mutual = neighbours.neighbours_from_bytes(storage.read_bytes(url), url, n)
            neighbours.check_settings(positions, mutual, rc.neighbours_k, rc.neighbours_mutual, url)
        else:
            # the samples are the model's inputs: with model.deskew already deskewed
            space = neighbours.deskewed if rc.neighbours_space == "deskewed" and not self.cfg.model.deskew else None
            keys, positions, pick = neighbours.neighbour_positions(self._training_samples, n, rc.neighbours_k, self.cfg.train.seed,
                                                                   space=space, mutual=rc.neighbours_mutual)
            if self.rank == 0:
                storage.write_bytes_atomic(url, neighbours.neighbours_to_bytes(keys, positions, pick, rc.neighbours_mutual))
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.from_numpy(pick)] = True
        rows, seen = [], 0
        for x in self._training_samples():
            rows.append(x[keep[seen : seen + len(x)]])
            seen += len(x)
        return neighbours.NeighbourTable(keys, positions, torch.cat(rows), self.device)

    # ---- one step -------------------------------------------------------------------------------
    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict | None:
        """One optimizer step per phase over `batches` (train.accumulate micro-batches): gradients add up
        locally under DDP's no_sync and are all-reduced once, with the last micro-batch."""
        self.generator.manual_seed(seeds.step(self.cfg.train.seed, self.rank, self.coord.step))
        if self.cfg.train.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are consumed: their memory may be reused
        phases = self.coord.phases_now()
        self.ctx.shared_codes = {} if self.shares_codes and any(ph.name == "generator" for ph in phases) else None
        for ph in phases:
            t0 = time.perf_counter()
            self.comm.phase = ph.name
            for _ in range(ph.repeat):
                self._update(ph, batches)
                if self.ctx.shared_codes is not None and "encoder" in ph.networks:  # codes computed before are stale now
                    self.ctx.shared_codes = None if ph.name == "generator" else {}
            ph.scheduler.step()
            self.phase_seconds[ph.name] += time.perf_counter() - t0
        return self.coord.end_step()

    def _update(self, ph, batches) -> None:
        """One optimizer step of phase `ph` (or, with non-finite gradients, the update its policy drops)."""
        ph.optimizer.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(batches):
            with self._no_sync(i < len(batches) - 1 or self.average_every > 1):
                with precision.autocast(self.device, self.autocast_dtype):
                    loss, stats = self.losses[ph.name](self.ctx, x, y)
                scale = ph.cfg.weight / len(batches)
                (loss * scale if scale != 1.0 else loss).backward()
            self.coord.record(ph, stats)
            self.coord.flag_nonfinite(ph, loss)
        if not self._grads_finite(ph):  # once per update, whatever the policy
            if self.average_every > 1:
                self._skip_local_update(ph)
                return
            if self.nan_policy == "stop":
                self._stop_nonfinite(ph)
            ph.optimizer.zero_grad(set_to_none=True)  # nan_policy=skip: drop this update on every rank alike
            self.coord.skipped_update()
            if self.reporter:
                self.reporter.warn(f"non-finite gradients in phase '{ph.name}' (first at step {self.coord.step}): such updates are "
                                   "skipped and counted in summary.json['skipped_updates']; lower that phase's lr if it recurs")
            return
        ph.optimizer.step()
        self.recent_updates.append(ph)

    def _skip_local_update(self, ph) -> None:
        """Local SGD: these gradients are this rank's own, so the other ranks cannot take the same
        decision now.  The update is dropped here and counted as a non-finite loss: the coordinator's
        next reduction tells every rank, and nan_policy=stop stops them all there (last checkpoint kept)."""
        ph.optimizer.zero_grad(set_to_none=True)
        self.coord.stats.add(f"{ph.name}/nonfinite", 1.0)
        self.coord.skipped_update()

    def _average_replicas(self) -> None:
        """Local SGD (train.average_every=H): the parameters become their mean over the workers every H
        steps, at checkpoints and at the end, so checkpoints, evaluation and the final weights see one
        model.  At checkpoints and the end the optimizers' state is averaged too, so a resumed run starts
        from what every rank holds (not just rank 0's moments)."""
        coord, h = self.coord, self.average_every
        at_checkpoint = coord.step % self.cfg.train.checkpoint_every == 0 or coord.done()
        if coord.step % h and not at_checkpoint:
            return
        self.comm.phase = "parameter_average"
        self.comm.count(average_([p for m in self.aae.nets.values() for p in m.parameters()]))
        if at_checkpoint:
            states = [t for ph in self.phases for group in ph.optimizer.param_groups for p in group["params"]
                      for _, t in sorted(ph.optimizer.state.get(p, {}).items()) if torch.is_tensor(t) and t.is_floating_point()]
            n = sum(t.numel() for t in states)
            most, minus_least = all_reduce_(torch.tensor([n, -n], dtype=torch.float64), op="max").tolist()
            if most == -minus_least:  # the same state layout on every rank (a locally skipped first update leaves a hole)
                self.comm.count(average_(states))

    def _no_sync(self, skip_reduction: bool):
        """DDP's no_sync on every network for all micro-batches but a step's last one."""
        if not skip_reduction or not distributed():
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for m in self.wrapped.values():
            stack.enter_context(m.no_sync())
        return stack

    def _grads_finite(self, ph) -> bool:
        """Gradients are all-reduced by DDP before this check, so every rank gets the same answer with no
        extra collective.  Every gradient, not a sample of them: an overflow can leave the small ones (a
        last bias) finite.  Cost: one fused norm per phase (benchmarks/bench_nan_check.py)."""
        grads = [p.grad for p in ph.optimizer.param_groups[0]["params"] if p.grad is not None]
        if not grads:
            return True
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())

    def _stop_nonfinite(self, ph) -> None:
        """nan_policy=stop: before the bad update, on every rank alike (DDP keeps their weights equal).  The
        weights are saved only if every tensor is finite; an earlier update can have broken them (an
        overflowing step), and then its phase is the one to blame and the last good checkpoint is named."""
        ph.optimizer.zero_grad(set_to_none=True)
        failing, done = self.coord.step + 1, self.coord.step
        if not self._weights_finite():
            self._refuse_nonfinite_weights(failing, f"first seen in the gradients of phase '{ph.name}'")
        if done != self.last_saved_step:
            self.save_checkpoint(stopped_by={"nonfinite_loss_at_step": failing, "phase": ph.name,
                                             "note": "phases before this one in that step were applied"})
        raise UserError(
            f"non-finite gradients in phase '{ph.name}' at step {failing}: stopped before applying it; checkpoint_step_{done:09d} "
            "holds the last finite weights; lower that phase's lr or set train.nan_policy=skip"
        )

    def _weights_finite(self) -> bool:
        """Weights, batch-norm statistics and optimizer moments: what a resume continues from (the
        coordinator's statistics may hold the very non-finite loss that stopped the run)."""
        return checkpoint.all_finite(self.checkpointer.state(("models", "optimizers")))

    def _refuse_nonfinite_weights(self, step: int, seen: str) -> None:
        """Stop without saving weights that hold inf or nan, naming the update that broke them and the last good checkpoint."""
        culprit = self._broken_by()
        cause = f"an update of phase '{culprit.name}' made weights non-finite" if culprit else "the weights were already non-finite"
        kept = (f"checkpoint_step_{self.last_saved_step:09d} holds the last finite weights" if self.last_saved_step is not None
                else "the run has no checkpoint with finite weights (start it again)")
        fix = f"lower phases.{culprit.name}.lr or phases.{culprit.name}.weight" if culprit else "resume from an earlier checkpoint"
        raise UserError(f"non-finite weights at step {step}: {cause}, {seen}; stopped without saving them; {kept}; {fix}")

    def _broken_by(self):
        """The phase of the latest recent update whose parameters are non-finite now: that update broke them
        (a later phase reading them would have stopped before its own update)."""
        for ph in reversed(self.recent_updates):
            if not all(torch.isfinite(p).all() for group in ph.optimizer.param_groups for p in group["params"]):
                return ph
        return None

    # ---- the loop -------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, coord, rep = self.cfg, self.coord, self.reporter
        self.start_step, t_first, self.startup_s, self.eval_s = coord.step, None, None, 0.0
        if rep:
            rep.start(coord.step, coord.total_steps())
        while not coord.done():
            epoch = coord.epoch
            batches = self.train_data.iter_epoch(epoch, skip=coord.batch_in_epoch * self.micro, stages=coord.progress.stages)
            for group in _groups(batches, self.micro):
                if t_first is None:
                    t_first = time.perf_counter()
                    self.startup_s = time.time() - self.started_at
                    timeline.mark("first_step")
                means = self.train_step([(self.aae.normalise(x), y.to(self.device, non_blocking=True)) for x, y in group])
                if self.callbacks:
                    self.callbacks("step", world=self.world, rank=self.rank, step=coord.step)
                if means is not None:
                    average_buffers(self.aae.nets.values())  # batch-norm statistics: the same on every replica
                    self._check_numerics()
                if self.average_every > 1:
                    self._average_replicas()
                if rep:
                    rep.step(coord, means, self.phase_seconds, t_first, self.start_step, self.world)
                if coord.step % cfg.train.checkpoint_every == 0 and not coord.done():
                    self.save_checkpoint()
                if coord.done() or coord.epoch != epoch:
                    break
        train_s = time.perf_counter() - t_first if t_first else 0.0
        samples = (coord.step - self.start_step) * cfg.data.batch_size * self.micro * self.world
        t_eval = time.perf_counter()
        evaluator = Evaluator(self.cfg, self.aae, self.manifest, rank=self.rank, world=self.world)
        metrics = evaluator.run(self.eval_split) if coord.stop_reason != "interrupted" else {}
        baselines = evaluator.baselines(self.eval_split, run_url=self.session.run_url, steps=coord.step) if metrics and self.rank == 0 else {}
        self.eval_s = time.perf_counter() - t_eval
        self.save_checkpoint(final=True, metrics=metrics)
        return write_summary(self.record(train_s, samples / train_s if train_s else 0.0), metrics, baselines)

    def record(self, train_s: float, samples_per_s: float) -> RunRecord:
        """The run as the summary writer reads it."""
        return RunRecord(self.rank, self.world, str(self.device), self.session.node(), self.session.run_url, self.aae.nets, self.coord,
                         self.comm, self.started_at, self.start_step, self.resumed_from, self.startup_s, self.eval_s, train_s,
                         samples_per_s, self.cfg.train.max_steps, self.cfg.to_dict(redact=True), self.reporter)

    def _check_numerics(self) -> None:
        if self.coord.nonfinite_steps and self.cfg.train.nan_policy == "stop":
            raise UserError(
                f"non-finite loss in phase '{self.coord.nonfinite_phase or '?'}' before step {self.coord.step}: "
                "the last checkpoint is kept; lower that phase's lr or set train.nan_policy=skip"
            )

    # ---- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, final: bool = False, metrics: dict | None = None, **meta) -> None:
        """Every rank calls this.  nan_policy=stop never saves non-finite weights (the step's last update can
        break them with nothing after it to notice): every rank refuses alike, as their weights are equal."""
        coord = self.coord
        if self.nan_policy == "stop" and not self._weights_finite():
            self._refuse_nonfinite_weights(coord.step, f"found before writing checkpoint_step_{coord.step:09d}")
        folder = None
        self.last_saved_step = coord.step
        if self.rank == 0:
            folder = scratch_dir()
            self.checkpointer.save(folder, coord.step, final, epoch=coord.epoch, **meta)
            if self.callbacks:
                self.callbacks("checkpoint_written", run_name=self.name, step=coord.step, folder=folder)
        try:
            self.session.save(folder, coord.step, {"step": coord.step, "epoch": coord.epoch, **coord.last_means, **(metrics or {})})
        finally:
            if folder:
                checkpoint.remove_local(folder)

    def _restore(self) -> int | None:
        with self.session.latest_checkpoint() as folder:
            if folder is None:
                return None
            meta = self.checkpointer.restore(folder, self.cfg.model)
        return int(meta["step"])



def _groups(batches, k: int):
    """Consecutive groups of k batches; a last, shorter group is dropped (like drop_last)."""
    group = []
    for b in batches:
        group.append(b)
        if len(group) == k:
            yield group
            group = []


def train_worker(payload: dict) -> None:
    """Ray Train's train_loop_per_worker: payload = {"config", "run_url", "started_at", "board" (the driver's progress
    actor) or "board_file" (a local Ray's progress file)}."""
    from ..console import FileBoard, RemoteFeed

    timeline.mark("worker_started")
    timeline.update(payload.get("timeline") or {})  # the driver's marks
    cfg = Config.model_validate(payload["config"])
    session = RaySession(payload["run_url"], cfg.train.keep_checkpoints)
    feed = RemoteFeed(payload["board"]) if payload.get("board") is not None else None
    if payload.get("board_file") and session.rank == 0:  # only rank 0 posts (a restarted one continues the file)
        feed = FileBoard(payload["board_file"])
    _fit(Trainer(cfg, session, payload.get("started_at"), feed, **payload["worker"]))


def train_in_process(cfg: Config, run_url: str, started_at: float | None = None, feed=None, callbacks=()) -> dict:
    return _fit(Trainer(cfg, LocalSession(run_url, cfg.train.keep_checkpoints), started_at, feed, callbacks=callbacks, **worker_options(cfg)))


def worker_options(cfg: Config) -> dict:
    """What a worker takes from the driver's run section, passed explicitly (the trainer reads no run.* key):
    torch threads (train.threads, else the CPUs each worker was given), the GPU, the run's name."""
    return {"threads": cfg.train.threads or cfg.run.cpus_per_worker, "gpu": cfg.run.gpu, "name": cfg.run.name}


def _fit(trainer: Trainer) -> dict:
    """fit(), and on failure rank 0 still uploads its TensorBoard events (they show what led to it)."""
    try:
        return trainer.fit()
    except BaseException:
        if trainer.reporter is not None:
            with contextlib.suppress(Exception):
                trainer.reporter.abort()
        raise
