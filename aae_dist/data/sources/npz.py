"""`npz:URL`: arrays x (N, ...) and optional y (N,), x_test / y_test; without x_test a seeded holdout.

(N, D) arrays are vectors: stored as (N, 1, D) as before, marked `features: vector` in the manifest, which
also keeps per-feature statistics of them; (N, H, W) and (N, C, H, W) are images."""

from __future__ import annotations

import math

from ...errors import UserError
from .base import Opened, Source, holdout_indices, indexed_chunks


def _read(url: str) -> dict:
    import io

    import numpy as np

    from ... import storage

    try:
        with np.load(io.BytesIO(storage.read_bytes(url)), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - anything unparsable
        raise UserError(f"cannot read npz {storage.redact(url)}: {type(exc).__name__}: {exc}") from None


def open_npz(url: str, opts: dict) -> Opened:
    from ... import storage

    arrays = _read(url)
    if "x" not in arrays:
        raise UserError(f"npz {storage.redact(url)} has no array 'x' (it has: {', '.join(arrays)}): save samples as x and labels as y")
    vector = arrays["x"].ndim == 2
    x = _npz_samples(arrays["x"], "x", url)
    y = _npz_labels(arrays.get("y"), "y", len(x), url)
    if "x_test" in arrays:
        xt = _npz_test_samples(arrays["x_test"], x, url)
        splits = {"train": (x, y), "test": (xt, _npz_labels(arrays.get("y_test"), "y_test", len(xt), url))}
        parts = {k: range(len(v[0])) for k, v in splits.items()}
    else:
        splits = {"train": (x, y), "test": (x, y)}
        parts = holdout_indices(len(x), opts["test_fraction"])
    labels = all(v[1] is not None for k, v in splits.items() if k in parts)

    def chunks(split):
        xs, ys = splits[split]
        return indexed_chunks(lambda i: (xs[i], ys[i] if labels else None), parts[split])

    return Opened(name=f"npz:{storage.redact(url)}", dtype=x.dtype, shape=x.shape[1:], counts={k: len(v) for k, v in parts.items()},
                  chunks=chunks, num_classes=0 if y is None or not labels else int(y.max()) + 1, labels=labels,
                  features="vector" if vector else "image")


def _npz_samples(x, key: str, url: str):
    """Samples as (N, C, ...): (N, D) becomes (N, 1, D) and (N, H, W) becomes (N, 1, H, W), as shards always had."""
    from ... import storage

    if x.ndim < 2:
        raise UserError(f"npz {storage.redact(url)}: '{key}' is {x.ndim}-D {x.shape}: save one sample per row, shape (N, features...)")
    if x.dtype.kind not in "biuf":
        raise UserError(f"npz {storage.redact(url)}: '{key}' holds {x.dtype}: save numbers (uint8, int or float)")
    if len(x) == 0:
        raise UserError(f"npz {storage.redact(url)}: '{key}' holds no samples: save the data as x")
    if x.ndim == 2:
        return x[:, None, :]
    return x[:, None] if x.ndim == 3 else x


def _npz_test_samples(xt, x, url: str):
    """x_test in x's sample shape (the same values per sample may come flattened, e.g. (M, 784) beside (N, 28, 28))."""
    from ... import storage

    per_sample = math.prod(x.shape[1:])
    if xt.ndim < 1 or xt.size != len(xt) * per_sample:
        raise UserError(f"npz {storage.redact(url)}: 'x_test' {xt.shape} does not hold samples of {per_sample} values like 'x' "
                        f"{x.shape[1:]}: save both with one sample shape")
    if xt.dtype.kind not in "biuf":
        raise UserError(f"npz {storage.redact(url)}: 'x_test' holds {xt.dtype}: save numbers (uint8, int or float)")
    if xt.dtype != x.dtype:
        raise UserError(f"split 'test' has samples {xt.dtype} {x.shape[1:]}, others {x.dtype} {x.shape[1:]}")
    return xt.reshape((len(xt),) + x.shape[1:])


def _npz_labels(y, key: str, n: int, url: str):
    import numpy as np

    from ... import storage

    if y is None:
        return None
    if y.ndim != 1 or len(y) != n or y.dtype.kind not in "biuf":
        raise UserError(f"npz {storage.redact(url)}: '{key}' is {y.dtype} {y.shape}, expected {n} labels (shape ({n},), whole numbers)")
    if n and y.min() < 0:
        raise UserError(f"npz {storage.redact(url)}: '{key}' holds negative labels: number the classes from 0")
    return y.astype(np.int64)


SOURCE = Source(scheme="npz", usage="npz:URL", open=open_npz)
