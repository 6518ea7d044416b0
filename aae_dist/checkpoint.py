"""Checkpoints: what they hold (a Checkpointer over named stateful parts), how they are stored,
and whether a config fits them.

A checkpoint is a folder `checkpoint_step_NNNNNNNNN` in the run folder: `state.pt` (tensors and
plain containers only, loaded with `weights_only=True`) and `meta.json` (step, architecture),
written last so a folder without it is an unfinished write and is never resumed from.  Runs in
process and under Ray store them the same way (rank 0 writes; Ray only gets the metrics)."""

from __future__ import annotations

import json
import os
import re
import shutil

from typing import Protocol

from . import storage, tempdirs
from .config import ModelConfig
from .errors import UserError

STATE, META = "state.pt", "meta.json"
METRICS = "metrics.json"  # what the trainer reported at this checkpoint: ranks checkpoints for train.keep_best
PREFIX = "checkpoint_"
STEP_FOLDER = re.compile(r"checkpoint_step_(\d{9,})")  # the step is the folder's name, never what meta.json claims
_ORIGIN: dict[str, str] = {}  # a fetched local copy -> the URL it came from, so messages name the original


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Checkpointer:
    """Owns everything a checkpoint holds: named stateful parts (model, optimizers, schedulers,
    training state).  `save` writes them with the run's metadata; `restore` loads them back."""

    def __init__(self, parts: dict[str, Stateful], meta: dict):
        self.parts, self.meta = parts, meta

    def state(self, names=None) -> dict:
        """The parts' states (all, or those named)."""
        return {name: part.state_dict() for name, part in self.parts.items() if names is None or name in names}

    def save(self, folder: str, step: int, final: bool = False, **where) -> None:
        state = self.state()
        write_local(folder, state, {"format": 1, "step": step, "final": final, **where, **self.meta})

    def restore(self, folder: str, model_cfg: ModelConfig) -> dict:
        state, meta = read_local(folder, model_cfg)
        for name, part in self.parts.items():
            restore_part(part, state, name, origin(folder))
        return meta


def restore_part(part: Stateful, state: dict, name: str, where: str) -> None:
    """Load one named part of a checkpoint's state; a missing or misshapen one is a UserError naming it."""
    shown = _state_file(where)
    if not isinstance(state.get(name), dict):
        raise UserError(f"{shown} has no '{name}' entry (it holds {sorted(map(str, state))}): it was altered or not written by "
                        "aae-dist; delete this checkpoint folder to resume from an earlier one")
    try:
        part.load_state_dict(state[name])
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"{shown}: its '{name}' do not fit this run ({type(exc).__name__}: {detail}): it was altered or is from "
                        "another model; delete this checkpoint folder to resume from an earlier one") from None


def all_finite(state) -> bool:
    """Every floating-point tensor in a (nested) state holds only finite numbers."""
    import torch

    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    if torch.is_tensor(state) and state.is_floating_point():
        return bool(torch.isfinite(state).all())
    return True


def architecture(cfg) -> dict:
    """The settings a checkpoint's weights depend on, from a ModelConfig or a whole config dict."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.model_validate(cfg["model"])
    return cfg.architecture()


def _state_file(where: str) -> str:
    """How a message names the state.pt of a checkpoint folder, or of a run folder's latest checkpoint."""
    last = str(where).rstrip("/").rsplit("/", 1)[-1]
    if last.startswith(PREFIX):
        return storage.redact(storage.join(where, STATE))
    return f"the latest checkpoint's {STATE} in {storage.redact(where)}"


def origin(folder: str) -> str:
    """Where a local checkpoint folder came from: the URL `fetch` copied it from, or itself."""
    return _ORIGIN.get(folder, folder)


