"""aae-dist against SDV's TVAE and CTGAN on scikit-learn's bundled tables, one table of results.

Each table is written as Parquet, sharded by `aae-dist shard` (20% held out), and every synthesizer trains
on the same training rows (decoded back from the shards).  Scores come from aae_dist.tabular_report (written
to be identical to SDMetrics' QualityReport) and, where sdmetrics is importable, from SDMetrics' own
QualityReport too (`sdm_quality`), so the two are printed side by side.

Equal CPU time: TVAE at its defaults (300 epochs) sets the budget, its fit's process CPU (preprocessing
included; --budget fixes it instead).  CTGAN gets the epochs that fit it (two throwaway fits of 5 and 25 epochs
measure its fixed and per-epoch CPU).  aae-dist gets the steps that fit it (a --calib-steps run measures CPU per step).
A run more than 5% off the budget is repeated with its size scaled (twice at most; cpu_ratio shows the result):
its figure is the training loop's CPU, measured inside every worker by a train.callbacks hook (`step_clock`:
process CPU between the first and the last step, summed over workers), so start-up, Ray and the final report
are not counted; its shard's CPU (the per-column mixtures, fitted once per dataset, as TVAE's fit fits its own)
counts against the budget and is included in cpu_s (and printed apart as shard_cpu_s).

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


CLOCK_ENV = "AAE_BENCH_CLOCK"  # a file naming the folder where this run's step clocks write rank-R.json
_first: dict = {}


def step_clock(event: str, rank: int = 0, step: int = 0, **_) -> None:
    """train.callbacks hook (runs in every worker): this process's CPU time at its first and latest step, written to
    rank-R.json every 10 steps, so the training loop's CPU excludes start-up and the final report.  The folder is read
    from the file $AAE_BENCH_CLOCK names (Ray's workers keep the environment Ray started with, and may be reused)."""
    pointer = os.environ.get(CLOCK_ENV)
    if event != "step" or not pointer or (step % 10 and step > 2):
        return
    now = time.process_time()
    with open(pointer) as f:
        folder = f.read().strip()
    _first.setdefault((folder, rank), (step, now))
    if step % 10 == 0:
        first_step, first_cpu = _first[(folder, rank)]
        with open(os.path.join(folder, f"rank-{rank}.json"), "w") as f:
            json.dump({"first_step": first_step, "first_cpu": first_cpu, "step": step, "cpu": now}, f)


def loop_cpu(folder: str, steps: int) -> tuple[float, float]:
    """(training-loop CPU-s summed over workers, CPU-s per step summed over workers): the clocks' CPU between the first
    and the last recorded step, scaled to `steps` steps (the first step and the few after the last record are not seen)."""
    per_step, names = 0.0, os.listdir(folder)
    assert names, f"no step clock in {folder}: the workers did not import benchmarks/tabular.py (PYTHONPATH)"
    for name in names:
        c = json.load(open(os.path.join(folder, name)))
        per_step += (c["cpu"] - c["first_cpu"]) / max(1, c["step"] - c["first_step"])
    return per_step * steps, per_step


EXTRA_SETS: list[str] = []  # --aae-set KEY=VALUE: extra settings for every aae-dist run (experiments on the recipe)


def train_aae(ds: str, runs: str, name: str, workers: int, seed: int, steps: int) -> tuple[str, float, float, float]:
    """One aae-dist run of `steps` steps: (run folder, training-loop CPU-s summed over workers, CPU-s per step, samples/s)."""
    from aae_dist.cli import main

    clock = os.path.join(runs, "clocks", f"{name}-{time.time_ns()}")  # a new folder per run: step_clock keys on it
    os.makedirs(clock)
    with open(os.environ[CLOCK_ENV], "w") as f:
        f.write(clock)
    argv = ["train", "--workers", str(workers), "--storage", runs, "--name", name, "--overwrite", "--config", "jobs/cpu/tabular.yaml",
            "--set", f"data.path={ds}", "--set", "train.progress=false", "--set", f"train.seed={seed}", "--set", "train.epochs=1000000",
            "--set", f"train.max_steps={steps}", "--set", "train.callbacks=['tabular:step_clock']"]
    for kv in EXTRA_SETS:
        argv += ["--set", kv]
    assert main(argv) == 0
    summary = json.load(open(os.path.join(runs, name, "summary.json")))
    cpu, per_step = loop_cpu(clock, summary["steps"])
    return os.path.join(runs, name), cpu, per_step, float(summary.get("samples_per_s", 0.0) or 0.0)


TOLERANCE = 0.05  # a run whose CPU is off the budget by more than this is run again, its size scaled (twice at most)


def aae_at_budget(ds: str, runs: str, workers: int, seed: int, budget: float, calib_steps: int) -> tuple:
    """aae-dist with as many steps as fit `budget` training CPU-s: a short run measures CPU per step (summed over
    workers); the real run is repeated with its steps scaled while its CPU is off by more than TOLERANCE (the
    host's load moves CPU per step).  Returns train_aae's tuple for the last run and its steps."""
    _, _, per_step, _ = train_aae(ds, runs, f"calib-w{workers}", workers, seed, calib_steps)
    steps = max(1, int(budget / per_step))
    for attempt in range(3):
        out = train_aae(ds, runs, f"aae-w{workers}-s{seed}", workers, seed, steps)
        if abs(out[1] / budget - 1) <= TOLERANCE or attempt == 2:
            return out + (steps,)
        steps = max(1, int(steps * budget / out[1]))


def sdv_synthesizer(kind: str, train_df, epochs: int):
    from sdv.metadata import Metadata
    from sdv.single_table import CTGANSynthesizer, TVAESynthesizer

    md = Metadata.detect_from_dataframes({"t": train_df})
    return (TVAESynthesizer if kind == "tvae" else CTGANSynthesizer)(md, epochs=epochs)


def sdv_fit_sample(kind: str, train_df, n: int, epochs: int, seed: int):
    """Fit (preprocessing included) and sample: (rows, fit CPU-s, training samples/s)."""
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)
    synth = sdv_synthesizer(kind, train_df, epochs)
    c0, t0 = cpu_seconds(), time.time()
    synth.fit({"t": train_df})  # SDV 2: a single table is passed and returned as {name: DataFrame}
    cpu, wall = cpu_seconds() - c0, time.time() - t0
    out = synth.sample(n)
    out = out["t"] if isinstance(out, dict) else out
    return pa.Table.from_pandas(out, preserve_index=False), cpu, len(train_df) * epochs / max(wall, 1e-9)


