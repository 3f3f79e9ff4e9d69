"""RayJob submitter against a Kubernetes API stand-in.

No Kubernetes API server runs here, so :class:`FakeKube` is a tiny real HTTP server on loopback that
implements the few endpoints the submitter uses (create/get/delete ``ray.io/v1`` rayjobs, list pods,
read a pod log, create/replace a ConfigMap). The real ``kubernetes`` Python client talks to it over
HTTP, so serialisation, URLs and error handling are exercised for real; only the operator is scripted
(each GET of the RayJob returns the next scripted ``status``).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from troupe.config import ConfigError
from troupe.kube.rayjob import (
    RayJobError,
    chart_values,
    merge_values,
    rayjob_manifest,
    submit_rayjob,
    training_values,
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "troupe-training"
NS = "troupe-test"
ROLE = {"aws": {"roleArn": "arn:aws:iam::123456789012:role/troupe-test-training"}}
RJ = re.compile(r"^/apis/ray\.io/v1/namespaces/([^/]+)/rayjobs(?:/([^/?]+))?")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/?]+)/log)?")
CMS = re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps(?:/([^/?]+))?")


class FakeKube:
    """Loopback HTTP stand-in for the Kubernetes API (see module docstring)."""

    def __init__(self, statuses: list[dict[str, Any]], create_status: int = 201, log_text: str = ""):
        self.statuses = list(statuses)
        self.create_status = create_status
        self.log_text = log_text
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.configmaps: dict[str, dict[str, Any]] = {}
        self.gets = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: Any, ctype: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict[str, Any]:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                  "reason": reason, "message": message, "code": code})  # fmt: skip

            def do_POST(self) -> None:  # noqa: N802
                if RJ.match(self.path):
                    body = self._body()
                    if fake.create_status != 201:
                        return self._status(fake.create_status, "AlreadyExists",
                                            f'rayjobs.ray.io "{body["metadata"]["name"]}" already exists')  # fmt: skip
                    fake.created.append(body)
                    return self._send(201, body)
                if CMS.match(self.path):
                    body = self._body()
                    if body["metadata"]["name"] in fake.configmaps:
                        return self._status(409, "AlreadyExists", "configmap exists")
                    fake.configmaps[body["metadata"]["name"]] = body
                    return self._send(201, body)
                self._status(404, "NotFound", self.path)

            def do_PUT(self) -> None:  # noqa: N802
                if (m := CMS.match(self.path)) and m.group(2):
                    fake.configmaps[m.group(2)] = self._body()
                    return self._send(200, fake.configmaps[m.group(2)])
                self._status(404, "NotFound", self.path)

            def do_GET(self) -> None:  # noqa: N802
                if (m := RJ.match(self.path)) and m.group(2):
                    found = [o for o in fake.created if o["metadata"]["name"] == m.group(2)]
                    if not found or m.group(2) in fake.deleted:
                        return self._status(404, "NotFound", "no such rayjob")
                    i = min(fake.gets, len(fake.statuses) - 1)
                    fake.gets += 1
                    return self._send(200, {**found[0], "status": fake.statuses[i]})
                if m := PODS.match(self.path):
                    if m.group(2):
                        return self._send(200, fake.log_text[: 20 * fake.gets], "text/plain")
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                            "items": [{"metadata": {"name": "submitter-x1"}}]})  # fmt: skip
                self._status(404, "NotFound", self.path)

            def do_DELETE(self) -> None:  # noqa: N802
                if (m := RJ.match(self.path)) and m.group(2):
                    fake.deleted.append(m.group(2))
                    return self._send(200, {"kind": "Status", "status": "Success"})
                self._status(404, "NotFound", self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKube:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def api(self) -> Any:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return client.CustomObjectsApi(client.ApiClient(cfg))


def params() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def manifest(step: str = "sft", accelerator: str = "nvidia") -> dict[str, Any]:
    p = merge_values(params(), {"train": {"accelerator": accelerator, "num_workers": 8}})
    values = training_values(p, step, chart_dir=CHART, value_files=["values-test.yaml"], overrides=ROLE)
    return rayjob_manifest(values, release="run-1", namespace=NS, chart_dir=CHART)


def chart_rayjob(values: dict[str, Any], release: str) -> dict[str, Any]:
    helm = pytest.importorskip("helm_python")
    out = helm.Chart.load(CHART).render(values, name=release, namespace=NS)
    docs = [d for t in out.values() for d in yaml.safe_load_all(t) if d]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    return job


RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}


def test_success_sends_the_charts_rayjob_and_streams_logs() -> None:
    job = manifest()
    lines: list[str] = []
    statuses = [{"jobDeploymentStatus": "Initializing"}, RUNNING,
                {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]  # fmt: skip
    with FakeKube(statuses, log_text="step 1 loss 2.3\nstep 2 loss 2.1\nstep 3 loss 1.9\n") as kube:
        status = submit_rayjob(job, NS, timeout_s=30, api=kube.api(), poll_s=0.01, log=lines.append)
    assert status["jobStatus"] == "SUCCEEDED"
    assert kube.deleted == []
    # What reached the API server is exactly what the chart renders for the same values.
    p = merge_values(params(), {"train": {"accelerator": "nvidia", "num_workers": 8}})
    values = training_values(p, "sft", chart_dir=CHART, value_files=["values-test.yaml"], overrides=ROLE)
    (sent,) = kube.created
    assert sent == chart_rayjob(values, "run-1")
    assert (
        sent["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 1
    )  # 8 workers / 8 GPUs per pod
    assert any("Running" in line for line in lines)
    assert any("[submitter-x1] step 1 loss 2.3" in line for line in lines)


@pytest.mark.parametrize(
    ("status", "state", "needle"),
    [
        ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "reason": "AppFailed",
          "message": "Job entrypoint command failed with exit code 1"}, "FAILED", "exit code 1"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED", "message": "stopped by user"},
         "STOPPED", "stopped by user"),
        ({"jobDeploymentStatus": "Failed", "jobStatus": "RUNNING", "reason": "DeadlineExceeded",
          "message": "The RayJob has passed the activeDeadlineSeconds"}, "Failed", "DeadlineExceeded"),
        ({"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed",
          "message": "The RayJob spec is invalid: entrypoint is required"}, "ValidationFailed", "spec is invalid"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "PENDING"}, "Complete", "without SUCCEEDED"),
    ],
)  # fmt: skip
def test_failure_states_raise_and_delete(status: dict[str, Any], state: str, needle: str) -> None:
    job = manifest("dpo")
    with FakeKube([RUNNING, status]) as kube, pytest.raises(RayJobError) as err:
        submit_rayjob(job, NS, timeout_s=30, api=kube.api(), poll_s=0.01, log=lambda s: None)
    assert err.value.state == state and err.value.name == "run-1-dpo"
    assert needle in str(err.value) and f"{NS}/run-1-dpo" in str(err.value)
    assert kube.deleted == ["run-1-dpo"]


def test_timeout_raises_and_deletes() -> None:
    with FakeKube([RUNNING]) as kube, pytest.raises(RayJobError, match="timed out after 0.2s") as err:
        submit_rayjob(manifest(), NS, timeout_s=0.2, api=kube.api(), poll_s=0.02, log=lambda s: None)
    assert err.value.state == "timeout"
    assert kube.deleted == ["run-1-sft"]


def test_refused_create_names_the_api_message_and_deletes_nothing() -> None:
    with FakeKube([RUNNING], create_status=409) as kube, pytest.raises(RayJobError, match="already exists"):
        submit_rayjob(manifest(), NS, timeout_s=5, api=kube.api(), poll_s=0.01, log=lambda s: None)
    assert kube.deleted == []  # not ours to delete


def test_missing_kubeconfig_names_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nope"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="set KUBECONFIG"):
        submit_rayjob(manifest(), NS, timeout_s=1)


def test_unknown_accelerator_and_missing_secret_name_the_setting() -> None:
    p = merge_values(params(), {"train": {"accelerator": "tpu"}})
    with pytest.raises(ConfigError, match=r"set train\.accelerator"):
        training_values(p, "sft", chart_dir=CHART, value_files=["values-test.yaml"], overrides=ROLE)
    with pytest.raises(ConfigError, match=r"aws\.roleArn.*aws\.existingSecret"):
        training_values(params(), "sft", chart_dir=CHART, value_files=["values-test.yaml"])
    values = chart_values(CHART, ["values-test.yaml"])
    with pytest.raises(ConfigError, match="aws.existingSecret"):
        rayjob_manifest(values)


def _cli(args: list[str]) -> Any:
    from troupe.kube.cli import rayjob_cli

    return CliRunner().invoke(rayjob_cli, args, catch_exceptions=False)


def test_cli_render_matches_chart(tmp_path: Path) -> None:
    res = _cli(["render", "--step", "sft", "--params", str(ROOT / "params.yaml"), "--set", "train.accelerator=ascend",
                "--env", "prod", "--chart-set", "aws.existingSecret=troupe-aws", "-n", NS, "--release", "r2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    cm, job = list(yaml.safe_load_all(res.output))
    assert yaml.safe_load(cm["data"]["params.yaml"])["train"]["accelerator"] == "ascend"
    values = merge_values(chart_values(CHART, ["values-prod.yaml"]), {
        "step": "sft", "accelerator": "ascend", "aws": {"existingSecret": "troupe-aws"},
        "worker": {"replicas": 1}, "params": {"content": cm["data"]["params.yaml"]}})  # fmt: skip
    assert job == chart_rayjob(values, "r2")
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["huawei.com/Ascend910"] == 8
    assert worker["envFrom"] == [{"secretRef": {"name": "troupe-aws"}}]


def test_cli_submit_through_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    statuses = [
        RUNNING,
        {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded", "message": "too slow"},
    ]
    with FakeKube(statuses) as kube:
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": kube.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
        }  # fmt: skip
        (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        from troupe.kube.cli import rayjob_cli

        res = CliRunner().invoke(rayjob_cli, ["submit", "--step", "sft", "--params", str(ROOT / "params.yaml"),
                                              "--env", "test", "--chart-set", "aws.roleArn=arn:aws:iam::1:role/t",
                                              "-n", NS, "--release", "r3", "--poll", "0.01"])  # fmt: skip
    assert res.exit_code == 1
    assert "DeadlineExceeded" in res.output and "too slow" in res.output
    assert kube.deleted == ["r3-sft"]
    assert "r3-params" in kube.configmaps
    assert kube.created[0]["spec"]["entrypoint"] == "troupe train sft --params /etc/troupe/params.yaml"
