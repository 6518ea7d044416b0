"""Tables out of a table run: generated rows as Parquet/CSV files (one per Ray task), a few rows printed,
and the real rows of a table dataset decoded back from its shards (the report compares against them)."""

from __future__ import annotations

import io

import numpy as np
import torch

from . import seeds, storage
from .errors import UserError

FORMATS = ("parquet", "csv")
PART = "part-{:05d}.{}"


def table_model(ref: str):
    from .inference import load_model

    model = load_model(ref)
    if model.rows is None:
        raise UserError(f"run {storage.redact(ref)} was trained on images, not a table: --format parquet|csv and table rows need a run "
                        "trained on a dataset sharded from parquet:URL or csv:URL")
    return model


def classes_are_target(model) -> bool:
    """A run's classes are the target column's values where it trained on labels (supervised, semi_supervised,
    label_regularized); clustering's are unlabelled segments, however many, and never fix the target column."""
    return bool(model.num_classes and model.variant.needs_classes and model.variant.needs_labels and model.rows.table.get("target"))


def label_index(model, label: str | None) -> int | None:
    """--label VALUE: the index of a value of the target column (as the source wrote it); clustering: a segment number."""
    if label is None:
        return None
    target = model.rows.table.get("target")
    if model.num_classes and model.variant.needs_classes and not model.variant.needs_labels:
        if not str(label).isdigit() or not 0 <= int(label) < model.num_classes:
            raise UserError(f"--label {label!r}: a {model.cfg.variant} run's classes are its {model.num_classes} segments, not target values: "
                            f"give a segment number 0 to {model.num_classes - 1}")
        return int(label)
    if not target or not model.variant.needs_classes:
        raise UserError(f"--label needs a run trained with --target and a labelled variant (model.variant=supervised, semi_supervised "
                        f"or clustering); this run's variant is {model.cfg.variant}" + ("" if target else " and its table has no target"))
    cats = next(h.spec["categories"] for h in model.rows.heads if h.spec["name"] == target)
    names = [str(c) for c in cats]
    if str(label) not in names:
        raise UserError(f"--label {label!r} is not a value of the target '{target}': use one of {', '.join(names)[:300]}")
    return names.index(str(label))


def generate_rows(model, count: int, g: torch.Generator, label: int | None = None):
    """`count` rows as a pyarrow table; labelled variants draw the class at its real rate (or fix it) and the target column
    carries it; clustering draws segments from its uniform categorical prior (or fixes one) and the decoder gives the target."""
    labels = None
    if model.num_classes and model.variant.needs_classes:
        if label is not None:
            labels = torch.full((count,), label, dtype=torch.long)
        else:
            labels = torch.multinomial(torch.tensor(class_rates(model)), count, replacement=True, generator=g)
    with torch.no_grad(), model.evaluating():
        enc = model.sample(count, g, labels=labels).float().numpy()
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
    return model.rows.decode_table(enc, rng, labels.numpy() if labels is not None and classes_are_target(model) else None)


def class_rates(model) -> list[float]:
    if not classes_are_target(model):
        return [1.0 / model.num_classes] * model.num_classes
    target = model.rows.table.get("target")
    spec = next((h.spec for h in model.rows.heads if h.spec["name"] == target), None)
    if spec and len(spec.get("frequencies", [])) == model.num_classes:
        return spec["frequencies"]
    return [1.0 / model.num_classes] * model.num_classes


def _generate_part(job: tuple) -> int:
    ref, out, index, count, seed, fmt, label = job
    model = table_model(ref)
    table = generate_rows(model, count, torch.Generator().manual_seed(seeds.generate_chunk(seed, index)), label)
    storage.write_bytes_atomic(storage.join(out, PART.format(index, fmt)), table_bytes(table, fmt))
    return table.num_rows


def table_bytes(table, fmt: str) -> bytes:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    (pq.write_table if fmt == "parquet" else pcsv.write_csv)(table, buf)
    return buf.getvalue()


