"""aae-dist against SDV's TVAE and CTGAN on scikit-learn's bundled tables, one table of results.

Each table is written as Parquet, sharded by `aae-dist shard` (20% held out), and every synthesizer trains
on the same training rows (decoded back from the shards).  Scores come from aae_dist.tabular_report (the
quality score after SDMetrics' definitions) and, where sdmetrics is importable, from SDMetrics' own
QualityReport too (`sdmetrics_quality`), so the two can be compared.  CPU seconds are process CPU time.

SDV is a benchmark-only dependency; it pins pandas<3, so install it beside the project, not into it:
    pip install --target /tmp/sdvdeps --no-deps sdv==2.0.0 ctgan==0.12.1 copulas rdt sdmetrics deepecho Faker graphviz plotly pandas==2.3.3 pytz tzdata
    PYTHONPATH=/tmp/sdvdeps python benchmarks/tabular.py --out /tmp/tabular-bench
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def sklearn_tables() -> dict:
    """name -> (table, target): three bundled tables; diabetes gets a text target, a text column and 10% nulls in two columns."""
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine

    out = {}
    w = load_wine()
    out["wine"] = (pa.table({**{n: w.data[:, i] for i, n in enumerate(w.feature_names)},
                             "cultivar": np.array(w.target_names)[w.target].tolist()}), "cultivar")
    b = load_breast_cancer()
    out["breast_cancer"] = (pa.table({**{n: b.data[:, i] for i, n in enumerate(b.feature_names[:12])},
                                      "diagnosis": np.array(b.target_names)[b.target].tolist()}), "diagnosis")
    d = load_diabetes(scaled=False)
    rng = np.random.default_rng(0)
    cols = {}
    for i, n in enumerate(d.feature_names):
        v = d.data[:, i]
        if n == "sex":
            cols[n] = np.where(v == 1, "F", "M").tolist()
        else:
            cols[n] = pa.array(v, mask=rng.random(len(v)) < (0.1 if n in ("bmi", "bp") else 0.0))
    cols["progression"] = np.where(d.target > np.median(d.target), "high", "low").tolist()
    out["diabetes_nulls"] = (pa.table(cols), "progression")
    return out


def train_aae(ds: str, runs: str, name: str, workers: int, sets: list[str]) -> tuple[str, float, float]:
    from aae_dist.cli import main

    argv = ["train", "--workers", str(workers), "--storage", runs, "--name", name, "--overwrite", "--config", "jobs/cpu/tabular.yaml",
            "--set", f"data.path={ds}", "--set", "train.progress=false"]
    for s in sets:
        argv += ["--set", s]
    c0, t0 = cpu_seconds(), time.time()
    assert main(argv) == 0
    summary = json.load(open(os.path.join(runs, name, "summary.json")))
    cpu = cpu_seconds() - c0
    if workers > 0:  # Ray's workers are not our children: count each worker's one thread busy for the whole training time
        cpu = max(cpu, cpu + summary["train_s"] * workers)
    return os.path.join(runs, name), cpu, float(summary.get("samples_per_s", 0.0) or 0.0)


def sdv_fit_sample(kind: str, train_df, n: int, epochs: int):
    from sdv.metadata import Metadata
    from sdv.single_table import CTGANSynthesizer, TVAESynthesizer

    md = Metadata.detect_from_dataframes({"t": train_df})
    cls = TVAESynthesizer if kind == "tvae" else CTGANSynthesizer
    synth = cls(md, epochs=epochs)
    c0, t0 = cpu_seconds(), time.time()
    synth.fit({"t": train_df})  # SDV 2: a single table is passed and returned as {name: DataFrame}
    cpu, wall = cpu_seconds() - c0, time.time() - t0
    out = synth.sample(n)
    out = out["t"] if isinstance(out, dict) else out
    return pa.Table.from_pandas(out, preserve_index=False), cpu, len(train_df) * epochs / max(wall, 1e-9)


def sdmetrics_quality(real, synth, columns) -> dict:
    """SDMetrics' own QualityReport on the same rows: overall score and its two properties (empty without sdmetrics)."""
    try:
        from sdmetrics.reports.single_table import QualityReport
    except ImportError:
        return {}
    md = {"columns": {c["name"]: {"sdtype": "numerical" if c["kind"] == "continuous" else "categorical"} for c in columns}}
    rep = QualityReport()
    rep.generate(real.to_pandas(), synth.select(real.column_names).to_pandas(), md, verbose=False)
    props = dict(zip(rep.get_properties()["Property"], rep.get_properties()["Score"]))
    return {"sdm_quality": float(rep.get_score()), "sdm_shapes": float(props["Column Shapes"]), "sdm_pairs": float(props["Column Pair Trends"])}


