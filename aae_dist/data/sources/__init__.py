"""Sources as a registry: `aae-dist shard SCHEME:ARG DEST` names a registered `Source`, which declares its
options and yields chunks of samples; the writer streams them into shards through bounded memory.

Add one with `register(Source(...))` in the process that shards, or from an installed package with an entry
point in the group `aae_dist.sources` (`myscheme = mypackage.module:SOURCE`)."""

from __future__ import annotations

from . import digits, images, mnist_idx, npz, tables
from .base import (CHUNK_SAMPLES, SPLIT_SEED, Opened, Option, Source, SourceData, check_validation, from_arrays, holdout_indices, indexed_chunks,
                   load_source, lookup, open_source, options, register, registry)

for _src in (mnist_idx.SOURCE, npz.SOURCE, images.SOURCE, digits.SOURCE, tables.PARQUET, tables.CSV):
    register(_src)


def load_digits(test_fraction: float = 0.1) -> SourceData:
    """The embedded digits as arrays (the default dataset's cache is written from them)."""
    return load_source("digits", test_fraction=test_fraction)


__all__ = ["CHUNK_SAMPLES", "SPLIT_SEED", "Opened", "Option", "Source", "SourceData", "check_validation", "from_arrays", "holdout_indices",
           "indexed_chunks", "load_digits", "load_source", "lookup", "open_source", "options", "register", "registry"]
