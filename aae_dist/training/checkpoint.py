"""Checkpoint contents and storage.

A checkpoint is a folder: `state.pt` (tensors and plain containers only, loaded with
`weights_only=True`) and `meta.json` (step, architecture), written last so a folder
without it is an unfinished write and is never resumed from.  Under Ray Train the folder
goes through `ray.train.report`; in-process runs store it in the run folder themselves."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from .. import storage
from ..errors import UserError

STATE, META = "state.pt", "meta.json"
PREFIX = "checkpoint_"


def architecture(cfg_dict: dict) -> dict:
    """The settings a checkpoint's weights depend on."""
    m = cfg_dict["model"]
    keys = ("variant", "regularizer", "num_classes", "kind", "hidden", "disc_hidden", "latent_dim", "posterior", "noise_dim", "conv_channels")
    return {k: m[k] for k in keys}


def check_architecture(meta: dict, cfg_dict: dict) -> None:
    want, have = architecture(cfg_dict), meta.get("architecture", {})
    diff = [f"model.{k}: checkpoint {have.get(k)!r}, config {v!r}" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise UserError(f"checkpoint at step {meta.get('step')} has a different architecture ({'; '.join(diff)}): use the run's own config or start a new run")


def write_local(folder: str, state: dict, meta: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, STATE))
    with open(os.path.join(folder, META), "w") as fh:
        json.dump(meta, fh)


def read_local(folder: str, cfg_dict: dict | None = None) -> tuple[dict, dict]:
    meta_path, state_path = os.path.join(folder, META), os.path.join(folder, STATE)
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder} is not an aae-dist checkpoint ({META}: {exc}): point at a run folder or checkpoint folder") from None
    if cfg_dict is not None:
        check_architecture(meta, cfg_dict)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refuse anything that is not a plain tensor checkpoint
        raise UserError(f"{state_path} is not a valid checkpoint (refused without unpickling code: {type(exc).__name__}): delete it to resume from an earlier one") from None
    return state, meta


# ---- checkpoints kept by aae-dist itself (in-process runs) ---------------------------------------

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


def remove_local(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