def main() -> int:
    import torch

    from aae_dist.cli import main as cli
    from aae_dist.inference import load_model
    from aae_dist.tabular import generate_rows, real_rows
    from aae_dist.tabular_report import table_report

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/tabular-bench")
    ap.add_argument("--sdv-epochs", type=int, default=300)
    ap.add_argument("--aae-epochs", type=int, default=0, help="0: the recipe's default (about 3000 steps, at most 300 epochs)")
    ap.add_argument("--workers", default="0", help="comma list of aae-dist worker counts (0: in-process, 2: two Ray workers)")
    ap.add_argument("--tables", default="wine,breast_cancer,diabetes_nulls")
    ap.add_argument("--skip-sdv", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # every synthesizer on one thread: tiny ops gain nothing from a second on a shared host
    rows = []
    for name, (table, target) in sklearn_tables().items():
        if name not in args.tables.split(","):
            continue
        root = os.path.join(args.out, name)
        os.makedirs(root, exist_ok=True)
        pq.write_table(table, os.path.join(root, "table.parquet"))
        ds = os.path.join(root, "ds")
        assert cli(["shard", f"parquet:{root}/table.parquet", ds, "--target", target, "--test-fraction", "0.2", "--overwrite", "--quiet"]) == 0
        results = {}
        for w in [int(x) for x in args.workers.split(",")]:
            sets = [f"train.epochs={args.aae_epochs}"] if args.aae_epochs else []  # else the recipe's size-aware default
            run, cpu, sps = train_aae(ds, os.path.join(root, "runs"), f"aae-w{w}", w, sets)
            model = load_model(run)
            train, holdout = real_rows(model, ds, "train"), real_rows(model, ds, "test")
            synth = generate_rows(model, train.num_rows, torch.Generator().manual_seed(0))
            results[f"aae-dist ({max(w, 1)} worker{'s' if w > 1 else ''})"] = (synth, cpu, sps)
        if not args.skip_sdv:
            df = train.to_pandas()
            for kind in ("tvae", "ctgan"):
                results[kind.upper()] = sdv_fit_sample(kind, df, train.num_rows, args.sdv_epochs)
        for who, (synth, cpu, sps) in results.items():
            rep = table_report(train, synth.select(train.column_names).cast(train.schema), holdout, model.rows.table)
            q, e, p = rep["quality"], rep.get("efficacy", {}), rep["privacy"]
            rows.append({"table": name, "synthesizer": who, "quality": q["quality_score"], "shapes": q["column_shapes"],
                         "pairs": q["column_pair_trends"], **sdmetrics_quality(train, synth, model.rows.table["columns"]),
                         "tstr_acc": e.get("train_on_synthetic", {}).get("accuracy"), "trtr_acc": e.get("train_on_real", {}).get("accuracy"),
                         "identical": p["synthetic_identical_to_train"], "holdout_identical": p["holdout_identical_to_train"],
                         "dcr": p["synthetic_median_dcr"], "holdout_dcr": p["holdout_median_dcr"], "cpu_s": cpu, "samples_per_s": sps})
            print(json.dumps(rows[-1]), file=sys.stderr)
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    cols = ["table", "synthesizer", "quality", "shapes", "pairs", "sdm_quality", "sdm_shapes", "sdm_pairs", "tstr_acc", "trtr_acc", "identical",
            "holdout_identical", "dcr", "holdout_dcr", "cpu_s", "samples_per_s"]
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) and abs(v) < 100 else f"{v:.0f}" if isinstance(v, float) else str(v))  # noqa: E731
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
