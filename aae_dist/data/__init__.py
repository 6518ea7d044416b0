"""Data layer: a sharded dataset format on any fsspec URL, its writers, and a per-rank streaming reader."""

from .format import Manifest, read_manifest
from .reader import ShardStream

__all__ = ["Manifest", "read_manifest", "ShardStream"]
