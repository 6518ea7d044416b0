"""Spread independent pieces of work (one shard to encode, one chunk to generate) over Ray tasks."""

from __future__ import annotations

from typing import Callable, Sequence


def map_tasks(fn: Callable, items: Sequence, workers: int, address: str | None = None) -> list:
    """fn(item) for every item: in this process when workers == 0, else as Ray tasks (at most `workers` at once)."""
    if workers <= 0:
        return [fn(item) for item in items]
    import ray

    from .ray_connect import connect_ray

    connect_ray(address)
    remote = ray.remote(num_cpus=1)(fn)
    pending, results = [], {}
    for i, item in enumerate(items):
        if len(pending) >= workers:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[ref] = ray.get(ref)
        pending.append(remote.remote(item))
        results[pending[-1]] = None
    order = list(results)
    for ref in pending:
        results[ref] = ray.get(ref)
    return [results[ref] for ref in order]
