"""`mnist-idx:DIR`: the four IDX files of MNIST (gz or not); also Fashion-MNIST and KMNIST."""

from __future__ import annotations

import math

from ...errors import UserError
from .base import CHUNK_SAMPLES, Opened, Source

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(folder: str, base: str) -> tuple[str, bytes]:
    import gzip

    from ... import storage

    names = set(storage.listdir(folder))
    for cand in (base, base + ".gz", base.replace("-idx", ".idx"), base.replace("-idx", ".idx") + ".gz"):
        if cand in names:
            url = storage.join(folder, cand)
            data = storage.read_bytes(url)
            if data[:2] == b"\x1f\x8b":
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError) as exc:
                    raise UserError(f"IDX file {storage.redact(url)} is not valid gzip: {exc}") from None
            return url, data
    raise UserError(f"IDX file {base}[.gz] not found in {storage.redact(folder)}: the folder needs the four standard MNIST files")


def parse_idx(data: bytes, url: str, ndim: int):
    """Parse an IDX (unsigned byte) file: magic 0x0000 08 NN, then NN big-endian int32 sizes."""
    import numpy as np

    from ... import storage

    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != ndim:
        raise UserError(f"IDX file {storage.redact(url)} has wrong magic number {data[:4].hex()} (expected 000008{ndim:02x}): not an MNIST-format file")
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"IDX file {storage.redact(url)} ends inside its header: the file is truncated or corrupt")
    dims = [int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4)]
    expected = math.prod(dims) if min(dims) >= 0 else -1  # Python ints: no overflow on a crafted header
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise UserError(f"IDX file {storage.redact(url)} holds {len(body)} bytes of data, its header promises {expected}: the file is truncated or corrupt")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _split(folder: str, img_name: str, lbl_name: str):
    from ... import storage

    img_url, img = _find_idx(folder, img_name)
    lbl_url, lbl = _find_idx(folder, lbl_name)
    x, y = parse_idx(img, img_url, 3), parse_idx(lbl, lbl_url, 1)
    if len(x) != len(y):
        raise UserError(f"IDX count mismatch in {storage.redact(folder)}: {img_name} has {len(x)} images, {lbl_name} has {len(y)} labels")
    if len(x) == 0:
        raise UserError(f"IDX file {storage.redact(img_url)} holds 0 samples: replace it with the full MNIST file")
    return x, y


def open_mnist_idx(folder: str, opts: dict) -> Opened:
    """Both splits are parsed (and so checked) before anything is written; chunks are views of the files."""
    import numpy as np

    from ... import storage

    splits = {split: _split(folder, *names) for split, names in IDX_FILES.items()}
    num_classes = int(max(int(y.max()) for _, y in splits.values())) + 1

    def chunks(split):
        x, y = splits[split]
        for i in range(0, len(x), CHUNK_SAMPLES):
            yield x[i : i + CHUNK_SAMPLES, None], y[i : i + CHUNK_SAMPLES].astype(np.int64)

    x, xt = splits["train"][0], splits["test"][0]
    if xt.shape[1:] != x.shape[1:]:
        raise UserError(f"split 'test' has samples uint8 {(1, *xt.shape[1:])}, others uint8 {(1, *x.shape[1:])}")
    return Opened(name=f"mnist-idx:{storage.redact(folder)}", dtype=x.dtype, shape=(1, *x.shape[1:]),
                  counts={k: len(v[0]) for k, v in splits.items()}, chunks=chunks, num_classes=num_classes, labels=True)


SOURCE = Source(scheme="mnist-idx", usage="mnist-idx:DIR", open=open_mnist_idx)
