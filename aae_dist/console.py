"""What a person sees in the terminal during `aae-dist train`: one line saying what starts, one
progress bar updated in place (fed by rank 0 through a channel, never by forwarded worker output),
and a final table of the metrics beside their baselines and the paper's figures.

The channel is a `ProgressBoard`: in-process it is called directly; under a local Ray (every process on
this machine) it is a JSON file rank 0 rewrites and the driver polls (`FileBoard`); on a cluster joined by
--address it runs as a small actor that rank 0 posts to and the driver polls."""

from __future__ import annotations

import json
import os
import sys
import threading

from tqdm import tqdm

from .scoring import BASELINE_OF


class ProgressBoard:
    """Latest progress posted by rank 0 (a plain class; wrapped with ray.remote under Ray)."""

    def __init__(self):
        self.latest: dict = {}
        self.warnings: list[str] = []
        self.starts = 0

    def put(self, update: dict) -> None:
        if "start" in update:  # rank 0 (re)starting: a second start is a restart after a lost worker
            self.starts += 1
            if self.starts > 1:
                self.warn(f"a worker was lost: the group restarted from step {update['start']} (restart {self.starts - 1})")
        self.latest.update(update)

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def read(self) -> tuple[dict, list[str]]:
        return dict(self.latest), list(self.warnings)


class FileBoard(ProgressBoard):
    """The board as a file, for a local Ray: rank 0 runs on this machine, so no actor is needed (an actor is one
    more Ray worker process to start beside Train's controller and worker; about 1 s of a 2-core machine's
    start-up, measured).  A restarted rank 0 loads the file first, so restarts are still counted."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.latest, self.warnings, self.starts = _read_board(path)

    def put(self, update: dict) -> None:
        super().put(update)
        self._write()

    def warn(self, text: str) -> None:
        super().warn(text)
        self._write()

    def _write(self) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"latest": self.latest, "warnings": self.warnings, "starts": self.starts}, fh)
        os.replace(tmp, self.path)  # the driver never reads half a file


def read_board_file(path: str) -> tuple[dict, list[str]]:
    """What the driver draws from a FileBoard: (latest, warnings); nothing yet before rank 0's first post."""
    latest, warnings, _ = _read_board(path)
    return latest, warnings


def _read_board(path: str) -> tuple[dict, list[str], int]:
    try:
        with open(path) as fh:
            state = json.load(fh)
    except (FileNotFoundError, ValueError):
        return {}, [], 0
    return dict(state.get("latest", {})), list(state.get("warnings", [])), int(state.get("starts", 0))


class RemoteFeed:
    """A worker's handle on the driver's board actor: posting never waits for the driver."""

    def __init__(self, actor):
        self.actor = actor

    def put(self, update: dict) -> None:
        self.actor.put.remote(update)

    def warn(self, text: str) -> None:
        self.actor.warn.remote(text)


