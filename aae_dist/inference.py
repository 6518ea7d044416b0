"""Use a trained run: evaluate, sample grids, encode a dataset to Parquet, generate a sharded dataset."""

from __future__ import annotations

import io
import json
import numpy as np
import torch

from . import checkpoint, seeds, storage
from .config import Config
from .errors import UserError
from .models import AAE


def load_run(ref: str) -> tuple[Config, AAE]:
    """The config and AAE of a run's latest checkpoint (or of a checkpoint folder), in eval mode on the CPU."""
    state, meta = checkpoint.load(ref)
    if "config" not in meta:
        raise UserError(f"checkpoint {storage.redact(ref)} has no config (written by an older aae-dist): re-train")
    cfg = Config.model_validate(meta["config"])
    from .data.format import scaling_from_meta

    aae = AAE(cfg.model, cfg.prior, tuple(meta["shape"]), meta["dtype"], int(meta["num_classes"]), table=table_of(meta, ref),
              scaling=scaling_from_meta(meta, ref))
    checkpoint.restore_part(aae, state, "models", ref)  # a network missing or misshapen: one line naming it
    aae.step = int(meta["step"])  # the step the weights are from: figures and aae_dist.load name it
    return cfg, aae.eval()


def table_of(meta: dict, ref: str) -> dict | None:
    """A table run's columns and transforms, as its checkpoint saved them (checked like a manifest's)."""
    if meta.get("table") is None:
        return None
    from .data.tables import check_table_spec

    try:
        return check_table_spec(meta["table"], int(np.prod(meta["shape"])))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"checkpoint {storage.redact(ref)} has an invalid table description ({exc}): re-train") from None


def load_model(ref: str) -> AAE:
    return load_run(ref)[1]


# ---- eval --------------------------------------------------------------------------------------

def run_data(cfg: Config, data: str | None) -> str:
    """--data, else the run's own data.path, unless that was saved without its credentials."""
    path = data or cfg.data.path
    if storage.is_redacted(path):
        raise UserError(f"the run's data.path {path} had credentials in its URL, which are never saved: pass the dataset with --data URL")
    return path


def evaluate(ref: str, data: str | None, split: str) -> dict:
    from .data import read_manifest
    from .evaluation import Evaluator

    cfg, model = load_run(ref)
    path = run_data(cfg, data)
    manifest = read_manifest(path)
    if tuple(manifest.shape) != model.shape:
        raise UserError(f"dataset {storage.redact(path)} holds {tuple(manifest.shape)} samples, the model was trained on {model.shape}")
    ev = Evaluator(cfg, model, manifest, data_path=path)
    manifest.split(split, path)
    return {**ev.run(split), "baselines": ev.baselines(split, run_url=ref)}  # a run folder's stored plain autoencoder is scored too


def write_figures(ref: str, out: str, data: str | None = None, split: str = "test", n: int = 2000, seed: int = 0) -> list[str]:
    """The paper's pictures of a trained run as PNG files in folder `out` (any fsspec URL)."""
    from .data import ShardStream, read_manifest
    from .figures import paper_figures
    from .plots import to_png

    cfg, model = load_run(ref)
    path = run_data(cfg, data)
    manifest = read_manifest(path)
    manifest.split(split, path)
    x, y = next(iter(ShardStream(path, split, n, shuffle=False, drop_last=False, manifest=manifest).iter_epoch(0)))
    written = []
    with model.evaluating():
        caption = f"run {cfg.run.name}, step {model.step}"
        figs = paper_figures(model, model.normalise(x), y.numpy(), torch.Generator().manual_seed(seed), caption=caption)
        if model.rows is not None:  # a table run: real beside synthetic, per column
            figs.update(table_column_figures(model, x, seed, caption))
        for name, fig in figs.items():
            dest = storage.join(out, f"{name}.png")
            storage.write_bytes_atomic(dest, to_png(fig))
            written.append(dest)
    return written


def table_column_figures(model: AAE, x: torch.Tensor, seed: int, caption: str | None = None) -> dict:
    """Per-column figures of a table model: the rows `x` (encoded, as in the shards) beside as many generated rows."""
    from .table_figures import column_figures
    from .tabular import generate_rows

    real = model.rows.decode_table(np.asarray(x, np.float32), np.random.default_rng(seed))
    synth = generate_rows(model, len(x), torch.Generator().manual_seed(seed))
    return column_figures(real, synth, model.rows.table["columns"], caption=caption)


# ---- sample ------------------------------------------------------------------------------------

MAX_SAMPLE_GRID = 10_000  # a 100 x 100 grid: more is no longer a picture, and decoding it all at once needs its memory


def check_out_file(out: str) -> None:
    """--out names a file: an existing folder would be replaced by nothing and leave a temp file beside it."""
    fs, path = storage.filesystem(out)
    if str(out).endswith("/") or storage.with_retries("checking", out, lambda: fs.isdir(path)):
        raise UserError(f"--out {storage.redact(out)} is a folder: give a file name, e.g. {storage.redact(storage.join(out, 'samples.png'))}")


