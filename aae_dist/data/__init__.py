"""Data layer: a sharded dataset format on any fsspec URL, its writers, and a per-rank streaming reader.

The reader (torch) is imported on first use: the driver of a Ray run reads manifests but never
streams, and importing torch there would add ~1.3 s before Ray even starts."""

from .format import Manifest, read_manifest

__all__ = ["Manifest", "read_manifest", "ShardStream"]


def __getattr__(name: str):
    if name == "ShardStream":
        from .reader import ShardStream

        return ShardStream
    raise AttributeError(name)
