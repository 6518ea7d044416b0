"""Stream one rank's part of a sharded dataset as shuffled batches.

Partitioning (re-balancing): each epoch the shard order is shuffled with a seed every
rank shares; the shards are then laid end to end and rank r takes samples
[r*n, (r+1)*n) of that sequence, n = N // world_size.  So every rank gets exactly the
same number of samples and batches whatever the shard sizes; at most world_size-1
samples (the tail of the sequence, different each epoch) are left out of an epoch.
A rank reads whole shards plus, at its two edges, the byte range of a partial shard.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .. import seeds

from .. import storage
from ..errors import UserError
from .format import LABEL_DTYPE, Manifest, Shard, check_array, decode_npy, read_manifest

UNLABELED = -1


@dataclass(frozen=True)
class Segment:
    shard: Shard
    start: int
    end: int


class ShardStream(torch.utils.data.IterableDataset):
    """Batches `(x uint8 [B,*shape], y int64 [B])` of this rank's samples; y is -1 where unknown/hidden."""

    def __init__(
        self,
        url: str,
        split: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 16384,
        drop_last: bool = False,
        cache_dir: str | None = None,
        prefetch: int = 2,
        labeled_per_class: int | None = None,
        manifest: Manifest | None = None,
    ):
        if batch_size <= 0:
            raise UserError(f"data.batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        self.url, self.split_name = url, split
        self.manifest = manifest or read_manifest(url)
        self.split = self.manifest.split(split, url)
        if world_size > self.split.count:
            raise UserError(
                f"{world_size} ranks but split '{split}' of {storage.redact(url)} has only {self.split.count} samples: use fewer workers"
            )
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer, self.drop_last = seed, shuffle, shuffle_buffer, drop_last
        self.cache_dir, self.prefetch = cache_dir, max(0, prefetch)
        self.per_rank = self.split.count // world_size
        if drop_last and self.per_rank < batch_size:
            raise UserError(
                f"split '{split}' gives each of {world_size} ranks {self.per_rank} samples, fewer than one batch of {batch_size}: lower data.batch_size or use fewer workers"
            )
        self.shape = tuple(self.manifest.shape)
        self.dtype = np.dtype(self.manifest.dtype)
        self.label_mask = self._choose_labeled(labeled_per_class) if labeled_per_class is not None else None
        self.epoch, self.position = 0, 0

    # ---- position ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.per_rank // self.batch_size if self.drop_last else math.ceil(self.per_rank / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self):
        for x, y in self.iter_epoch(self.epoch, skip=self.position):
            self.position += 1
            yield x, y

    # ---- the epoch's plan -------------------------------------------------------------------
    def shard_order(self, epoch: int) -> list[int]:
        n = len(self.split.shards)
        if not self.shuffle:
            return list(range(n))
        return [int(i) for i in np.random.default_rng(seeds.shuffle(self.seed, epoch)).permutation(n)]

    def segments(self, epoch: int) -> list[Segment]:
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        out, offset = [], 0
        for idx in self.shard_order(epoch):
            shard = self.split.shards[idx]
            a, b = max(lo, offset), min(hi, offset + shard.count)
            if a < b:
                out.append(Segment(shard, a - offset, b - offset))
            offset += shard.count
        return out

    def iter_epoch(self, epoch: int, skip: int = 0):
        """Yield this epoch's batches, the first `skip` of them replayed but not returned."""
        rng = np.random.default_rng(seeds.shuffle_buffer(self.seed, epoch, self.rank))
        segs = self.segments(epoch)
        B = self.batch_size
        pool_x = np.empty((0,) + self.shape, self.dtype)
        pool_y = np.empty((0,), LABEL_DTYPE)
        emitted = 0
        total = len(self)
        keep = self.shuffle_buffer if self.shuffle else 0
        # several workers: remote shards download in parallel while the current one is consumed
        with ThreadPoolExecutor(max_workers=max(1, self.prefetch), thread_name_prefix="shard-prefetch") as pool:
            futures = [pool.submit(self.read_segment, s) for s in segs[: self.prefetch + 1]]
            for i in range(len(segs)):
                x, y = futures[i].result()
                nxt = i + self.prefetch + 1
                if nxt < len(segs):
                    futures.append(pool.submit(self.read_segment, segs[nxt]))
                futures[i] = None
                if len(pool_x):
                    x, y = np.concatenate([pool_x, x]), np.concatenate([pool_y, y])
                last = i == len(segs) - 1
                n_out = len(x) if last else max(0, len(x) - keep) // B * B
                # shuffle by index: each emitted sample is copied once, into its batch
                order = rng.permutation(len(x)) if self.shuffle else np.arange(len(x))
                for s in range(0, n_out, B):
                    if emitted >= total:
                        break
                    idx = order[s : s + B]
                    if len(idx) < B and self.drop_last:
                        break
                    if emitted >= skip:
                        yield _tensor(x[idx] if self.shuffle else x[s : s + B]), _tensor(y[idx] if self.shuffle else y[s : s + B])
                    emitted += 1
                rest = order[n_out:]
                pool_x, pool_y = (x[rest], y[rest]) if self.shuffle else (x[n_out:], y[n_out:])

    # ---- reading ----------------------------------------------------------------------------
    def read_segment(self, seg: Segment) -> tuple[np.ndarray, np.ndarray]:
        x = self._read_array(seg, "x")
        if seg.shard.y is not None:
            y = self._read_array(seg, "y").copy()
            if self.label_mask is not None:
                y[~self.label_mask[seg.shard.name][seg.start : seg.end]] = UNLABELED
        else:
            y = np.full(seg.end - seg.start, UNLABELED, LABEL_DTYPE)
        return x, y

    def _read_array(self, seg: Segment, which: str) -> np.ndarray:
        meta = seg.shard.x if which == "x" else seg.shard.y
        dtype, shape = (self.dtype, self.shape) if which == "x" else (np.dtype(LABEL_DTYPE), ())
        url = storage.join(self.url, meta.file)
        whole = seg.start == 0 and seg.end == seg.shard.count
        item = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        a, b = meta.header + seg.start * item, meta.header + seg.end * item
        if self.cache_dir or whole or not meta.blocks:  # format 1 has no block checksums: check the whole file
            data = self._fetch_whole(url, meta)
            if whole:
                return decode_npy(data, url, dtype, shape, seg.shard.count)
            chunk = data[a:b]
        else:
            actual = storage.size(url)
            if actual != meta.bytes:
                raise UserError(f"shard {storage.redact(url)} is {actual} bytes, manifest says {meta.bytes}: truncated or replaced (re-shard the dataset)")
            lo, hi = meta.block_span(a, b)
            blocks = storage.read_bytes(url, lo, hi)
            if len(blocks) != hi - lo:
                raise UserError(f"shard {storage.redact(url)} is truncated: wanted bytes {lo}-{hi}, got {len(blocks)} (re-shard the dataset)")
            meta.verify_blocks(blocks, lo, url)
            chunk = blocks[a - lo : b - lo]
        arr = np.frombuffer(chunk, dtype=dtype).reshape((seg.end - seg.start,) + tuple(shape))
        check_array(arr, url, dtype, shape, seg.end - seg.start)
        return arr

    def _fetch_whole(self, url: str, meta) -> bytes:
        cached = os.path.join(self.cache_dir, meta.sha256 + ".npy") if self.cache_dir else None
        if cached and os.path.exists(cached):
            with open(cached, "rb") as fh:
                return fh.read()
        data = storage.read_bytes(url)
        if len(data) != meta.bytes:
            raise UserError(f"shard {storage.redact(url)} is {len(data)} bytes, manifest says {meta.bytes}: truncated or replaced (re-shard the dataset)")
        if hashlib.sha256(data).hexdigest() != meta.sha256:
            raise UserError(f"shard {storage.redact(url)} fails its sha256 check: corrupt or replaced (re-shard the dataset)")
        if cached:
            os.makedirs(self.cache_dir, exist_ok=True)
            tmp = f"{cached}.tmp{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, cached)
        return data

    def labelled_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """All samples whose label is kept (the whole split is scanned; the same on every rank)."""
        xs, ys = [], []
        for shard in self.split.shards:
            x, y = self.read_segment(Segment(shard, 0, shard.count))
            keep = y >= 0
            xs.append(x[keep])
            ys.append(y[keep])
        return np.concatenate(xs), np.concatenate(ys)

    # ---- semi-supervised label hiding -------------------------------------------------------
    def _choose_labeled(self, per_class: int) -> dict[str, np.ndarray]:
        """Keep `per_class` labels per class, chosen with the run seed (the same on every rank)."""
        if not self.manifest.labels:
            raise UserError(f"data.labeled_per_class needs labels, but {storage.redact(self.url)} has none: shard a labelled source")
        ys = []
        for shard in self.split.shards:
            ys.append(self._read_array(Segment(shard, 0, shard.count), "y"))
        y = np.concatenate(ys)
        keep = np.zeros(len(y), bool)
        rng = np.random.default_rng(seeds.labelled_subset(self.seed))
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            keep[rng.choice(idx, size=min(per_class, len(idx)), replace=False)] = True
        out, offset = {}, 0
        for shard in self.split.shards:
            out[shard.name] = keep[offset : offset + shard.count]
            offset += shard.count
        return out


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy when the array is already a writable contiguous copy (the shuffled case)."""
    return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else a.copy())
