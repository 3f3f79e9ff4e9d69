"""Shared fixtures: the tiny random model (SmolLM2 tokenizer), a real `mlflow server` process and a
moto S3 server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random model + SmolLM2 tokenizer checkpoint (``prepare_base("tiny-random")``), built once."""
    from troupe.modeling import prepare_base

    return prepare_base("tiny-random", tmp_path_factory.mktemp("tiny_model"))


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free TCP port on loopback, never one this process handed out before: the kernel may give
    a just-closed port again, and Ray refuses to start when two of its components share a port
    (CI saw the dashboard and the node manager both drawn as 34915)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_healthy(uri: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 180) -> None:
    """Poll ``<uri>/health`` until 200; RuntimeError with the log's tail if ``proc`` exits or time runs out
    (the process is killed then)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log_path.read_text()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"server not healthy in {timeout_s:g} s: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite backend, served artifacts) on loopback; yields its URI."""
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{d}/mlflow.db",
            "--artifacts-destination",
            str(d / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    wait_healthy(uri, proc, d / "server.log")
    yield uri
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory):
    """A moto S3 server subprocess on 127.0.0.1:<free port> (module scope); yields its endpoint URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited early (rc={proc.returncode}):\n{log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start on {endpoint}:\n{log.read_text()}")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
