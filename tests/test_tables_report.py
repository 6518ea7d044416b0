"""The table report's quality score is SDMetrics' QualityReport written out (aae_dist/tabular_report.py): each
metric against figures worked out by hand on tiny tables, and (where sdmetrics is importable, e.g.
PYTHONPATH=/tmp/sdvdeps) the whole score against QualityReport itself on wine and a perturbed copy."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pytest

from aae_dist.tabular_report import pair_trends, quality

X, Y, C = {"name": "x", "kind": "continuous"}, {"name": "y", "kind": "continuous"}, {"name": "c", "kind": "categorical", "categories": ["a", "b"]}


def test_ks_complement_drops_nulls():
    real, synth = pa.table({"x": [1.0, 2, 3, 4]}), pa.table({"x": [1.0, 2, 3, 5, None]})
    # ECDFs differ most at 4: real 4/4, synthetic 3/4 (the null is not a row)
    assert quality(real, synth, [X])["column_shape_scores"]["x"] == pytest.approx(0.75, abs=1e-12)


def test_tv_complement_drops_nulls_and_counts_a_synthetic_only_category_as_one_millionth():
    real, synth = pa.table({"c": ["a", "a", "b", None]}), pa.table({"c": ["a", "b", "b", "z"]})
    n = 3 + 1e-6  # real non-null rows, plus 1e-6 for "z"
    tv = 0.5 * (abs(0.25 - 2 / n) + abs(0.5 - 1 / n) + abs(0.25 - 1e-6 / n))
    assert quality(real, synth, [C])["column_shape_scores"]["c"] == pytest.approx(1 - tv, abs=1e-12)


def test_correlation_similarity_and_its_threshold():
    real = pa.table({"x": [1.0, 2, 3, 4], "y": [2.0, 4, 6, 8]})  # Pearson 1
    synth = pa.table({"x": [1.0, 2, 3, 4], "y": [1.0, 3, 2, 4]})  # Pearson 4 / 5 = 0.8
    assert pair_trends(real, synth, [X, Y]) == {"x | y": pytest.approx(1 - 0.2 / 2, abs=1e-12)}
    weak = pa.table({"x": [1.0, 2, 3, 4], "y": [3.0, 1, 4, 2]})  # Pearson 0 in the real rows: the pair does not count
    assert pair_trends(weak, synth, [X, Y]) == {}
    assert quality(weak, synth, [X, Y])["pairs_scored"] == 0


def test_contingency_bins_each_table_on_its_own_range_and_a_null_shares_the_top_bin():
    real = pa.table({"x": [0.0, 0, 10, 10], "c": ["a", "a", "b", "b"]})  # codes (1,a) (1,a) (11,b) (11,b)
    # synthetic values far outside the real range still fill the synthetic range's bins 1 and 11; the null gets 11
    synth = pa.table({"x": [None, 100.0, 200, 200], "c": ["a", "a", "b", "b"]})  # (11,a) (1,a) (11,b) (11,b)
    # real: (1,a) .5, (11,b) .5; synthetic: (11,a) .25, (1,a) .25, (11,b) .5
    assert pair_trends(real, synth, [X, C]) == {"x | c": pytest.approx(1 - 0.5 * (0.25 + 0.25), abs=1e-12)}


def test_contingency_pair_without_real_association_does_not_count():
    cd = {"name": "d", "kind": "categorical", "categories": ["x", "y"]}
    real = pa.table({"c": ["a", "a", "b", "b"], "d": ["x", "y", "x", "y"]})  # Cramer's V 0
    assert pair_trends(real, real, [C, cd]) == {}


def test_overall_score_by_hand():
    real = pa.table({"x": [1.0, 2, 3, 4], "y": [2.0, 4, 6, 8], "c": ["a", "a", "b", "b"]})
    synth = pa.table({"x": [1.0, 2, 3, 4], "y": [1.0, 3, 2, 4], "c": ["a", "b", "b", "b"]})
    q = quality(real, synth, [X, Y, C])
    # shapes: x 1, y 1 - 0.5 (ECDFs at 3-4), c 1 - 0.25;  pairs: x|y 0.9, x|c and y|c 0.75 each (codes 1,4,7,11 on
    # each table's own 10 bins; the synthetic rows move one row from (4,a) to (4,b))
    assert q["column_shape_scores"] == pytest.approx({"x": 1.0, "y": 0.5, "c": 0.75}, abs=1e-12)
    assert q["column_pair_scores"] == pytest.approx({"x | y": 0.9, "x | c": 0.75, "y | c": 0.75}, abs=1e-12)
    assert q["column_shapes"] == pytest.approx(0.75, abs=1e-12) and q["column_pair_trends"] == pytest.approx(0.8, abs=1e-12)
    assert q["quality_score"] == pytest.approx(0.775, abs=1e-12)


def _perturbed(t: pa.Table, seed: int) -> pa.Table:
    """Scaled, noisy, partly shuffled rows with a few nulls and an unknown category: every branch of the metrics."""
    rng, n, cols = np.random.default_rng(seed), t.num_rows, {}
    for f in t.schema:
        v = t.column(f.name)
        if pa.types.is_floating(f.type):
            a = v.to_numpy(zero_copy_only=False) * rng.normal(1, 0.2, n) + rng.normal(0, 0.1, n)
            cols[f.name] = pa.array(a, mask=(rng.random(n) < 0.05) | np.isnan(a))
        else:
            vals, p = v.to_pylist(), rng.permutation(n)
            vals = [vals[p[i]] if rng.random() < 0.3 else vals[i] for i in range(n)]
            cols[f.name] = pa.array([None if rng.random() < 0.03 else "zz" if rng.random() < 0.03 else x for x in vals])
    return pa.table(cols).take(rng.permutation(n)[: int(n * 0.8)])


def test_equals_sdmetrics_quality_report_on_wine():
    pytest.importorskip("sdmetrics")
    from sklearn.datasets import load_wine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sdmetrics.reports.single_table import QualityReport
    w = load_wine()
    real = pa.table({**{n: w.data[:, i] for i, n in enumerate(w.feature_names)}, "cultivar": np.array(w.target_names)[w.target].tolist()})
    cols = [{"name": n, "kind": "continuous"} for n in w.feature_names] + [{"name": "cultivar", "kind": "categorical", "categories": list(w.target_names)}]
    md = {"columns": {c["name"]: {"sdtype": "numerical" if c["kind"] == "continuous" else "categorical"} for c in cols}}
    for seed in (1, 2):
        synth = _perturbed(real, seed)
        rep = QualityReport()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep.generate(real.to_pandas(), synth.to_pandas(), md, verbose=False)
        props = dict(zip(rep.get_properties()["Property"], rep.get_properties()["Score"]))
        q = quality(real, synth, cols)
        assert q["quality_score"] == pytest.approx(rep.get_score(), abs=1e-9)
        assert q["column_shapes"] == pytest.approx(props["Column Shapes"], abs=1e-9)
        assert q["column_pair_trends"] == pytest.approx(props["Column Pair Trends"], abs=1e-9)
