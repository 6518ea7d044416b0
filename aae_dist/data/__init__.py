"""Data layer: a sharded dataset format on any fsspec URL, its writers, and a per-rank streaming reader.

Everything is imported on first use: the driver of a Ray run reads manifests but never streams (importing
torch there would add ~1.3 s before Ray even starts), and the command line builds its `shard` options
from the source registry on every start, before numpy or fsspec is needed."""

__all__ = ["Manifest", "read_manifest", "ShardStream"]


def __getattr__(name: str):
    if name in ("Manifest", "read_manifest"):
        from . import format

        return getattr(format, name)
    if name == "ShardStream":
        from .reader import ShardStream

        return ShardStream
    raise AttributeError(name)
