"""Tables as datasets: `parquet:URL` and `csv:URL` read in chunks through pyarrow, column kinds inferred,
per-column transforms fitted on a bounded sample and stored as plain data in manifest.json.

Two passes over the files, each one chunk at a time, so memory is bounded by the chunk and the fit sample
(not the table): the first gathers statistics (kinds, nulls, categories, a uniform sample of each numeric
column), the second encodes each chunk and writes it as shards.  An encoded row is float32 (1, D):
per continuous column a scalar and a one-hot mode (mode-specific normalisation, as CTGAN/TVAE do), per
categorical column a one-hot category, and a null indicator for every column that has nulls."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..errors import UserError
from .sources import SPLIT_SEED

CHUNK_ROWS = 65_536  # rows per pyarrow batch: bounds the reader's memory
FIT_SAMPLE = 20_000  # rows per column the mixtures are fitted on
MAX_MODES = 10
MODE_WEIGHT = 0.005  # CTGAN's threshold: lighter modes are dropped
INTEGER_CATEGORIES = 10  # integer columns with at most this many values are categorical
DEFAULT_MAX_CATEGORIES = 100
CLIP = 0.99  # normalised scalars live in (-1, 1): the decoder's tanh reaches them


@dataclass
class TableOptions:
    categorical: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    keep: tuple[str, ...] = ()  # key columns (e.g. a customer id): stored raw beside each shard, never model input
    target: str | None = None
    max_categories: int = DEFAULT_MAX_CATEGORIES
    test_fraction: float = 0.1
    chunk_rows: int = CHUNK_ROWS


# ---- files -----------------------------------------------------------------------------------

def table_files(url: str, kind: str) -> list[str]:
    """A file, a folder (its .parquet/.csv files, sorted) or a glob: the URLs to read, in order."""
    fs, path = storage.filesystem(url)
    suffixes = (".parquet", ".pq") if kind == "parquet" else (".csv", ".csv.gz")
    if any(c in path for c in "*?["):
        found = sorted(storage.with_retries("listing", url, lambda: fs.glob(path)))
    elif storage.with_retries("checking", url, lambda: fs.isdir(path)):
        found = sorted(p for p in storage.with_retries("listing", url, lambda: fs.find(path)) if p.lower().endswith(suffixes))
    elif storage.with_retries("checking", url, lambda: fs.exists(path)):
        found = [path]
    else:
        raise UserError(f"{kind} source {storage.redact(url)} does not exist: give a file, a folder or a glob of {kind} files")
    if not found:
        raise UserError(f"no {kind} files at {storage.redact(url)}: a folder needs *{suffixes[0]} files")
    return [fs.unstrip_protocol(p) if "file" not in storage._protocols(fs) else p for p in found]


def iter_batches(files: list[str], kind: str, chunk_rows: int):
    """(file, RecordBatch) chunk by chunk; every file's schema must be the first's."""
    first = None
    for url in files:
        fs, path = storage.filesystem(url)
        with fs.open(path, "rb") as fh:
            for batch in (_parquet_batches if kind == "parquet" else _csv_batches)(fh, url, chunk_rows, first):
                if first is None:
                    first = (url, batch.schema)
                elif not batch.schema.equals(first[1]):
                    raise UserError(f"{kind} file {storage.redact(url)} has columns {_schema_text(batch.schema)}, the first file "
                                    f"{storage.redact(first[0])} has {_schema_text(first[1])}: give files of one schema")
                yield url, batch


def _schema_text(schema: pa.Schema) -> str:
    return "(" + ", ".join(f"{f.name}: {f.type}" for f in schema)[:300] + ")"


def _parquet_batches(fh, url: str, chunk_rows: int, first):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(fh)
    except Exception as exc:  # noqa: BLE001 - anything unparsable
        raise UserError(f"cannot read parquet {storage.redact(url)}: {type(exc).__name__}: {exc}") from None
    if first is not None and not pf.schema_arrow.equals(first[1]):
        raise UserError(f"parquet file {storage.redact(url)} has columns {_schema_text(pf.schema_arrow)}, the first file "
                        f"{storage.redact(first[0])} has {_schema_text(first[1])}: give files of one schema")
    # one row group at a time: iter_batches over the whole file kept memory growing with the file (a 1 GB table
    # read in 65,536-row batches peaked at 1.2 GiB RSS, 0.5 GiB for 250 MB; per row group: 0.29 GiB for both)
    for group in range(pf.num_row_groups):
        yield from pf.iter_batches(batch_size=chunk_rows, row_groups=[group])


def _csv_batches(fh, url: str, chunk_rows: int, first):
    """Streamed CSV; later files are read with the first file's column types (a ragged row or a value of another
    type is then one line naming the file)."""
    import pyarrow.csv as pcsv

    convert = pcsv.ConvertOptions(column_types=first[1]) if first is not None else None
    try:
        reader = pcsv.open_csv(fh, read_options=pcsv.ReadOptions(block_size=1 << 22), convert_options=convert)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            yield batch
    except pa.ArrowInvalid as exc:
        raise UserError(_csv_error(url, str(exc))) from None


def _csv_error(url: str, text: str) -> str:
    first = text.strip().splitlines()[0][:200]
    if "Expected" in first and "columns" in first:
        return f"CSV {storage.redact(url)} has a ragged row ({first}): every row needs the header's number of fields"
    if "conversion error" in first or "column #" in first:
        return (f"CSV {storage.redact(url)} has a column of mixed types ({first}): clean the column, or pass --categorical COL "
                "to read it as categories")
    return f"cannot read CSV {storage.redact(url)}: {first}"


# ---- pass 1: statistics -----------------------------------------------------------------------

@dataclass
class ColumnStats:
    name: str
    type: pa.DataType
    rows: int = 0
    nulls: int = 0
    counts: dict = field(default_factory=dict)  # value -> count, up to the category limit + 1
    numeric_looking: int = 0  # string values that parse as numbers (a mixed column)
    sample_keys: np.ndarray = field(default_factory=lambda: np.empty(0))
    sample: np.ndarray = field(default_factory=lambda: np.empty(0))
    lo: float = math.inf
    hi: float = -math.inf


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _check_type(name: str, t: pa.DataType) -> None:
    if pa.types.is_temporal(t):
        raise UserError(f"column '{name}' holds dates/times ({t}), which tables do not model: pass --drop {name}, or turn it into a "
                        "number (e.g. days since a date) before sharding")
    if not (_is_number(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t)
            or pa.types.is_dictionary(t) or pa.types.is_null(t)):
        raise UserError(f"column '{name}' holds {t}: only numbers, strings and booleans are modelled; pass --drop {name}")


def gather_stats(files: list[str], kind: str, opts: TableOptions) -> tuple[list[ColumnStats], int]:
    rng = np.random.default_rng(SPLIT_SEED)
    stats: list[ColumnStats] | None = None
    total = 0
    for _, batch in iter_batches(files, kind, opts.chunk_rows):
        batch = _select(batch, opts)
        if stats is None:
            stats = [ColumnStats(f.name, f.type.value_type if pa.types.is_dictionary(f.type) else f.type) for f in batch.schema]
            for st in stats:
                _check_type(st.name, st.type)
        keys = rng.random(batch.num_rows)
        for st, col in zip(stats, batch.columns):
            _update(st, col, keys, opts)
        total += batch.num_rows
    if not stats or total == 0:
        raise UserError(f"the {kind} source holds no rows: give a table with data in it")
    return stats, total


def _select(batch: pa.RecordBatch, opts: TableOptions) -> pa.RecordBatch:
    names = batch.schema.names
    for col in (*opts.drop, *opts.categorical, *opts.keep, *([opts.target] if opts.target else [])):
        if col not in names:
            raise UserError(f"column '{col}' (from --drop/--categorical/--keep/--target) is not in the table; its columns: {', '.join(names)[:300]}")
    for col in opts.keep:
        if col == opts.target or col in opts.categorical:
            raise UserError(f"column '{col}' is given to --keep and to --{'target' if col == opts.target else 'categorical'}: a kept key is "
                            f"stored beside the rows, not modelled; pass it to one of them")
    keep = [n for n in names if n not in opts.drop and n not in opts.keep]
    if not keep:
        raise UserError("--drop removes every column: keep at least one")
    if len(set(names)) != len(names):
        raise UserError(f"the table has two columns of one name ({', '.join(names)[:300]}): rename them")
    return batch.select(keep)


def _update(st: ColumnStats, col: pa.Array, keys: np.ndarray, opts: TableOptions) -> None:
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    st.rows += len(col)
    st.nulls += col.null_count
    valid = np.asarray(col.is_valid())
    forced = st.name in opts.categorical or st.name == opts.target
    if _is_number(st.type) and not (forced and pa.types.is_floating(st.type)):
        vals = col.drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
        if len(vals):
            st.lo, st.hi = min(st.lo, float(vals.min())), max(st.hi, float(vals.max()))
        st.sample_keys = np.concatenate([st.sample_keys, keys[valid]])
        st.sample = np.concatenate([st.sample, vals])
        if len(st.sample) > FIT_SAMPLE:  # bottom-k by random key: a uniform sample of every row seen so far
            keep = np.argpartition(st.sample_keys, FIT_SAMPLE)[:FIT_SAMPLE]
            st.sample_keys, st.sample = st.sample_keys[keep], st.sample[keep]
        if pa.types.is_floating(st.type) and not forced:
            return
    limit = opts.max_categories + 1
    if len(st.counts) > limit:
        return
    for value, count in zip(*_value_counts(col)):
        st.counts[value] = st.counts.get(value, 0) + count
    if pa.types.is_string(st.type) or pa.types.is_large_string(st.type):
        st.numeric_looking += int(pc.sum(pc.cast(pc.match_substring_regex(col.drop_null(), r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"),
                                                 pa.int64())).as_py() or 0)


def _value_counts(col: pa.Array) -> tuple[list, list]:
    vc = pc.value_counts(col.drop_null())
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


# ---- transforms -------------------------------------------------------------------------------

def column_spec(st: ColumnStats, opts: TableOptions, seed: int) -> dict:
    """One column's kind and transform as plain JSON data (what every worker encodes and decodes with)."""
    name = st.name
    if st.nulls == st.rows:
        raise UserError(f"column '{name}' is null in every row: pass --drop {name}")
    spec = {"name": name, "dtype": str(st.type), "null_rate": st.nulls / st.rows, "nullable": st.nulls > 0}
    textual = not _is_number(st.type)
    forced = name in opts.categorical or name == opts.target
    is_int = pa.types.is_integer(st.type)
    if textual or forced or (is_int and len(st.counts) <= INTEGER_CATEGORIES):
        if textual and not forced and 0 < st.numeric_looking < st.rows - st.nulls:
            raise UserError(f"column '{name}' has mixed types (numbers and text): clean it, or pass --categorical {name} to read "
                            "every value as a category")
        if len(st.counts) > opts.max_categories:
            raise UserError(f"column '{name}' has more than {opts.max_categories} distinct values, too many for a categorical column: "
                            f"pass --max-categories N to allow more, or --drop {name}")
        cats = sorted(st.counts, key=lambda v: (-st.counts[v], str(v)))
        return {**spec, "kind": "categorical", "categories": cats, "frequencies": [st.counts[c] / (st.rows - st.nulls) for c in cats]}
    return {**spec, "kind": "continuous", "integer": is_int, "min": st.lo, "max": st.hi, **fit_modes(st.sample, seed)}


