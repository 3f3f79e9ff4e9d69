"""Stand-ins for the Kubernetes API server (none can run here): real HTTP on loopback, real clients.

:class:`KubeStandIn` is a tiny HTTP server implementing the few endpoints Troupe's RayJob submitter
uses (create/get/delete ``ray.io/v1`` rayjobs, list pods, read a pod log, create/replace a
ConfigMap). The real ``kubernetes`` Python client talks to it over HTTP, so serialisation, URLs
and error handling are exercised for real. What the KubeRay operator would do is a subclass's job:

* :class:`FakeKube` scripts it: each GET of a RayJob returns the next scripted ``status``.
* :class:`KubeRayStandIn` does what KubeRay does with a RayJob, for real, on a running Ray cluster:
  mounts the params ConfigMap at the RayJob's ``mountPath`` (as the kubelet would), submits
  ``spec.entrypoint`` with ``spec.runtimeEnvYAML`` through Ray's Job Submission API, reports the Ray
  job's status as ``status.jobStatus``, retries a FAILED job up to ``spec.backoffLimit`` times
  (``status.failed`` counts attempts, ``jobDeploymentStatus`` Retrying meanwhile, Failed when spent)
  and stops the Ray job when the RayJob is deleted. It does not create a RayCluster per RayJob: the
  job runs on the cluster it is given (KubeRay's ``clusterSelector`` mode).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

RJ = re.compile(r"^/apis/ray\.io/v1/namespaces/([^/]+)/rayjobs(?:/([^/?]+))?")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/?]+)/log)?")
CMS = re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps(?:/([^/?]+))?")


class KubeStandIn:
    """Loopback HTTP stand-in for the Kubernetes API; the operator's part is left to subclasses."""

    def __init__(self, create_status: int = 201, log_text: str = ""):
        self.create_status = create_status
        self.log_text = log_text
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []
        self.configmaps: dict[str, dict[str, Any]] = {}
        self.gets = 0
        self.lock = threading.Lock()
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
                        fake.created.append(body)  # it exists (created earlier by someone)
                        return self._status(fake.create_status, "AlreadyExists",
                                            f'rayjobs.ray.io "{body["metadata"]["name"]}" already exists')  # fmt: skip
                    fake.created.append(body)
                    fake.on_create(body)
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
                    with fake.lock:
                        status = fake.status_of(found[-1])
                        fake.gets += 1
                    return self._send(200, {**found[-1], "status": status})
                if m := PODS.match(self.path):
                    if m.group(2):
                        return self._send(200, fake.pod_log(m.group(2)), "text/plain")
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                            "items": [{"metadata": {"name": "submitter-x1"}}]})  # fmt: skip
                self._status(404, "NotFound", self.path)

            def do_DELETE(self) -> None:  # noqa: N802
                if (m := RJ.match(self.path)) and m.group(2):
                    fake.deleted.append(m.group(2))
                    fake.on_delete(m.group(2))
                    return self._send(200, {"kind": "Status", "status": "Success"})
                self._status(404, "NotFound", self.path)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- the operator's part ----------------------------------------------------------------------
    def on_create(self, rayjob: dict[str, Any]) -> None:
        """A RayJob was created."""

    def on_delete(self, name: str) -> None:
        """A RayJob was deleted."""

    def status_of(self, rayjob: dict[str, Any]) -> dict[str, Any]:
        """The RayJob's ``status`` on this GET."""
        return {}

    def pod_log(self, pod: str) -> str:
        """Text of the submitter pod's log so far."""
        return self.log_text[: 20 * self.gets]

    # -- plumbing ---------------------------------------------------------------------------------
    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def api(self) -> Any:
        """A kubernetes ``CustomObjectsApi`` talking to this server."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return client.CustomObjectsApi(client.ApiClient(cfg))

    def kubeconfig(self, path: Path) -> Path:
        """Write a kubeconfig pointing at this server to ``path`` (for ``KUBECONFIG``)."""
        import yaml

        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "u"}}],
        }  # fmt: skip
        path.write_text(yaml.safe_dump(cfg))
        return path


class FakeKube(KubeStandIn):
    """The operator scripted: each GET of the RayJob returns the next of ``statuses``."""

    def __init__(self, statuses: list[dict[str, Any]], create_status: int = 201, log_text: str = ""):
        super().__init__(create_status=create_status, log_text=log_text)
        self.statuses = list(statuses)

    def status_of(self, rayjob: dict[str, Any]) -> dict[str, Any]:
        return self.statuses[min(self.gets, len(self.statuses) - 1)]


class KubeRayStandIn(KubeStandIn):
    """What KubeRay does with a RayJob, done on a running Ray cluster (see the module docstring).

    Args:
        dashboard_url: the Ray cluster's dashboard (Job Submission API), e.g. ``http://127.0.0.1:8265``.
        mount_root: where ConfigMap volumes are materialised; a RayJob's ``params`` volume must be
            mounted at a path under it (render the chart with ``params.mountPath`` there).
    """

    def __init__(self, dashboard_url: str, mount_root: Path):
        super().__init__()
        from ray.job_submission import JobSubmissionClient

        self.jobs = JobSubmissionClient(dashboard_url)
        self.mount_root = Path(mount_root)
        self.attempts: dict[str, list[str]] = {}  # RayJob name -> Ray submission ids, one per attempt
        self.events: list[str] = []

    def _submit(self, rayjob: dict[str, Any]) -> None:
        name = rayjob["metadata"]["name"]
        spec = rayjob["spec"]
        tpl = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in tpl["containers"][0].get("volumeMounts", [])}
        for vol in tpl.get("volumes", []):  # the kubelet's part: ConfigMap volumes become files
            if "configMap" in vol and vol["name"] in mounts:
                d = Path(mounts[vol["name"]])
                assert str(d).startswith(str(self.mount_root)), f"mount {d} outside {self.mount_root}"
                d.mkdir(parents=True, exist_ok=True)
                for k, v in self.configmaps[vol["configMap"]["name"]]["data"].items():
                    (d / k).write_text(v)
        import yaml

        attempt = len(self.attempts.setdefault(name, []))
        sid = f"{name}-{attempt}"
        self.jobs.submit_job(
            entrypoint=spec["entrypoint"],
            runtime_env=yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or None,
            submission_id=sid,
        )
        self.attempts[name].append(sid)
        self.events.append(f"submitted {sid}")

    def on_create(self, rayjob: dict[str, Any]) -> None:
        self._submit(rayjob)

    def on_delete(self, name: str) -> None:
        for sid in self.attempts.get(name, []):
            try:
                self.jobs.stop_job(sid)
                self.events.append(f"stopped {sid}")
            except Exception:  # noqa: BLE001 - finished already
                pass

    def status_of(self, rayjob: dict[str, Any]) -> dict[str, Any]:
        name = rayjob["metadata"]["name"]
        sids = self.attempts.get(name) or []
        if not sids:
            return {"jobDeploymentStatus": "Initializing"}
        info = self.jobs.get_job_info(sids[-1])
        job = str(info.status.value if hasattr(info.status, "value") else info.status)
        failed = sum(1 for s in sids[:-1]) + (1 if job in ("FAILED", "STOPPED") else 0)
        status = {"jobId": sids[-1], "jobStatus": job, "failed": failed, "message": info.message or ""}
        if job == "SUCCEEDED":
            return {**status, "jobDeploymentStatus": "Complete", "succeeded": 1}
        if job in ("FAILED", "STOPPED"):
            if failed <= int(rayjob["spec"].get("backoffLimit") or 0):
                status["jobDeploymentStatus"] = "Retrying"
                self._submit(rayjob)  # next GET sees the new attempt
                return status
            return {**status, "jobDeploymentStatus": "Failed", "reason": "AppFailed"}
        return {**status, "jobDeploymentStatus": "Running"}

    def pod_log(self, pod: str) -> str:
        name = next(iter(self.attempts), None)
        return "".join(self.jobs.get_job_logs(s) for s in self.attempts.get(name, [])) if name else ""
