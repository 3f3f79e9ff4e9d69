"""Training on Kubernetes: the KubeRay RayJob of ``charts/troupe-training``, built in Python and submitted.

One source of truth for the shape: the chart's ``values.yaml`` (plus an environment file such as
``values-prod.yaml``). :func:`training_values` merges those files the way Helm does and fills in what
params.yaml decides (step, ``train.accelerator``, ``train.num_workers``, the params file itself);
:func:`rayjob_manifest` turns the values into exactly the RayJob that ``helm template`` renders
(``tests/test_charts.py`` and ``tests/test_rayjob.py`` compare the two); :func:`submit_rayjob` creates
it with the Kubernetes ``CustomObjectsApi``, follows ``status.jobDeploymentStatus`` / ``jobStatus``
and the submitter pod's log, and deletes the RayJob on any failure so nothing half-submitted remains.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from troupe.config import ConfigError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
STEPS = ("sft", "dpo")

#: Deployment states after which the RayJob will not make progress (KubeRay v1 ``JobDeploymentStatus``).
#: KubeRay sets ``Failed`` only once ``backoffLimit`` retries are spent; while it retries, the
#: previous attempt's ``jobStatus`` FAILED stays visible beside ``Retrying``/``Initializing``.
FAILED_DEPLOYMENT = {"Failed", "ValidationFailed"}
#: ``jobStatus`` values of a Ray job attempt that did not succeed (terminal only with FAILED_DEPLOYMENT
#: or once ``status.failed`` exceeds ``spec.backoffLimit``).
FAILED_JOB = {"FAILED", "STOPPED"}

#: The Kubernetes API calls :func:`submit_rayjob` and ``troupe rayjob submit`` make, as RBAC rules:
#: the training chart's ``templates/rbac.yaml`` grants them to the KFP pipeline's ServiceAccount
#: (``tests/test_charts.py`` checks the rendered Role covers every rule).
SUBMITTER_RBAC: tuple[tuple[str, str, frozenset[str]], ...] = (
    ("ray.io", "rayjobs", frozenset({"create", "get", "delete"})),
    ("", "configmaps", frozenset({"create", "get", "update"})),
    ("", "pods", frozenset({"list"})),
    ("", "pods/log", frozenset({"get"})),
)


class RayJobError(RuntimeError):
    """A RayJob that failed, was stopped, could not be created, or timed out.

    ``state`` is the failing status (e.g. ``FAILED``, ``ValidationFailed``, ``timeout``); the message
    names the RayJob and KubeRay's ``status.reason`` / ``status.message``.
    """

    def __init__(self, message: str, *, name: str = "", state: str = "", reason: str = ""):
        super().__init__(message)
        self.name, self.state, self.reason = name, state, reason


def default_chart_dir() -> Path:
    """``charts/troupe-training`` of this checkout, or ``$TROUPE_CHARTS_DIR/troupe-training``."""
    root = os.environ.get("TROUPE_CHARTS_DIR")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "charts"
    return base / "troupe-training"


def merge_values(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's value coalescing: maps merge recursively, other values replace, ``null`` deletes a key."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_values(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: values file not found")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def chart_values(
    chart_dir: str | Path | None = None, value_files: Iterable[str | Path] = ()
) -> dict[str, Any]:
    """The chart's ``values.yaml`` merged with ``value_files`` in order (like ``helm -f a -f b``).

    A relative file that does not exist as given is looked up inside the chart directory, so
    ``values-prod.yaml`` works from anywhere. Raises ConfigError for a missing or non-mapping file.
    """
    cdir = Path(chart_dir) if chart_dir else default_chart_dir()
    values = _read_yaml(cdir / "values.yaml")
    for f in value_files:
        p = Path(f)
        if not p.is_file() and not p.is_absolute() and (cdir / p).is_file():
            p = cdir / p
        values = merge_values(values, _read_yaml(p))
    return values


def chart_meta(chart_dir: str | Path | None = None) -> dict[str, Any]:
    """``Chart.yaml`` of the training chart as a dict (``appVersion`` goes into the labels)."""
    cdir = Path(chart_dir) if chart_dir else default_chart_dir()
    return _read_yaml(cdir / "Chart.yaml")


def training_values(
    params: dict[str, Any],
    step: str,
    *,
    chart_dir: str | Path | None = None,
    value_files: Iterable[str | Path] = (),
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Chart values for one training run: chart files, then params.yaml, then ``overrides``.

    From ``params``: ``step``; ``accelerator`` <- ``train.accelerator``; ``worker.replicas`` <-
    ceil(``train.num_workers`` / devices per worker of that accelerator); ``params.content`` <- the
    params dict as YAML (mounted at /etc/troupe/params.yaml). ``overrides`` (nested dict, e.g.
    ``{"aws": {"roleArn": "arn:..."}}``) win over everything. The result is checked with
    :func:`check_values`.
    """
    values = chart_values(chart_dir, value_files)
    train = params.get("train") or {}
    values["step"] = step
    if train.get("accelerator"):
        values["accelerator"] = train["accelerator"]
    acc = _accelerator(values, setting="train.accelerator (params.yaml)")
    if train.get("num_workers"):
        values.setdefault("worker", {})["replicas"] = math.ceil(
            int(train["num_workers"]) / max(int(acc.get("perWorker") or 1), 1)
        )
    values.setdefault("params", {})["content"] = yaml.safe_dump(params, sort_keys=False, allow_unicode=True)
    values["params"]["existingConfigMap"] = ""
    if overrides:
        values = merge_values(values, overrides)
    check_values(values)
    return values


