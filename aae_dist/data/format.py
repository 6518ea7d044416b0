"""The on-storage dataset format: `manifest.json` plus `.npy` shard files per split.

Why `.npy`: a fixed header followed by raw C-order bytes, so a rank that owns only
samples [a, b) of a shard fetches exactly that byte range (one ranged GET on object
stores), parses with `numpy.frombuffer` (zero copy, no pickle) and needs no extra
dependency.  Each shard is two files, `<split>-NNNNN.x.npy` and `.y.npy` (labels).

Integrity: each file has a sha256 of the whole and (format 2 on) a checksum per fixed-size block,
so a rank that reads only a byte range still verifies every byte it uses: it fetches the
blocks covering its range (at most two blocks more than it needs) and checks each.  Format-1
datasets have no block list; their ranged reads fetch and check the whole file.  Block checksums
are sha256 in format 2 and XXH3-64 (xxhash) from format 3: they guard against corruption,
truncation and a replaced file, not against someone who can write to the bucket (who could rewrite
the manifest beside it too), and XXH3 runs at memory speed where sha256 took the streaming reader
more CPU than any other step (bench_data.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import threading
from dataclasses import dataclass, field

import numpy as np
import xxhash

from .. import storage
from ..errors import UserError

FORMAT_NAME = "aae-dist-shards"
FORMAT_VERSION = 3
BLOCK_HASHES = {"sha256": lambda b: hashlib.sha256(b).hexdigest(), "xxh3_64": lambda b: xxhash.xxh3_64_hexdigest(b)}
BLOCK_HASH = "xxh3_64"  # what the writer uses (format 3); manifests name theirs, format 2's being sha256
BLOCK_BYTES = 1 << 20  # 1 MiB: ~70 bytes of manifest per MiB of data, at most 2 MiB read beyond a range
MANIFEST = "manifest.json"
LABEL_DTYPE = np.int64


@dataclass
class ArrayFile:
    file: str
    bytes: int
    sha256: str
    header: int  # bytes before the first sample, for ranged reads
    block_bytes: int = 0  # 0: no per-block checksums (format 1)
    blocks: list[str] | None = None  # checksum of bytes [i*block_bytes, (i+1)*block_bytes) of the file
    block_hash: str = "sha256"  # how `blocks` were computed (format 2: sha256)

    def block_span(self, start: int, end: int) -> tuple[int, int]:
        """The byte range [a, b) of whole blocks that covers bytes [start, end)."""
        bs = self.block_bytes
        return start // bs * bs, min(self.bytes, -(-end // bs) * bs)

    def verify_blocks(self, data: bytes, start: int, url: str) -> None:
        """`data` holds the file's bytes from `start`, a block boundary, to a block boundary or the end."""
        bs, view, digest = self.block_bytes, memoryview(data), BLOCK_HASHES[self.block_hash]
        for off in range(0, len(data), bs):
            i = (start + off) // bs
            if i >= len(self.blocks) or digest(view[off : off + bs]) != self.blocks[i]:
                raise UserError(
                    f"shard {storage.redact(url)} fails its {self.block_hash} check in bytes {start + off}-{start + off + len(data[off:off + bs])}: "
                    "corrupt or replaced (re-shard the dataset)"
                )


@dataclass
class Shard:
    name: str
    count: int
    x: ArrayFile
    y: ArrayFile | None = None
    keys: ArrayFile | None = None  # tables sharded with --keep: the rows' raw key columns, `<shard>.keys.parquet`

    @property
    def files(self) -> list[ArrayFile]:
        """Every file of this shard that the manifest lists (what --overwrite may move or remove)."""
        return [f for f in (self.x, self.y, self.keys) if f is not None]


@dataclass
class Split:
    count: int
    shards: list[Shard] = field(default_factory=list)


