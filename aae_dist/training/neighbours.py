"""Nearest training samples, computed once per dataset and stored in the run folder (plain arrays, no
pickle), so a resumed run reuses them: each sample's distance to its k-th nearest training sample (the
adaptive VAT radius, `vat_radius.npz`) and the positions of its k nearest (the neighbour term,
`neighbours.npz`).  The data stream yields no sample index, so samples are found again by a fingerprint of
their (normalised) values: an exact integer hash of the float bits, the same on every device and batch."""

from __future__ import annotations

import io

import numpy as np
import torch

from .. import storage
from ..errors import UserError
from ..models.deskew import deskewed  # noqa: F401  (neighbours_space=deskewed)

FILE = "vat_radius.npz"
NEIGHBOUR_FILE = "neighbours.npz"
EXACT_LIMIT = 20_000  # up to this many samples the search is exact; above, neighbours come from a sample of this size


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """One int64 per sample: the float32 bits times fixed odd weights, summed with wrap-around (exact, order-free)."""
    bits = x.detach().float().flatten(1).contiguous().view(torch.int32).long()
    g = torch.Generator().manual_seed(20170226)
    w = (torch.randint(1, 2**62, (bits.shape[1],), generator=g) | 1).to(x.device)
    return (bits * w).sum(1)


