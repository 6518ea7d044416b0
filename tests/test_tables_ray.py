"""A table on a real local Ray cluster (issue 25): 2 Ray Train workers train the wine table with replicas in
sync, then `generate --format parquet` writes the source's schema from Ray tasks on the same cluster."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import SMALL_MODEL, read_summary
from raycluster import LocalCluster, loopback_env
from test_tables import wine_table

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster({"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")})
    try:
        c.start_head(2)
        assert c.wait_nodes(1) == ["127.0.0.2"]
        yield c
    finally:
        c.stop()


def cli(*argv, timeout=300):
    env = loopback_env({"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    return subprocess.run([sys.executable, "-m", "aae_dist.cli", *map(str, argv)], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # ~90 s with its own cluster; CI keeps a table on two DDP workers (test_tables.py) and images through Ray
def test_a_table_trains_on_two_ray_workers_and_generates_parquet(cluster, tmp_path):
    t = wine_table()
    pq.write_table(t, tmp_path / "wine.parquet")
    r = cli("shard", f"parquet:{tmp_path / 'wine.parquet'}", tmp_path / "ds", "--target", "cultivar", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    sets = []
    for s in SMALL_MODEL + [f"data.path={tmp_path / 'ds'}", "data.batch_size=40", "train.max_steps=20", "train.checkpoint_every=20",
                            "train.parzen_samples=0", "train.image_every=1000000", "model.variant=supervised"]:
        sets += ["--set", s]
    r = cli("train", "--workers", "2", "--address", cluster.address, "--storage", tmp_path / "runs", "--name", "wine", *sets)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    run = tmp_path / "runs" / "wine"
    s = read_summary(run)
    assert s["world_size"] == 2 and s["steps"] == 20
    assert s["replicas_in_sync"] is True and len(s["replica_fingerprints"]) == 2 and len(set(s["replica_fingerprints"])) == 1
    assert 0 <= s["metrics"]["table/quality_score"] <= 1  # the row report at the end of a Ray run too
    r = cli("generate", run, "--n", "300", "--out", tmp_path / "synthetic", "--format", "parquet", "--shard-size", "100",
            "--workers", "2", "--address", cluster.address)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    files = sorted(os.listdir(tmp_path / "synthetic"))
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]  # one file per Ray task
    g = pa.concat_tables([pq.read_table(tmp_path / "synthetic" / f) for f in files])
    assert g.schema.equals(t.schema) and g.num_rows == 300
    assert set(g.column("cultivar").to_pylist()) <= set(t.column("cultivar").to_pylist())
