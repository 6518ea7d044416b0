"""Write a source as a sharded dataset, chunk by chunk: memory holds one chunk and one shard per split, whatever
the dataset's size. The manifest goes last so a killed write never looks complete."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .. import storage
from ..errors import UserError
from .format import (BLOCK_BYTES, BLOCK_HASH, KEYS_SUFFIX, LABEL_DTYPE, MANIFEST, ArrayFile, Manifest, Shard, Split, block_digests, default_scaling,
                     encode_npy, read_manifest, sha256)
from .sources import Opened, check_validation, from_arrays

DEFAULT_SHARD_SIZE = 10_000
MAX_STAT_FEATURES = 1 << 16  # per-feature statistics for vectors up to this width (the manifest stays small)


def write_dataset(dest: str, splits: dict[str, tuple[np.ndarray, np.ndarray | None]], *, num_classes: int, source: str,
                  class_names: list[str] | None = None, shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                  progress: bool = True, block_bytes: int = BLOCK_BYTES, features: str | None = None, scaling: dict | None = None) -> Manifest:
    """Arrays in memory as a dataset (tests, benchmarks, the digits cache): the same writer as every source."""
    if shard_size <= 0:
        raise UserError(f"--shard-size must be a positive number of samples, got {shard_size}")
    opened = from_arrays(splits, num_classes=num_classes, name=source, class_names=class_names, features=features, scaling=scaling)
    return write_source(dest, opened, shard_size=shard_size, overwrite=overwrite, progress=progress, block_bytes=block_bytes)


def write_source(dest: str, opened: Opened, *, validation_size: int = 0, shard_size: int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                 progress: bool = True, block_bytes: int = BLOCK_BYTES) -> Manifest:
    """Stream an opened source into shards; `validation_size` moves the last training samples to 'validation'."""
    if shard_size <= 0:
        raise UserError(f"--shard-size must be a positive number of samples, got {shard_size}")
    if validation_size > 0:
        check_validation(opened, validation_size)
    with Replacement(dest, overwrite) as target:
        manifest = _write_shards(target.folder, opened, validation_size, shard_size, progress, block_bytes)
        target.commit(manifest)
    return manifest


class Replacement:
    """Where a dataset is written: DEST itself when it holds none, else a staging folder inside it, so an existing
    dataset stays whole until the new one is completely written (a failure removes the staging folder and
    nothing else); `commit` then replaces only what the old manifest listed and writes the manifest last."""

    STAGING = ".staging"

    def __init__(self, dest: str, overwrite: bool):
        self.dest, self.staging = dest, None
        if storage.exists(storage.join(dest, MANIFEST)):
            if not overwrite:
                raise UserError(f"a dataset already exists at {storage.redact(dest)}: pass --overwrite to replace it")
            self.staging = storage.join(dest, self.STAGING)
            storage.remove(self.staging)  # what a killed earlier --overwrite left
        self.folder = self.staging or dest

    def __enter__(self) -> "Replacement":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None and self.staging:
            storage.remove(self.staging)

    def commit(self, manifest: Manifest) -> None:
        if self.staging:
            prepare_destination(self.dest, overwrite=True)
            _move_up(self.staging, self.dest, manifest)
        storage.write_bytes_atomic(storage.join(self.dest, MANIFEST), manifest.to_json().encode())


def _move_up(staging: str, dest: str, manifest: Manifest) -> None:
    fs, _ = storage.filesystem(dest)
    for file in (f.file for sp in manifest.splits.values() for s in sp.shards for f in s.files):
        src, dst = storage.filesystem(storage.join(staging, file))[1], storage.filesystem(storage.join(dest, file))[1]
        storage.with_retries("moving", dest, lambda: fs.mv(src, dst))
    storage.remove(staging)


def _write_shards(dest: str, opened: Opened, validation_size: int, shard_size: int, progress: bool, block_bytes: int) -> Manifest:
    names = list(opened.counts) + (["validation"] if validation_size > 0 else [])
    writers = {n: ShardWriter(dest, n, shard_size, opened.labels, block_bytes) for n in names}
    stats = FeatureStats() if opened.features == "vector" and opened.stats is None else None
    with tqdm(total=sum(opened.counts.values()), unit="sample", desc=f"shard -> {storage.redact(dest)}", disable=not progress) as bar:
        for split, count in opened.counts.items():
            keep = count - validation_size if split == "train" and validation_size > 0 else count
            written = 0
            for x, y in opened.chunks(split):
                _check_chunk(opened, split, x, y, written + len(x), count)
                _route(writers, split, x, y, keep - written, stats if split == "train" else None)
                written += len(x)
                bar.update(len(x))
            if written != count:
                raise UserError(f"source {opened.name} gave {written} samples for split '{split}', it announced {count}: fix the source")
    shards = {n: w.finish() for n, w in writers.items()}
    manifest = Manifest(dtype=str(np.dtype(opened.dtype)), shape=list(opened.shape), labels=opened.labels,
                        num_classes=int(opened.num_classes) if opened.labels else 0,
                        splits={n: Split(count=sum(s.count for s in v), shards=v) for n, v in shards.items()}, source=opened.name,
                        class_names=opened.class_names, features=opened.features,
                        scaling=opened.scaling or default_scaling(str(np.dtype(opened.dtype))),
                        stats=opened.stats or (stats.result() if stats else None))
    return manifest


def _route(writers: dict, split: str, x, y, room: int, stats) -> None:
    """A chunk into its split; of 'train', what lies past `room` goes to 'validation'."""
    head = max(0, min(len(x), room))
    if stats is not None and head:
        stats.add(x[:head])
    writers[split].add(x[:head], None if y is None else y[:head])
    if head < len(x):
        writers["validation"].add(x[head:], None if y is None else y[head:])


def _check_chunk(opened: Opened, split: str, x, y, seen: int, count: int) -> None:
    """A source's chunk is what it announced (a plug-in's mistake is one line, not a corrupt dataset)."""
    if x.dtype != np.dtype(opened.dtype) or tuple(x.shape[1:]) != tuple(opened.shape):
        raise UserError(f"source {opened.name} gave split '{split}' samples {x.dtype} {tuple(x.shape[1:])}, it announced "
                        f"{np.dtype(opened.dtype)} {tuple(opened.shape)}: fix the source")
    if (y is None) == opened.labels or (y is not None and len(y) != len(x)) or seen > count:
        raise UserError(f"source {opened.name} gave split '{split}' a chunk whose labels or size differ from what it announced: fix the source")


class ShardWriter:
    """One split's shards: chunks are buffered until `shard_size` samples are ready, then written as a shard."""

    def __init__(self, dest: str, split: str, shard_size: int, labels: bool, block_bytes: int):
        self.dest, self.split, self.size, self.labels, self.block_bytes = dest, split, shard_size, labels, block_bytes
        self.parts: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.buffered = 0
        self.shards: list[Shard] = []

    def add(self, x: np.ndarray, y: np.ndarray | None) -> None:
        if len(x):
            self.parts.append((x, y))
            self.buffered += len(x)
        if self.buffered >= self.size:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        x = np.concatenate([p[0] for p in self.parts]) if len(self.parts) > 1 else self.parts[0][0]
        y = (np.concatenate([p[1] for p in self.parts]) if len(self.parts) > 1 else self.parts[0][1]) if self.labels else None
        start = 0
        while len(x) - start >= self.size or (final and start < len(x)):
            end = min(start + self.size, len(x))
            name = f"{self.split}-{len(self.shards):05d}"
            self.shards.append(write_shard(self.dest, name, x[start:end], None if y is None else y[start:end], self.block_bytes))
            start = end
        self.parts = [(x[start:], None if y is None else y[start:])] if start < len(x) else []
        self.buffered = len(x) - start

    def finish(self) -> list[Shard]:
        if self.buffered:
            self._flush(final=True)
        return self.shards