def _accelerator(values: dict[str, Any], setting: str = "accelerator") -> dict[str, Any]:
    name = values.get("accelerator")
    profiles = values.get("accelerators") or {}
    if name not in profiles:
        raise ConfigError(f"accelerator={name!r} is not one of {', '.join(sorted(profiles))}: set {setting}")
    return profiles[name]


def check_values(values: dict[str, Any]) -> None:
    """The chart's ``fail`` checks, in Python: each ConfigError names the setting to change."""
    if values.get("step") not in STEPS:
        raise ConfigError(f"step={values.get('step')!r}: set step to sft or dpo")
    _accelerator(values)
    if not (values.get("checkpoints") or {}).get("s3Uri"):
        raise ConfigError("checkpoints.s3Uri is empty: set it to s3://<checkpoints bucket>/<prefix>")
    aws = values.get("aws") or {}
    if not aws.get("roleArn") and not aws.get("existingSecret"):
        raise ConfigError("no AWS credentials: set aws.roleArn (IRSA) or aws.existingSecret (Secret name)")


def _quote(v: Any) -> str:
    """What Helm's ``quote`` makes of a scalar."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _labels(release: str, chart: dict[str, Any]) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "troupe-training",
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/version": str(chart.get("appVersion", "")),
        "app.kubernetes.io/part-of": "troupe",
    }


def params_configmap_name(values: dict[str, Any], release: str) -> str:
    """Name of the ConfigMap holding params.yaml (``params.existingConfigMap`` or ``<release>-params``)."""
    return (values.get("params") or {}).get("existingConfigMap") or f"{release}-params"


def params_configmap(
    values: dict[str, Any],
    *,
    release: str = "troupe",
    namespace: str = "default",
    chart_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The chart's params ConfigMap (v1) as a dict; ``data['params.yaml']`` is ``params.content``."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": params_configmap_name(values, release),
            "namespace": namespace,
            "labels": _labels(release, chart_meta(chart_dir)),
        },
        "data": {"params.yaml": values["params"]["content"]},
    }


def rayjob_manifest(
    values: dict[str, Any],
    *,
    release: str = "troupe",
    namespace: str = "default",
    chart_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The ``ray.io/v1`` RayJob that ``charts/troupe-training`` renders for ``values``.

    Args:
        values: full chart values (``training_values`` or ``chart_values`` output).
        release: Helm release name; the RayJob is ``<release>-<step>``.
        namespace: namespace written into ``metadata.namespace``.

    Returns:
        The manifest as a plain dict, equal to the chart's rendered RayJob parsed as YAML.

    Raises:
        ConfigError: unknown accelerator, bad step, missing checkpoint URI or AWS credentials.
    """
    check_values(values)
    v = values
    acc = _accelerator(v)
    labels = _labels(release, chart_meta(chart_dir))
    image = f"{v['image']['repository']}:{v['image']['version']}-{acc['imageSuffix']}"
    env = [{"name": "AWS_DEFAULT_REGION", "value": _quote(v["aws"]["region"])}]
    mount = v["params"]["mountPath"]

    def pod_common() -> dict[str, Any]:
        return {
            "serviceAccountName": v["serviceAccount"]["name"],
            "securityContext": copy.deepcopy(v["podSecurityContext"]),
            "volumes": [
                {"name": "params", "configMap": {"name": params_configmap_name(v, release)}},
                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": v["worker"]["shmSize"]}},
            ],
        }

    def container(name: str) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": name,
            "image": image,
            "imagePullPolicy": v["image"]["pullPolicy"],
            "securityContext": copy.deepcopy(v["containerSecurityContext"]),
            "env": copy.deepcopy(env),
        }
        secrets = [v["aws"].get("existingSecret"), (v.get("mlflow") or {}).get("existingSecret")]
        if any(secrets):
            c["envFrom"] = [{"secretRef": {"name": s}} for s in secrets if s]
        c["volumeMounts"] = [
            {"name": "params", "mountPath": mount, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ]
        return c

    head = container("ray-head")
    head["resources"] = copy.deepcopy(v["head"]["resources"])
    head["ports"] = [
        {"name": "gcs", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "client", "containerPort": 10001},
    ]
    worker = container("ray-worker")
    res: dict[str, Any] = {"cpu": _quote(v["worker"]["cpu"]), "memory": _quote(v["worker"]["memory"])}
    if acc.get("resourceName"):
        res[acc["resourceName"]] = acc["perWorker"]
    if acc.get("efaPerWorker"):
        res["vpc.amazonaws.com/efa"] = acc["efaPerWorker"]
    worker["resources"] = {"requests": dict(res), "limits": dict(res)}
    replicas = v["worker"]["replicas"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": f"{release}-{v['step']}",
            "namespace": namespace,
            "labels": {**labels, "troupe.ai/step": v["step"]},
        },
        "spec": {
            "entrypoint": f"troupe train {v['step']} --params {mount}/params.yaml",
            "runtimeEnvYAML": json.dumps(runtime_env(v, release), sort_keys=True, separators=(",", ":")),
            "shutdownAfterJobFinishes": v["job"]["shutdownAfterJobFinishes"],
            "ttlSecondsAfterFinished": v["job"]["ttlSecondsAfterFinished"],
            "activeDeadlineSeconds": v["job"]["activeDeadlineSeconds"],
            "backoffLimit": v["job"]["backoffLimit"],
            "submissionMode": v["job"]["submissionMode"],
            "rayClusterSpec": {
                "rayVersion": _quote(v["rayVersion"]),
                "headGroupSpec": {
                    "rayStartParams": copy.deepcopy(v["head"]["rayStartParams"]),
                    "template": {
                        "metadata": {"labels": dict(labels)},
                        "spec": {
                            **pod_common(),
                            "nodeSelector": copy.deepcopy(v["head"]["nodeSelector"]),
                            "tolerations": copy.deepcopy(v["head"]["tolerations"]),
                            "containers": [head],
                        },
                    },
                },
                "workerGroupSpecs": [
                    {
                        "groupName": f"{v['accelerator']}-workers",
                        "replicas": replicas,
                        "minReplicas": replicas,
                        "maxReplicas": replicas,
                        "rayStartParams": {
                            **(acc.get("rayStartParams") or {}),
                            **(v["worker"].get("rayStartParams") or {}),
                        },
                        "template": {
                            "metadata": {"labels": dict(labels)},
                            "spec": {
                                **pod_common(),
                                "nodeSelector": copy.deepcopy(acc["nodeSelector"]),
                                "tolerations": copy.deepcopy(acc["tolerations"]),
                                "containers": [worker],
                            },
                        },
                    }
                ],
            },
        },
    }