class ConsoleProgress:
    """Draws the driver's progress bar from a board's latest update; warnings are shown once."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.shown: set[str] = set()

    def show(self, latest: dict, warnings: list[str]) -> None:
        for w in warnings:
            if w not in self.shown:
                self.shown.add(w)
                (self.bar.write if self.bar else print)(f"aae-dist: warning: {w}", file=sys.stderr)
        if not self.enabled or "total" not in latest:
            return
        if self.bar is None:
            self.bar = tqdm(total=latest["total"], initial=latest.get("start", 0), desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        if latest == getattr(self, "_drawn", None):
            return  # nothing new (e.g. during the final evaluation)
        self._drawn = latest
        self.bar.total = latest["total"]
        self.bar.n = latest.get("step", self.bar.n)
        post = {k: f"{v:.3f}" for k, v in latest.get("losses", {}).items()}
        if "epoch" in latest:
            post = {"epoch": f"{latest['epoch']:.1f}", **post}
        if latest.get("samples_per_s"):
            post["samples/s"] = f"{latest['samples_per_s']:.0f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LocalBoard(ProgressBoard):
    """In-process: posting draws at once."""

    def __init__(self, console: ConsoleProgress):
        super().__init__()
        self.console = console

    def put(self, update: dict) -> None:
        super().put(update)
        self.console.show(*self.read())

    def warn(self, text: str) -> None:
        super().warn(text)
        self.console.show(*self.read())


class Poller:
    """Under Ray: a driver thread that reads the board twice a second and draws; read() -> (latest, warnings)."""

    def __init__(self, read, console: ConsoleProgress, every_s: float = 0.5):
        self.read, self.console, self.every_s = read, console, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.console.show(*self.read())
            except Exception:  # noqa: BLE001 - the bar is a courtesy; training goes on without it
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        try:
            self.console.show(*self.read())
        except Exception:  # noqa: BLE001
            pass
        self.console.close()


def start_line(cfg, train_count: int, run_url: str, redact) -> str:
    lo, hi = cfg.run.worker_range
    m = cfg.model
    where = "in this process" if hi == 0 else (f"{lo}..{hi} Ray workers" if lo != hi else f"{hi} Ray worker{'s' if hi > 1 else ''}")
    own = [f"{k} {getattr(m, k).class_path}" for k in ("encoder", "decoder", "discriminator") if getattr(m, k).class_path]
    nets = f"{m.kind} {m.hidden}" + (f"; own {', '.join(own)}" if own else "")
    return (f"aae-dist: training {m.variant} AAE ({nets}, z {m.latent_dim}-d, prior {cfg.prior.kind}) on "
            f"{redact(cfg.data.path)} ({train_count} samples), {where}; run folder {redact(run_url)}")


# how a metric was measured, not how well the run did: shown on a line of their own, not in the table
RUN_DETAILS = ("parzen_ll_se", "parzen_sigma", "parzen_samples", "parzen_sigma_split", "parzen_sigma_at_grid_edge")
PAPER_BUDGET = ("paper: full MNIST (50,000 training digits) trained for thousands of epochs (Makhzani et al. 2015); "
                "a short run, or other data, is not comparable to its figures")


def final_table(summary: dict, paper: dict[str, str], run_url: str, redact, kept: bool = True) -> str:
    """The run's metrics beside the same data's baselines and the paper's figures, then what to do next."""
    metrics, baselines = summary.get("metrics", {}), summary.get("baselines", {})
    rows = [("metric", "this run", "baseline (same data)", "paper")]
    for k, v in metrics.items():
        if k in RUN_DETAILS or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        base = BASELINE_OF.get(k)
        shown = f"{v:.1f} +- {metrics['parzen_ll_se']:.1f} nats" if k == "parzen_ll" and "parzen_ll_se" in metrics else _fmt(k, v)
        rows.append((k, shown, f"{_fmt(k, baselines[base])} ({base})" if base in baselines else "", paper.get(k, "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (f"done: {summary['steps']} steps ({summary['epochs']:.1f} epochs) in {summary['train_s'] / 60:.1f} min, "
            f"{summary['samples_per_s']:.0f} samples/s, {summary['world_size']} worker(s)")
    notes = [d for d in (_details(metrics),) if d]
    if any(r[3] for r in rows[1:]):
        notes.append(PAPER_BUDGET)
    if not kept:
        return "\n".join([head, *lines, *notes, "fast-dev-run: nothing was kept (no run folder, checkpoint or TensorBoard); "
                          "drop --fast-dev-run to train for real"])
    run = redact(run_url)
    return "\n".join([head, *lines, *notes, *next_steps(run), f"run folder: {run}", f"tensorboard --logdir {run}/tensorboard"])


def _details(metrics: dict) -> str:
    """How the Parzen estimate was made: its sigma, where sigma was chosen, how many decoded samples."""
    if "parzen_sigma" not in metrics:
        return ""
    edge = ", at the edge of the sigma grid" if metrics.get("parzen_sigma_at_grid_edge") else ""
    return (f"details: parzen sigma {metrics['parzen_sigma']:g} (chosen on {metrics.get('parzen_sigma_split', '?')}{edge}), "
            f"{metrics.get('parzen_samples', '?')} prior samples")


def next_steps(run: str) -> list[str]:
    """The exact commands that use the run, for a person who has just trained one."""
    import shlex

    r = shlex.quote(run)
    return [f"next: aae-dist eval {r} --plots figures        # metrics as JSON, the paper's figures as PNGs",
            f"      aae-dist sample {r} --out samples.png    # a grid of decoded prior samples",
            f"      aae-dist generate {r} --n 10000 --out generated   # a sharded dataset of samples",
            f"      in Python: aae_dist.load({run!r})   # an nn.Module: encode, reconstruct, decode, sample"]


def _fmt(key: str, v: float) -> str:
    if "error" in key:
        return f"{100 * v:.2f}%"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
