"""RayJob submitter against a Kubernetes API stand-in.

No Kubernetes API server runs here, so :class:`FakeKube` is a tiny real HTTP server on loopback that
implements the few endpoints the submitter uses (create/get/delete ``ray.io/v1`` rayjobs, list pods,
read a pod log, create/replace a ConfigMap). The real ``kubernetes`` Python client talks to it over
HTTP, so serialisation, URLs and error handling are exercised for real; only the operator is scripted
(each GET of the RayJob returns the next scripted ``status``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from tests.kube_standin import FakeKube
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
    with FakeKube([RUNNING], create_status=422) as kube, pytest.raises(RayJobError, match="HTTP 422"):
        submit_rayjob(manifest(), NS, timeout_s=5, api=kube.api(), poll_s=0.01, log=lambda s: None)
    assert kube.deleted == []  # not ours to delete


def test_existing_rayjob_is_adopted_when_the_task_is_retried() -> None:
    """A KFP task retry finds its RayJob (same name) running: follow it instead of failing on 409."""
    lines: list[str] = []
    with FakeKube(
        [RUNNING, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}], create_status=409
    ) as kube:
        status = submit_rayjob(manifest(), NS, timeout_s=5, api=kube.api(), poll_s=0.01, log=lines.append)
    assert status["jobStatus"] == "SUCCEEDED" and kube.deleted == []
    assert any("exists already" in line for line in lines)


def test_waits_through_kuberay_retries_up_to_backoff_limit() -> None:
    """KubeRay shows jobStatus FAILED while it retries under backoffLimit: not a failure of the run."""
    failed = {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "failed": 1}
    ok = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "failed": 1}
    job = manifest()
    assert job["spec"]["backoffLimit"] == 1
    lines: list[str] = []
    with FakeKube([RUNNING, failed, {**RUNNING, "failed": 1}, ok]) as kube:
        status = submit_rayjob(job, NS, timeout_s=5, api=kube.api(), poll_s=0.01, log=lines.append)
    assert status["jobStatus"] == "SUCCEEDED" and kube.deleted == []
    assert any("KubeRay retries from the last checkpoint" in line for line in lines)
    spent = {"jobDeploymentStatus": "Running", "jobStatus": "FAILED", "failed": 2}
    with FakeKube([RUNNING, failed, spent]) as kube, pytest.raises(RayJobError, match="after 2 attempts"):
        submit_rayjob(job, NS, timeout_s=5, api=kube.api(), poll_s=0.01, log=lambda s: None)
    assert kube.deleted == ["run-1-sft"]


def test_sigterm_deletes_the_rayjob() -> None:
    """KFP stops a run by deleting its pod (SIGTERM): the RayJob must not keep training."""
    import os
    import signal
    import threading
    import time

    from troupe.kube.rayjob import Terminated

    def earlier(signum, frame):  # the handler in place before (Ray's own, when ray.init ran earlier)
        raise AssertionError("the earlier SIGTERM handler ran instead of the RayJob's")

    original = signal.signal(signal.SIGTERM, earlier)
    try:
        with FakeKube([RUNNING]) as kube:

            def stop_when_watched() -> None:  # KFP's SIGTERM, once the RayJob is being watched
                deadline = time.monotonic() + 20
                while signal.getsignal(signal.SIGTERM) is earlier and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.1)
                os.kill(os.getpid(), signal.SIGTERM)

            threading.Thread(target=stop_when_watched, daemon=True).start()
            with pytest.raises(Terminated):
                submit_rayjob(manifest(), NS, timeout_s=30, api=kube.api(), poll_s=0.02, log=lambda s: None)
        assert kube.deleted == ["run-1-sft"]
        assert signal.getsignal(signal.SIGTERM) is earlier  # the earlier handler is restored
    finally:
        signal.signal(signal.SIGTERM, original)


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
    assert worker["envFrom"] == [
        {"secretRef": {"name": "troupe-aws"}},
        {"secretRef": {"name": "troupe-mlflow-client"}},
    ]


def test_cli_submit_through_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI path through a kubeconfig. Input reachability (S3) is checked for real in
    tests/test_cluster_training.py; here it is switched off so params.yaml's local paths pass."""
    monkeypatch.setattr("troupe.kube.rayjob.check_cluster_locations", lambda params, step, ckpt: None)
    statuses = [
        RUNNING,
        {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded", "message": "too slow"},
    ]
    with FakeKube(statuses) as kube:
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kubeconfig")))
        from troupe.kube.cli import rayjob_cli

        res = CliRunner().invoke(rayjob_cli, ["submit", "--step", "sft", "--params", str(ROOT / "params.yaml"),
                                              "--env", "test", "--chart-set", "aws.roleArn=arn:aws:iam::1:role/t",
                                              "-n", NS, "--release", "r3", "--poll", "0.01"])  # fmt: skip
    assert res.exit_code == 1
    assert "DeadlineExceeded" in res.output and "too slow" in res.output
    assert kube.deleted == ["r3-sft"]
    assert "r3-params" in kube.configmaps
    assert kube.created[0]["spec"]["entrypoint"] == "troupe train sft --params /etc/troupe/params.yaml"


def test_chart_rbac_lets_the_pipeline_do_what_the_submitter_does() -> None:
    """The Role the chart grants the KFP ServiceAccount covers every API call of the submitter."""
    from troupe.kube.rayjob import SUBMITTER_RBAC

    helm = pytest.importorskip("helm_python")
    values = merge_values(chart_values(CHART, ["values-prod.yaml"]), ROLE)
    out = helm.Chart.load(CHART).render(values, name="r", namespace=NS)
    docs = [d for t in out.values() for d in yaml.safe_load_all(t) if d]
    (role,) = [d for d in docs if d["kind"] == "Role"]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    for group, resource, verbs in SUBMITTER_RBAC:
        granted = set().union(*(set(r["verbs"]) for r in role["rules"]
                                if group in r["apiGroups"] and resource in r["resources"]))  # fmt: skip
        assert verbs <= granted, (group, resource, verbs - granted)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}
    ]


def test_prod_rayjob_requests_efa_and_carries_run_identity() -> None:
    """NCCL over EFA needs the interfaces requested; a retry finds its checkpoints by TROUPE_PIPELINE_RUN."""
    p = merge_values(params(), {"train": {"accelerator": "nvidia", "num_workers": 32}})
    values = training_values(p, "sft", chart_dir=CHART, value_files=["values-prod.yaml"],
                             overrides={**ROLE, "run": {"id": "kfp-run-7"}})  # fmt: skip
    job = rayjob_manifest(values, release="r", namespace=NS, chart_dir=CHART)
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["vpc.amazonaws.com/efa"] == 32
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["TROUPE_PIPELINE_RUN"] == "kfp-run-7" and env["FI_PROVIDER"] == "efa"
    assert int(env["TROUPE_CHECKPOINT_EVERY"]) > 0  # checkpointing on in production
    assert job == chart_rayjob(values, "r")
