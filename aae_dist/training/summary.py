"""`summary.json`: what a finished run reports (figures, topology, coordinator cost, replica
fingerprints), gathered from every rank and written by rank 0."""

from __future__ import annotations

import hashlib
import json
import time

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


def write_summary(trainer, metrics: dict, baselines: dict, samples_per_s: float, train_s: float) -> dict:
    """Every rank calls this (it gathers); rank 0 writes the file and returns the summary."""
    t = trainer
    everyone = all_gather({"fingerprint": fingerprint(t.aae.nets), "node": t.session.node(), "device": str(t.device),
                           "storage_retries": storage.retries()})
    if t.rank != 0:
        return {}
    coord, cfg = t.coord, t.cfg
    prints = [e["fingerprint"] for e in everyone]
    summary = {
        "steps": coord.step,
        "epochs": coord.epochs_done,
        "samples_per_s": samples_per_s,
        "wall_s": time.time() - t.started_at,
        "train_s": train_s,
        "startup_s": t.startup_s,  # process start (driver) to first step
        "startup_stages_s": timeline.breakdown(timeline.marks()),  # where those seconds went (rank 0's view)
        "eval_s": t.eval_s,  # the final evaluation (metrics and baselines)
        "metrics": metrics,
        "baselines": baselines,  # the same data's floors: k-means on pixels, logistic regression on the labelled samples
        "world_size": t.world,
        "device": str(t.device),
        "workers": [{"rank": r, "node": e["node"], "device": e["device"]} for r, e in enumerate(everyone)],
        "nodes": len({e["node"] for e in everyone}),
        "resumed_from_step": t.resumed_from,
        "stop_reason": coord.stop_reason or ("max_steps" if cfg.train.max_steps and coord.step >= cfg.train.max_steps else "epochs"),
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
        "communication_per_step": t.comm.per_step(coord.step - t.start_step),
        "replica_fingerprints": prints,
        "replicas_in_sync": len(set(prints)) == 1,
        "config": cfg.to_dict(redact=True),
    }
    t.reporter.finish(coord.step, metrics, summary)
    storage.write_bytes_atomic(storage.join(t.session.run_url, "summary.json"), json.dumps(summary, indent=1).encode())
    return summary
