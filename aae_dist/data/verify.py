"""Read every shard of a dataset once (its key file too, where `shard --keep` wrote one) and check it against the manifest."""

from __future__ import annotations

from .. import storage
from .format import read_manifest
from .reader import Segment, ShardStream
from .tables import read_keys


def verify_dataset(url: str) -> str:
    m = read_manifest(url)
    total = 0
    for name, split in m.splits.items():
        stream = ShardStream(url, name, batch_size=1, shuffle=False, prefetch=0, manifest=m)
        for shard in split.shards:
            stream.read_segment(Segment(shard, 0, shard.count))  # size + sha256 + dtype/shape checks
            if getattr(shard, "keys", None) is not None:
                read_keys(url, shard, [])  # size + sha256 + row count
            total += shard.count
    return f"ok: {storage.redact(url)} has {total} samples in {sum(len(s.shards) for s in m.splits.values())} shards, all matching the manifest"
