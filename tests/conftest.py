"""Shared fixtures: small identifiable datasets, a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")


def ident_arrays(n: int, classes: int = 10, seed: int = 0):
    """x[i] encodes i in its first two bytes, so every sample can be identified after a round trip."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 1, 4, 4), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n) % 256
    x[:, 0, 0, 1] = np.arange(n) // 256
    y = (np.arange(n) % classes).astype(np.int64)
    return x, y


def ident(xb) -> np.ndarray:
    xb = np.asarray(xb)
    return xb[:, 0, 0, 0].astype(np.int64) + 256 * xb[:, 0, 0, 1].astype(np.int64)


@pytest.fixture
def make_dataset(tmp_path):
    """Write an identifiable dataset; returns (url, x, y)."""
    from aae_dist.data.writer import write_dataset

    def make(n=1000, shard_size=128, labels=True, url=None, test=100, block_bytes=None):
        x, y = ident_arrays(n + test)
        url = url or str(tmp_path / f"ds{n}_{shard_size}")
        splits = {"train": (x[:n], y[:n] if labels else None)}
        if test:
            splits["test"] = (x[n:], y[n:] if labels else None)
        blocks = {"block_bytes": block_bytes} if block_bytes else {}
        write_dataset(url, splits, num_classes=10 if labels else 0, source="test", shard_size=shard_size, progress=False, **blocks)
        return url, x[:n], y[:n]

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1; every s3:// URL points at it via the environment."""
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        import boto3
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # instances remember the endpoint they were made with
        boto3.client("s3").create_bucket(Bucket="aae-test")
        yield {"endpoint": endpoint, "bucket": "aae-test", "proc": proc, "port": port}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


SMALL_MODEL = ["model.hidden=[64,64]", "model.disc_hidden=[64,64]", "data.batch_size=50", "train.sync_every=5", "train.parzen_samples=500", "train.progress=false"]


@pytest.fixture(scope="session")
def digits_url(tmp_path_factory):
    """The embedded real digits, sharded once per test session."""
    from aae_dist.data.sources import load_digits
    from aae_dist.data.writer import write_dataset

    url = str(tmp_path_factory.mktemp("digits") / "ds")
    src = load_digits()
    write_dataset(url, src.splits, num_classes=10, source=src.name, shard_size=1000, progress=False)
    return url


def read_summary(run_dir) -> dict:
    import json

    with open(os.path.join(run_dir, "summary.json")) as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def regular_install(tmp_path_factory):
    """aae-dist installed with a plain (non-editable) `pip install .` into a fresh virtual environment; its
    dependencies come from this environment through a .pth file (no downloads but the build backend).
    Returns (python, site-packages, the installed aae_dist/__init__.py)."""
    import sysconfig

    root = tmp_path_factory.mktemp("regular")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with open(os.path.join(site, "deps.pth"), "w") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", repo], check=True, cwd=root)
    where = subprocess.run([py, "-c", "import aae_dist; print(aae_dist.__file__)"], capture_output=True, text=True, cwd=root,
                           check=True).stdout.strip()
    assert where.startswith(site), where  # the regular install, not the checkout
    return py, site, where


def pytest_sessionfinish(session, exitstatus):
    """Leave any Ray this process joined (the Python API's and in-process CLI tests') while the interpreter is
    whole: left to Ray's atexit hook it crashed the finished test process once (SIGSEGV, exit 139, all tests passed)."""
    from aae_dist.ray_connect import disconnect

    disconnect()
