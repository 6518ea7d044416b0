"""Issue 21, items 4 and 7: a secret in a URL (AWS secret keys often hold '/') is never printed, saved or
sent to a Ray job, and a mistyped bucket is never created.  Real storage throughout: the moto S3 server
on 127.0.0.1 (fixture s3_server, bucket aae-test), real commands through aae_dist.cli.main."""

from __future__ import annotations

import http.server
import socket
import tempfile
import threading

import boto3
import pytest

from aae_dist import storage
from aae_dist.cli import main
from aae_dist.errors import UserError
from conftest import SMALL_MODEL

SECRET = "Sq3cR/Et+9x/Zq=="  # the shape of a real AWS secret key: base64 with '/' and '+'
KEY = "AKIATRUSTKEY"
PASSWORD = "Pw9q/Zx7-k"


def creds_url(bucket: str, path: str) -> str:
    return f"s3://{KEY}:{SECRET}@{bucket}/{path}"


def one_error_line(capsys) -> tuple[str, str]:
    """(stdout, the single stderr line); no secret, nor any piece of one cut at its '/', appears in either."""
    out, err = capsys.readouterr()
    err = err.strip()
    assert err.startswith("aae-dist: error:") and "\n" not in err and "Traceback" not in err, err
    for piece in SECRET.split("/") + PASSWORD.split("/"):
        assert piece not in out + err, (piece, out, err)
    return out, err


# --- the rule: user-info is everything between '//' and the last '@' of the URL, when the text before the
# first ':' holds no '/' (USER:SECRET@, the secret may hold '/' and '@'), or when an '@' comes before the first '/'
# (USER@).  So s3://bucket/dir/with@at has none; hiding too much of a path after real credentials is safe.
REDACT = [
    ("s3://KEY:SE/CRET@bucket/runs", "s3://***@bucket/runs"),
    ("http://user:pass@host:8265", "http://***@host:8265"),
    ("s3://KEY:a/b+c==@bucket", "s3://***@bucket"),
    ("http://user:p@ss@host:8265/x", "http://***@host:8265/x"),
    ("http://token@host/api", "http://***@host/api"),
    ("gs://K:S@b/p and s3://K2:A/B@c/q", "gs://***@b/p and s3://***@c/q"),
    ("storage refused writing s3://K:S/x@b/f: denied", "storage refused writing s3://***@b/f: denied"),
]
CLEAN = ["s3://bucket/path/with@at", "s3://bucket/a:b@c", "/local/run@1/x", "/data//run@1/x", "http://host:8265", "ray://head:10001", "runs"]


@pytest.mark.parametrize("url,shown", REDACT)
def test_redact_drops_any_user_info(url, shown):
    assert storage.redact(url) == shown
    assert storage.has_credentials(url)
    assert storage.is_redacted(storage.redact(url))


def test_the_rule_on_ambiguous_urls():
    """'@' in a path is no user-info; after USER: everything to the last '@' is (a port then '/x@y' is rare,
    a secret starting '7/' is not: hiding too much is the safe side); a redacted URL holds no credentials."""
    for url in CLEAN:
        assert storage.redact(url) == url and not storage.has_credentials(url), url
    assert storage.redact("http://host:8265/x@y") == "http://***@y"
    assert storage.redact("s3://K:7/abc@bucket/r") == "s3://***@bucket/r"
    assert not storage.has_credentials("s3://***@bucket/runs")


def test_filesystem_takes_a_secret_with_slashes_to_the_filesystem_object():
    fs, path = storage.filesystem(f"s3://{KEY}:{SECRET}@aae-test/runs/a@b")
    assert (fs.key, fs.secret, path) == (KEY, SECRET, "aae-test/runs/a@b")


