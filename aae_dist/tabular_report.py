"""The report a data owner reads on a synthetic table: quality (SDMetrics' single-table QualityReport, written
out here so no extra package is needed, and identical to it: tests/test_tables_report.py checks both against
hand-computed figures and against QualityReport itself), machine-learning efficacy and privacy.

Quality as SDMetrics 0.32.0 computes it (sdmetrics/reports/single_table/_properties/*.py):
- Column Shapes: the mean over columns of KSComplement (1 - Kolmogorov-Smirnov statistic; nulls dropped, values
  rounded to 14 decimals) for continuous columns and TVComplement (1 - total variation distance of the category
  frequencies; nulls dropped; a synthetic-only category counts 1e-6 real rows) for categorical ones.
- Column Pair Trends: over every pair of columns, CorrelationSimilarity (1 - |Pearson_real - Pearson_synth| / 2,
  rows where either value is null dropped) for two continuous columns, ContingencySimilarity (1 - total variation
  distance of the joint frequencies, null a value) otherwise.  In a continuous x categorical pair the continuous
  column is cut into 10 bins on ITS OWN table's range (the real rows on the real range, the synthetic rows on the
  synthetic range; np.digitize on all 11 edges, so the maximum and a null share the top code).  A pair counts only
  where the real data links the two columns: |Pearson_real| > 0.5, or Cramer's V of the real contingency table
  > 0.3 (QualityReport's default thresholds); pairs that cannot be scored (a constant column, < 2 rows) are left
  out too.  The property is the mean over the pairs that count.
- The overall score is the mean of the two properties.  Where no pair counts SDMetrics' pair property is NaN and
  its overall the shapes score; here `column_pair_trends` then reads as the shapes score (the overall is the
  same) and `pairs_scored` is 0.  Above 50,000 rows SDMetrics scores contingency on a random 50,000-row sample
  (unseeded); here the sample is seeded, so only tables up to 50,000 rows give figure-for-figure the same."""

from __future__ import annotations

import itertools
import sys
import warnings
from collections import Counter

import numpy as np

BINS = 10
CORRELATION_THRESHOLD = 0.5  # QualityReport's real_correlation_threshold
ASSOCIATION_THRESHOLD = 0.3  # QualityReport's real_association_threshold (Cramer's V)
SUBSAMPLE = 50_000  # QualityReport's num_rows_subsample for contingency
KS_DECIMALS = sys.float_info.dig - 1  # SDMetrics' KSComplement rounds to this many decimals
PRIVACY_ROWS = 2000  # rows compared for the distance to the closest record
NULL_CODE = -1  # a categorical null's code (categories are 0.., values outside them after)


