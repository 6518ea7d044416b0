"""What a source is: a URL scheme, its own options, and chunks of samples per split.

Kept free of numpy and fsspec at import time: the command line builds its `shard` options from the
registry on every start, and those imports cost a few hundred milliseconds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from ...errors import UserError

SPLIT_SEED = 20151118  # fixed: the same source always splits the same way
CHUNK_SAMPLES = 4096  # samples a built-in source hands the writer at a time


@dataclass(frozen=True)
class Option:
    """One `aae-dist shard` flag a source reads (`--image-size`); its value reaches `open` under `dest`."""

    flag: str
    help: str
    type: Callable | None = None
    default: Any = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass
class Opened:
    """A source after its checks, before any byte is written: what its samples are, how many each split
    holds, and `chunks(split)` yielding `(x, y or None)` arrays in the order they are written."""

    name: str
    dtype: Any  # numpy dtype of every sample
    shape: tuple[int, ...]  # one sample's shape
    counts: dict[str, int]  # split -> samples, in manifest order
    chunks: Callable[[str], Iterator[tuple[Any, Any]]]
    num_classes: int = 0
    labels: bool = False
    class_names: list[str] | None = None
    features: str = "image"  # "image" or "vector": what the model may assume about neighbouring values
    scaling: dict | None = None  # model input = (x - offset) / divide; None: by dtype (uint8 pixels / 255)
    stats: dict | None = None  # per-feature statistics the source knows (the writer adds them for vectors)


@dataclass(frozen=True)
class Source:
    """A registered source. `open(arg, options)` gives an `Opened`; a source that writes its own shards
    (tables: two passes over the files) gives `write(arg, dest, options, **writer)` instead."""

    scheme: str
    usage: str  # how `aae-dist shard --help` and errors name it, e.g. 'npz:URL'
    open: Callable[[str, dict], Opened] | None = None
    options: tuple[Option, ...] = ()
    needs_arg: bool = True  # 'digits' takes none, 'npz:URL' needs one
    write: Callable | None = None
    summary: Callable | None = None  # manifest -> the tail of the 'wrote ...' line


_REGISTRY: dict[str, Source] = {}


def register(source: Source) -> Source:
    """Add (or replace) a source under its scheme; a flag two sources declare must mean the same."""
    for opt in source.options:
        for other in _REGISTRY.values():
            for o in other.options:
                if o.flag == opt.flag and (o.type, o.default) != (opt.type, opt.default) and other.scheme != source.scheme:
                    raise ValueError(f"source '{source.scheme}' declares {opt.flag} unlike source '{other.scheme}'")
    _REGISTRY[source.scheme] = source
    return source


def registry(strict: bool = True) -> dict[str, Source]:
    """Every source: the built-ins, those registered in this process and the `aae_dist.sources` entry points
    (`strict=False`: a broken plug-in is left out here and named when it is used)."""
    try:
        _load_entry_points()
    except UserError:
        if strict:
            raise
    return dict(_REGISTRY)


def _load_entry_points() -> None:
    """Installed packages add sources with an entry point `aae_dist.sources: SCHEME = module:SOURCE`."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="aae_dist.sources"):
        if ep.name in _REGISTRY:
            continue
        try:
            src = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is the user's to fix, in one line
            raise UserError(f"source plug-in '{ep.name}' ({ep.value}) fails to import: {type(exc).__name__}: {exc}") from None
        if not isinstance(src, Source) or src.scheme != ep.name:
            raise UserError(f"entry point aae_dist.sources '{ep.name}' ({ep.value}) is not a Source with scheme '{ep.name}'")
        register(src)


def lookup(spec: str) -> tuple[Source, str]:
    """The source a SOURCE argument names, and its argument (the part after 'scheme:')."""
    scheme, _, arg = spec.partition(":")
    sources = registry()
    src = sources.get(scheme)
    if src is None or bool(arg) != src.needs_arg:
        usages = ", ".join(s.usage for s in sources.values())
        raise UserError(f"unknown source '{spec}': use {usages}")
    return src, arg