@dataclass
class Manifest:
    dtype: str
    shape: list[int]
    labels: bool
    num_classes: int
    splits: dict[str, Split]
    source: str = ""
    class_names: list[str] | None = None
    version: int = FORMAT_VERSION
    table: dict | None = None  # a table dataset's columns and their transforms (data/tables.py); None for images
    features: str | None = None  # "image" or "vector"; None (manifests before it): a table's rows are vectors, the rest images
    scaling: dict | None = None  # model input = (x - offset) / divide; None (manifests before it): uint8 / 255, others as they are
    stats: dict | None = None  # per-feature count, mean, std, min, max of the train split, where the source has them

    @property
    def feature_kind(self) -> str:
        return self.features or ("vector" if self.table is not None else "image")

    @property
    def custom_scaling(self) -> dict | None:
        """The scaling a checkpoint must remember: None where it is today's pixel rule (old checkpoints never had one)."""
        return None if self.input_scaling == default_scaling(self.dtype) else self.input_scaling

    @property
    def input_scaling(self) -> dict:
        """What the model divides its input by (and subtracts first); today's pixel rule where the manifest is silent."""
        return self.scaling or default_scaling(self.dtype)

    @property
    def sample_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape)))

    def split(self, name: str, url: str = "") -> Split:
        if name not in self.splits:
            raise UserError(f"dataset {storage.redact(url)} has no split '{name}' (it has: {', '.join(self.splits) or 'none'})")
        sp = self.splits[name]
        if sp.count == 0:
            raise UserError(f"split '{name}' of dataset {storage.redact(url)} is empty: re-shard with data in it")
        return sp

    def to_json(self) -> str:
        def arr(a: ArrayFile | None):
            return None if a is None else a.__dict__.copy()

        doc = {
            "format": FORMAT_NAME,
            "version": self.version,
            "source": self.source,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "labels": self.labels,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "splits": {
                name: {
                    "count": sp.count,
                    "shards": [{"name": s.name, "count": s.count, "x": arr(s.x), "y": arr(s.y), **({"keys": arr(s.keys)} if s.keys else {})}
                               for s in sp.shards],
                }
                for name, sp in self.splits.items()
            },
        }
        if self.table is not None:
            doc["table"] = self.table
        for key in ("features", "scaling", "stats"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str, url: str = "") -> "Manifest":
        where = storage.redact(url)
        try:
            return _parse_manifest(json.loads(text))
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            raise UserError(f"invalid manifest {where}/{MANIFEST}: {type(exc).__name__}: {exc} (re-shard the dataset)") from None


# ---- a manifest is untrusted input: every field is checked before any is used as a name, a size or a path -----

SPLIT_NAME = re.compile(r"[a-z0-9_]+")
SHARD_NUMBER = r"-[0-9]{5,}"  # the writer's `<split>-NNNNN`; its files are `<split>-NNNNN.x.npy` and `.y.npy`
HEX = re.compile(r"[0-9a-f]+")
HEX_LENGTH = {"sha256": 64, "xxh3_64": 16}
SAMPLE_KINDS = "biuf"  # bool, integers, floats: no strings, objects or records
MAX_SAMPLE_BYTES = 1 << 30  # one sample of at most 1 GiB
MAX_FILE_BYTES = 1 << 40  # one shard file of at most 1 TiB


def is_sha256(value) -> bool:
    """A cache file is named after its sha256: only 64 hex digits may become a file name."""
    return isinstance(value, str) and len(value) == 64 and HEX.fullmatch(value) is not None