def sdv_epochs_for(kind: str, train_df, budget: float, seed: int, short: int = 5, long: int = 25) -> tuple[int, float]:
    """(epochs that fit `budget` fit CPU-s, the fixed CPU-s): two throwaway fits (`short` and `long` epochs) separate
    the fixed cost (preprocessing, the mode-specific normaliser's mixtures) from the cost per epoch."""
    c_short, c_long = (sdv_fit_sample(kind, train_df, 1, e, seed)[1] for e in (short, long))
    per_epoch = max(1e-6, (c_long - c_short) / (long - short))
    fixed = max(0.0, c_short - short * per_epoch)
    return max(1, int((budget - fixed) / per_epoch)), fixed


def sdv_at_budget(kind: str, train_df, n: int, budget: float, seed: int) -> tuple:
    """sdv_fit_sample at the epochs that fit `budget`, refitted (twice at most) while its CPU is off by more than TOLERANCE."""
    epochs, fixed = sdv_epochs_for(kind, train_df, budget, seed)
    for attempt in range(3):
        out = sdv_fit_sample(kind, train_df, n, epochs, seed)
        if abs(out[1] / budget - 1) <= TOLERANCE or attempt == 2:
            return out + (epochs,)
        epochs = max(1, int(epochs * max(budget - fixed, 1e-3) / max(out[1] - fixed, 1e-3)))


def sdmetrics_quality(real, synth, columns) -> dict:
    """SDMetrics' own QualityReport on the same rows: overall score and its two properties (empty without sdmetrics)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sdmetrics.reports.single_table import QualityReport
    except ImportError:
        return {}
    md = {"columns": {c["name"]: {"sdtype": "numerical" if c["kind"] == "continuous" else "categorical"} for c in columns}}
    rep = QualityReport()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep.generate(real.to_pandas(), synth.select(real.column_names).to_pandas(), md, verbose=False)
    props = dict(zip(rep.get_properties()["Property"], rep.get_properties()["Score"]))
    return {"sdm_quality": float(rep.get_score()), "sdm_shapes": float(props["Column Shapes"]), "sdm_pairs": float(props["Column Pair Trends"])}


class _Rows:
    """What aae_dist.tabular.real_rows needs of a model: the dataset's row layout."""

    def __init__(self, ds: str):
        from aae_dist.data import read_manifest
        from aae_dist.models.rows import RowLayout

        self.rows = RowLayout(read_manifest(ds).table)


