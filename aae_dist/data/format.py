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
                    "shards": [{"name": s.name, "count": s.count, "x": arr(s.x), "y": arr(s.y)} for s in sp.shards],
                }
                for name, sp in self.splits.items()
            },
        }
        return json.dumps(doc, indent=1)

    @classmethod
    def from_json(cls, text: str, url: str = "") -> "Manifest":
        where = storage.redact(url)
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT_NAME:
                raise ValueError(f"'format' is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
            if int(doc["version"]) > FORMAT_VERSION:
                raise ValueError(f"format version {doc['version']} is newer than this aae-dist reads ({FORMAT_VERSION})")
            splits = {}
            for name, sp in doc["splits"].items():
                shards = []
                for s in sp["shards"]:
                    shards.append(
                        Shard(
                            name=str(s["name"]),
                            count=int(s["count"]),
                            x=ArrayFile(**s["x"]),
                            y=ArrayFile(**s["y"]) if s.get("y") else None,
                        )
                    )
                for f in (a for s in shards for a in (s.x, s.y) if a is not None):
                    if f.block_hash not in BLOCK_HASHES:
                        raise ValueError(f"{f.file}: block_hash {f.block_hash!r} is not one of {', '.join(BLOCK_HASHES)}")
                if sum(s.count for s in shards) != int(sp["count"]):
                    raise ValueError(f"split '{name}' count {sp['count']} differs from the sum of its shards")
                splits[name] = Split(count=int(sp["count"]), shards=shards)
            np.dtype(doc["dtype"])
            return cls(
                dtype=str(doc["dtype"]),
                shape=[int(d) for d in doc["shape"]],
                labels=bool(doc["labels"]),
                num_classes=int(doc["num_classes"]),
                splits=splits,
                source=str(doc.get("source", "")),
                class_names=doc.get("class_names"),
                version=int(doc["version"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"invalid manifest {where}/{MANIFEST}: {type(exc).__name__}: {exc} (re-shard the dataset)") from None


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