def generate_table(ref: str, n: int, out: str, fmt: str, label: str | None = None, shard_size: int = 10_000, seed: int = 0,
                   workers: int = 0, address: str | None = None, overwrite: bool = False) -> int:
    """`generate --format parquet|csv`: files part-NNNNN.<fmt> in folder `out`, one per task, the source's columns in order."""
    from .parallel import map_tasks

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use parquet or csv (or leave it out for a sharded dataset)")
    if n <= 0:
        raise UserError(f"--n must be positive, got {n}")
    if shard_size <= 0:
        raise UserError(f"--shard-size must be a positive number of rows, got {shard_size}")
    model = table_model(ref)
    index = label_index(model, label)
    _prepare(out, overwrite)
    jobs = ((ref, out, i, min(shard_size, n - s), seed, fmt, index) for i, s in enumerate(range(0, n, shard_size)))
    return sum(map_tasks(_generate_part, jobs, workers, address))


def _prepare(out: str, overwrite: bool) -> None:
    """Refuse a folder holding generated parts unless --overwrite; then remove only those parts."""
    import re

    fs, path = storage.filesystem(out)
    if not storage.exists(out):
        return
    old = [n for n in storage.listdir(out) if re.fullmatch(r"part-\d{5,}\.(parquet|csv)", n)]
    if old and not overwrite:
        raise UserError(f"generated tables already exist at {storage.redact(out)}: pass --overwrite to replace them")
    for name in old:
        storage.remove(storage.join(out, name), recursive=False)


def sample_rows(ref: str, n: int, seed: int = 0, label: str | None = None) -> str:
    """`aae-dist sample RUN` on a table run: a few generated rows as text."""
    if not 0 < n <= 1000:
        raise UserError(f"--n {n}: sample prints 1 to 1000 rows (for more use aae-dist generate --format parquet)")
    model = table_model(ref)
    table = generate_rows(model, n, torch.Generator().manual_seed(seed), label_index(model, label))
    return format_rows(table)


def format_rows(table) -> str:
    names = table.column_names
    rows = [[_cell(v) for v in r.values()] for r in table.to_pylist()]
    widths = [max(len(n), *(len(r[i]) for r in rows)) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "null"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def real_rows(model, data: str, split: str, limit: int = 0):
    """A table dataset's rows decoded back from its shards (exact for categories and nulls, values to float32)."""
    from .data import ShardStream, read_manifest

    manifest = read_manifest(data)
    manifest.split(split, data)
    parts, got = [], 0
    for x, _ in ShardStream(data, split, 4096, shuffle=False, drop_last=False, manifest=manifest).iter_epoch(0):
        parts.append(np.asarray(x, np.float32))
        got += len(x)
        if limit and got >= limit:
            break
    enc = np.concatenate(parts)[: limit or None]
    return model.rows.decode_table(enc, np.random.default_rng(0))


def evaluate_table(ref: str, data: str, split: str = "test", n: int = 0, seed: int = 0, limit: int = 20_000) -> dict:
    """The table report of a run: real training rows, `n` generated ones (default: as many) and the held-out `split`."""
    return report_of(table_model(ref), data, split, n, seed, limit)


def report_of(model, data: str, split: str = "test", n: int = 0, seed: int = 0, limit: int = 20_000) -> dict:
    """The table report of a model in hand (the trainer's at the end of a run, or a loaded one)."""
    from .tabular_report import table_report

    train = real_rows(model, data, "train", limit)
    holdout = real_rows(model, data, split, limit) if split != "train" else train.slice(0, 0)
    synth = generate_rows(model, n or train.num_rows, torch.Generator().manual_seed(seed))
    return table_report(train, synth, holdout, model.rows.table, seed)


def report_scalars(report: dict) -> dict:
    """The report's headline figures as flat `table/...` numbers: TensorBoard's final/ scalars, metrics.json, the console."""
    q, p, e = report["quality"], report["privacy"], report.get("efficacy")
    out = {"table/quality_score": q["quality_score"], "table/column_shapes": q["column_shapes"],
           "table/column_pair_trends": q["column_pair_trends"], "table/synthetic_identical_to_train": p["synthetic_identical_to_train"],
           "table/holdout_identical_to_train": p["holdout_identical_to_train"], "table/synthetic_median_dcr": p["synthetic_median_dcr"],
           "table/holdout_median_dcr": p["holdout_median_dcr"]}
    if e:
        out.update({"table/train_on_real_accuracy": e["train_on_real"]["accuracy"],
                    "table/train_on_synthetic_accuracy": e["train_on_synthetic"]["accuracy"], "table/efficacy_gap": e["accuracy_gap"]})
    return out