def _whole(value, what: str, low: int = 0, high: int | None = None) -> int:
    """A JSON integer in [low, high]: floats (1e400 is inf), strings and booleans are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f" and <= {high}" if high is not None else ""
        raise ValueError(f"{what} is {value!r}: expected a whole number >= {low}{bound}")
    return value


def _hex(value, what: str, length: int) -> str:
    if not isinstance(value, str) or len(value) != length or not HEX.fullmatch(value):
        raise ValueError(f"{what} is {str(value)[:80]!r}: expected {length} lower-case hex digits")
    return value


def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is a JSON {type(value).__name__}, not a JSON object")
    return value


def _sample_dtype(value) -> np.dtype:
    if not isinstance(value, str):
        raise ValueError(f"'dtype' is {value!r}: expected a numpy type name such as 'uint8'")
    dtype = np.dtype(value)
    if dtype.kind not in SAMPLE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"'dtype' {value!r} is not a number type (bool, int, uint or float)")
    return dtype


def _sample_shape(value, dtype: np.dtype) -> list[int]:
    if not isinstance(value, list) or not 1 <= len(value) <= 8:
        raise ValueError(f"'shape' is {str(value)[:80]}: expected a list of 1 to 8 sizes")
    shape = [_whole(d, "a size in 'shape'", 1, MAX_SAMPLE_BYTES) for d in value]
    if dtype.itemsize * math.prod(shape) > MAX_SAMPLE_BYTES:
        raise ValueError(f"'shape' {shape} makes samples of {dtype.itemsize * math.prod(shape)} bytes, more than {MAX_SAMPLE_BYTES}")
    return shape


def _file_entry(doc, where: str, what: str, expected: str) -> dict:
    """A shard file's manifest entry: an object of ArrayFile's keys only, naming the writer's own file."""
    doc = _object(doc, what)
    unknown = set(doc) - set(ArrayFile.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
    if doc.get("file") != expected:
        raise ValueError(f"{where} 'file' is {str(doc.get('file'))[:80]!r}: expected '{expected}', a file inside the dataset folder")
    return doc


def _array_file(doc, shard: str, which: str, count: int, item_bytes: int) -> ArrayFile:
    """One shard file's entry: its name is the writer's, its size follows from the count, its checksums are hex."""
    where = f"shard {shard} {which}"
    doc = _file_entry(doc, where, f"'{which}' of shard {shard}", f"{shard}.{which}.npy")
    f = ArrayFile(file=doc["file"], bytes=_whole(doc["bytes"], f"{where} 'bytes'", 0, MAX_FILE_BYTES),
                  sha256=_hex(doc["sha256"], f"{where} 'sha256'", 64), header=_whole(doc["header"], f"{where} 'header'", 0),
                  block_bytes=_whole(doc.get("block_bytes", 0), f"{where} 'block_bytes'", 0), blocks=doc.get("blocks"),
                  block_hash=doc.get("block_hash", "sha256"))
    if f.header + count * item_bytes > f.bytes:  # not '!=': a file of another shape is named by the reader, which opens it
        raise ValueError(f"{where} 'bytes' is {f.bytes}, fewer than a header of {f.header} and {count} samples of {item_bytes} bytes")
    _check_blocks(f, where)
    return f


def _check_blocks(f: ArrayFile, where: str) -> None:
    if f.block_hash not in BLOCK_HASHES:
        raise ValueError(f"{f.file}: block_hash {f.block_hash!r} is not one of {', '.join(BLOCK_HASHES)}")
    if f.blocks is None or f.blocks == []:
        return  # format 1: the whole file's sha256 is checked
    if not isinstance(f.blocks, list):
        raise ValueError(f"{where} 'blocks' is not a list")
    _whole(f.block_bytes, f"{where} 'block_bytes' (with 'blocks')", 1)
    if len(f.blocks) != max(1, -(-f.bytes // f.block_bytes)):
        raise ValueError(f"{where} 'blocks' has {len(f.blocks)} checksums, {f.bytes} bytes in blocks of {f.block_bytes} need "
                         f"{max(1, -(-f.bytes // f.block_bytes))}")
    for b in f.blocks:
        _hex(b, f"{where} 'blocks' entry", HEX_LENGTH[f.block_hash])


def _shard(doc, split: str, item_bytes: int) -> Shard:
    doc = _object(doc, f"a shard of split '{split}'")
    name = doc["name"]
    if not isinstance(name, str) or not re.fullmatch(re.escape(split) + SHARD_NUMBER, name):
        raise ValueError(f"shard 'name' {str(name)[:80]!r} in split '{split}' is not the writer's '{split}-NNNNN'")
    count = _whole(doc["count"], f"'count' of shard {name}", 0)
    y = _array_file(doc["y"], name, "y", count, np.dtype(LABEL_DTYPE).itemsize) if doc.get("y") else None
    keys = _keys_file(doc["keys"], name) if doc.get("keys") else None
    return Shard(name=name, count=count, x=_array_file(doc["x"], name, "x", count, item_bytes), y=y, keys=keys)


KEYS_SUFFIX = ".keys.parquet"


def _keys_file(doc, shard: str) -> ArrayFile:
    """A shard's key side file (tables, `shard --keep`): the writer's name, no header, checksums as hex."""
    where = f"shard {shard} keys"
    doc = _file_entry(doc, where, f"'keys' of shard {shard}", f"{shard}{KEYS_SUFFIX}")
    f = ArrayFile(file=doc["file"], bytes=_whole(doc["bytes"], f"{where} 'bytes'", 1, MAX_FILE_BYTES), sha256=_hex(doc["sha256"], f"{where} 'sha256'", 64),
                  header=_whole(doc.get("header", 0), f"{where} 'header'", 0, 0), block_bytes=_whole(doc.get("block_bytes", 0), f"{where} 'block_bytes'", 0),
                  blocks=doc.get("blocks"), block_hash=doc.get("block_hash", "sha256"))
    _check_blocks(f, where)
    return f


def _split(name, doc, item_bytes: int) -> Split:
    if not isinstance(name, str) or not SPLIT_NAME.fullmatch(name):
        raise ValueError(f"split name {str(name)[:80]!r} is not lower-case letters, digits and '_'")
    doc = _object(doc, f"split '{name}'")
    if not isinstance(doc["shards"], list):
        raise ValueError(f"'shards' of split '{name}' is not a list")
    shards = [_shard(s, name, item_bytes) for s in doc["shards"]]
    if len({s.name for s in shards}) != len(shards):
        raise ValueError(f"split '{name}' lists a shard twice")
    count = _whole(doc["count"], f"'count' of split '{name}'", 0)
    if sum(s.count for s in shards) != count:
        raise ValueError(f"split '{name}' count {count} differs from the sum of its shards")
    return Split(count=count, shards=shards)


def _parse_manifest(doc) -> Manifest:
    doc = _object(doc, "the manifest")
    if doc.get("format") != FORMAT_NAME:
        raise ValueError(f"'format' is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
    version = _whole(doc["version"], "'version'", 1)
    if version > FORMAT_VERSION:
        raise ValueError(f"format version {version} is newer than this aae-dist reads ({FORMAT_VERSION})")
    dtype = _sample_dtype(doc["dtype"])
    shape = _sample_shape(doc["shape"], dtype)
    item_bytes = dtype.itemsize * math.prod(shape)
    splits = {name: _split(name, sp, item_bytes) for name, sp in _object(doc["splits"], "'splits'").items()}
    if not isinstance(doc["labels"], bool):
        raise ValueError(f"'labels' is {doc['labels']!r}: expected true or false")
    class_names = doc.get("class_names")
    if class_names is not None and not (isinstance(class_names, list) and all(isinstance(c, str) for c in class_names)):
        raise ValueError("'class_names' is not a list of strings")
    table = None
    if doc.get("table") is not None:
        from .tables import check_table_spec

        table = check_table_spec(doc["table"], math.prod(shape))
    width = math.prod(shape)
    return Manifest(dtype=str(doc["dtype"]), shape=shape, labels=doc["labels"], num_classes=_whole(doc["num_classes"], "'num_classes'", 0),
                    splits=splits, source=str(doc.get("source", "")), class_names=class_names, version=version, table=table,
                    features=_features(doc.get("features")), scaling=check_scaling(doc.get("scaling"), width),
                    stats=_stats(doc.get("stats"), width))


FEATURE_KINDS = ("image", "vector")
STAT_KEYS = ("mean", "std", "min", "max")


def default_scaling(dtype: str) -> dict:
    """Before manifests said so: uint8 pixels / 255, every other dtype as it is."""
    return {"offset": 0.0, "divide": 255.0 if str(dtype) == "uint8" else 1.0}


def _features(value) -> str | None:
    if value is not None and value not in FEATURE_KINDS:
        raise ValueError(f"'features' is {str(value)[:80]!r}: expected one of {', '.join(FEATURE_KINDS)}")
    return value


def _numbers(value, what: str, width: int, positive: bool = False):
    """One finite number, or a list of `width` of them (one per feature)."""
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) != width:
        raise ValueError(f"{what} lists {len(value)} values, the samples hold {width}")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"{what} holds {str(v)[:40]!r}: expected finite numbers{' > 0' if positive else ''}")
    return value


def check_scaling(doc, width: int) -> dict | None:
    """A manifest's (or checkpoint's) input scaling: offset and divide, each a number or one per feature."""
    if doc is None:
        return None
    doc = _object(doc, "'scaling'")
    if set(doc) != {"offset", "divide"}:
        raise ValueError(f"'scaling' has keys {sorted(doc)}: expected offset and divide")
    return {"offset": _numbers(doc["offset"], "'scaling' offset", width), "divide": _numbers(doc["divide"], "'scaling' divide", width, True)}


def scaling_from_meta(meta: dict, ref: str) -> dict | None:
    """A checkpoint's input scaling (absent: the pixel rule), checked like a manifest's."""
    try:
        return check_scaling(meta.get("scaling"), math.prod(meta["shape"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"checkpoint {storage.redact(ref)} has an invalid input scaling ({exc}): re-train") from None


def _stats(doc, width: int) -> dict | None:
    if doc is None:
        return None
    doc = _object(doc, "'stats'")
    _whole(doc.get("count"), "'stats' count", 0)
    for key in STAT_KEYS:
        if not isinstance(doc.get(key), list):
            raise ValueError(f"'stats' {key} is not a list of per-feature numbers")
        _numbers(doc[key], f"'stats' {key}", width)
    return doc


def read_manifest(url: str) -> Manifest:
    murl = storage.join(url, MANIFEST)
    if not storage.exists(murl):
        raise UserError(f"no dataset at {storage.redact(url)}: {MANIFEST} is missing (create it with 'aae-dist shard SOURCE {storage.redact(url)}')")
    return Manifest.from_json(storage.read_bytes(murl).decode("utf-8", errors="replace"), url)


def encode_npy(arr: np.ndarray) -> tuple[bytes, int]:
    """`.npy` bytes for arr and the length of its header."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    data = buf.getvalue()
    return data, len(data) - arr.nbytes


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def block_digests(data: bytes, block_bytes: int, block_hash: str = BLOCK_HASH) -> list[str]:
    digest, view = BLOCK_HASHES[block_hash], memoryview(data)
    return [digest(view[i : i + block_bytes]) for i in range(0, max(len(data), 1), block_bytes)]


# numpy parses .npy headers with ast.literal_eval, and CPython's AST constructor is not safe to run
# in several threads at once ("AST constructor recursion depth mismatch"): headers are parsed one
# at a time; the (large) body is then viewed in place with frombuffer.
_HEADER_LOCK = threading.Lock()


def decode_npy(data: bytes, url: str, expect_dtype, expect_shape: tuple, count: int) -> np.ndarray:
    """Parse whole-file `.npy` bytes without pickle, checking dtype, shape and count."""
    try:
        f = io.BytesIO(data)
        with _HEADER_LOCK:
            version = np.lib.format.read_magic(f)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = reader(f)
        if fortran or dtype.hasobject:
            raise ValueError("Fortran-ordered or object arrays are not shard data")
        n = int(np.prod(shape, dtype=np.int64))
        if len(data) - f.tell() != n * dtype.itemsize:
            raise ValueError(f"body is {len(data) - f.tell()} bytes, header promises {n * dtype.itemsize}")
        arr = np.frombuffer(data, dtype=dtype, count=n, offset=f.tell()).reshape(shape)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt shard
        raise UserError(f"corrupt shard {storage.redact(url)}: {type(exc).__name__}: {exc} (re-shard the dataset)") from None
    check_array(arr, url, expect_dtype, expect_shape, count)
    return arr


def check_array(arr: np.ndarray, url: str, expect_dtype, expect_shape: tuple, count: int) -> None:
    if arr.dtype != np.dtype(expect_dtype) or tuple(arr.shape[1:]) != tuple(expect_shape) or arr.shape[0] != count:
        raise UserError(
            f"shard {storage.redact(url)} holds {arr.dtype} {tuple(arr.shape)}, manifest says "
            f"{np.dtype(expect_dtype)} ({count}, {', '.join(map(str, expect_shape))}) (re-shard the dataset)"
        )