def main() -> int:
    import torch

    from aae_dist.cli import main as cli
    from aae_dist.inference import load_model
    from aae_dist.tabular import generate_rows, real_rows
    from aae_dist.tabular_report import table_report

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/tabular-bench")
    ap.add_argument("--sdv-epochs", type=int, default=300, help="TVAE's epochs; its fit CPU is every synthesizer's budget")
    ap.add_argument("--budget", type=float, default=0.0, help="CPU-s per synthesizer (0: TVAE's fit CPU at --sdv-epochs)")
    ap.add_argument("--calib-steps", type=int, default=100, help="aae-dist steps of the run that measures CPU per step")
    ap.add_argument("--workers", default="0,2", help="comma list of aae-dist worker counts (0: in-process, 2: two Ray workers)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--tables", default="wine,breast_cancer,diabetes_nulls")
    ap.add_argument("--skip-sdv", action="store_true")
    ap.add_argument("--aae-set", action="append", default=[], help="KEY=VALUE for every aae-dist run (on top of jobs/cpu/tabular.yaml)")
    args = ap.parse_args()
    EXTRA_SETS[:] = args.aae_set
    torch.set_num_threads(1)  # every synthesizer on one thread: tiny ops gain nothing from a second on a shared host
    here = os.path.dirname(os.path.abspath(__file__))  # Ray's local workers inherit PYTHONPATH: they import step_clock
    os.environ["PYTHONPATH"] = os.pathsep.join([here] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    sys.path.insert(0, here)
    os.makedirs(args.out, exist_ok=True)
    os.environ[CLOCK_ENV] = os.path.abspath(os.path.join(args.out, "clock-folder.txt"))
    rows = []
    for name, (table, target) in sklearn_tables().items():
        if name not in args.tables.split(","):
            continue
        root = os.path.join(args.out, name)
        os.makedirs(root, exist_ok=True)
        pq.write_table(table, os.path.join(root, "table.parquet"))
        ds = os.path.join(root, "ds")
        c0 = cpu_seconds()
        assert cli(["shard", f"parquet:{root}/table.parquet", ds, "--target", target, "--test-fraction", "0.2", "--overwrite", "--quiet"]) == 0
        shard_cpu = cpu_seconds() - c0
        layout = _Rows(ds)
        train, holdout = real_rows(layout, ds, "train"), real_rows(layout, ds, "test")
        df = train.to_pandas()
        for seed in [int(x) for x in args.seeds.split(",")]:
            results = {}
            budget = args.budget
            if not args.skip_sdv:
                results["TVAE"] = sdv_fit_sample("tvae", df, train.num_rows, args.sdv_epochs, seed) + (args.sdv_epochs,)
                budget = budget or results["TVAE"][1]
                results["CTGAN"] = sdv_at_budget("ctgan", df, train.num_rows, budget, seed)
            assert budget > 0, "--budget is needed with --skip-sdv"
            for w in [int(x) for x in args.workers.split(",")]:
                # the shard's CPU (column mixtures, as TVAE's preprocessing inside its fit) counts against aae-dist's budget
                run, cpu, _, sps, steps = aae_at_budget(ds, os.path.join(root, "runs"), w, seed, budget - shard_cpu, args.calib_steps)
                model = load_model(run)
                synth = generate_rows(model, train.num_rows, torch.Generator().manual_seed(seed))
                results[f"aae-dist ({max(w, 1)} worker{'s' if w > 1 else ''})"] = (synth, cpu + shard_cpu, sps, steps)
            for who, (synth, cpu, sps, size) in results.items():
                rep = table_report(train, synth.select(train.column_names).cast(train.schema), holdout, layout.rows.table, seed)
                q, e, p = rep["quality"], rep.get("efficacy", {}), rep["privacy"]
                rows.append({"table": name, "seed": seed, "synthesizer": who, "quality": q["quality_score"], "shapes": q["column_shapes"],
                             "pairs": q["column_pair_trends"], **sdmetrics_quality(train, synth, layout.rows.table["columns"]),
                             "tstr_acc": e.get("train_on_synthetic", {}).get("accuracy"), "trtr_acc": e.get("train_on_real", {}).get("accuracy"),
                             "identical": p["synthetic_identical_to_train"], "holdout_identical": p["holdout_identical_to_train"],
                             "dcr": p["synthetic_median_dcr"], "holdout_dcr": p["holdout_median_dcr"], "budget_s": budget, "cpu_s": cpu, "cpu_ratio": cpu / budget,
                             "size": size, "samples_per_s": sps, "shard_cpu_s": shard_cpu})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    cols = ["table", "seed", "synthesizer", "quality", "shapes", "pairs", "sdm_quality", "tstr_acc", "trtr_acc", "identical",
            "holdout_identical", "dcr", "holdout_dcr", "budget_s", "cpu_s", "cpu_ratio", "size", "samples_per_s"]
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) and abs(v) < 100 else f"{v:.0f}" if isinstance(v, float) else str(v))  # noqa: E731
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
