"""The row model's output side: the decoder's flat output read as one head per column (a value and a mode
for a continuous column, a softmax for a categorical one, a logit for a null indicator), the reconstruction
loss as the sum of the per-column losses, and generated rows turned back into a pyarrow table.

The decoder's output has the encoded row's width (data/tables.py lays both out the same way), so the MLP
networks need no change: only how their output is read."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

VALUE_SIGMA = 0.1  # the scalar's loss is (x - tanh(out))^2 / (2 sigma^2), as TVAE's at its initial sigma


@dataclass
class Head:
    spec: dict
    start: int  # first value of this column in the row
    body: int  # values before the null indicator (1 + modes, or categories)
    nullable: bool

    @property
    def kind(self) -> str:
        return self.spec["kind"]


class RowLayout:
    def __init__(self, table: dict):
        self.table, self.heads, at = table, [], 0
        for c in table["columns"]:
            body = 1 + len(c["means"]) if c["kind"] == "continuous" else len(c["categories"])
            self.heads.append(Head(c, at, body, bool(c["nullable"])))
            at += body + (1 if c["nullable"] else 0)
        self.width = at

    def output_bias(self) -> torch.Tensor:
        """The decoder's output bias that starts every column at its real marginal: null logits at the log-odds of the
        null rate, category logits at log frequencies, mode logits at log mode weights, scalars at 0.  With a zero bias
        an untrained null indicator says 50%, and a short run generated ~40% nulls for a column with 15%."""
        bias = torch.zeros(self.width)
        for h in self.heads:
            if h.kind == "categorical" and h.spec.get("frequencies"):
                bias[h.start : h.start + h.body] = torch.log(torch.tensor(h.spec["frequencies"], dtype=torch.float32).clamp_min(1e-6))
            elif h.kind == "continuous" and h.body > 2:
                bias[h.start + 1 : h.start + h.body] = torch.log(torch.tensor(h.spec["weights"], dtype=torch.float32).clamp_min(1e-6))
            if h.nullable:
                r = min(max(float(h.spec["null_rate"]), 1e-4), 1 - 1e-4)
                bias[h.start + h.body] = math.log(r / (1 - r))
        return bias

    def loss(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Sum over columns of each column's loss, mean over rows; a null row's value and mode are not scored."""
        out, x = out.float().flatten(1), x.float().flatten(1)
        total = out.new_zeros(())
        for h in self.heads:
            o, t = out[:, h.start : h.start + h.body], x[:, h.start : h.start + h.body]
            present = 1.0 - x[:, h.start + h.body] if h.nullable else torch.ones_like(x[:, 0])
            if h.kind == "continuous":
                value = (t[:, 0] - torch.tanh(o[:, 0])) ** 2 / (2 * VALUE_SIGMA**2)
                part = value + F.cross_entropy(o[:, 1:], t[:, 1:].argmax(1), reduction="none") if h.body > 2 else value
            else:
                part = F.cross_entropy(o, t.argmax(1), reduction="none")
            total = total + (part * present).mean()
            if h.nullable:
                total = total + F.binary_cross_entropy_with_logits(out[:, h.start + h.body], x[:, h.start + h.body])
        return total

    def to_encoded(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's output in the encoded row's space (tanh scalars, softmax modes and categories, null probabilities)."""
        flat = out.flatten(1).float()
        parts = []
        for h in self.heads:
            o = flat[:, h.start : h.start + h.body]
            parts.append(torch.cat([torch.tanh(o[:, :1]), torch.softmax(o[:, 1:], 1)], 1) if h.kind == "continuous" and h.body > 1
                         else torch.softmax(o, 1) if h.kind == "categorical" else torch.tanh(o))
            if h.nullable:
                parts.append(torch.sigmoid(flat[:, h.start + h.body : h.start + h.body + 1]))
        return torch.cat(parts, 1).view(out.shape)

    def decode_table(self, encoded: np.ndarray, rng: np.random.Generator, labels: np.ndarray | None = None):
        """Rows in the source's columns, order and types: categories and nulls drawn from their probabilities (so they come
        back at their rate), a continuous value from its most likely mode. `labels` fixes the target column."""
        import pyarrow as pa

        enc = encoded.reshape(len(encoded), -1)
        arrays, names = [], []
        for h in self.heads:
            body = enc[:, h.start : h.start + h.body]
            null = rng.random(len(enc)) < enc[:, h.start + h.body] if h.nullable else np.zeros(len(enc), bool)
            if h.kind == "categorical":
                idx = _draw(body, rng)
                if labels is not None and h.spec["name"] == self.table.get("target"):
                    idx, null = labels, np.zeros(len(enc), bool)
                arrays.append(_category_array(h.spec, idx, null))
            else:
                arrays.append(_value_array(h.spec, body, null))
            names.append(h.spec["name"])
        return pa.table(arrays, names=names)


def _draw(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    p = np.clip(p, 0, None) + 1e-12
    return ((p / p.sum(1, keepdims=True)).cumsum(1) > rng.random((len(p), 1))).argmax(1)


def _category_array(spec: dict, idx: np.ndarray, null: np.ndarray):
    import pyarrow as pa

    cats = spec["categories"]
    values = [None if n else cats[i] for i, n in zip(idx, null)]
    return pa.array(values).cast(pa.type_for_alias(spec["dtype"])) if spec["dtype"] != "null" else pa.array(values)


def _value_array(spec: dict, body: np.ndarray, null: np.ndarray):
    import pyarrow as pa

    means, stds = np.asarray(spec["means"]), np.asarray(spec["stds"])
    mode = body[:, 1:].argmax(1) if body.shape[1] > 1 else np.zeros(len(body), np.int64)
    v = np.clip(body[:, 0], -1, 1) * 4 * stds[mode] + means[mode]
    v = np.clip(v, spec["min"], spec["max"])
    if spec.get("integer"):
        v = np.rint(v)
    return pa.array(v, mask=null).cast(pa.type_for_alias(spec["dtype"]))