def fit_modes(values: np.ndarray, seed: int) -> dict:
    """Mode-specific normalisation: a Bayesian Gaussian mixture of up to 10 modes; modes under 0.5% weight dropped."""
    import warnings

    from sklearn.mixture import BayesianGaussianMixture

    values = values[np.isfinite(values)]
    std = float(values.std()) if len(values) else 1.0
    if len(np.unique(values[:1000])) < 2 or std == 0:
        return {"means": [float(values.mean()) if len(values) else 0.0], "stds": [max(std, 1e-3)], "weights": [1.0]}
    gm = BayesianGaussianMixture(n_components=min(MAX_MODES, len(values)), weight_concentration_prior_type="dirichlet_process",
                                 weight_concentration_prior=0.001, max_iter=100, n_init=1, random_state=seed)
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(1):  # one column of 20,000 values: BLAS threads only wait (2x slower on two)
        warnings.simplefilter("ignore")
        gm.fit(values.reshape(-1, 1))
    keep = gm.weights_ > MODE_WEIGHT
    floor = 1e-3 * max(std, 1e-12)
    return {"means": gm.means_[keep, 0].tolist(), "stds": np.maximum(np.sqrt(gm.covariances_[keep, 0, 0]), floor).tolist(),
            "weights": (gm.weights_[keep] / gm.weights_[keep].sum()).tolist()}


