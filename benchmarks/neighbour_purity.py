"""How clean the neighbour term's neighbours are (issue 26): of each training digit's k nearest training digits,
the share with its own label, searched as aae-dist searches them (aae_dist.training.neighbours) on the raw pixels
and on the deskewed images, overall and per digit.  The halves are those of benchmarks/imsat_reference.py.

    python benchmarks/neighbour_purity.py --half 0 [--k 1 3 5 10]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from aae_dist.training.neighbours import deskewed, fingerprint, neighbour_positions
from imsat_reference import halves


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--half", type=int, default=0)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 3, 5, 10])
    args = ap.parse_args()
    x, y, _, _ = halves(args.half)
    images = torch.from_numpy(x).view(-1, 1, 28, 28)
    labels = y[np.argsort(fingerprint(images).numpy(), kind="stable")]  # the table's rows are in fingerprint order
    print(f"[purity] half {args.half}: {len(x)} training digits; share of each digit's k nearest with its label")
    for name, space in (("pixels", None), ("deskewed", deskewed)):
        keys, positions, pick = neighbour_positions(lambda: iter([images]), len(images), max(args.k), seed=0, space=space)
        near = y[pick][positions]  # the reference is every digit, in stored order
        overall = "  ".join(f"k={k}: {np.mean(near[:, :k] == labels[:, None]):.1%}" for k in args.k)
        k5 = min(5, max(args.k))
        digits = " ".join(f"{d}:{np.mean(near[labels == d, :k5] == d):.0%}" for d in range(10))
        print(f"[purity] {name:9s} {overall}   per digit (k={k5}): {digits}")


if __name__ == "__main__":
    main()
