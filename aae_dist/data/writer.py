"""Write arrays as a sharded dataset; the manifest goes last so a killed write never looks complete."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from .. import storage
from ..errors import UserError
from .format import (BLOCK_BYTES, BLOCK_HASH, LABEL_DTYPE, MANIFEST, ArrayFile, Manifest, Shard, Split, block_digests, encode_npy,
                     read_manifest, sha256)

DEFAULT_SHARD_SIZE = 10_000


def write_dataset(
    dest: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray | None]],
    *,
    num_classes: int,
    source: str,
    class_names: list[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    progress: bool = True,
    block_bytes: int = BLOCK_BYTES,
) -> Manifest:
    if shard_size <= 0:
        raise UserError(f"--shard-size must be a positive number of samples, got {shard_size}")
    first_x = next(iter(splits.values()))[0]
    dtype, shape = first_x.dtype, tuple(first_x.shape[1:])
    for split_name, (x, _) in splits.items():  # every check before anything old is removed
        if x.dtype != dtype or tuple(x.shape[1:]) != shape:
            raise UserError(f"split '{split_name}' has samples {x.dtype} {x.shape[1:]}, others {dtype} {shape}")
    prepare_destination(dest, overwrite)
    has_labels = all(y is not None for _, y in splits.values())
    total = sum(len(x) for x, _ in splits.values())
    out_splits: dict[str, Split] = {}
    with tqdm(total=total, unit="sample", desc=f"shard -> {storage.redact(dest)}", disable=not progress) as bar:
        for split_name, (x, y) in splits.items():
            shards = []
            for i, start in enumerate(range(0, len(x), shard_size)):
                name = f"{split_name}-{i:05d}"
                xs = x[start : start + shard_size]
                shards.append(write_shard(dest, name, xs, y[start : start + shard_size] if has_labels else None, block_bytes))
                bar.update(len(xs))
            out_splits[split_name] = Split(count=len(x), shards=shards)

    manifest = Manifest(
        dtype=str(dtype),
        shape=list(shape),
        labels=has_labels,
        num_classes=int(num_classes) if has_labels else 0,
        splits=out_splits,
        source=source,
        class_names=class_names,
    )
    storage.write_bytes_atomic(storage.join(dest, MANIFEST), manifest.to_json().encode())
    return manifest


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
        listed = [f.file for sp in old.splits.values() for s in sp.shards for f in (s.x, s.y) if f is not None]
    except UserError:
        listed = []  # an unreadable manifest names nothing we may delete: its files are overwritten or left
    storage.remove(manifest_url, recursive=False)
    for file in listed:  # validated names (`<split>-NNNNN.x.npy`): all inside dest
        storage.remove(storage.join(dest, file), recursive=False)


def write_shard(dest: str, name: str, x: np.ndarray, y: np.ndarray | None, block_bytes: int = BLOCK_BYTES) -> Shard:
    """One shard's files; the caller writes the manifest that lists it."""
    y_file = _write_array(dest, f"{name}.y.npy", y.astype(LABEL_DTYPE), block_bytes) if y is not None else None
    return Shard(name=name, count=len(x), x=_write_array(dest, f"{name}.x.npy", x, block_bytes), y=y_file)


def _write_array(dest: str, file: str, arr: np.ndarray, block_bytes: int) -> ArrayFile:
    data, header = encode_npy(arr)
    storage.write_bytes_atomic(storage.join(dest, file), data)
    return ArrayFile(file=file, bytes=len(data), sha256=sha256(data), header=header, block_bytes=block_bytes,
                     blocks=block_digests(data, block_bytes), block_hash=BLOCK_HASH)