#: ``paths.*`` keys a training step reads, and the one it writes (``troupe train <step>``).
STEP_IO: dict[str, tuple[tuple[str, ...], str]] = {
    "sft": (("splits", "base_model"), "sft_model"),
    "dpo": (("splits", "pairs", "sft_model"), "dpo_model"),
}


def check_cluster_locations(params: dict[str, Any], step: str, checkpoint_uri: str) -> None:
    """Fail at submission, not after an hour, when a RayJob could not reach its inputs or outputs.

    Every input ``paths.*`` of ``step`` (:data:`STEP_IO`) must be a URI every pod can read (a local
    path exists only on the pod or machine that wrote it) and readable now (credentials, endpoint,
    object present); the output must be a URI too; the bucket of ``checkpoint_uri`` (the chart's
    ``checkpoints.s3Uri``) must exist.

    Raises:
        troupe.storage.StorageError: naming ``paths.<key>`` or ``checkpoints.s3Uri``, the location and why.
    """
    from troupe import storage

    inputs, output = STEP_IO[step]
    paths = params.get("paths") or {}
    for key in (*inputs, output):
        loc = str(paths.get(key, ""))
        if not storage.is_remote(loc):
            raise storage.StorageError(
                f"paths.{key}={loc!r}: a local path; the RayJob's pods cannot read it. Give a URI every pod "
                "can reach (s3://<bucket>/<run>/...): the KFP step uploads its inputs under its storage_root",
                uri=loc,
                reason="local",
            )
    for key in inputs:
        storage.check_readable(str(paths[key]), f"paths.{key}")
    storage.check_root(checkpoint_uri, "checkpoints.s3Uri")


