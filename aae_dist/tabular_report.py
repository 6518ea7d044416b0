"""The report a data owner reads on a synthetic table: quality (SDMetrics' QualityReport scores, computed here
after SDMetrics' definitions so no extra package is needed), machine-learning efficacy and privacy.

Quality, as SDMetrics' single-table QualityReport: Column Shapes is the mean over columns of KSComplement
(1 - the Kolmogorov-Smirnov statistic, nulls left out) for continuous columns and TVComplement
(1 - total variation distance of the category frequencies, null a category) for categorical ones; Column
Pair Trends is the mean over column pairs of CorrelationSimilarity (1 - |Pearson_real - Pearson_synth| / 2)
for two continuous columns and ContingencySimilarity (1 - total variation distance of the joint
frequencies, continuous columns cut into 10 bins on the real data's range) otherwise; the overall score
is the mean of the two.  All three lie in [0, 1], higher is better."""

from __future__ import annotations

import itertools

import numpy as np

BINS = 10
PRIVACY_ROWS = 2000  # rows compared for the distance to the closest record


def _arrays(table, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(values, null mask): floats for continuous columns, category codes for categorical ones."""
    col = table.column(spec["name"])
    null = np.asarray(col.is_null())
    if spec["kind"] == "continuous":
        return col.fill_null(0).to_numpy().astype(np.float64), null
    lookup = {v: i for i, v in enumerate(spec["categories"])}
    return np.array([lookup.get(v, -1) for v in col.to_pylist()], np.int64), null


def ks_complement(r: np.ndarray, s: np.ndarray) -> float:
    from scipy.stats import ks_2samp

    if not len(r) or not len(s):
        return 0.0 if len(r) != len(s) else 1.0
    return float(1.0 - ks_2samp(r, s).statistic)


def tv_complement(r: np.ndarray, s: np.ndarray) -> float:
    keys = np.union1d(r, s)
    fr = np.array([(r == k).mean() for k in keys])
    fs = np.array([(s == k).mean() for k in keys])
    return float(1.0 - 0.5 * np.abs(fr - fs).sum())


def _discrete(values: np.ndarray, null: np.ndarray, spec: dict, edges: np.ndarray | None) -> np.ndarray:
    """Codes for contingency tables: categories as they are, continuous values in the real data's bins; null is -2."""
    codes = np.digitize(values, edges[1:-1]) if edges is not None else values
    return np.where(null, -2, codes)


def column_shapes(real, synth, columns: list[dict]) -> dict:
    out = {}
    for c in columns:
        (rv, rn), (sv, sn) = _arrays(real, c), _arrays(synth, c)
        if c["kind"] == "continuous":
            out[c["name"]] = ks_complement(rv[~rn], sv[~sn])
        else:
            out[c["name"]] = tv_complement(np.where(rn, -2, rv), np.where(sn, -2, sv))
    return out


def pair_trends(real, synth, columns: list[dict]) -> dict:
    data = {c["name"]: (_arrays(real, c), _arrays(synth, c)) for c in columns}
    out = {}
    for a, b in itertools.combinations(columns, 2):
        (ra, rna), (sa, sna) = data[a["name"]]
        (rb, rnb), (sb, snb) = data[b["name"]]
        if a["kind"] == b["kind"] == "continuous":
            out[f"{a['name']} | {b['name']}"] = _correlation_similarity(ra, rb, ~(rna | rnb), sa, sb, ~(sna | snb))
        else:
            ea, eb = _edges(ra[~rna], a), _edges(rb[~rnb], b)
            r = (_discrete(ra, rna, a, ea), _discrete(rb, rnb, b, eb))
            s = (_discrete(sa, sna, a, ea), _discrete(sb, snb, b, eb))
            out[f"{a['name']} | {b['name']}"] = _contingency_similarity(r, s)
    return out


def _edges(values: np.ndarray, spec: dict):
    if spec["kind"] != "continuous":
        return None
    return np.histogram_bin_edges(values if len(values) else np.zeros(1), bins=BINS)


def _correlation_similarity(ra, rb, rk, sa, sb, sk) -> float:
    def corr(x, y):
        if len(x) < 2 or x.std() == 0 or y.std() == 0:
            return 0.0
        return float(np.corrcoef(x, y)[0, 1])

    return float(1.0 - abs(corr(ra[rk], rb[rk]) - corr(sa[sk], sb[sk])) / 2.0)


def _contingency_similarity(r: tuple, s: tuple) -> float:
    rp = {k: v / len(r[0]) for k, v in zip(*np.unique(np.stack(r, 1), axis=0, return_counts=True)) for k in [tuple(k)]}
    sp = {k: v / len(s[0]) for k, v in zip(*np.unique(np.stack(s, 1), axis=0, return_counts=True)) for k in [tuple(k)]}
    return float(1.0 - 0.5 * sum(abs(rp.get(k, 0.0) - sp.get(k, 0.0)) for k in set(rp) | set(sp)))


def quality(real, synth, columns: list[dict]) -> dict:
    shapes, pairs = column_shapes(real, synth, columns), pair_trends(real, synth, columns)
    shape_score = float(np.mean(list(shapes.values())))
    pair_score = float(np.mean(list(pairs.values()))) if pairs else shape_score
    return {"quality_score": (shape_score + pair_score) / 2, "column_shapes": shape_score, "column_pair_trends": pair_score,
            "column_shape_scores": shapes}


# ---- machine-learning efficacy ------------------------------------------------------------------

def features(table, columns: list[dict], target: str) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    xs, cat = [], []
    for c in columns:
        if c["name"] == target:
            continue
        v, null = _arrays(table, c)
        xs.append(np.where(null, np.nan, v.astype(np.float64)))
        cat.append(c["kind"] == "categorical")
    spec = next(c for c in columns if c["name"] == target)
    y, _ = _arrays(table, spec)
    return np.stack(xs, 1) if xs else np.zeros((table.num_rows, 0)), y, cat


def efficacy(real_train, synth, holdout, columns: list[dict], target: str, seed: int = 0) -> dict:
    """Train on synthetic, test on the real holdout, beside train on real: the same HistGradientBoosting classifier."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import accuracy_score, f1_score

    xt, yt, cat = features(holdout, columns, target)
    out = {}
    for name, table in (("train_on_real", real_train), ("train_on_synthetic", synth)):
        x, y, _ = features(table, columns, target)
        if len(np.unique(y)) < 2:
            out[name] = {"accuracy": float(np.mean(yt == (y[0] if len(y) else -1))), "macro_f1": 0.0}
            continue
        clf = HistGradientBoostingClassifier(categorical_features=np.array(cat, bool) if any(cat) else None, random_state=seed)
        clf.fit(np.nan_to_num(x, nan=np.nan), y)
        p = clf.predict(xt)
        out[name] = {"accuracy": float(accuracy_score(yt, p)), "macro_f1": float(f1_score(yt, p, average="macro"))}
    out["accuracy_gap"] = out["train_on_real"]["accuracy"] - out["train_on_synthetic"]["accuracy"]
    return out


# ---- privacy -----------------------------------------------------------------------------------

def _points(table, columns: list[dict], ranges: dict) -> np.ndarray:
    """Rows as points: continuous values scaled to [0, 1] on the training range, categories one-hot, null its own axis."""
    parts = []
    for c in columns:
        v, null = _arrays(table, c)
        if c["kind"] == "continuous":
            lo, hi = ranges[c["name"]]
            parts.append(np.where(null, 0.0, (v - lo) / max(hi - lo, 1e-12))[:, None])
        else:
            parts.append((v[:, None] == np.arange(len(c["categories"]))[None]).astype(np.float64))
        parts.append(null[:, None].astype(np.float64))
    return np.concatenate(parts, 1)


def _rows_set(table) -> set:
    return set(map(tuple, (tuple(_key(v) for v in r.values()) for r in table.to_pylist())))


def _key(v):
    return round(v, 6) if isinstance(v, float) else v


def privacy(train, synth, holdout, columns: list[dict], seed: int = 0) -> dict:
    """Share of synthetic rows identical to a training row (beside the holdout's share) and the median distance to
    the closest training record of synthetic rows (beside the holdout's): a copy shows as a share and a distance of 0."""
    from sklearn.neighbors import NearestNeighbors

    seen = _rows_set(train)
    exact = lambda t: float(np.mean([tuple(_key(v) for v in r.values()) in seen for r in t.to_pylist()])) if t.num_rows else 0.0  # noqa: E731
    ranges = {}
    for c in columns:
        if c["kind"] == "continuous":
            v, null = _arrays(train, c)
            ranges[c["name"]] = (float(v[~null].min()), float(v[~null].max())) if (~null).any() else (0.0, 1.0)
    rng = np.random.default_rng(seed)
    pick = lambda t: t.take(rng.permutation(t.num_rows)[:PRIVACY_ROWS])  # noqa: E731
    nn = NearestNeighbors(n_neighbors=1).fit(_points(pick(train), columns, ranges))
    dcr = lambda t: float(np.median(nn.kneighbors(_points(pick(t), columns, ranges))[0]))  # noqa: E731
    return {"synthetic_identical_to_train": exact(synth), "holdout_identical_to_train": exact(holdout),
            "synthetic_median_dcr": dcr(synth), "holdout_median_dcr": dcr(holdout)}


def table_report(real_train, synth, holdout, table_spec: dict, seed: int = 0) -> dict:
    """Quality, privacy and (with a target and a holdout) efficacy, on one thread: the tables are small and
    OpenMP's threads wait at barriers on a busy host (HistGradientBoosting took 10x longer on two)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _table_report(real_train, synth, holdout, table_spec, seed)


def _table_report(real_train, synth, holdout, table_spec: dict, seed: int = 0) -> dict:
    columns, target = table_spec["columns"], table_spec.get("target")
    report = {"quality": quality(real_train, synth, columns), "privacy": privacy(real_train, synth, holdout, columns, seed),
              "quality_implementation": "aae-dist (SDMetrics QualityReport definitions)"}
    if target and holdout.num_rows:
        report["efficacy"] = efficacy(real_train, synth, holdout, columns, target, seed)
    return report
