"""Rank partitioning, shuffling, resume and label hiding of the streaming reader."""

from __future__ import annotations

import numpy as np
import pytest

from aae_dist.data import ShardStream
from conftest import ident


def epoch_ids(url, world, epoch, batch=32, **kw):
    per_rank, counts = [], []
    for rank in range(world):
        s = ShardStream(url, "train", batch, rank=rank, world_size=world, seed=11, **kw)
        batches = list(s.iter_epoch(epoch))
        assert len(batches) == len(s)
        counts.append(len(batches))
        per_rank.append(np.concatenate([ident(x.numpy()) for x, _ in batches]))
    return per_rank, counts


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shard_size", [100, 333, 1000])  # uneven shards; 1000 = fewer shards than ranks
def test_every_sample_once_and_equal_batches(make_dataset, world, shard_size):
    url, _, _ = make_dataset(1000, shard_size)
    per_rank, counts = epoch_ids(url, world, epoch=0)
    assert len(set(counts)) == 1
    allids = np.concatenate(per_rank)
    assert len(allids) == len(set(allids.tolist())) == world * (1000 // world)  # documented: N % world left out
    assert set(allids.tolist()) <= set(range(1000))
    later, _ = epoch_ids(url, world, epoch=1)
    assert not np.array_equal(np.concatenate(later), allids)  # order differs between epochs


def test_partial_shard_reads_only_its_byte_range(make_dataset, monkeypatch):
    from aae_dist import storage

    url, _, _ = make_dataset(1000, 1000, block_bytes=512)
    ranges = []
    real = storage.read_bytes

    def spy(u, start=None, end=None, **checks):
        ranges.append((u.rsplit("/", 1)[-1], start, end))
        return real(u, start, end, **checks)

    monkeypatch.setattr(storage, "read_bytes", spy)
    s = ShardStream(url, "train", 50, rank=1, world_size=4, seed=0)
    list(s.iter_epoch(0))
    x_reads = [r for r in ranges if r[0].endswith(".x.npy")]
    assert len(x_reads) == 1 and x_reads[0][1] is not None
    _, lo, hi = x_reads[0]
    header = 128  # the .npy header of this array
    a, b = header + 250 * 16, header + 500 * 16  # samples 250-499 of 16 bytes
    assert lo <= a and b <= hi and lo % 512 == 0  # whole checksummed blocks that cover the range ...
    assert a - lo < 512 and hi - b < 512  # ... and no more than that


def test_shuffle_buffer_mixes_across_shards(make_dataset):
    url, _, _ = make_dataset(1000, 100)
    s = ShardStream(url, "train", 100, seed=3, shuffle_buffer=500)
    first = ident(next(iter(s.iter_epoch(0)))[0].numpy())
    assert len({i // 100 for i in first}) > 1  # a batch draws from several shards


def test_same_seed_same_order_and_seed_changes_it(make_dataset):
    url, _, _ = make_dataset(500, 100)
    a = [ident(x.numpy()) for x, _ in ShardStream(url, "train", 50, seed=1).iter_epoch(2)]
    b = [ident(x.numpy()) for x, _ in ShardStream(url, "train", 50, seed=1).iter_epoch(2)]
    c = [ident(x.numpy()) for x, _ in ShardStream(url, "train", 50, seed=2).iter_epoch(2)]
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


@pytest.mark.parametrize("world", [1, 3])
def test_resume_mid_epoch_yields_exactly_the_rest(make_dataset, world):
    url, _, _ = make_dataset(900, 128)
    for rank in range(world):
        full = ShardStream(url, "train", 40, rank=rank, world_size=world, seed=4)
        full.set_epoch(1)
        all_ids = [ident(x.numpy()) for x, _ in full]
        s = ShardStream(url, "train", 40, rank=rank, world_size=world, seed=4)
        s.set_epoch(1)
        it = iter(s)
        seen = [ident(next(it)[0].numpy()) for _ in range(3)]
        state = s.state_dict()
        assert state == {"epoch": 1, "position": 3}
        r = ShardStream(url, "train", 40, rank=rank, world_size=world, seed=4)
        r.load_state_dict(state)
        rest = [ident(x.numpy()) for x, _ in r]
        assert np.array_equal(np.concatenate(seen + rest), np.concatenate(all_ids))


def test_drop_last_gives_full_batches(make_dataset):
    url, _, _ = make_dataset(1000, 128)
    s = ShardStream(url, "train", 64, world_size=3, rank=2, drop_last=True)
    sizes = [len(x) for x, _ in s.iter_epoch(0)]
    assert sizes == [64] * (333 // 64) == [64] * len(s)


def test_labeled_per_class_same_on_all_ranks(make_dataset):
    url, _, y = make_dataset(1000, 128)
    labeled = []
    for rank in range(2):
        s = ShardStream(url, "train", 50, rank=rank, world_size=2, seed=9, labeled_per_class=7)
        for x, yb in s.iter_epoch(0):
            ids, yb = ident(x.numpy()), yb.numpy()
            known = yb >= 0
            np.testing.assert_array_equal(yb[known], y[ids[known]])
            labeled.extend(ids[known].tolist())
    assert len(labeled) == 70 and len(set(labeled)) == 70
    assert np.bincount(y[labeled], minlength=10).tolist() == [7] * 10
    again = ShardStream(url, "train", 50, seed=9, labeled_per_class=7)
    ids2 = [i for x, yb in again.iter_epoch(3) for i, v in zip(ident(x.numpy()), yb.numpy()) if v >= 0]
    assert sorted(ids2) == sorted(labeled)  # same choice whatever the rank count or epoch


def test_prefetch_overlaps_reading(make_dataset):
    """Segment 2 is read while the consumer still holds batch 1 and asks for nothing: the read happens
    in the prefetch thread, not inside next().  (A reader that fetched lazily in next() would leave
    segment 2 unread here and fail.)"""
    import threading

    url, _, _ = make_dataset(600, 100)
    s = ShardStream(url, "train", 100, shuffle=False, prefetch=1)
    real = s.read_segment
    first_taken, second_read, threads = threading.Event(), threading.Event(), set()

    def spy(seg):
        if seg.shard.name == "train-00001":
            assert first_taken.wait(10)  # start reading segment 2 only once batch 1 is in the consumer's hands
            out = real(seg)
            threads.add(threading.current_thread().name)
            second_read.set()
            return out
        return real(seg)

    s.read_segment = spy
    it = s.iter_epoch(0)
    next(it)
    first_taken.set()
    assert second_read.wait(10), "segment 2 was not read while batch 1 was being consumed"
    assert threads and all(t.startswith("shard-prefetch") for t in threads)
    assert len(list(it)) == 5

def test_elastic_resize_mid_epoch_uses_every_sample_at_most_once(make_dataset):
    """2 workers consume 7 batches each, the group grows to 3 (4 batches each), then shrinks to 1 and
    finishes the epoch.  Across the three groups no sample repeats, and what is left out is only each
    group's tail that does not fill a batch per rank (< world x (batch + 1) samples per group)."""
    url, _, _ = make_dataset(1000, 128)
    B, kw = 30, dict(seed=5, shuffle_buffer=300, drop_last=True)

    def taken(world, stages, batches=None):
        ids = []
        for rank in range(world):
            s = ShardStream(url, "train", B, rank=rank, world_size=world, **kw)
            it = s.iter_epoch(2, stages=stages)
            got = [ident(x.numpy()) for x, _ in (it if batches is None else (next(it) for _ in range(batches)))]
            ids += [int(i) for b in got for i in b]
        return ids

    first = taken(2, (), 7)
    second = taken(3, ((2, 7),), 4)
    third = taken(1, ((2, 7), (3, 4)))
    seen = first + second + third
    assert len(first) == 2 * 7 * B and len(second) == 3 * 4 * B
    assert len(seen) == len(set(seen)), "a sample was used twice in one epoch across the resize"
    left = ShardStream(url, "train", B, world_size=1, **kw).remaining(2, ((2, 7), (3, 4)))
    assert sorted(set(range(1000)) - set(first) - set(second)) == sorted(int(i) for i in ident_positions(url, 2, left, kw))
    assert 0 < 1000 - len(seen) < B + 1  # only the last group's tail (less than a batch, 1 rank) is left out
    # before the resize, the new plan is the old one: a group of 2 that never resized replays the same batches
    again = taken(2, (), 7)
    assert again == first
    # the number of batches the grown group gets is what it really yields
    s3 = ShardStream(url, "train", B, rank=0, world_size=3, **kw)
    assert s3.stage_batches(2, ((2, 7),)) == len(list(s3.iter_epoch(2, stages=((2, 7),))))


def ident_positions(url, epoch, positions, kw):
    """Sample ids at sequence positions of an epoch (the shard order is shuffled per epoch)."""
    s = ShardStream(url, "train", 30, **kw)
    sample_at = np.concatenate([np.arange(sh.count) + int(sh.name.split("-")[1]) * 128 for sh, _ in s.layout(epoch)])
    return sample_at[np.asarray(positions)]


def test_object_storage_reads_concurrent_checked_ranges(make_dataset, s3_server, monkeypatch):
    """From S3 a shard arrives as concurrent ranged requests of `request_bytes`, each block checked;
    the batches are those of the local reader, and a corrupt block on the server is named."""
    import threading
    import time

    from aae_dist import storage
    from aae_dist.errors import UserError

    local, _, _ = make_dataset(1000, 500, block_bytes=512)
    remote = f"s3://{s3_server['bucket']}/reader-ranges"
    storage.upload_dir(local, remote)  # the same manifest and blocks, on the server
    kw = dict(seed=3, shuffle_buffer=200, connections=4, request_bytes=1024)
    calls, active, peak, lock = [], [0], [0], threading.Lock()
    real = storage.read_bytes

    def spy(u, start=None, end=None, checked_by_caller=False):
        with lock:
            calls.append((u, start, end, checked_by_caller))
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)  # hold the request open so that concurrent ones overlap
        try:
            return real(u, start, end, checked_by_caller)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(storage, "read_bytes", spy)
    got = [(ident(x.numpy()), y.numpy()) for x, y in ShardStream(remote, "train", 50, **kw).iter_epoch(1)]
    want = [(ident(x.numpy()), y.numpy()) for x, y in ShardStream(local, "train", 50, **kw).iter_epoch(1)]
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, want)) and len(got) == len(want)
    assert all(checked for u, s, e, checked in calls if ".npy" in u)  # every shard read is checked by its blocks
    x0 = sorted((s, e) for u, s, e, _ in calls if u == storage.join(remote, "train-00000.x.npy"))
    size = 128 + 500 * 16
    assert x0[0][0] == 0 and x0[-1][1] == size + 1  # the last one asks one byte past the end: a file that grew is caught
    assert all(e - s <= 1024 for s, e in x0[:-1])
    assert all(a[1] == b[0] for a, b in zip(x0, x0[1:]))  # the requests tile the file exactly once
    assert peak[0] > 1, "ranged requests were not issued concurrently"

    # corrupt one byte of sample 300 in the server's copy: the block holding it is named, nothing else is read wrong
    monkeypatch.setattr(storage, "read_bytes", real)
    blob = bytearray(real(storage.join(remote, "train-00000.x.npy")))
    blob[128 + 300 * 16] ^= 0xFF
    storage.write_bytes_atomic(storage.join(remote, "train-00000.x.npy"), bytes(blob))
    with pytest.raises(UserError, match=r"train-00000\.x\.npy fails its xxh3_64 check in bytes 4608-5120"):
        list(ShardStream(remote, "train", 50, **kw).iter_epoch(0))


def test_shard_reads_skip_the_sdk_checksum_other_reads_keep_it(make_dataset, s3_server, monkeypatch):
    """Shard bytes are checked block by block against the manifest, so botocore's response CRC32 (a second
    pass over every byte, ~0.4 s of CPU per million 28x28 samples) is skipped for them; files without digests
    of their own (checkpoints, run files) keep it."""
    from botocore import httpchecksum

    from aae_dist import storage

    local, _, _ = make_dataset(600, 300)
    remote = f"s3://{s3_server['bucket']}/reader-crc"
    storage.upload_dir(local, remote)
    updates = [0]
    real = httpchecksum.Crc32Checksum.update

    def counting(self, chunk):
        updates[0] += 1
        return real(self, chunk)

    monkeypatch.setattr(httpchecksum.Crc32Checksum, "update", counting)
    storage.read_bytes(storage.join(remote, "train-00000.x.npy"))  # as a checkpoint file is read
    assert updates[0] > 0, "the server sent no CRC32 or the SDK did not check it: this test shows nothing"
    stream = ShardStream(remote, "train", 50, seed=1)  # its manifest, which has no digest of its own, keeps the CRC
    updates[0] = 0
    batches = list(stream.iter_epoch(0))
    assert len(batches) == 12 and updates[0] == 0