def folder_step(url: str) -> int | None:
    """The step in a folder name `checkpoint_step_NNNNNNNNN`, or None for any other name."""
    m = STEP_FOLDER.fullmatch(str(url).rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def check_meta(meta, where: str) -> dict:
    """meta.json is untrusted input: a JSON object with a non-negative integer step, the same as the folder's name."""
    shown = storage.redact(storage.join(where, META))
    if not isinstance(meta, dict):
        raise UserError(f"{shown} holds a JSON {type(meta).__name__}, not an aae-dist checkpoint's object: point at a run folder or "
                        "checkpoint folder written by aae-dist")
    step = meta.get("step")
    if type(step) is not int or step < 0:
        raise UserError(f"{shown} has no valid step (got {str(step)[:40]!r}): the checkpoint was altered; delete it")
    if not isinstance(meta.get("architecture", {}), dict) or not isinstance(meta.get("config", {}), dict):
        raise UserError(f"{shown}: 'architecture' and 'config' must be JSON objects: the checkpoint was altered; delete it")
    named = folder_step(where)
    if named is not None and named != step:
        raise UserError(f"{shown} says step {step} but its folder is step {named}: the checkpoint was altered; delete it or "
                        "pass another checkpoint folder")
    return meta


def check_architecture(meta: dict, cfg) -> None:
    want, have = architecture(cfg), meta.get("architecture", {})
    diff = [f"model.{k}: checkpoint {have.get(k)!r}, config {v!r}" for k, v in want.items() if have.get(k) != v]
    # a setting the config leaves at its default is not in `want` (older checkpoints never recorded it): one the
    # checkpoint recorded must still agree (model.deskew=true weights learnt upright digits)
    full = (ModelConfig.model_validate(cfg["model"]) if isinstance(cfg, dict) else cfg).model_dump(mode="json")
    diff += [f"model.{k}: checkpoint {v!r}, config {full[k]!r}" for k, v in have.items()
             if k not in want and k in ModelConfig.architecture_keys() and v != full[k]]
    if diff:
        raise UserError(f"checkpoint at step {meta.get('step')} has a different architecture ({'; '.join(diff)}): use the run's own config or start a new run")


def write_local(folder: str, state: dict, meta: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    import torch  # here, not at the top: the driver lists checkpoints without needing torch

    torch.save(state, os.path.join(folder, STATE))
    with open(os.path.join(folder, META), "w") as fh:
        json.dump(meta, fh)


def read_local(folder: str, cfg=None) -> tuple[dict, dict]:
    """(state, meta) of a local checkpoint folder; with `cfg` (ModelConfig or config dict), refuse one it does not fit."""
    where = origin(folder)
    try:
        with open(os.path.join(folder, META), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"{storage.redact(where)} is not an aae-dist checkpoint ({META}: {' '.join(str(exc).split())[:200]}): point at a "
                        "run folder or checkpoint folder") from None
    check_meta(meta, where)
    if cfg is not None:
        check_architecture(meta, cfg)
    shown = storage.redact(storage.join(where, STATE))
    try:
        import torch

        state = torch.load(os.path.join(folder, STATE), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refuse anything that is not a plain tensor checkpoint
        raise UserError(f"{shown} is not a valid checkpoint (refused without unpickling code: {type(exc).__name__}): delete it to resume from an earlier one") from None
    if not isinstance(state, dict):
        raise UserError(f"{shown} holds a {type(state).__name__}, not a checkpoint's parts: delete it to resume from an earlier one")
    return state, meta


# ---- checkpoints in a run folder ----------------------------------------------------------------

def persist(local_folder: str, run_url: str, step: int, keep: int, metrics: dict | None = None, best: tuple[str, str] | None = None) -> str:
    """Copy a checkpoint folder into the run folder (its metrics.json first, meta.json last), then prune:
    the newest `keep` stay and, with best=(METRIC, min|max), the best by that metric too."""
    dest = storage.join(run_url, f"{PREFIX}step_{step:09d}")
    if metrics is not None:
        storage.write_bytes_atomic(storage.join(dest, METRICS), json.dumps(finite_scalars(metrics)).encode())
    for name in (STATE, META):
        with open(os.path.join(local_folder, name), "rb") as fh:
            storage.write_bytes_atomic(storage.join(dest, name), fh.read())
    prune(run_url, keep, best)
    return dest


def prune(run_url: str, keep: int, best: tuple[str, str] | None = None) -> None:
    """Remove complete checkpoints but the newest `keep` and the best by best=(METRIC, min|max)."""
    completed = listing(run_url)
    kept = {url for _, url in completed[-keep:]}
    if best and best[0]:
        winner = best_in(completed, *best)
        if winner:
            kept.add(winner)
    for _, url in completed:
        if url not in kept:
            storage.remove(url)


def best_in(found: list[tuple[int, str]], metric: str, mode: str = "min") -> str | None:
    """The checkpoint whose metrics.json holds the best finite `metric` (ties: the newest); None if none has it."""
    scored = []
    for step, url in found:
        value = saved_metrics(url).get(metric)
        if value is not None:
            scored.append((value if mode == "max" else -value, step, url))
    return max(scored)[2] if scored else None


def saved_metrics(url: str) -> dict[str, float]:
    """A checkpoint's metrics.json (untrusted: anything but finite numbers is dropped; missing or unreadable: {})."""
    try:
        raw = json.loads(storage.read_bytes(storage.join(url, METRICS)))
    except (OSError, ValueError, UserError):
        return {}
    return finite_scalars(raw) if isinstance(raw, dict) else {}


def finite_scalars(metrics: dict) -> dict[str, float]:
    """The finite int/float values of a metrics dict (booleans, text, nested values and nan/inf dropped)."""
    import math

    return {str(k): float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def listing(run_url: str) -> list[tuple[int, str]]:
    """(step, url) of every complete checkpoint folder in a run folder.  The step is the folder's name; a
    folder whose meta.json is not an object claiming that same step is skipped, so an altered meta.json
    can neither pose as the newest checkpoint nor make pruning delete the real newest."""
    out = []
    for name in storage.listdir(run_url):
        step = folder_step(name)
        if step is None:
            continue
        url = storage.join(run_url, name)
        meta_url = storage.join(url, META)
        if storage.exists(meta_url) and storage.exists(storage.join(url, STATE)):
            try:
                meta = json.loads(storage.read_bytes(meta_url))
            except ValueError:
                continue
            if isinstance(meta, dict) and type(meta.get("step")) is int and meta["step"] == step:
                out.append((step, url))
    return sorted(out)


def fetch(url: str) -> str:
    """A local copy of a checkpoint folder (a temp dir the caller removes; one a killed process left behind
    is removed by the next fetch on this machine)."""
    tmp = tempdirs.make("aae-ckpt-")
    _ORIGIN[tmp] = url
    try:
        for name in (STATE, META):
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(storage.read_bytes(storage.join(url, name)))
    except BaseException:
        remove_local(tmp)
        raise
    return tmp


def latest_in_run(run_url: str) -> str | None:
    found = listing(run_url)
    return found[-1][1] if found else None


def resolve(ref: str) -> str:
    """A checkpoint folder as given, or the latest complete checkpoint of a run folder."""
    if storage.exists(storage.join(ref, META)):
        return ref
    latest = latest_in_run(ref)
    if latest is None:
        raise UserError(f"no checkpoint at {storage.redact(ref)}: pass a run folder (STORAGE/NAME) or a checkpoint_* folder")
    return latest


def load(ref: str) -> tuple[dict, dict]:
    """(state, meta) of a run's latest checkpoint or of a checkpoint folder, at any URL."""
    local = fetch(resolve(ref))
    try:
        state, meta = read_local(local)
        restore_part(_Check(), state, "models", origin(local))
        check_saved_config(meta, origin(local))
        return state, meta
    finally:
        remove_local(local)


class _Check:
    """A stand-in part for `load`: the models entry must map network names to their tensors."""

    def load_state_dict(self, state: dict) -> None:
        for net, tensors in state.items():
            if not isinstance(tensors, dict):
                raise TypeError(f"network {net!r} holds a {type(tensors).__name__}, not its tensors")


def check_saved_config(meta: dict, where: str) -> None:
    """The config and data description saved with a run's checkpoint, as `inference.load_run` reads them."""
    from pydantic import ValidationError

    from .config import Config

    if "config" not in meta:
        return
    shown = storage.redact(storage.join(where, META))
    missing = [k for k in ("shape", "dtype", "num_classes") if k not in meta]
    if missing:
        raise UserError(f"{shown} lacks {', '.join(missing)}: the checkpoint was altered; delete it")
    try:
        Config.model_validate(meta["config"])
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"{shown}: its saved config is invalid at '{'.'.join(map(str, err['loc']))}' ({err['msg']}): the checkpoint "
                        "was altered or written with values aae-dist now refuses; retrain") from None


def remove_local(folder: str) -> None:
    _ORIGIN.pop(folder, None)
    shutil.rmtree(folder, ignore_errors=True)