def test_shard_train_and_dry_run_never_print_a_secret_with_slashes(s3_server, capsys):
    bucket = s3_server["bucket"]
    data, runs = creds_url(bucket, "trust4/ds"), creds_url(bucket, "trust4/runs")
    assert main(["shard", "digits", data, "--quiet", "--shard-size", "1000"]) == 0
    train = ["train", "--workers", "0", "--storage", runs, "--name", "r", "--set", f"data.path={data}", "--set", "train.max_steps=2"]
    for s in SMALL_MODEL:
        train += ["--set", s]
    assert main(train + ["--dry-run"]) == 0
    assert main(train) == 0
    out, err = capsys.readouterr()
    assert not [p for p in SECRET.split("/") if p in out + err] and "s3://***@aae-test/trust4/runs/r" in out, out
    # the error lines of the three commands
    assert main(["shard", "digits", data, "--quiet"]) == 2
    assert "a dataset already exists at s3://***@aae-test/trust4/ds" in one_error_line(capsys)[1]
    assert main(train) == 2
    assert "already exists at s3://***@aae-test/trust4/runs" in one_error_line(capsys)[1]
    assert main(train[:5] + ["--name", "ghost", "--resume", "--dry-run"] + train[7:]) == 2
    assert "no run named 'ghost' at s3://***@aae-test/trust4/runs" in one_error_line(capsys)[1]
    client = boto3.client("s3")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="trust4/")["Contents"]]
    assert "trust4/runs/r/config.json" in keys and "trust4/runs/r/summary.json" in keys
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert not [p for p in SECRET.split("/") if p.encode() in body], key


@pytest.fixture
def refusing_api():
    """An HTTP server on 127.0.0.1 that answers every request 401, as a job API with the wrong token would."""

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b"Unauthenticated")

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_jobs_address_with_a_password_is_shown_without_it(refusing_api, capsys):
    assert main(["jobs", "list", "--address", f"http://admin:{PASSWORD}@127.0.0.1:1"]) == 2
    assert "cannot reach the Ray cluster at http://***@127.0.0.1:1" in one_error_line(capsys)[1]
    assert main(["jobs", "list", "--address", f"http://admin:{PASSWORD}@127.0.0.1:{refusing_api}"]) == 2
    assert f"at http://***@127.0.0.1:{refusing_api}" in one_error_line(capsys)[1]  # urllib3 quoted 'admin:Pw9q'
    assert main(["jobs", "list", "--address", f"http://admin:{PASSWORD.replace('/', '')}@127.0.0.1:{refusing_api}"]) == 2
    err = one_error_line(capsys)[1]  # the 401 answer
    assert f"the Ray cluster at http://***@127.0.0.1:{refusing_api} refused" in err and PASSWORD.replace("/", "") not in err, err


def submit_argv(*more):
    return ["submit", "--address", "http://127.0.0.1:1", "--dry-run", "--workers", "2", "--set", "data.path=s3://aae-test/ds", *more]


SUBMIT = {
    "--storage": (lambda tmp: submit_argv("--storage", creds_url("aae-test", "runs")), "--storage"),
    "--set run.storage": (lambda tmp: submit_argv("--set", f"run.storage={creds_url('aae-test', 'runs')}"), "--set run.storage"),
    "--set data.path": (lambda tmp: submit_argv("--set", f"data.path={creds_url('aae-test', 'ds')}"), "--set data.path"),
    "--set run.address": (lambda tmp: submit_argv("--set", f"run.address=ray://u:{PASSWORD}@head:10001"), "--set run.address"),
    "--config data.path": (lambda tmp: ["submit", "--address", "http://127.0.0.1:1", "--dry-run", "--config",
                                        config_file(tmp, f"data: {{path: '{creds_url('aae-test', 'ds')}'}}")], "data.path"),
    "--config run.storage": (lambda tmp: ["submit", "--address", "http://127.0.0.1:1", "--dry-run", "--config",
                                          config_file(tmp, f"data: {{path: 's3://aae-test/ds'}}\nrun: {{storage: '{creds_url('aae-test', 'r')}'}}")],
                             "run.storage"),
    "--address": (lambda tmp: ["submit", "--address", f"http://admin:{PASSWORD}@127.0.0.1:1", "--dry-run", "--workers", "2", "--set",
                               "data.path=s3://aae-test/ds"], "--address"),
    "argument after --": (lambda tmp: ["submit", "--address", "http://127.0.0.1:1", "--dry-run", "--command", "eval", "--",
                                       creds_url("aae-test", "runs/r")], "an argument after --"),
}