@torch.no_grad()
def sample_grid(ref: str, n: int, out: str, label: int | None = None, interpolate: bool = False, seed: int = 0) -> str:
    from PIL import Image

    from .plots import image_grid

    if not 0 < n <= MAX_SAMPLE_GRID:
        raise UserError(f"--n {n}: a grid holds 1 to at most {MAX_SAMPLE_GRID} samples (for many samples use aae-dist generate)")
    check_out_file(out)
    model = load_model(ref)
    if len(model.shape) != 3:
        raise UserError(f"sample needs image data (C, H, W); this model's samples are {model.shape}")
    g = torch.Generator().manual_seed(seed)
    labels = None
    if label is not None:
        if not model.num_classes or not 0 <= label < model.num_classes:
            raise UserError(f"--label {label}: this model has {model.num_classes or 'no'} classes")
        labels = torch.full((n,), label, dtype=torch.long)
    z, y = model.sample_latents(n, g, labels=labels)
    if interpolate:  # walk in a straight line between two codes
        t = torch.linspace(0, 1, n)[:, None]
        z = (1 - t) * z[:1] + t * z[-1:]
        if y is not None:
            y = y[:1].expand(n, -1) if labels is not None else (1 - t) * y[:1] + t * y[-1:]
    imgs = model.decode(z, y).float().numpy()
    grid = image_grid(model.displayable(imgs), cols=n if interpolate else int(np.ceil(np.sqrt(n))))
    arr = (grid.transpose(1, 2, 0) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    storage.write_bytes_atomic(out, buf.getvalue())
    return out


# ---- encode ------------------------------------------------------------------------------------

def _encode_shard(job: tuple) -> int:
    ref, data, split, shard_index, out, keep, head = job
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .data.format import read_manifest
    from .data.reader import Segment, ShardStream

    model = load_model(ref)
    manifest = read_manifest(data)
    shard = manifest.splits[split].shards[shard_index]
    stream = ShardStream(data, split, 1, shuffle=False, manifest=manifest)
    x, y = stream.read_segment(Segment(shard, 0, shard.count))
    with torch.no_grad():
        c = model.encode(model.normalise(torch.from_numpy(np.array(x))), torch.Generator().manual_seed(shard_index))
        z = (c.mu if c.mu is not None else c.z).numpy().astype(np.float32)
    cols = {"split": pa.array([split] * len(z)), "shard": pa.array([shard.name] * len(z)), "index": pa.array(np.arange(len(z))),
            "label": pa.array(np.asarray(y)), "z": pa.FixedSizeListArray.from_arrays(pa.array(z.reshape(-1)), z.shape[1])}
    if c.y_logits is not None:
        cols["y_pred"] = pa.array(c.heads[head].argmax(1).numpy())  # the reported head (model.cluster_heads)
        if len(c.heads) > 1:
            preds = np.stack([h.argmax(1).numpy() for h in c.heads], 1)
            cols["y_pred_heads"] = pa.FixedSizeListArray.from_arrays(pa.array(preds.reshape(-1)), preds.shape[1])
    if model.variant.decoder_input == "heads":  # dimensionality reduction: the 2-D representation y @ heads + z
        from .figures import representation

        with torch.no_grad():
            r = representation(model, c).numpy().astype(np.float32)
        cols["representation"] = pa.FixedSizeListArray.from_arrays(pa.array(r.reshape(-1)), r.shape[1])
    if keep:  # the rows' kept key columns (shard --keep), in the shard's row order
        from .data.tables import read_keys

        keys = read_keys(data, shard, list(keep))
        cols.update({name: keys.column(name) for name in keep})
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf)
    storage.write_bytes_atomic(storage.join(out, f"{split}-{shard_index:05d}.parquet"), buf.getvalue())
    return len(z)


ENCODE_COLUMNS = ("split", "shard", "index", "label", "z", "y_pred", "y_pred_heads", "representation")


def encode(ref: str, data: str, out: str, splits: list[str] | None = None, workers: int = 0, address: str | None = None,
           keep: list[str] | None = None) -> int:
    """Codes per sample as `<split>-NNNNN.parquet`; `keep`: a table's key columns kept at shard time, beside each code."""
    from .data.format import read_manifest
    from .parallel import map_tasks

    manifest = read_manifest(data)
    cfg, model = load_run(ref)
    if tuple(manifest.shape) != model.shape:
        raise UserError(f"dataset {storage.redact(data)} holds {tuple(manifest.shape)} samples, the model was trained on {model.shape}")
    names = splits or list(manifest.splits)
    for s in names:  # every split checked before any is encoded
        manifest.split(s, data)
    keep = check_keep(manifest, data, names, keep or [])
    head = reported_head(cfg, model, data, manifest)
    return sum(map_tasks(_encode_shard, encode_jobs(ref, data, manifest, names, out, keep, head), workers, address))