def column_width(spec: dict) -> int:
    body = 1 + len(spec["means"]) if spec["kind"] == "continuous" else len(spec["categories"])
    return body + (1 if spec["nullable"] else 0)


def check_table_spec(doc, width: int) -> dict:
    """A manifest's `table` is untrusted: types and sizes checked before anything is built from it."""
    if not isinstance(doc, dict) or not isinstance(doc.get("columns"), list) or not doc["columns"]:
        raise ValueError("'table' is not an object with a list of 'columns'")
    for c in doc["columns"]:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or c.get("kind") not in ("continuous", "categorical"):
            raise ValueError("a column of 'table' lacks a string 'name' or a kind of continuous/categorical")
        if not isinstance(c.get("nullable"), bool) or not isinstance(c.get("null_rate"), (int, float)) or not isinstance(c.get("dtype"), str):
            raise ValueError(f"column {c['name']!r} of 'table' lacks 'nullable', 'null_rate' or 'dtype'")
        if c["kind"] == "continuous":
            lists = [c.get(k) for k in ("means", "stds", "weights")]
            if not all(isinstance(v, list) and v and len(v) == len(lists[0]) and all(isinstance(a, (int, float)) for a in v) for v in lists):
                raise ValueError(f"column {c['name']!r} of 'table' has malformed modes")
            if not all(s > 0 for s in c["stds"]) or not all(isinstance(c.get(k), (int, float)) for k in ("min", "max")):
                raise ValueError(f"column {c['name']!r} of 'table' has a non-positive std or no min/max")
        elif not isinstance(c.get("categories"), list) or not c["categories"] or not all(
                isinstance(v, (str, int, float, bool)) for v in c["categories"]):
            raise ValueError(f"column {c['name']!r} of 'table' has no list of categories")
    if sum(column_width(c) for c in doc["columns"]) != width:
        raise ValueError(f"'table' columns encode to {sum(column_width(c) for c in doc['columns'])} values, the samples hold {width}")
    keep = doc.get("keep", [])
    if not isinstance(keep, list) or not all(isinstance(k, str) for k in keep):
        raise ValueError("'table' keep is not a list of column names")
    target = doc.get("target")
    if target is not None and target not in [c["name"] for c in doc["columns"] if c["kind"] == "categorical"]:
        raise ValueError(f"'table' target {target!r} is not one of its categorical columns")
    return doc