def options(strict: bool = True) -> list[Option]:
    """Every source's flags, once each, for the `shard` command's parser."""
    seen: dict[str, Option] = {}
    for src in registry(strict).values():
        for opt in src.options:
            seen.setdefault(opt.flag, opt)
    return list(seen.values())


def open_source(spec: str, test_fraction: float = 0.1, **opts) -> Opened:
    """Open a chunked source with its options (flags it does not declare take their defaults)."""
    src, arg = lookup(spec)
    if src.open is None:
        raise UserError(f"source '{src.scheme}' writes its own shards: use 'aae-dist shard {src.usage} DEST'")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    values = {o.dest: opts.get(o.dest, o.default) for o in src.options}
    return src.open(arg, {**values, "test_fraction": test_fraction})


def holdout_indices(n: int, test_fraction: float) -> dict:
    """Shuffle with a fixed seed, then cut off a test split (none when test_fraction rounds to 0 samples):
    split -> the source indices it holds, in order."""
    import numpy as np

    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = int(round(n * test_fraction))
    return {"train": order} if n_test == 0 else {"train": order[n_test:], "test": order[:n_test]}


def indexed_chunks(take: Callable, indices, size: int = CHUNK_SAMPLES) -> Iterator:
    """`take(idx)` for consecutive pieces of `indices`: a gathered copy of one chunk at a time."""
    for i in range(0, len(indices), size):
        yield take(indices[i : i + size])


# ---- whole arrays: for small in-memory data and callers that want arrays -----------------------------------

@dataclass
class SourceData:
    splits: dict  # split -> (x, y or None)
    num_classes: int
    name: str
    class_names: list[str] | None = None


def from_arrays(splits: dict, *, num_classes: int, name: str, class_names=None, features: str | None = None,
                scaling: dict | None = None) -> Opened:
    """Arrays already in memory as a source (e.g. `write_dataset`); every split must hold one sample type."""
    import numpy as np

    first = next(iter(splits.values()))[0]
    dtype, shape = first.dtype, tuple(first.shape[1:])
    for split_name, (x, _) in splits.items():  # every check before anything old is removed
        if x.dtype != dtype or tuple(x.shape[1:]) != shape:
            raise UserError(f"split '{split_name}' has samples {x.dtype} {x.shape[1:]}, others {dtype} {shape}")
    labels = all(y is not None for _, y in splits.values())

    def chunks(split):
        x, y = splits[split]
        for i in range(0, len(x), CHUNK_SAMPLES):
            yield x[i : i + CHUNK_SAMPLES], (np.asarray(y[i : i + CHUNK_SAMPLES]) if labels else None)

    return Opened(name=name, dtype=dtype, shape=shape, counts={k: len(x) for k, (x, _) in splits.items()}, chunks=chunks,
                  num_classes=int(num_classes) if labels else 0, labels=labels, class_names=class_names,
                  features=features or ("image" if len(shape) == 3 else "vector"), scaling=scaling)


def load_source(spec: str, *, test_fraction: float = 0.1, validation_size: int = 0, **opts) -> SourceData:
    """A whole source as arrays (small data, notebooks, tests); `aae-dist shard` streams instead."""
    import numpy as np

    opened = open_source(spec, test_fraction, **opts)
    splits = {}
    for split in opened.counts:
        parts = list(opened.chunks(split))
        x = np.concatenate([p[0] for p in parts]) if parts else np.empty((0, *opened.shape), opened.dtype)
        y = (np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.int64)) if opened.labels else None
        splits[split] = (x, y)
    if validation_size > 0:
        check_validation(opened, validation_size)
        x, y = splits["train"]
        splits["train"] = (x[:-validation_size], None if y is None else y[:-validation_size])
        splits["validation"] = (x[-validation_size:], None if y is None else y[-validation_size:])
    return SourceData(splits, opened.num_classes, opened.name, opened.class_names)


def check_validation(opened: Opened, size: int) -> None:
    """A 'validation' split is the last `size` training samples (training never reads it; the paper uses
    MNIST's train[50000:60000] where Parzen's sigma is chosen)."""
    n = opened.counts.get("train", 0)
    if size >= n:
        raise UserError(f"--validation-size {size} leaves no training samples (the source has {n}): lower it")
