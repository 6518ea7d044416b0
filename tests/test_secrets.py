"""Planted secrets never leave the process: one in the storage URL (s3://KEY:SECRET@bucket/...), one in
a config value (data.path with its own KEY:SECRET@), one in the environment of a Ray run.  Every command a
user runs on such URLs (shard, train on 2 Ray workers, eval, sample, encode, generate, submit) is checked:
its output, every object it wrote (saved config, summary, TensorBoard events, checkpoints, datasets) and
every file in Ray's log folder."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import boto3
import pytest

from conftest import SMALL_MODEL

pytestmark = pytest.mark.ray

URL_SECRET, CONFIG_SECRET, ENV_SECRET = "URLSECRET-1b2c3d4e", "CFGSECRET-5f6a7b8c", "ENVSECRET-9d0e1f2a"


@pytest.mark.slow  # ~2 min (seven commands); CI keeps test_reliability.py's planted secret and test_trust_secrets.py
def test_planted_secrets_appear_nowhere(tmp_path, s3_server):
    bucket = s3_server["bucket"]
    runs = f"s3://AKIAURLKEY:{URL_SECRET}@{bucket}/sec2/runs"
    data = f"s3://AKIACFGKEY:{CONFIG_SECRET}@{bucket}/sec2/data"
    out = f"s3://AKIAURLKEY:{URL_SECRET}@{bucket}/sec2/out"
    env = dict(os.environ, AWS_SECRET_ACCESS_KEY=ENV_SECRET, TQDM_DISABLE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               RAY_AUTH_MODE="disabled")
    seen = []

    def aae(*argv, ok=True):
        p = subprocess.run([sys.executable, "-m", "aae_dist.cli", *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        seen.append(p.stdout + p.stderr)
        assert (p.returncode == 0) == ok, (argv[0], p.stdout[-2000:], p.stderr[-2000:])
        return p

    aae("shard", "digits", data, "--quiet")
    sets = []
    for s in SMALL_MODEL + [f"data.path={data}", "train.max_steps=6", "train.checkpoint_every=3"]:
        sets += ["--set", s]
    train = aae("train", "--workers", "2", "--storage", runs, "--name", "s", *sets)
    run = f"{runs}/s"
    no_data = aae("eval", run, ok=False)  # the saved config holds data.path without its credentials
    assert no_data.returncode == 2 and "pass the dataset with --data URL" in no_data.stderr and "Traceback" not in no_data.stderr
    aae("eval", run, "--data", data)
    aae("sample", run, "--out", f"{out}/grid.png", "--n", "16")
    aae("encode", run, "--data", data, "--out", f"{out}/codes", "--split", "test")
    aae("generate", run, "--n", "50", "--out", f"{out}/generated")
    refused = aae("submit", "--address", "http://127.0.0.1:1", "--workers", "2", "--storage", runs, *sets, ok=False)
    assert "carries credentials in the URL" in refused.stderr

    for text in seen:
        for secret in (URL_SECRET, CONFIG_SECRET, ENV_SECRET):
            assert secret not in text, text[-2000:]
    client = boto3.client("s3")
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="sec2/") for o in page.get("Contents", [])]
    for expected in ("sec2/runs/s/config.json", "sec2/runs/s/summary.json", "sec2/data/manifest.json", "sec2/out/grid.png",
                     "sec2/out/generated/manifest.json"):
        assert expected in keys, expected
    assert any("/tensorboard/" in k for k in keys) and any("/checkpoint_step_" in k for k in keys) and any(k.startswith("sec2/out/codes/") for k in keys)
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        for secret in (URL_SECRET, CONFIG_SECRET, ENV_SECRET):
            assert secret.encode() not in body, (key, secret)
    logs = re.search(r"Ray's logs \(workers' output included\): (\S+)", train.stdout)
    assert logs, train.stdout
    files = [os.path.join(d, f) for d, _, fs in os.walk(logs.group(1)) for f in fs]
    assert len(files) > 5
    for path in files:
        blob = open(path, "rb").read()
        for secret in (URL_SECRET, CONFIG_SECRET, ENV_SECRET):
            assert secret.encode() not in blob, (path, secret)
