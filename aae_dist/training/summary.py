"""`summary.json`: what a finished run reports (figures, topology, coordinator cost, replica
fingerprints), gathered from every rank and written by rank 0."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

from .. import storage, timeline
from ..distributed import all_gather


def fingerprint(nets: dict) -> str:
    """A hash of every weight: replicas in sync have the same one."""
    h = hashlib.sha256()
    for n in sorted(nets):
        for k, v in nets[n].state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class RunRecord:
    """What a finished worker hands the summary writer: its measurements and the components it ran,
    so the writer reads this record and not the trainer."""

    rank: int
    world: int
    device: str
    node: str
    run_url: str
    nets: dict
    coord: object  # the Coordinator: steps, epochs, stop reason, sync cost
    comm: object  # CommStats
    started_at: float
    start_step: int
    resumed_from: int | None
    startup_s: float | None
    eval_s: float
    train_s: float
    samples_per_s: float
    max_steps: int | None
    config: dict  # redacted
    reporter: object | None  # rank 0's Reporter


def write_summary(r: RunRecord, metrics: dict, baselines: dict) -> dict:
    """Every rank calls this (it gathers); rank 0 writes the file and returns the summary."""
    everyone = all_gather({"fingerprint": fingerprint(r.nets), "node": r.node, "device": r.device, "storage_retries": storage.retries()})
    if r.rank != 0:
        return {}
    coord, train_s = r.coord, r.train_s
    prints = [e["fingerprint"] for e in everyone]
    summary = {
        "steps": coord.step,
        "epochs": coord.epochs_done,
        "samples_per_s": r.samples_per_s,
        "wall_s": time.time() - r.started_at,
        "train_s": train_s,
        "startup_s": r.startup_s,  # process start (driver) to first step
        "startup_stages_s": timeline.breakdown(timeline.marks()),  # where those seconds went (rank 0's view)
        "eval_s": r.eval_s,  # the final evaluation (metrics and baselines)
        "metrics": metrics,
        "baselines": baselines,  # the same data's floors: k-means on pixels, logistic regression on the labelled samples
        "world_size": r.world,
        "device": r.device,
        "workers": [{"rank": i, "node": e["node"], "device": e["device"]} for i, e in enumerate(everyone)],
        "nodes": len({e["node"] for e in everyone}),
        "resumed_from_step": r.resumed_from,
        "stop_reason": coord.stop_reason or ("max_steps" if r.max_steps and coord.step >= r.max_steps else "epochs"),
        "nonfinite_steps": coord.nonfinite_steps,
        "skipped_updates": coord.skipped_updates,
        "storage_retries": sum(e["storage_retries"] for e in everyone),  # transient storage errors ridden out, all ranks
        "coordinator": {
            "syncs": coord.syncs,
            "sync_every": coord.sync_every,
            "sync_s": coord.sync_seconds,
            "sync_ms_mean": 1000 * coord.sync_seconds / max(1, coord.syncs),
            "fraction_of_train_time": coord.sync_seconds / train_s if train_s else 0.0,
        },
        "communication_per_step": r.comm.per_step(coord.step - r.start_step),
        "replica_fingerprints": prints,
        "replicas_in_sync": len(set(prints)) == 1,
        "config": r.config,
    }
    r.reporter.finish(coord.step, metrics, summary)
    storage.write_bytes_atomic(storage.join(r.run_url, "summary.json"), json.dumps(summary, indent=1).encode())
    return summary