def run_id(values: dict[str, Any], release: str) -> str:
    """The run's stable identity (``run.id``, default the release name): ``TROUPE_PIPELINE_RUN``."""
    return str((values.get("run") or {}).get("id") or release)


def runtime_env(values: dict[str, Any], release: str) -> dict[str, Any]:
    """The RayJob's runtime env (``spec.runtimeEnvYAML``): env vars every process of the job sees.

    ``TROUPE_PIPELINE_RUN`` (:func:`run_id`; names the Ray Train run, so a retry resumes),
    ``TROUPE_ACCELERATOR``, ``MLFLOW_TRACKING_URI``, ``TROUPE_CHECKPOINT_URI``,
    ``TROUPE_CHECKPOINT_EVERY``, then the accelerator profile's and ``extraEnv`` entries. KubeRay
    submits it with the entrypoint through Ray's Job Submission API, so it reaches the driver and
    every Ray Train worker on whichever node they run (pod env reaches only Ray's own processes).
    """
    acc = _accelerator(values)
    env = {
        "TROUPE_PIPELINE_RUN": run_id(values, release),
        "TROUPE_ACCELERATOR": _quote(values["accelerator"]),
        "MLFLOW_TRACKING_URI": _quote(values["mlflow"]["trackingUri"]),
        "TROUPE_CHECKPOINT_URI": _quote(values["checkpoints"]["s3Uri"]),
        "TROUPE_CHECKPOINT_EVERY": _quote((values.get("checkpoints") or {}).get("everySteps", 0)),
    }
    for e in (acc.get("env") or []) + (values.get("extraEnv") or []):
        env[e["name"]] = _quote(e["value"])
    return {"env_vars": env}


