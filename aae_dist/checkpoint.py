"""Checkpoints: what they hold (a Checkpointer over named stateful parts), how they are stored,
and whether a config fits them.

A checkpoint is a folder `checkpoint_step_NNNNNNNNN` in the run folder: `state.pt` (tensors and
plain containers only, loaded with `weights_only=True`) and `meta.json` (step, architecture),
written last so a folder without it is an unfinished write and is never resumed from.  Runs in
process and under Ray store them the same way (rank 0 writes; Ray only gets the metrics)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from typing import Protocol

from . import storage
from .config import ModelConfig
from .errors import UserError

STATE, META = "state.pt", "meta.json"
PREFIX = "checkpoint_"


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Checkpointer:
    """Owns everything a checkpoint holds: named stateful parts (model, optimizers, schedulers,
    training state).  `save` writes them with the run's metadata; `restore` loads them back."""

    def __init__(self, parts: dict[str, Stateful], meta: dict):
        self.parts, self.meta = parts, meta

    def save(self, folder: str, step: int, final: bool = False, **where) -> None:
        state = {name: part.state_dict() for name, part in self.parts.items()}
        write_local(folder, state, {"format": 1, "step": step, "final": final, **where, **self.meta})

    def restore(self, folder: str, model_cfg: ModelConfig) -> dict:
        state, meta = read_local(folder, model_cfg)
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        return meta


def architecture(cfg) -> dict:
    """The settings a checkpoint's weights depend on, from a ModelConfig or a whole config dict."""
    if isinstance(cfg, dict):
        cfg = ModelConfig.model_validate(cfg["model"])
    return cfg.architecture()


def check_architecture(meta: dict, cfg) -> None:
    want, have = architecture(cfg), meta.get("architecture", {})
    diff = [f"model.{k}: checkpoint {have.get(k)!r}, config {v!r}" for k, v in want.items() if have.get(k) != v]
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
    meta_path, state_path = os.path.join(folder, META), os.path.join(folder, STATE)
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} is not an aae-dist checkpoint ({META}: {exc}): point at a run folder or checkpoint folder") from None
    if cfg is not None:
        check_architecture(meta, cfg)
    try:
        import torch

        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refuse anything that is not a plain tensor checkpoint
        raise UserError(f"{state_path} is not a valid checkpoint (refused without unpickling code: {type(exc).__name__}): delete it to resume from an earlier one") from None
    return state, meta


# ---- checkpoints in a run folder ----------------------------------------------------------------

def persist(local_folder: str, run_url: str, step: int, keep: int) -> str:
    """Copy a checkpoint folder into the run folder, meta.json last, then prune old ones."""
    dest = storage.join(run_url, f"{PREFIX}step_{step:09d}")
    for name in (STATE, META):
        with open(os.path.join(local_folder, name), "rb") as fh:
            storage.write_bytes_atomic(storage.join(dest, name), fh.read())
    completed = sorted(listing(run_url))
    for _, old in completed[:-keep]:
        storage.remove(old)
    return dest


def listing(run_url: str) -> list[tuple[int, str]]:
    """(step, url) of every complete checkpoint folder in a run folder, Ray's or ours."""
    out = []
    for name in storage.listdir(run_url):
        if not name.startswith(PREFIX):
            continue
        url = storage.join(run_url, name)
        meta_url = storage.join(url, META)
        if storage.exists(meta_url) and storage.exists(storage.join(url, STATE)):
            try:
                out.append((int(json.loads(storage.read_bytes(meta_url))["step"]), url))
            except (ValueError, KeyError):
                continue
    return sorted(out)


def fetch(url: str) -> str:
    """A local copy of a checkpoint folder (a temp dir the caller removes)."""
    tmp = tempfile.mkdtemp(prefix="aae-ckpt-")
    for name in (STATE, META):
        with open(os.path.join(tmp, name), "wb") as fh:
            fh.write(storage.read_bytes(storage.join(url, name)))
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
        return read_local(local)
    finally:
        remove_local(local)


def remove_local(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
