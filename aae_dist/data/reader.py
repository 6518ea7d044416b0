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
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .. import seeds

from .. import storage
from ..errors import UserError
from ..plan import check_split
from .format import LABEL_DTYPE, Manifest, Shard, check_array, decode_npy, is_sha256, read_manifest

UNLABELED = -1


@dataclass(frozen=True)
class Segment:
    shard: Shard
    start: int
    end: int


class ShardStream(torch.utils.data.IterableDataset):
    """Batches `(x uint8 [B,*shape], y int64 [B])` of this rank's samples; y is -1 where unknown/hidden."""

    @classmethod
    def from_config(cls, data, rank: int = 0, world: int = 1, *, seed: int = 0, manifest: Manifest | None = None) -> "ShardStream":
        """The training stream of a rank, built from the data section (data.*) alone."""
        return cls(data.path, "train", data.batch_size, rank=rank, world_size=world, seed=seed, shuffle_buffer=data.shuffle_buffer,
                   drop_last=True, cache_dir=data.cache_dir, prefetch=data.prefetch, connections=data.connections,
                   request_bytes=data.request_bytes, labeled_per_class=data.labeled_per_class, manifest=manifest)

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
        connections: int = 8,
        request_bytes: int = 8 << 20,
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
        check_split(self.split.count, world_size, batch_size, url, split, drop_last=drop_last, who="ranks")  # the run plan's check
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.shuffle_buffer, self.drop_last = seed, shuffle, shuffle_buffer, drop_last
        self.cache_dir, self.prefetch = cache_dir, max(0, prefetch)
        self.connections, self.request_bytes = max(1, connections), max(1, request_bytes)
        self._remote = not storage.is_local(url)
        self._pool: ThreadPoolExecutor | None = None
        # the shuffle buffer's rows, sized once for its peak (pool + a batch + a shard) and reused epoch after epoch:
        # growing it copied the pool each time, and fresh memory costs page faults (bench_data.py)
        self._slots = _Slots(shuffle_buffer + batch_size + max(s.count for s in self.split.shards)) if shuffle else _Slots()
        self.per_rank = self.split.count // world_size
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

    def layout(self, epoch: int) -> list[tuple[Shard, int]]:
        """The epoch's sequence: the shards in this epoch's order, each with the position of its first sample."""
        out, offset = [], 0
        for idx in self.shard_order(epoch):
            out.append((self.split.shards[idx], offset))
            offset += self.split.shards[idx].count
        return out

    def segments(self, epoch: int, mine: range | np.ndarray | None = None) -> list[tuple[Segment, np.ndarray | None]]:
        """The shard ranges holding this rank's positions `mine` (default: its contiguous share), each with
        the indices to keep inside it (None: all of it)."""
        if mine is None:
            mine = range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        out = []
        for shard, offset in self.layout(epoch):
            if isinstance(mine, range):
                a, b = max(mine.start, offset), min(mine.stop, offset + shard.count)
                if a < b:
                    out.append((Segment(shard, a - offset, b - offset), None))
                continue
            i, j = np.searchsorted(mine, [offset, offset + shard.count])
            if i < j:
                local = mine[i:j] - offset
                seg = Segment(shard, int(local[0]), int(local[-1]) + 1)
                out.append((seg, None if j - i == seg.end - seg.start else local - seg.start))
        return out

    # ---- elastic resize: what is left of an interrupted epoch ---------------------------------
    def remaining(self, epoch: int, stages) -> np.ndarray:
        """Sorted positions of the epoch not consumed by its completed stages [(world_size, batches), ...]:
        each stage's ranks are replayed on indices only (no data read) to find exactly what they used."""
        left = None
        for k, (world, batches) in enumerate(stages):
            used = [self._replay(epoch, rank, k, self.share(left, rank, world), batches) for rank in range(world)]
            base = np.arange(self.split.count) if left is None else left
            left = np.setdiff1d(base, np.concatenate(used), assume_unique=True)
        return np.arange(self.split.count) if left is None else left

    def share(self, left: np.ndarray | None, rank: int, world: int) -> range | np.ndarray:
        """Rank `rank`'s contiguous share of the positions `left` (None: the whole epoch)."""
        if left is None:
            n = self.split.count // world
            return range(rank * n, (rank + 1) * n)
        m = len(left) // world
        return left[rank * m : (rank + 1) * m]

    def stage_batches(self, epoch: int, stages) -> int:
        """Batches per rank in the current stage of `epoch` (after a resize, fewer than len(self))."""
        if not stages:
            return len(self)
        m = len(self.remaining(epoch, stages)) // self.world_size
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def _replay(self, epoch: int, rank: int, stage: int, mine, batches: int) -> np.ndarray:
        """The positions rank `rank` consumed in its first `batches` batches of that stage."""
        starts = {id(shard): offset for shard, offset in self.layout(epoch)}
        segs = self.segments(epoch, mine)

        def positions():
            for seg, keep in segs:
                pos = starts[id(seg.shard)] + np.arange(seg.start, seg.end)
                yield (pos if keep is None else pos[keep],)

        out = [b[0] for b in self._emit(epoch, rank, stage, len(mine), positions(), len(segs), 0, limit=batches)]
        return np.concatenate(out) if out else np.empty(0, np.int64)

    # ---- the batches ----------------------------------------------------------------------------
    def iter_epoch(self, epoch: int, skip: int = 0, stages=()):
        """Yield this epoch's batches, the first `skip` of them replayed but not returned.  `stages`: the
        (world_size, batches) of earlier worker groups in this epoch (elastic resize), whose samples are
        left out: across the groups every sample of the epoch is used at most once."""
        mine = self.share(self.remaining(epoch, stages) if stages else None, self.rank, self.world_size)
        segs = self.segments(epoch, mine)
        for x, y in self._emit(epoch, self.rank, len(stages), len(mine), self._read_ahead(segs), len(segs), skip, slots=self._slots.reset()):
            yield _tensor(x), _tensor(y)

    def _read_ahead(self, segs):
        """Each segment's (x, y); several workers: remote shards download while the current one is consumed."""
        with ThreadPoolExecutor(max_workers=max(1, self.prefetch), thread_name_prefix="shard-prefetch") as pool:
            futures = [pool.submit(self.read_segment, s) for s, _ in segs[: self.prefetch + 1]]
            for i in range(len(segs)):
                x, y = futures[i].result()
                nxt = i + self.prefetch + 1
                if nxt < len(segs):
                    futures.append(pool.submit(self.read_segment, segs[nxt][0]))
                futures[i] = None
                keep = segs[i][1]
                yield (x, y) if keep is None else (x[keep], y[keep])

    def _emit(self, epoch: int, rank: int, stage: int, count: int, parts_per_segment, n_segments: int, skip: int, limit=None, slots=None):
        """The shuffle buffer over a rank's segments: tuples of aligned arrays in, batches of them out.
        The same code serves data (x, y) and index-only replays (positions), so both see the same order."""
        rng = np.random.default_rng(seeds.shuffle_buffer(self.seed, epoch, rank) + ([stage] if stage else []))
        B = self.batch_size
        total = count // B if self.drop_last else math.ceil(count / B)
        if limit is not None:
            total = min(total, limit)
        keep = self.shuffle_buffer if self.shuffle else 0
        pool, slots, emitted = None, slots or _Slots(), 0
        for i, parts in enumerate(parts_per_segment):
            if emitted >= total:
                return
            if self.shuffle:  # rows stay in the slot buffer until they leave in a batch: copied in once, out once
                cand = slots.add(parts)
                n = len(cand)
            else:
                if pool is not None and len(pool[0]):
                    parts = tuple(np.concatenate([p, q]) for p, q in zip(pool, parts))
                n = len(parts[0])
            n_out = n if i == n_segments - 1 else max(0, n - keep) // B * B
            ranked = cand[rng.permutation(n)] if self.shuffle else None  # the candidates' slots in shuffled order
            for s in range(0, n_out, B):
                if emitted >= total:
                    break
                if min(B, n_out - s) < B and self.drop_last:
                    break
                if emitted >= skip:
                    yield slots.take(ranked[s : s + B]) if self.shuffle else tuple(p[s : s + B] for p in parts)
                emitted += 1
            if self.shuffle:
                slots.keep(ranked[n_out:], ranked[:n_out])
            else:
                pool = tuple(p[n_out:] for p in parts)

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
        if not meta.blocks:  # format 1 has no block checksums: fetch and check the whole file
            data = self._fetch_whole(url, meta)
        elif self.cache_dir:
            data = self._fetch_whole(url, meta, verified_blocks=True)
        elif whole:
            data = self._fetch_blocks(url, meta, 0, meta.bytes)
        else:
            lo, hi = meta.block_span(a, b)
            return self._as_array(memoryview(self._fetch_blocks(url, meta, lo, hi))[a - lo : b - lo], url, dtype, shape, seg)
        if whole:
            return decode_npy(data, url, dtype, shape, seg.shard.count)
        return self._as_array(data[a:b], url, dtype, shape, seg)

    @staticmethod
    def _as_array(chunk, url, dtype, shape, seg: Segment) -> np.ndarray:
        arr = np.frombuffer(chunk, dtype=dtype).reshape((seg.end - seg.start,) + tuple(shape))
        check_array(arr, url, dtype, shape, seg.end - seg.start)
        return arr

    def _fetch_blocks(self, url: str, meta, lo: int, hi: int) -> bytes:
        """Bytes [lo, hi) (block boundaries) of a format-2 file, each block checked against the manifest.

        From object storage the range goes out as concurrent ranged requests of about
        `request_bytes`, each checked in its own thread as it arrives (hashing overlaps the
        other downloads).  A shorter or longer file fails the length
        check of its last request, so no separate size request is needed."""
        bs = meta.block_bytes
        step = max(bs, self.request_bytes // bs * bs) if self._remote else hi - lo
        parts = [(p, min(hi, p + step)) for p in range(lo, hi, max(step, 1))] or [(lo, hi)]

        def fetch(p: int, q: int) -> bytes:
            # the request that ends the file asks for one byte more: a file that grew is caught too
            data = storage.read_bytes(url, p, q + 1 if q == meta.bytes else q, checked_by_caller=True)
            if len(data) != q - p:
                raise UserError(
                    f"shard {storage.redact(url)} is truncated or replaced: bytes {p}-{q} came back as {len(data)} bytes, "
                    f"manifest says {q - p} (re-shard the dataset)"
                )
            meta.verify_blocks(data, p, url)
            return data

        if len(parts) == 1:
            return fetch(*parts[0])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.connections, thread_name_prefix="shard-range")
        return b"".join(f.result() for f in [self._pool.submit(fetch, p, q) for p, q in parts])

    def _fetch_whole(self, url: str, meta, verified_blocks: bool = False) -> bytes:
        cached = self._cache_path(meta)
        data = _read_cached(cached, url, meta) if cached else None
        if data is not None:
            return data
        data = self._fetch_blocks(url, meta, 0, meta.bytes) if verified_blocks else storage.read_bytes(url)
        if len(data) != meta.bytes:
            raise UserError(f"shard {storage.redact(url)} is {len(data)} bytes, manifest says {meta.bytes}: truncated or replaced (re-shard the dataset)")
        if not verified_blocks and hashlib.sha256(data).hexdigest() != meta.sha256:
            raise UserError(f"shard {storage.redact(url)} fails its sha256 check: corrupt or replaced (re-shard the dataset)")
        if cached:
            _write_cached(cached, data)
        return data

    def _cache_path(self, meta) -> str | None:
        """The cache file of a shard file: named after its (checked) sha256 only, so it stays inside data.cache_dir."""
        if not self.cache_dir:
            return None
        if not is_sha256(meta.sha256):
            raise UserError(f"shard {meta.file}: sha256 {str(meta.sha256)[:80]!r} is not 64 hex digits (re-shard the dataset)")
        return os.path.join(self.cache_dir, meta.sha256 + ".npy")

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