class FeatureStats:
    """Per-feature count, mean, std, min and max over the train split, merged chunk by chunk (Chan et al.)."""

    def __init__(self):
        self.n, self.mean, self.m2, self.lo, self.hi = 0, None, None, None, None

    def add(self, x: np.ndarray) -> None:
        v = x.reshape(len(x), -1).astype(np.float64)
        if v.shape[1] > MAX_STAT_FEATURES:
            return
        mean, m2 = v.mean(0), ((v - v.mean(0)) ** 2).sum(0)
        if self.n == 0:
            self.n, self.mean, self.m2, self.lo, self.hi = len(v), mean, m2, v.min(0), v.max(0)
            return
        total, delta = self.n + len(v), mean - self.mean
        self.mean = self.mean + delta * len(v) / total
        self.m2 = self.m2 + m2 + delta**2 * self.n * len(v) / total
        self.lo, self.hi, self.n = np.minimum(self.lo, v.min(0)), np.maximum(self.hi, v.max(0)), total

    def result(self) -> dict | None:
        if self.n == 0 or not all(np.isfinite(a).all() for a in (self.mean, self.m2, self.lo, self.hi)):
            return None
        std = np.sqrt(self.m2 / self.n)
        return {"count": self.n, "mean": self.mean.tolist(), "std": std.tolist(), "min": self.lo.tolist(), "max": self.hi.tolist()}


