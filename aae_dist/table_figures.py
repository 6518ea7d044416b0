"""Per-column pictures of a synthetic table: real beside synthetic, a histogram for a continuous column and
bars for a categorical one (null its own bar), the column's shape score in the title.  Drawn with
matplotlib (Agg); shown in TensorBoard at the end of a table run and written by `eval --plots`."""

from __future__ import annotations

import numpy as np

PANELS = 16  # columns per figure (4 x 4 panels): a wide table gets several figures
BARS = 20  # categories shown per categorical column (the most frequent)


def column_figures(real, synth, columns: list[dict], caption: str | None = None) -> dict:
    """name -> Figure: "columns" (or "columns_1", "columns_2", ... for more than PANELS columns)."""
    from .plots import _caption, _plt
    from .tabular_report import column_shapes

    plt = _plt()
    scores = column_shapes(real, synth, columns)
    groups = [columns[i : i + PANELS] for i in range(0, len(columns), PANELS)]
    figs = {}
    for g, group in enumerate(groups):
        cols = min(4, len(group))
        rows = (len(group) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows + 0.6), squeeze=False)
        for ax, spec in zip(axes.flat, group):
            (_continuous if spec["kind"] == "continuous" else _categorical)(ax, real, synth, spec)
            ax.set_title(f"{spec['name'][:28]} ({scores[spec['name']]:.2f})", fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(group):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        _caption(fig, caption)
        fig.tight_layout()
        figs["columns" if len(groups) == 1 else f"columns_{g + 1}"] = fig
    return figs


def _values(table, name: str) -> np.ndarray:
    return table.column(name).drop_null().to_numpy(zero_copy_only=False).astype(np.float64)


def _continuous(ax, real, synth, spec: dict) -> None:
    r, s = _values(real, spec["name"]), _values(synth, spec["name"])
    both = np.concatenate([r, s]) if len(r) + len(s) else np.zeros(1)
    edges = np.histogram_bin_edges(both, bins=30)
    ax.hist(r, bins=edges, density=True, alpha=0.5, label="real")
    ax.hist(s, bins=edges, density=True, alpha=0.5, label="synthetic")


def _categorical(ax, real, synth, spec: dict) -> None:
    def freq(table):
        values = ["null" if v is None else str(v) for v in table.column(spec["name"]).to_pylist()]
        keys, counts = np.unique(values, return_counts=True) if values else (np.array([]), np.array([]))
        return dict(zip(keys.tolist(), (counts / max(1, len(values))).tolist()))

    fr, fs = freq(real), freq(synth)
    names = sorted(set(fr) | set(fs), key=lambda k: -fr.get(k, 0.0))[:BARS]
    at = np.arange(len(names))
    ax.bar(at - 0.2, [fr.get(k, 0.0) for k in names], 0.4, label="real")
    ax.bar(at + 0.2, [fs.get(k, 0.0) for k in names], 0.4, label="synthetic")
    ax.set_xticks(at, [k[:10] for k in names], rotation=45 if len(names) > 4 else 0)