# cache files checked in this process: a hit is read whole and checked (size, then the block checksums, or the
# sha256 for format 1) the first time this process uses it, after which the same file is trusted
_CACHE_CHECKED: set[str] = set()


def _read_cached(path: str, url: str, meta) -> bytes | None:
    """A cache hit's bytes, or None (a miss, or a bad copy: removed with one warning, so the caller fetches again)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    if path in _CACHE_CHECKED:
        return data
    problem = _cache_problem(data, url, meta)
    if problem:
        print(f"aae-dist: warning: cached copy {path} of {storage.redact(url)} {problem}: fetching it again", file=sys.stderr)
        _remove_quietly(path)
        return None
    _CACHE_CHECKED.add(path)
    return data


def _cache_problem(data: bytes, url: str, meta) -> str | None:
    if len(data) != meta.bytes:
        return f"is {len(data)} bytes, the manifest says {meta.bytes}"
    if not meta.blocks:
        return None if hashlib.sha256(data).hexdigest() == meta.sha256 else "fails its sha256 check"
    try:
        meta.verify_blocks(data, 0, url)
    except UserError:
        return f"fails its {meta.block_hash} check"
    return None


def _write_cached(path: str, data: bytes) -> None:
    """Write a checked shard file to the cache (temp file + rename: a reader never sees half of it)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        raise UserError(f"cannot write to data.cache_dir {os.path.dirname(path)}: {exc.strerror or exc} "
                        "(free space there, point data.cache_dir at a writable folder, or unset it)") from None
    _CACHE_CHECKED.add(path)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class _Slots:
    """The shuffle buffer's storage.  The pool used to be re-concatenated with each new segment and
    re-gathered after it (five row copies per sample); here a row is written once into a free slot
    and copied once more, into its batch.  The candidates' order (pool first, then the new rows) is
    the old one, so the batches are the same."""

    def __init__(self, capacity: int = 0):
        self.capacity = capacity
        self.bufs: tuple[np.ndarray, ...] | None = None
        self.live = np.empty(0, np.int64)  # slots of the pooled rows, in pool order
        self.free = np.empty(0, np.int64)

    def reset(self) -> "_Slots":
        """Empty, keeping the buffers (batches are copies: nothing handed out refers to them)."""
        if self.bufs is not None:
            self.live, self.free = np.empty(0, np.int64), np.arange(len(self.bufs[0]))
        return self

    def add(self, parts: tuple[np.ndarray, ...]) -> np.ndarray:
        """Store a segment's rows; the candidate slots: the pool's, then the new rows'."""
        m = len(parts[0])
        if len(self.free) < m:
            self._grow(parts, len(self.live) + m)
        new, self.free = self.free[:m], self.free[m:]
        rows = slice(int(new[0]), int(new[-1]) + 1) if m and new[-1] - new[0] == m - 1 else new  # free slots in one run: a plain copy
        for (buf, _, _), p in zip(self.rows, parts):
            buf[rows] = _as_rows(np.ascontiguousarray(p), m)
        return np.concatenate([self.live, new])

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, ...]:
        """A batch: ndarray.take over whole rows (about half the time of buf[idx] on (N, C, H, W) uint8),
        called directly (numpy's np.take wrapper cost as much as the copy at batch 128)."""
        k = len(idx)
        return tuple([buf.take(idx, 0).view(dtype).reshape((k,) + shape) for buf, dtype, shape in self.rows])

    def keep(self, pooled: np.ndarray, released: np.ndarray) -> None:
        self.live = pooled
        self.free = np.sort(np.concatenate([self.free, released]))  # in slot order: the next writes are near-sequential

    def _grow(self, parts, need: int) -> None:
        cap = max(need, self.capacity, 2 * (len(self.bufs[0]) if self.bufs else 0))
        try:
            bufs = tuple(np.empty((cap,) + p.shape[1:], p.dtype) for p in parts)
        except (MemoryError, ValueError):
            gib = cap * sum(p[:1].nbytes for p in parts) / 2**30
            raise UserError(f"the shuffle buffer needs {cap} samples ({gib:.1f} GiB), more memory than there is: "
                            "lower data.shuffle_buffer, or re-shard with a smaller --shard-size") from None
        k = len(self.live)
        if self.bufs is not None and k:
            for nb, ob in zip(bufs, self.bufs):
                nb[:k] = ob[self.live]
        self.bufs, self.live, self.free = bufs, np.arange(k), np.arange(k, cap)
        self.rows = [(_as_rows(b, cap), b.dtype, b.shape[1:]) for b in bufs]  # each buffer seen as one item per row


def _as_rows(a: np.ndarray, n: int) -> np.ndarray:
    """A contiguous (n, ...) array seen as n items of one row each (numpy void): scattering rows into free
    slots then copies each row whole (a 784-byte image row by row was ~5x slower, byte by byte)."""
    flat = a.reshape(n, -1)
    if flat.shape[1] == 0:
        return flat
    return flat.view(np.dtype((np.void, flat.shape[1] * a.dtype.itemsize))).reshape(n)


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy when the array is already a writable contiguous copy (the shuffled case)."""
    return torch.from_numpy(a if a.flags.writeable and a.flags.c_contiguous else a.copy())