def prepare_destination(dest: str, overwrite: bool) -> None:
    """Refuse an existing dataset unless `overwrite`; then remove its manifest first (a half-replaced dataset must
    not look complete) and only the files that manifest lists: other files in the folder are the user's."""
    manifest_url = storage.join(dest, MANIFEST)
    if not storage.exists(manifest_url):
        return
    if not overwrite:
        raise UserError(f"a dataset already exists at {storage.redact(dest)}: pass --overwrite to replace it")
    try:
        old = read_manifest(dest)
        listed = [f.file for sp in old.splits.values() for s in sp.shards for f in s.files]
    except UserError:
        listed = []  # an unreadable manifest names nothing we may delete: its files are overwritten or left
    storage.remove(manifest_url, recursive=False)
    for file in listed:  # validated names (`<split>-NNNNN.x.npy`): all inside dest
        storage.remove(storage.join(dest, file), recursive=False)


def write_shard(dest: str, name: str, x: np.ndarray, y: np.ndarray | None, block_bytes: int = BLOCK_BYTES) -> Shard:
    """One shard's files; the caller writes the manifest that lists it."""
    y_file = _write_array(dest, f"{name}.y.npy", y.astype(LABEL_DTYPE), block_bytes) if y is not None else None
    return Shard(name=name, count=len(x), x=_write_array(dest, f"{name}.x.npy", x, block_bytes), y=y_file)


def write_keys(dest: str, name: str, keys, block_bytes: int = BLOCK_BYTES) -> ArrayFile:
    """A table shard's kept key columns (`shard --keep`) as plain Parquet beside it, checksummed like its arrays."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(keys, buf)
    return _write_bytes(dest, f"{name}{KEYS_SUFFIX}", buf.getvalue(), 0, block_bytes)


def _write_array(dest: str, file: str, arr: np.ndarray, block_bytes: int) -> ArrayFile:
    data, header = encode_npy(arr)
    return _write_bytes(dest, file, data, header, block_bytes)


def _write_bytes(dest: str, file: str, data: bytes, header: int, block_bytes: int) -> ArrayFile:
    storage.write_bytes_atomic(storage.join(dest, file), data)
    return ArrayFile(file=file, bytes=len(data), sha256=sha256(data), header=header, block_bytes=block_bytes,
                     blocks=block_digests(data, block_bytes), block_hash=BLOCK_HASH)