# ---- pass 2: encode ---------------------------------------------------------------------------

def encode_column(spec: dict, col: pa.Array, rng: np.random.Generator) -> np.ndarray:
    """(n, width) float32 for one column; a null row is zeros with the null indicator set."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    n = len(col)
    valid = np.asarray(col.is_valid())
    out = np.zeros((n, column_width(spec)), np.float32)
    if spec["kind"] == "categorical":
        lookup = {v: i for i, v in enumerate(spec["categories"])}
        idx = np.array([lookup.get(v, -1) for v in col.to_pylist()], np.int64)
        rows = np.nonzero(valid & (idx >= 0))[0]
        out[rows, idx[rows]] = 1.0
    else:
        v = col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
        means, stds, w = (np.asarray(spec[k]) for k in ("means", "stds", "weights"))
        logp = np.log(w) - np.log(stds) - 0.5 * ((v[:, None] - means) / stds) ** 2
        p = np.exp(logp - logp.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        mode = (p.cumsum(1) > rng.random((n, 1))).argmax(1)  # a mode drawn from its posterior, as CTGAN does
        out[:, 0] = np.clip((v - means[mode]) / (4 * stds[mode]), -CLIP, CLIP) * valid
        out[np.nonzero(valid)[0], 1 + mode[valid]] = 1.0
    if spec["nullable"]:
        out[:, -1] = ~valid
    return out


def encode_batch(columns: list[dict], batch: pa.RecordBatch, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([encode_column(c, batch.column(c["name"]), rng) for c in columns], 1)


def read_keys(url: str, shard, columns: list[str]) -> pa.Table:
    """A shard's kept key columns (`shard --keep`), checked against the manifest's size and sha256 before Parquet parses them."""
    import io

    import pyarrow.parquet as pq

    from .format import sha256

    where = storage.join(url, shard.keys.file)
    data = storage.read_bytes(where)
    if len(data) != shard.keys.bytes or sha256(data) != shard.keys.sha256:
        raise UserError(f"key file {storage.redact(where)} is {len(data)} bytes and fails its sha256 check (manifest: {shard.keys.bytes} "
                        "bytes): corrupt or replaced (re-shard the dataset)")
    try:
        keys = pq.read_table(io.BytesIO(data), columns=columns)
    except Exception as exc:  # noqa: BLE001 - anything unparsable or a column it lacks
        raise UserError(f"cannot read key file {storage.redact(where)}: {type(exc).__name__}: {str(exc)[:200]} (re-shard the dataset)") from None
    if keys.num_rows != shard.count:
        raise UserError(f"key file {storage.redact(where)} holds {keys.num_rows} rows, its shard {shard.count} (re-shard the dataset)")
    return keys


def labels_of(spec: dict, batch: pa.RecordBatch) -> np.ndarray:
    lookup = {v: i for i, v in enumerate(spec["categories"])}
    return np.array([lookup.get(v, -1) for v in batch.column(spec["name"]).to_pylist()], np.int64)


# ---- the source -------------------------------------------------------------------------------

def shard_table(kind: str, url: str, dest: str, opts: TableOptions, *, shard_size: int, overwrite: bool, progress: bool):
    """`aae-dist shard parquet:URL DEST` / `csv:URL DEST`: statistics, transforms, then encoded shards and the manifest."""
    from .format import Manifest, Split
    from .writer import Replacement

    if shard_size <= 0:
        raise UserError(f"--shard-size must be a positive number of samples, got {shard_size}")
    if opts.max_categories < 2:
        raise UserError(f"--max-categories must be at least 2, got {opts.max_categories}")
    files = table_files(url, kind)
    stats, total = gather_stats(files, kind, opts)
    columns = [column_spec(st, opts, SPLIT_SEED) for st in stats]
    target = next((c for c in columns if c["name"] == opts.target), None)
    if target is not None and len(target["categories"]) < 2:
        raise UserError(f"--target {opts.target} has one class ({target['categories'][0]!r}) in every labelled row: a label needs two or more")
    if target is not None and target["nullable"]:
        raise UserError(f"--target {opts.target} is null in {target['null_rate']:.1%} of the rows: fill or drop those rows, or pick another target")
    table = {"columns": columns, "target": opts.target, "rows": total, "source_columns": [st.name for st in stats]}
    if opts.keep:
        table["keep"] = list(opts.keep)
    replacing = Replacement(dest, overwrite)  # an existing dataset stays whole until the new one is written
    writer = _SplitWriter(replacing.folder, shard_size, labelled=target is not None)
    rng = np.random.default_rng(SPLIT_SEED)
    for _, batch in iter_batches(files, kind, opts.chunk_rows):
        keys = pa.Table.from_batches([batch.select(list(opts.keep))]) if opts.keep else None
        batch = _select(batch, opts)
        x = encode_batch(columns, batch, rng)[:, None, :]
        y = labels_of(target, batch) if target is not None else None
        test = rng.random(len(x)) < opts.test_fraction
        for split, rows in (("train", ~test), ("test", test)):
            writer.add(split, x[rows], None if y is None else y[rows], None if keys is None else keys.filter(pa.array(rows)))
    splits = writer.finish()
    width = int(sum(column_width(c) for c in columns))
    manifest = Manifest(dtype="float32", shape=[1, width], labels=target is not None, num_classes=len(target["categories"]) if target else 0,
                        splits={k: Split(count=sum(s.count for s in v), shards=v) for k, v in splits.items()},
                        source=f"{kind}:{storage.redact(url)}", class_names=[str(c) for c in target["categories"]] if target else None,
                        table=table)
    replacing.commit(manifest)
    return manifest


class _SplitWriter:
    """Buffers encoded rows per split and writes a shard whenever `shard_size` rows are ready."""

    def __init__(self, dest: str, shard_size: int, labelled: bool):
        from .writer import write_shard

        self.dest, self.size, self.labelled, self.write = dest, shard_size, labelled, write_shard
        self.buf: dict[str, list] = {}
        self.shards: dict[str, list] = {}

    def add(self, split: str, x: np.ndarray, y: np.ndarray | None, keys: pa.Table | None = None) -> None:
        parts = self.buf.setdefault(split, [])
        parts.append((x, y, keys))
        while sum(len(p[0]) for p in parts) >= self.size:
            self._flush(split, self.size)
            parts = self.buf[split]

    def _flush(self, split: str, n: int) -> None:
        from .writer import write_keys

        parts = self.buf[split]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts]) if self.labelled else None
        keys = pa.concat_tables([p[2] for p in parts]).combine_chunks() if parts[0][2] is not None else None
        shards = self.shards.setdefault(split, [])
        name = f"{split}-{len(shards):05d}"
        shard = self.write(self.dest, name, x[:n], None if y is None else y[:n])
        if keys is not None:
            shard.keys = write_keys(self.dest, name, keys.slice(0, n))
        shards.append(shard)
        self.buf[split] = [(x[n:], None if y is None else y[n:], None if keys is None else keys.slice(n))]

    def finish(self) -> dict[str, list]:
        for split, parts in self.buf.items():
            left = sum(len(p[0]) for p in parts)
            if left:
                self._flush(split, left)
        return {k: v for k, v in self.shards.items() if v}


# ---- defaults for a table run -----------------------------------------------------------------

# What `train --set data.path=TABLE_DATASET` gets where the config leaves a key unset: the image defaults
# (1000-1000 MLPs, a 10,000-sample Parzen estimate on pixels, 10 epochs) fit rows badly and slowly.
TABLE_DEFAULTS = {
    "model.hidden": [256, 256],  # TVAE's networks are 128-128; rows need no more
    "model.disc_hidden": [256, 256],
    "model.latent_dim": 8,  # 8 beat 16 and 4 at equal CPU on all three benchmark tables x 2 seeds (benchmarks/RESULTS.md)
    "model.posterior": "gaussian",
    "train.parzen_samples": 0,  # a Parzen window on encoded rows means nothing: the row report replaces it
    "train.image_every": 1_000_000,  # per-column figures at the end (set it lower to see them during training)
    "train.threads": 1,  # a row's ops are tiny: a second thread only waits at barriers (17x slower on a loaded 2-core host)
    # 3x the reconstruction and 2.5x the adversarial rates of the image defaults: quality 0.873 against 0.859 over three
    # tables x two seeds at equal CPU, efficacy gap at most 3.3 points against 7.6 (benchmarks/RESULTS.md, "Tables at equal CPU")
    "phases.reconstruction.lr": 3e-3,
    "phases.discriminator.lr": 5e-4,
    "phases.generator.lr": 5e-4,
}
TABLE_BATCH = 500  # TVAE's batch; smaller tables get a quarter of their rows per worker
TABLE_STEPS = 3000  # the epochs default aims at this many steps, between 1 and 300 epochs (TVAE's 300)


def table_defaults(cfg, train_rows: int) -> dict:
    """The dataset-dependent defaults of a table run, for every key `cfg` was not given."""
    world = max(1, cfg.run.worker_range[1])
    out = dict(TABLE_DEFAULTS)
    out["data.batch_size"] = max(1, min(TABLE_BATCH, train_rows // (4 * world)))
    batch = cfg.data.batch_size if cfg.given("data.batch_size") else out["data.batch_size"]
    per_epoch = max(1, train_rows // world // batch)
    out["train.epochs"] = max(1, min(300, math.ceil(TABLE_STEPS / per_epoch)))
    return {k: v for k, v in out.items() if not cfg.given(k)}


def apply_table_defaults(cfg, manifest) -> dict:
    """Set a table dataset's defaults on `cfg` (only keys it was not given); returns what was set. Images: nothing."""
    from ..config import set_value

    if manifest.table is None:
        return {}
    chosen = table_defaults(cfg, manifest.splits["train"].count if "train" in manifest.splits else 0)
    for key, value in chosen.items():
        *path, name = key.split(".")
        section = cfg
        for part in path:
            section = getattr(section, part)
        set_value(section, name, value, "the table defaults")
    return chosen