# --------------------------------------------------------------------------------------------------
# Submission


def kube_api_client() -> Any:
    """A kubernetes ``ApiClient`` from ``$KUBECONFIG`` / ~/.kube/config, else the in-cluster config.

    Raises:
        ConfigError: neither is available (the message says to set KUBECONFIG).
    """
    from kubernetes import client, config

    try:
        # Read $KUBECONFIG now: the client only reads it once, at import time.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    except Exception as kube_err:  # noqa: BLE001 - fall back to in-cluster, report both
        try:
            config.load_incluster_config()
        except Exception as incluster_err:  # noqa: BLE001
            raise ConfigError(
                "no Kubernetes configuration: set KUBECONFIG to a kubeconfig file (e.g. `aws eks "
                f"update-kubeconfig --name <cluster>`) or run inside the cluster ({kube_err}; {incluster_err})"
            ) from incluster_err
    return client.ApiClient()


def _api_message(e: Exception) -> str:
    body = getattr(e, "body", None)
    if body:
        try:
            import json

            return json.loads(body).get("message") or str(body)
        except (ValueError, AttributeError):
            return str(body)
    return str(e)


def _status_text(status: dict[str, Any]) -> str:
    parts = [f"{k}={status[k]}" for k in ("jobDeploymentStatus", "jobStatus", "reason") if status.get(k)]
    if status.get("message"):
        parts.append(f"message: {status['message']}")
    return ", ".join(parts) or "no status"


class Terminated(BaseException):
    """SIGTERM received (a KFP run was stopped, the pod is being deleted): clean up and exit."""