def _arrays(table, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """(values, null mask): floats for continuous columns, category codes for categorical ones."""
    col = table.column(spec["name"])
    null = np.asarray(col.is_null())
    if spec["kind"] == "continuous":
        return col.fill_null(0).to_numpy().astype(np.float64), null
    lookup = {v: i for i, v in enumerate(spec["categories"])}
    return np.array([lookup.get(v, -1) for v in col.to_pylist()], np.int64), null


def _quality_values(table, spec: dict, lookup: dict) -> np.ndarray:
    """A column as the quality metrics read it: floats with NaN for nulls (continuous), or codes with NULL_CODE for
    nulls (categorical; `lookup` grows a code for each value outside the categories, shared by real and synthetic)."""
    import pyarrow as pa

    col = table.column(spec["name"])
    if spec["kind"] == "continuous":
        return col.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    return np.array([NULL_CODE if v is None else lookup.setdefault(v, len(lookup)) for v in col.to_pylist()], np.int64)


def ks_complement(r: np.ndarray, s: np.ndarray) -> float:
    """1 - KS statistic of the non-null values; NaN when either side has none (SDMetrics' KSComplement)."""
    from scipy.stats import ks_2samp

    r, s = r[~np.isnan(r)].round(KS_DECIMALS), s[~np.isnan(s)].round(KS_DECIMALS)
    if not len(r) or not len(s):
        return float("nan")
    return float(1.0 - ks_2samp(r, s).statistic)


def tv_complement(r: np.ndarray, s: np.ndarray) -> float:
    """1 - total variation distance of the non-null codes' frequencies (SDMetrics' TVComplement and get_frequencies:
    a code only the synthetic rows have counts 1e-6 real rows); NaN when either side has no non-null value."""
    real, synth = Counter(r[r != NULL_CODE].tolist()), Counter(s[s != NULL_CODE].tolist())
    if not real or not synth:
        return float("nan")
    for v in synth:
        if v not in real:
            real[v] += 1e-6
    nr, ns = sum(real.values()), sum(synth.values())
    return float(1.0 - 0.5 * sum(abs(synth[v] / ns - real[v] / nr) for v in real))


def _prepared(real, synth, columns: list[dict]) -> dict:
    out = {}
    for c in columns:
        lookup = {v: i for i, v in enumerate(c.get("categories") or [])}
        out[c["name"]] = (_quality_values(real, c, lookup), _quality_values(synth, c, lookup))
    return out


def column_shapes(real, synth, columns: list[dict], data: dict | None = None) -> dict:
    """name -> KS or TV complement (NaN where a column has no non-null value on a side)."""
    data = data or _prepared(real, synth, columns)
    return {c["name"]: (ks_complement if c["kind"] == "continuous" else tv_complement)(*data[c["name"]]) for c in columns}


def _bins(values: np.ndarray) -> np.ndarray:
    """A continuous column's contingency codes on its own table's 10 equal bins (ColumnPairTrends._discretize_column)."""
    return np.digitize(values, np.histogram_bin_edges(values[~np.isnan(values)], bins=BINS))


def correlation_similarity(ra, rb, sa, sb) -> float | None:
    """1 - |Pearson_real - Pearson_synth| / 2, or None where the pair does not count (see the module's docstring)."""
    from scipy.stats import pearsonr

    def distinct(v):
        return len(np.unique(v[~np.isnan(v)]))

    if 1 in (distinct(ra), distinct(rb), distinct(sa), distinct(sb)):
        return None  # SDMetrics: ConstantInputError
    rk, sk = ~(np.isnan(ra) | np.isnan(rb)), ~(np.isnan(sa) | np.isnan(sb))
    if rk.sum() < 2 or sk.sum() < 2:
        return None  # pearsonr refuses fewer than 2 rows
    with warnings.catch_warnings():  # a constant column after dropping nulls: NaN, left out below
        warnings.simplefilter("ignore")
        r, s = float(pearsonr(ra[rk], rb[rk])[0]), float(pearsonr(sa[sk], sb[sk])[0])
    if np.isnan(r) or abs(r) <= CORRELATION_THRESHOLD or np.isnan(s):
        return None
    return 1.0 - abs(r - s) / 2.0


def contingency_similarity(real: tuple, synth: tuple) -> float | None:
    """1 - total variation distance of the joint frequencies of two code columns, or None where the real pair's
    Cramer's V is at most the threshold (or the real table has fewer than 2 values on a side)."""
    from scipy.stats.contingency import association

    rk, rc = np.unique(np.stack(real, 1), axis=0, return_counts=True)
    rows, cols = np.unique(rk[:, 0], return_inverse=True), np.unique(rk[:, 1], return_inverse=True)
    table = np.zeros((len(rows[0]), len(cols[0])), np.int64)
    table[rows[1].ravel(), cols[1].ravel()] = rc
    if table.sum() == 0 or min(table.shape) < 2 or association(table, method="cramer") <= ASSOCIATION_THRESHOLD:
        return None
    sk, sc = np.unique(np.stack(synth, 1), axis=0, return_counts=True)
    rp = {tuple(k): v / len(real[0]) for k, v in zip(rk.tolist(), rc)}
    sp = {tuple(k): v / len(synth[0]) for k, v in zip(sk.tolist(), sc)}
    return float(1.0 - 0.5 * sum(abs(rp.get(k, 0.0) - sp.get(k, 0.0)) for k in set(rp) | set(sp)))


def _subsample(cols: tuple, rng: np.random.Generator) -> tuple:
    n = len(cols[0])
    if n <= SUBSAMPLE:
        return cols
    keep = rng.choice(n, SUBSAMPLE, replace=False)
    return tuple(c[keep] for c in cols)


def pair_trends(real, synth, columns: list[dict], data: dict | None = None, seed: int = 0) -> dict:
    """"a | b" -> similarity, for the pairs that count (see the module's docstring)."""
    data = data or _prepared(real, synth, columns)
    binned = {c["name"]: tuple(_bins(v) for v in data[c["name"]]) for c in columns if c["kind"] == "continuous"}
    rng, out = np.random.default_rng(seed), {}
    for a, b in itertools.combinations(columns, 2):
        (ra, sa), (rb, sb) = data[a["name"]], data[b["name"]]
        if a["kind"] == b["kind"] == "continuous":
            score = correlation_similarity(ra, rb, sa, sb)
        else:
            if a["kind"] != b["kind"]:  # the continuous one as contingency codes
                (ra, sa) = binned[a["name"]] if a["kind"] == "continuous" else (ra, sa)
                (rb, sb) = binned[b["name"]] if b["kind"] == "continuous" else (rb, sb)
            big = max(len(ra), len(sa)) > SUBSAMPLE
            r, s = ((_subsample((ra, rb), rng), _subsample((sa, sb), rng)) if big else ((ra, rb), (sa, sb)))
            score = contingency_similarity(r, s)
        if score is not None:
            out[f"{a['name']} | {b['name']}"] = float(score)
    return out


def _mean(scores) -> float | None:
    v = [x for x in scores if not np.isnan(x)]
    return float(np.mean(v)) if v else None


def quality(real, synth, columns: list[dict], seed: int = 0) -> dict:
    data = _prepared(real, synth, columns)
    shapes, pairs = column_shapes(real, synth, columns, data), pair_trends(real, synth, columns, data, seed)
    shape_score = _mean(shapes.values())
    shape_score = 0.0 if shape_score is None else shape_score
    pair_score = _mean(pairs.values())
    pair_score = shape_score if pair_score is None else pair_score  # SDMetrics: NaN, and the overall is the shapes score
    return {"quality_score": (shape_score + pair_score) / 2, "column_shapes": shape_score, "column_pair_trends": pair_score,
            "pairs_scored": len(pairs), "column_shape_scores": shapes, "column_pair_scores": pairs}


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
    report = {"quality": quality(real_train, synth, columns, seed), "privacy": privacy(real_train, synth, holdout, columns, seed),
              "quality_implementation": "aae-dist, identical to SDMetrics 0.32.0 single-table QualityReport"}
    if target and holdout.num_rows:
        report["efficacy"] = efficacy(real_train, synth, holdout, columns, target, seed)
    return report
