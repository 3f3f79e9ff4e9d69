"""DVC remote on S3: ``dvc push`` / ``dvc pull`` round-trip of a Troupe dataset.

moto's S3 server stands in for AWS S3 (no AWS here): it is started as a real process
(``python -m moto.server``) on loopback, and DVC talks to it over HTTP through the remote's
``endpointurl``, exactly as it would talk to AWS. Credentials are dummy values taken from the
environment. Uses the ``dvc-s3`` plugin (a Troupe dependency).

Every ``dvc`` command runs as a subprocess (``python -m dvc``) inside a throwaway git repo under
``tmp_path``; nothing touches the project's own ``.dvc`` or cache.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3  # noqa: E402
import dvc_s3  # noqa: E402,F401  (DVC's S3 remote plugin must be installed)
import moto.server  # noqa: E402,F401
import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
BUCKET = "troupe-dvc"
REGION = "us-east-1"
DVC_TIMEOUT = 120


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """Dummy credentials in the environment; no ~/.aws config or real profile can leak in."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    for var in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    # keep DVC quiet and self-contained: no telemetry, no update checks, no global/system config
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site-cache"))
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(tmp_path / "dvc-global"))
    monkeypatch.setenv("DVC_SYSTEM_CONFIG_DIR", str(tmp_path / "dvc-system"))


@pytest.fixture
def s3(moto_s3, aws_env):
    client = boto3.client("s3", endpoint_url=moto_s3, region_name=REGION)
    client.create_bucket(Bucket=BUCKET)
    yield client
    # empty + drop the bucket so each test starts clean
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=DVC_TIMEOUT)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} -> rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], repo, check=check)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def dvc_repo(tmp_path, aws_env, moto_s3) -> Path:
    """A fresh git + DVC repo holding a copy of ``data/sample`` tracked by ``dvc add``, remote ``s3``."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _run(["git", "init", "-q"], repo)
    dvc(repo, "init", "-q")
    shutil.copytree(SAMPLE, repo / "data" / "sample")
    dvc(repo, "add", "data/sample")
    dvc(repo, "remote", "add", "-d", "s3", f"s3://{BUCKET}/troupe")
    dvc(repo, "remote", "modify", "s3", "endpointurl", moto_s3)
    dvc(repo, "remote", "modify", "s3", "region", REGION)
    return repo


def test_dvc_push_pull_roundtrip_via_s3(dvc_repo, s3):
    data = dvc_repo / "data" / "sample"
    original = _digests(data)
    assert {"characters.jsonl", "dialogues.jsonl"} <= set(original)
    assert (dvc_repo / "data" / "sample.dvc").is_file()

    push = dvc(dvc_repo, "push")
    assert "pushed" in (push.stdout + push.stderr).lower()

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="troupe/").get("Contents", [])]
    # DVC 3 layout: troupe/files/md5/<2>/<rest>; one object per file + the .dir manifest
    assert keys and all(k.startswith("troupe/files/md5/") for k in keys), keys
    assert len(keys) == len(original) + 1, keys
    assert any(k.endswith(".dir") for k in keys), keys

    # lose everything local: workspace copy and the whole cache
    shutil.rmtree(data)
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    assert not data.exists()

    dvc(dvc_repo, "pull")
    assert _digests(data) == original
    for name in original:
        assert (data / name).read_bytes() == (SAMPLE / name).read_bytes()
    # and DVC itself agrees the workspace matches the remote
    status = dvc(dvc_repo, "status", "--cloud")
    assert "in sync" in status.stdout + status.stderr


def _error_lines(out: str) -> str:
    return "\n".join(line for line in out.splitlines() if "ERROR" in line)


def test_dvc_push_fails_clearly_on_missing_bucket(dvc_repo, s3):
    dvc(dvc_repo, "remote", "modify", "s3", "url", "s3://no-such-bucket/troupe")
    # DVC's one-line ERROR gives the S3 error but not the bucket; -v adds the target URL to the log.
    push = dvc(dvc_repo, "push", "-v", check=False)
    out = push.stdout + push.stderr
    assert push.returncode != 0, out
    err = _error_lines(out)
    assert "NoSuchBucket" in err and "bucket does not exist" in err, out
    assert "s3://no-such-bucket/troupe" in out, out


def _set_moto_auth(endpoint: str, unauthenticated_requests: str) -> None:
    """moto accepts any key unless told to authenticate: ``0`` enforces IAM from now on, ``inf`` turns it off."""
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=unauthenticated_requests.encode(),
        headers={"Content-Type": "text/plain"},  # form-encoded bodies are eaten by Flask
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def test_dvc_push_fails_clearly_on_bad_credentials(dvc_repo, s3, moto_s3, monkeypatch):
    # a real IAM identity on the fake AWS, allowed to do anything
    iam = boto3.client("iam", endpoint_url=moto_s3, region_name=REGION)
    iam.create_user(UserName="troupe-ci")
    iam.put_user_policy(
        UserName="troupe-ci",
        PolicyName="all",
        PolicyDocument='{"Version": "2012-10-17", "Statement": '
        '[{"Effect": "Allow", "Action": "*", "Resource": "*"}]}',
    )
    key = iam.create_access_key(UserName="troupe-ci")["AccessKey"]

    _set_moto_auth(moto_s3, "0")
    try:
        # a key the server does not know -> push must fail, and say where it was going
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        push = dvc(dvc_repo, "push", "-v", check=False)
        out = push.stdout + push.stderr
        assert push.returncode != 0, out
        err = _error_lines(out)
        assert "403" in err and "Forbidden" in err, out
        assert f"s3://{BUCKET}/troupe" in out, out
        authed = boto3.client(
            "s3",
            endpoint_url=moto_s3,
            region_name=REGION,
            aws_access_key_id=key["AccessKeyId"],
            aws_secret_access_key=key["SecretAccessKey"],
        )
        assert authed.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0

        # the same remote with the valid key works (auth really is being checked, not just broken)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        dvc(dvc_repo, "push")
        assert authed.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) > 0
    finally:
        _set_moto_auth(moto_s3, "inf")