def nearest(chunk: torch.Tensor, reference: torch.Tensor, k: int, self_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(distances, positions) of the k nearest rows of reference to each row of chunk, nearest first;
    self_index[i] (or -1) is row i's own position in reference, left out of its search."""
    sq = ((chunk**2).sum(1, keepdim=True) + (reference**2).sum(1)[None] - 2 * chunk @ reference.T).clamp_min(0)
    if self_index is not None:
        own = self_index >= 0
        sq[own.nonzero().squeeze(1), self_index[own]] = float("inf")
    values, positions = sq.topk(k, dim=1, largest=False)
    return values.sqrt(), positions


def kth_distances(chunk: torch.Tensor, reference: torch.Tensor, k: int, self_index: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distance of each row of chunk to its k-th nearest row of reference (self_index: as nearest)."""
    return nearest(chunk, reference, k, self_index)[0][:, -1]


def reference_rows(n: int, seed: int, limit: int = EXACT_LIMIT) -> np.ndarray:
    """Which of the n training samples the search compares against: all of them up to `limit`, else a
    seeded random `limit` of them (sorted), so the cost is n x limit, not n^2."""
    return np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _search(batches, n: int, k: int, pick: np.ndarray, chunk: int, space=None, keep_order: bool = False):
    """(sorted fingerprints, distances (n, k), positions in the reference (n, k)) of every sample's k nearest
    reference samples, itself left out; batches() yields the n samples in the same order each call.  space:
    what the distances are measured on (a function of a batch; None: the samples themselves); the fingerprints
    are always of the samples as they are.  keep_order: all three in the samples' order instead, unsorted."""
    space = space or (lambda x: x)
    where = np.full(n, -1, dtype=np.int64)
    where[pick] = np.arange(len(pick))
    reference, seen = [], 0
    for x in batches():
        rows = np.arange(seen, seen + len(x))
        keep = where[rows] >= 0
        reference.append(space(x).flatten(1).double()[torch.from_numpy(keep)])
        seen += len(x)
    reference = torch.cat(reference)
    if len(reference) <= k:
        return None
    keys, dist, pos, seen = [], [], [], 0
    for x in batches():
        flat = space(x).flatten(1).double()
        for i in range(0, len(flat), chunk):
            rows = np.arange(seen + i, seen + i + len(flat[i : i + chunk]))
            d, p = nearest(flat[i : i + chunk], reference, k, torch.from_numpy(where[rows]))
            dist.append(d)
            pos.append(p)
        keys.append(fingerprint(x))
        seen += len(x)
    keys, dist, pos = torch.cat(keys).numpy(), torch.cat(dist).numpy(), torch.cat(pos).numpy()
    if keep_order:
        return keys, dist, pos
    order = np.argsort(keys, kind="stable")
    return keys[order], dist[order], pos[order]


def compute(batches, n: int, k: int, seed: int, limit: int = EXACT_LIMIT, chunk: int = 1000) -> tuple[np.ndarray, np.ndarray, dict]:
    """(fingerprints, radii, facts) for the n samples `batches()` yields (a fresh iterator per call, same
    order each time).  n <= limit: exact, against every other sample.  Above: against a seeded random
    reference of `limit` samples with k scaled by limit / n (the k-th neighbour among n is about the
    (k limit / n)-th among a uniform sample of limit)."""
    pick = reference_rows(n, seed, limit)
    exact = len(pick) == n
    k_used = k if exact else max(1, round(k * limit / n))
    found = _search(batches, n, k_used, pick, chunk)
    if found is None:
        raise UserError(f"phases.reconstruction.vat_neighbours={k} needs more than {k_used} training samples, the data has {n}: lower it")
    keys, dist, _ = found
    return keys, dist[:, -1].astype(np.float32), {"exact": exact, "k": k, "k_used": k_used, "reference": len(pick), "samples": n}


def neighbour_positions(batches, n: int, k: int, seed: int, limit: int = EXACT_LIMIT, chunk: int = 1000,
                        space=None, mutual: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted fingerprints, positions (n, k) of each sample's k nearest in the reference, the reference's
    rows among the n): exact up to `limit` samples; above, the k nearest within a seeded sample of `limit`.
    space: what the distances are measured on (e.g. `deskewed`; None: the samples as they are).  mutual: each
    row keeps only its mutual neighbours (`mutual_only`)."""
    pick = reference_rows(n, seed, limit)
    found = _search(batches, n, k, pick, chunk, space, keep_order=mutual)
    if found is None:
        raise UserError(f"phases.reconstruction.neighbours_k={k} needs more than {k} training samples, the data has {n}: lower it")
    keys, dist, pos = found
    if mutual:
        pos = mutual_only(dist, pos, pick)
        order = np.argsort(keys, kind="stable")
        keys, pos = keys[order], pos[order]
    return keys, pos.astype(np.int64), pick


def mutual_only(dist: np.ndarray, pos: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """Rows in the samples' own order.  Keeps p among row i's k nearest only where i would be among p's k nearest
    too (i's distance to p within p's own k-th neighbour distance: for a sample in the reference, exactly "p lists
    i"); the kept positions, nearest first, repeat to fill the k columns, so a draw among the k columns is a draw
    among them; a row with none keeps its nearest.  On digits 5-NN pairs share the label 92% of the time, mutual
    ones 97%."""
    kth_of_reference = dist[pick, -1]  # each reference sample's distance to its own k-th nearest (itself left out)
    keep = dist <= kth_of_reference[pos] * (1 + 1e-9)
    keep[keep.sum(1) == 0, 0] = True  # none: the nearest
    first = np.argsort(~keep, axis=1, kind="stable")  # kept columns first, nearest first
    count = keep.sum(1, keepdims=True)
    return np.take_along_axis(pos, np.take_along_axis(first, np.arange(pos.shape[1])[None] % count, 1), 1)


class RadiusTable:
    """radius(x): each sample's stored neighbour distance; a sample not in the table (never, for training
    batches) gets the median."""

    def __init__(self, keys: np.ndarray, radii: np.ndarray, device):
        self.keys = torch.from_numpy(np.ascontiguousarray(keys)).to(device)
        self.radii = torch.from_numpy(np.ascontiguousarray(radii)).to(device)
        self.median = self.radii.median()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = fingerprint(x)
        pos = torch.searchsorted(self.keys, f).clamp_max(len(self.keys) - 1)
        return torch.where(self.keys[pos] == f, self.radii[pos], self.median)


def to_bytes(keys: np.ndarray, radii: np.ndarray, facts: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, keys=keys, radii=radii, **{f"fact_{k}": np.asarray(v) for k, v in facts.items()})
    return buf.getvalue()


def from_bytes(data: bytes, url: str) -> tuple[np.ndarray, np.ndarray]:
    """The stored table, checked: int64 keys sorted, finite non-negative radii of the same length."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            keys, radii = f["keys"], f["radii"]
    except (ValueError, KeyError, OSError) as exc:
        raise UserError(f"{storage.redact(url)} is not a VAT radius table ({exc}): delete it and resume (it is recomputed)") from None
    ok = (keys.dtype == np.int64 and radii.dtype == np.float32 and keys.shape == radii.shape and keys.ndim == 1 and len(keys)
          and np.all(np.diff(keys) >= 0) and np.isfinite(radii).all() and (radii >= 0).all())
    if not ok:
        raise UserError(f"{storage.redact(url)} is not a valid VAT radius table: delete it and resume (it is recomputed)")
    return keys, radii


class NeighbourTable:
    """neighbour(x, generator): for each sample, one of its k nearest training samples drawn at random (the
    reference images live on the device); a sample not in the table (never, for training batches) is its own."""

    def __init__(self, keys: np.ndarray, positions: np.ndarray, reference: torch.Tensor, device):
        self.keys = torch.from_numpy(np.ascontiguousarray(keys)).to(device)
        self.positions = torch.from_numpy(np.ascontiguousarray(positions)).to(device)
        self.reference = reference.to(device)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        f = fingerprint(x)
        pos = torch.searchsorted(self.keys, f).clamp_max(len(self.keys) - 1)
        column = torch.randint(0, self.positions.shape[1], (len(x),), device=x.device, generator=generator)
        found = self.reference[self.positions[pos, column]].to(x.dtype)
        hit = (self.keys[pos] == f).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(hit, found, x)


def neighbours_to_bytes(keys: np.ndarray, positions: np.ndarray, pick: np.ndarray, mutual: bool = False) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, keys=keys, positions=positions, pick=pick, mutual=np.asarray(mutual))
    return buf.getvalue()


def check_settings(positions: np.ndarray, mutual: bool, k: int, want_mutual: bool, url: str) -> None:
    """A stored table serves a resumed run only with the settings it was searched with (else the run would quietly
    draw from other neighbours than its config says)."""
    if positions.shape[1] != k or mutual != want_mutual:
        raise UserError(f"{storage.redact(url)} was searched with phases.reconstruction.neighbours_k={positions.shape[1]}, "
                        f"neighbours_mutual={str(mutual).lower()}; the config asks for {k}, {str(want_mutual).lower()}: resume with "
                        "the settings it was searched with, or delete the file to search again")


def neighbours_from_bytes(data: bytes, url: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """The stored neighbour table, checked against the n training samples it must describe, and whether it keeps
    mutual neighbours only (a table written before that setting existed does not)."""
    def bad(why: str):
        return UserError(f"{storage.redact(url)} is not a valid neighbour table ({why}): delete it and resume (it is recomputed)")

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            keys, positions, pick = f["keys"], f["positions"], f["pick"]
            mutual = f["mutual"] if "mutual" in f.files else np.asarray(False)
    except (ValueError, KeyError, OSError) as exc:
        raise bad(str(exc)) from None
    if mutual.dtype != np.bool_ or mutual.shape != ():
        raise bad("its mutual flag is not one boolean")
    ok = (keys.dtype == np.int64 and positions.dtype == np.int64 and pick.dtype == np.int64 and keys.ndim == 1
          and positions.ndim == 2 and len(keys) == len(positions) == n and pick.ndim == 1 and len(pick)
          and np.all(np.diff(keys) >= 0) and np.all(np.diff(pick) > 0) and pick[0] >= 0 and pick[-1] < n
          and positions.min(initial=0) >= 0 and positions.max(initial=0) < len(pick))
    if not ok:
        raise bad(f"not {n} sorted keys with positions into a sorted reference")
    return keys, positions, pick, bool(mutual)