def reported_head(cfg: Config, model: AAE, data: str, manifest) -> int:
    """With model.cluster_heads > 1, y_pred is the head the run's metrics report: chosen again here the same
    label-free way (the unsupervised objective on the run's own training split, else on this dataset's)."""
    from .data import read_manifest
    from .evaluation import Evaluator

    if getattr(model.nets["encoder"], "num_heads", 1) <= 1:
        return 0
    try:
        path = run_data(cfg, None)
        own = read_manifest(path)
    except UserError:
        path, own = data, manifest
    if "train" not in own.splits or tuple(own.shape) != model.shape:
        path, own = data, manifest
    if "train" not in own.splits:
        return 0
    ev = Evaluator(cfg, model, own, data_path=path)
    with model.evaluating():
        ev.generator.manual_seed(seeds.evaluation(cfg.train.seed))
        return ev.choose_head()["cluster_head"]


def check_keep(manifest, data: str, splits: list[str], keep: list[str]) -> tuple[str, ...]:
    """--keep COL names a column the dataset kept at shard time, and every shard to encode has its key file."""
    kept = (manifest.table or {}).get("keep", [])
    for col in keep:
        if col in ENCODE_COLUMNS:
            raise UserError(f"--keep {col}: encode writes its own column '{col}'; rename that column in the source and re-shard")
        if col not in kept:
            raise UserError(f"--keep {col}: dataset {storage.redact(data)} was sharded without keeping column '{col}' "
                            f"(kept: {', '.join(kept) or 'none'}): re-shard with --keep {col}")
    if keep:
        bare = next((s.name for sp in splits for s in manifest.splits[sp].shards if s.keys is None), None)
        if bare is not None:
            raise UserError(f"--keep: shard {bare} of dataset {storage.redact(data)} has no key file: re-shard with --keep {','.join(keep)}")
    return tuple(dict.fromkeys(keep))


def encode_jobs(ref: str, data: str, manifest, splits: list[str] | None, out: str, keep: tuple[str, ...] = (), head: int = 0):
    """One job per shard, made as the workers take them: a dataset of millions of shards is never a list."""
    for s in splits or list(manifest.splits):
        for i in range(len(manifest.splits[s].shards)):
            yield (ref, data, s, i, out, keep, head)


# ---- generate ----------------------------------------------------------------------------------

def _generate_chunk(job: tuple) -> dict:
    ref, out, index, count, seed = job
    from .data.writer import write_shard

    model = load_model(ref)
    g = torch.Generator().manual_seed(seeds.generate_chunk(seed, index))
    with torch.no_grad():
        labels = None
        if model.num_classes and model.variant.needs_classes:
            labels = torch.randint(0, model.num_classes, (count,), generator=g)
        x = model.sample(count, g, labels=labels).float().numpy()
    if model.dtype == "uint8":
        x = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    else:
        x = x.astype(model.dtype)
    shard = write_shard(out, f"train-{index:05d}", x, None if labels is None else labels.numpy())
    return {"shard": shard, "labels": labels is not None, "num_classes": model.num_classes, "dtype": str(x.dtype), "shape": list(x.shape[1:])}


def generate(ref: str, n: int, out: str, shard_size: int = 10_000, seed: int = 0, workers: int = 0, address: str | None = None,
             overwrite: bool = False) -> int:
    from .data.format import Manifest, Split
    from .data.writer import Replacement
    from .parallel import map_tasks

    if n <= 0:
        raise UserError(f"--n must be positive, got {n}")
    if shard_size <= 0:
        raise UserError(f"--shard-size must be a positive number of samples, got {shard_size}")
    load_model(ref)  # fail early on a bad reference
    with Replacement(out, overwrite) as target:  # an existing dataset stays whole until the new one is written
        parts = map_tasks(_generate_chunk, generate_jobs(ref, n, target.folder, shard_size, seed), workers, address)
        first = parts[0]
        target.commit(Manifest(dtype=first["dtype"], shape=first["shape"], labels=first["labels"],
                               num_classes=first["num_classes"] if first["labels"] else 0,
                               splits={"train": Split(count=n, shards=[p["shard"] for p in parts])},
                               source=f"generated by {storage.redact(ref)}"))
    return n


def generate_jobs(ref: str, n: int, out: str, shard_size: int, seed: int):
    """One job per shard, made as the workers take them: --n 10**12 is 10**8 jobs, far too many to hold as a list."""
    for i, start in enumerate(range(0, n, shard_size)):
        yield (ref, out, i, min(shard_size, n - start), seed)


def to_json(metrics: dict) -> str:
    return json.dumps(metrics, indent=1, sort_keys=True)