def config_file(tmp, text: str) -> str:
    path = tmp / "job.yaml"
    path.write_text(text + "\n")
    return str(path)


@pytest.mark.parametrize("case", list(SUBMIT))
def test_submit_refuses_credentials_in_any_url(case, tmp_path, monkeypatch, capsys):
    make, key = SUBMIT[case]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where submit would put the job's folder
    assert main(make(tmp_path)) == 2
    _, err = one_error_line(capsys)
    assert f"{key} " in err and "carries credentials" in err and "environment" in err, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("aae-job-")], "a job folder was written"


def test_submit_without_credentials_still_plans(tmp_path, monkeypatch, capsys):
    """The control: the same submit with clean URLs gets through to the plan."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        argv = submit_argv("--storage", "s3://aae-test/runs")
        argv[2] = f"http://127.0.0.1:{srv.getsockname()[1]}"
        assert main(argv) == 0
    assert "storage s3://aae-test/runs" in capsys.readouterr().out


# --- item 7: storage never creates a bucket


def buckets() -> set[str]:
    return {b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]}


def test_train_on_a_missing_bucket_is_refused_and_creates_nothing(s3_server, digits_url, capsys):
    argv = ["train", "--workers", "0", "--storage", "s3://nobucket/runs", "--name", "r", "--set", f"data.path={digits_url}",
            "--set", "train.max_steps=2"]
    assert main(argv) == 2
    assert "bucket 'nobucket' does not exist" in one_error_line(capsys)[1]
    assert "nobucket" not in buckets()


def test_shard_to_a_missing_bucket_is_refused_and_creates_nothing(s3_server, capsys):
    assert main(["shard", "digits", f"s3://{KEY}:{SECRET}@nobucket/ds", "--quiet"]) == 2
    _, err = one_error_line(capsys)
    assert "bucket 'nobucket' does not exist" in err and "create it first" in err, err
    assert "nobucket" not in buckets()


def test_no_write_path_creates_a_bucket(s3_server, tmp_path):
    """aae-dist's own writes and the filesystem handed to Ray Train (whose checkpoint upload calls mkdir)."""
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "events").write_bytes(b"x")
    attempts = [
        lambda: storage.write_bytes_atomic("s3://nobucket2/a/b.json", b"{}"),
        lambda: storage.upload_dir(str(tmp_path / "tb"), "s3://nobucket2/run/tensorboard"),
        lambda: storage.filesystem("s3://nobucket2/run")[0].makedirs("nobucket2/run/checkpoint_000001", exist_ok=True),
        lambda: storage.filesystem("s3://nobucket2")[0].mkdir("nobucket2"),
    ]
    for attempt in attempts:
        with pytest.raises(UserError, match="bucket 'nobucket2' does not exist"):
            attempt()
    assert "nobucket2" not in buckets()
    storage.write_bytes_atomic(f"s3://{s3_server['bucket']}/trust7/ok.json", b"{}")  # an existing bucket takes writes
    assert storage.read_bytes(f"s3://{s3_server['bucket']}/trust7/ok.json") == b"{}"


def test_a_rejected_config_value_is_quoted_without_its_secret(capsys):
    """A value of the wrong type is quoted back in the error line; its user-info is not."""
    assert main(["train", "--workers", "0", "--set", f"run.storage=[{creds_url('aae-test', 'runs')}]", "--dry-run"]) == 2
    assert "'run.storage'" in one_error_line(capsys)[1]


def test_check_bucket_refuses_a_missing_bucket_before_any_write(s3_server, tmp_path):
    """For a preflight (train --dry-run): the same one line as the first write would give."""
    with pytest.raises(UserError, match="bucket 'nobucket3' does not exist"):
        storage.check_bucket(f"s3://{KEY}:{SECRET}@nobucket3/runs")
    storage.check_bucket(f"s3://{s3_server['bucket']}/runs")
    storage.check_bucket(str(tmp_path / "runs"))
    assert "nobucket3" not in buckets() and not (tmp_path / "runs").exists()