def _raise_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread; returns a function that restores it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):  # noqa: ARG001
        raise Terminated(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def submit_rayjob(
    manifest: dict[str, Any],
    namespace: str,
    timeout_s: float,
    api: Any = None,
    *,
    poll_s: float = 5.0,
    log: Callable[[str], None] = print,
    follow_logs: bool = True,
) -> dict[str, Any]:
    """Create ``manifest`` (a RayJob) in ``namespace`` and wait until it succeeds.

    Progress (status changes) and new lines of the submitter pod's log (the driver output in
    K8sJobMode; pods labelled ``batch.kubernetes.io/job-name=<rayjob>``) go to ``log``.

    KubeRay retries a failed job up to ``spec.backoffLimit`` times on a fresh RayCluster; meanwhile
    the failed attempt's ``jobStatus: FAILED`` stays visible. This waits through those retries: a
    FAILED attempt is terminal only when ``jobDeploymentStatus`` is ``Failed`` (KubeRay's verdict) or
    ``status.failed`` exceeds ``backoffLimit``. Each retry resumes from the run's last checkpoint
    (same ``TROUPE_PIPELINE_RUN``, see :func:`runtime_env`).

    A RayJob of the same name that already exists (the KFP task itself was retried) is adopted and
    followed instead of failing the creation.

    Args:
        manifest: RayJob dict (``rayjob_manifest`` output).
        namespace: target namespace.
        timeout_s: seconds to wait after creation before giving up.
        api: a kubernetes ``CustomObjectsApi``; default one from :func:`kube_api_client`. Logs are
            read through a ``CoreV1Api`` on the same ``api_client``.
        poll_s: seconds between status reads.

    Returns:
        The final ``status`` dict (``jobStatus`` SUCCEEDED).

    Raises:
        RayJobError: creation refused (e.g. invalid), retries spent (``jobDeploymentStatus`` Failed /
            ValidationFailed, or more failures than ``backoffLimit``), Complete without SUCCEEDED, or
            timeout. Except for a refused creation, the RayJob is deleted before raising.
        Terminated: SIGTERM (KFP stopped the run): the RayJob is deleted first, so no training keeps
            running for a pipeline nobody waits on. Ctrl-C likewise.
        ConfigError: no kubeconfig when ``api`` is None.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    if api is None:
        api = client.CustomObjectsApi(kube_api_client())
    core = client.CoreV1Api(api.api_client)
    name = manifest["metadata"]["name"]
    backoff = int(manifest.get("spec", {}).get("backoffLimit") or 0)
    restore = _raise_on_sigterm()
    try:
        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
            log(f"rayjob {namespace}/{name}: created")
        except ApiException as e:
            if e.status != 409:
                raise RayJobError(
                    f"RayJob {namespace}/{name} was not created (HTTP {e.status} {e.reason}): {_api_message(e)}",
                    name=name,
                    state="create",
                    reason=str(e.reason or ""),
                ) from e
            log(f"rayjob {namespace}/{name}: exists already (task retried?): following it")
        return _follow(api, core, namespace, name, backoff, timeout_s, poll_s, log, follow_logs)
    finally:
        restore()


def _follow(api, core, namespace, name, backoff, timeout_s, poll_s, log, follow_logs) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    def delete() -> None:
        try:
            api.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background"
            )
            log(f"rayjob {namespace}/{name}: deleted")
        except ApiException as e:
            if e.status != 404:
                log(f"rayjob {namespace}/{name}: delete failed: {_api_message(e)}")

    def fail(state: str, status: dict[str, Any], text: str) -> RayJobError:
        delete()
        return RayJobError(
            f"RayJob {namespace}/{name} {text} ({_status_text(status)})",
            name=name,
            state=state,
            reason=str(status.get("reason") or ""),
        )

    deadline = time.monotonic() + timeout_s
    seen: tuple[str, str, int] | None = None
    log_offsets: dict[str, int] = {}
    status: dict[str, Any] = {}
    try:
        while True:
            try:
                obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            except ApiException as e:
                if e.status == 404:
                    raise RayJobError(
                        f"RayJob {namespace}/{name} disappeared while waiting (deleted by someone else?)",
                        name=name,
                        state="deleted",
                    ) from e
                raise
            status = obj.get("status") or {}
            dep, job = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
            failed = int(status.get("failed") or 0)
            if (dep, job, failed) != seen:
                seen = (dep, job, failed)
                note = ""
                if job in FAILED_JOB and dep not in FAILED_DEPLOYMENT and failed <= backoff:
                    note = f" (attempt {failed} of {backoff + 1} failed; KubeRay retries from the last checkpoint)"
                log(f"rayjob {namespace}/{name}: {_status_text(status)}{note}")
            if follow_logs:
                _print_new_logs(core, namespace, name, log_offsets, log)
            if dep in FAILED_DEPLOYMENT:
                raise fail(dep, status, f"deployment {dep}")
            if job in FAILED_JOB and failed > backoff:
                raise fail(job, status, f"job {job} after {failed} attempts (backoffLimit {backoff})")
            if job == "SUCCEEDED":
                log(f"rayjob {namespace}/{name}: succeeded")
                return status
            if dep == "Complete":  # KubeRay's last word on the job: no retry follows
                if job in FAILED_JOB:
                    raise fail(job, status, f"job {job}")
                raise fail("Complete", status, "completed without SUCCEEDED")
            if time.monotonic() >= deadline:
                raise fail("timeout", status, f"timed out after {timeout_s:g}s")
            time.sleep(poll_s)
    except RayJobError:
        raise
    except BaseException:
        delete()
        raise


def _print_new_logs(
    core: Any, namespace: str, name: str, offsets: dict[str, int], log: Callable[[str], None]
) -> None:
    """Print log text of the RayJob's submitter pods that was not printed before (best effort)."""
    from kubernetes.client.exceptions import ApiException

    try:
        pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={name}")
        for pod in pods.items:
            pname = pod.metadata.name
            text = core.read_namespaced_pod_log(pname, namespace)
            new = text[offsets.get(pname, 0) :]
            offsets[pname] = len(text)
            for line in new.splitlines():
                log(f"[{pname}] {line}")
    except ApiException:
        return  # the pod may not exist yet or be gone; status polling decides
