"""Cluster in a box: the production path's real parts on this machine, as session-scoped fixtures.

What a production cluster runs, and what stands in for the rest here:

* ``s3``: a moto S3 server (``moto.server.ThreadedMotoServer``) on loopback is the only storage the
  nodes share. The AWS variables every client reads (boto3, pyarrow, MLflow) point at it for the
  session: ``AWS_ENDPOINT_URL`` / ``MLFLOW_S3_ENDPOINT_URL``, dummy keys, ``AWS_DEFAULT_REGION``.
  Stands in for: AWS S3 and IRSA credentials.
* ``mlflow_server``: a real MLflow server started with the command, arguments and environment the
  ``troupe-mlflow`` chart renders with ``values-prod.yaml`` (the Helm engine renders it; nothing is
  hard-coded here), after the chart's pre-install hook Jobs (schema migration) ran the same way.
  Stands in for: the RDS database (a SQLite file replaces the backend store and Secrets Manager
  lookup), the chart's Secrets (admin user and Flask key are generated here), the Service name
  (loopback ``127.0.0.1:<port>`` is added to ``--allowed-hosts``), the artifacts bucket
  (``s3://<bucket>/mlflow`` on moto). With the chart's auth on, clients get
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` from the environment.
* ``ray_cluster``: two Ray nodes started with ``ray start`` (``--block``, so this session owns
  their processes and stops them by PID; ``ray stop`` would stop every Ray on the machine): a head
  with the dashboard (Serve REST API, Job Submission API) and one CPU, and a worker node with two
  CPUs plus the custom resources the serving chart's ``rayStartParams`` give its worker groups
  (``gateway_slot``, ``accelerator_slot``, summed over the groups' replicas in ``values-prod.yaml``).
  Each node has its own ``--temp-dir`` (so no other ``ray.init()`` on this machine finds it) and
  its own scratch dir exported as ``TROUPE_SCRATCH`` to every process it starts. Stands in for:
  KubeRay's pods (one IP per pod; here both nodes share 127.0.0.1, so ports are chosen free).
* :class:`RayServiceStandIn`: the Kubernetes API for one RayService (``get`` / ``patch`` of the
  custom object), doing what KubeRay does with a new ``serveConfigV2``: ``PUT`` it to Serve's REST
  API and report the application status back in ``status``.

Import the fixtures into a test module: ``from tests.cluster_box import mlflow_server, ray_cluster, s3``
(``mlflow_server`` there shadows ``tests/conftest.py``'s fixture of that name; the object it yields is a
``str`` holding the URI as well, so code written for either works).
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[1]
CHARTS = REPO / "charts"
REGION = "us-east-1"
#: Placeholder IRSA role: the charts refuse to render without credentials; the box's processes get
#: moto's dummy keys from the environment instead.
ROLE_ARN = "arn:aws:iam::123456789012:role/troupe-box"
#: Box-wide MLflow admin (used only when the MLflow chart turns auth on).
MLFLOW_USER = "troupe-admin"
MLFLOW_PASSWORD = secrets.token_urlsafe(18)


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM it when this test process dies (no orphaned servers or nodes)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def render_chart(chart: str, values: dict[str, Any], release: str, namespace: str) -> list[dict[str, Any]]:
    """Manifests of ``charts/<chart>`` rendered by the Helm engine with ``values-prod.yaml`` + ``values``."""
    import helm_python as helm

    from troupe.kube.rayjob import merge_values

    base = yaml.safe_load((CHARTS / chart / "values-prod.yaml").read_text()) or {}
    vals = merge_values(merge_values(base, {"aws": {"roleArn": ROLE_ARN}}), values)
    out = helm.Chart.load(CHARTS / chart).render(vals, name=release, namespace=namespace, is_install=True)
    return [
        d
        for path, text in sorted(out.items())
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]


# -- S3 -------------------------------------------------------------------------------------------
@dataclass
class S3Box:
    """The moto S3 server: ``endpoint`` (``http://127.0.0.1:<port>``) and one ``bucket``."""

    endpoint: str
    bucket: str
    region: str = REGION

    def uri(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def client(self):
        """A boto3 S3 client on the box."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region)

    def keys(self, prefix: str = "") -> list[str]:
        """Object keys under ``prefix``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for p in pages for o in p.get("Contents", [])]


def _box_env(endpoint: str) -> dict[str, str]:
    """The environment every process of the box gets (clients, MLflow, Ray nodes and their workers)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "MLFLOW_TRACKING_USERNAME": MLFLOW_USER,
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_PASSWORD,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray 2.60's `ray start --head` turns on token auth and a second node then needs the token;
        # KubeRay 1.7 clusters run without it unless authOptions asks, as the box does
        "RAY_AUTH_MODE": "disabled",
    }


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Box]:
    """moto S3 on loopback with bucket ``troupe-box``; the box's AWS/MLflow client variables are set
    in ``os.environ`` for the session (and restored afterwards)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = _box_env(endpoint)
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"]}
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(k, None)
    os.environ.update(env)
    box = S3Box(endpoint, "troupe-box")
    try:
        box.client().create_bucket(Bucket=box.bucket)
        yield box
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


# -- MLflow ---------------------------------------------------------------------------------------
class MlflowServer(str):
    """The tracking URI (``http://127.0.0.1:<port>``) with what was started to serve it.

    Attributes:
        uri: the tracking URI (the string itself).
        argv: the server's command line (the chart's command and args, substituted).
        env: the environment variables taken from the chart (values as passed).
        standins: ``{name: what replaced it}`` for each substituted argument or variable.
        auth: whether the chart's basic auth is on (clients then send the box's admin user).
        log: the server's log file.
    """

    uri: str
    argv: list[str]
    env: dict[str, str]
    standins: dict[str, str]
    auth: bool
    log: Path


def _container(docs: list[dict[str, Any]], kind: str, name_part: str = "") -> list[dict[str, Any]]:
    return [
        c
        for d in docs
        if d["kind"] == kind and name_part in d["metadata"]["name"]
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def _argv(container: dict[str, Any], port: int) -> tuple[list[str], dict[str, str]]:
    """The container's command + args with loopback stand-ins; python/mlflow run from this venv."""
    cmd = list(container.get("command") or []) + list(container.get("args") or [])
    if cmd and cmd[0] in ("python", "python3"):
        cmd[0] = sys.executable
    elif cmd and cmd[0] == "mlflow":
        cmd[:1] = [sys.executable, "-m", "mlflow"]
    out, standins = [], {}
    for a in cmd:
        flag, eq, val = a.partition("=")
        if eq and flag == "--host":
            a, standins["--host"] = "--host=127.0.0.1", "127.0.0.1 (loopback)"
        elif eq and flag == "--port":
            a, standins["--port"] = f"--port={port}", f"{port} (a free port)"
        elif eq and flag == "--workers":
            a, standins["--workers"] = "--workers=1", "1 (two cores here)"
        elif eq and flag == "--allowed-hosts":
            a = f"{a},127.0.0.1:{port},localhost:{port}"
            standins["--allowed-hosts"] = f"+127.0.0.1:{port} (loopback stands in for the Service name)"
        out.append(a)
    return out, standins


def _env(
    container: dict[str, Any], d: Path, s3box: S3Box
) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(environment to run with, chart's plain values, stand-ins) for a container of the MLflow chart."""
    sqlite = f"sqlite:///{d / 'mlflow.db'}"
    standin = {
        "MLFLOW_BACKEND_STORE_URI": sqlite,
        "MLFLOW_ARTIFACTS_DESTINATION": s3box.uri("mlflow"),
        "HOME": str(d / "home"),
        "MLFLOW_AUTH_ADMIN_USERNAME": MLFLOW_USER,
        "MLFLOW_AUTH_ADMIN_PASSWORD": MLFLOW_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }
    # the SQLite URI above replaces the RDS database and its Secrets Manager lookup
    dropped = {
        "TROUPE_MLFLOW_DB_SECRET_ID",
        "TROUPE_MLFLOW_DB_ENDPOINT",
        "TROUPE_MLFLOW_DB_NAME",
        "TROUPE_MLFLOW_DB_URI_TEMPLATE",
        "TROUPE_MLFLOW_AUTH_DB_NAME",
        "TROUPE_MLFLOW_AUTH_DB_URI",
    }
    run = {**os.environ, "MLFLOW_BACKEND_STORE_URI": sqlite}
    plain: dict[str, str] = {}
    used: dict[str, str] = {"MLFLOW_BACKEND_STORE_URI": "SQLite file (stands in for RDS PostgreSQL)"}
    for e in container.get("env") or []:
        name = e["name"]
        if "value" in e:
            plain[name] = str(e["value"])
        if name in dropped:
            used[name] = "dropped (SQLite stands in for the database)"
            continue
        if name in standin:
            run[name] = standin[name]
            used[name] = "stand-in" if "valueFrom" in e else f"{e.get('value')} -> {standin[name]}"
        elif "value" in e:
            run[name] = str(e["value"])
        else:
            raise RuntimeError(
                f"the MLflow chart takes {name} from {e['valueFrom']}: tests/cluster_box.py has no stand-in for it"
            )
    Path(standin["HOME"]).mkdir(parents=True, exist_ok=True)
    return run, plain, used


@pytest.fixture(scope="session")
def mlflow_server(s3: S3Box, tmp_path_factory) -> Iterator[MlflowServer]:
    """A real MLflow server as the ``troupe-mlflow`` chart (values-prod.yaml) runs it; yields its URI."""
    d = tmp_path_factory.mktemp("mlflow-box")
    docs = render_chart("troupe-mlflow", {}, release="troupe-mlflow", namespace="troupe-prod")
    port = free_port()
    # pre-install hook Jobs first (schema migration), as helm install does
    hooks = [
        doc
        for doc in docs
        if doc["kind"] == "Job"
        and "pre-install" in doc["metadata"].get("annotations", {}).get("helm.sh/hook", "")
    ]
    for job in sorted(hooks, key=lambda j: int(j["metadata"]["annotations"].get("helm.sh/hook-weight", "0"))):
        for c in job["spec"]["template"]["spec"]["containers"]:
            argv, _ = _argv(c, port)
            env, _, _ = _env(c, d, s3)
            r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=d)
            if r.returncode != 0:
                raise RuntimeError(f"hook job {job['metadata']['name']} ({argv}) failed: {r.stderr[-3000:]}")
    (container,) = _container(docs, "Deployment")
    argv, standins = _argv(container, port)
    env, plain, used = _env(container, d, s3)
    standins.update(used)
    auth = any(a.startswith("--app-name") and "basic-auth" in a for a in argv) or "basic-auth" in argv
    log_path = d / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=d, preexec_fn=_die_with_parent
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(uri, proc, log_path)
        server = MlflowServer(uri)
        server.uri, server.argv, server.env, server.standins = uri, argv, plain, standins
        server.auth, server.log = auth, log_path
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# -- Ray ------------------------------------------------------------------------------------------
@dataclass
class RayNode:
    """One ``ray start --block`` process: its temp dir, scratch dir and log."""

    name: str
    proc: subprocess.Popen
    temp_dir: Path
    scratch: Path
    log: Path
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class RayBox:
    """The two-node cluster: ``address`` (GCS ``127.0.0.1:<port>``), ``dashboard_url`` (Serve REST
    API ``/api/serve/applications/``, Job API ``/api/jobs/``), and ``head`` / ``worker`` nodes
    (``.scratch`` is that node's ``TROUPE_SCRATCH``)."""

    address: str
    dashboard_url: str
    head: RayNode
    worker: RayNode

    @property
    def nodes(self) -> list[RayNode]:
        return [self.head, self.worker]

    def scratch_dirs(self) -> dict[str, Path]:
        return {n.name: n.scratch for n in self.nodes}

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Nodes the cluster reports ALIVE (Ray state API through the dashboard)."""
        r = httpx.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100}, timeout=10)
        r.raise_for_status()
        rows = r.json()["data"]["result"]["result"]
        return [n for n in rows if n.get("state") == "ALIVE"]


def chart_worker_resources() -> dict[str, float]:
    """Custom resources the serving chart's worker groups advertise (``rayStartParams.resources``),
    summed over each group's replicas in ``values-prod.yaml``."""
    docs = render_chart(
        "troupe-serving", {"accelerator": "cpu"}, release="troupe-serving", namespace="troupe-prod"
    )
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    total: dict[str, float] = {}
    for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        raw = g.get("rayStartParams", {}).get("resources")
        if not raw:
            continue
        text = raw.strip()
        if text.startswith('"') and text.endswith('"'):  # KubeRay passes it quoted to the shell
            text = json.loads(text)
        for k, v in json.loads(text).items():
            total[k] = total.get(k, 0.0) + float(v) * int(g.get("replicas", 1))
    return total


def _ray_start(
    name: str, args: list[str], root: Path, env: dict[str, str], timeout_s: float = 120
) -> RayNode:
    temp_dir = Path(tempfile.mkdtemp(prefix="trb", dir="/tmp"))  # short: Ray's socket paths are limited
    scratch = root / f"scratch-{name}"
    scratch.mkdir(parents=True, exist_ok=True)
    log = root / f"ray-{name}.log"
    ports = [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    argv = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
        f"--object-store-memory={200 * 1024 * 1024}", *ports, *args,
    ]  # fmt: skip
    fh = open(log, "w")
    proc = subprocess.Popen(
        argv, env={**env, "TROUPE_SCRATCH": str(scratch)}, stdout=fh, stderr=subprocess.STDOUT,
        cwd=REPO, preexec_fn=_die_with_parent,
    )  # fmt: skip
    deadline = time.time() + timeout_s
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"ray start ({name}) failed: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return RayNode(name, proc, temp_dir, scratch, log)


def _stop(nodes: list[RayNode]) -> None:
    """SIGTERM each node's ``ray start --block`` (it stops its own processes), all at once; then
    whatever they left behind, by PID."""
    import psutil

    kids: list[psutil.Process] = []
    for node in nodes:
        try:
            kids += psutil.Process(node.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 15  # a throwaway cluster: no need to wait for every graceful exit
    for node in nodes:
        try:
            node.proc.wait(max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()
    _, alive = psutil.wait_procs(kids, timeout=max(1.0, deadline - time.time()))
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    for node in nodes:
        shutil.rmtree(node.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(s3: S3Box, tmp_path_factory) -> Iterator[RayBox]:
    """Two Ray nodes (head: dashboard, 1 CPU; worker: 2 CPUs + the serving chart's worker-group
    resources), each with its own ``TROUPE_SCRATCH``; stopped by PID at the end of the session."""
    root = tmp_path_factory.mktemp("ray-box")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    # the image puts the venv's console scripts (`troupe`, what a RayJob entrypoint runs) on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for attempt in range(3):  # a port drawn free may be taken by another process before Ray binds it
        gcs, dash = free_port(), free_port()
        try:
            head = _ray_start(
                "head",
                [
                    "--head", f"--port={gcs}", "--num-cpus=1", "--num-gpus=0", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                    f"--ray-client-server-port={free_port()}",
                ],
                root,
                env,
            )  # fmt: skip
            break
        except RuntimeError as err:
            if attempt == 2 or "port" not in str(err).lower():
                raise
    nodes = [head]
    try:
        resources = chart_worker_resources()
        worker = _ray_start(
            "worker",
            [
                f"--address=127.0.0.1:{gcs}",
                "--num-cpus=2",
                "--num-gpus=0",
                f"--resources={json.dumps(resources)}",
            ],
            root,
            env,
        )
        worker.resources = resources
        nodes.append(worker)
        box = RayBox(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", head, worker)
        deadline = time.time() + 120
        while True:
            try:
                if len(box.alive_nodes()) >= 2:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"the two Ray nodes did not come up: {head.log.read_text()[-2000:]}")
            time.sleep(1)
        yield box
    finally:
        _stop(nodes)


# -- Kubernetes API stand-in for one RayService ---------------------------------------------------
class RayServiceStandIn:
    """The two ``CustomObjectsApi`` calls ``troupe.rollout.KubeTarget`` makes, for one RayService,
    doing what KubeRay does with its ``serveConfigV2``: each change is ``PUT`` to Serve's REST API
    (``/api/serve/applications/``) and ``status`` mirrors Serve's application statuses.

    Args:
        rayservice: the RayService object (rendered by the serving chart).
        dashboard_url: the Ray dashboard (KubeRay talks to the head's port 8265).
        box_options: ``ServeDeploySchema`` fields the box adds to every PUT (``proxy_location``,
            ``http_options``): on Kubernetes every pod has its own IP and proxy on :8000; here the
            nodes share one IP, so the proxy runs on the head at a free port.
    """

    def __init__(self, rayservice: dict[str, Any], dashboard_url: str, box_options: dict[str, Any]) -> None:
        self.obj = copy.deepcopy(rayservice)
        self.obj["metadata"].setdefault("generation", 1)
        self.dashboard_url, self.box_options = dashboard_url, box_options
        self.patches: list[dict[str, Any]] = []
        self.observed = 0

    def apply(self) -> None:
        """KubeRay's reconcile: PUT the current serveConfigV2 and record the generation."""
        put_serve_config(self.dashboard_url, self.obj["spec"]["serveConfigV2"], self.box_options)
        self.observed = int(self.obj["metadata"]["generation"])

    def _check(self, group: str, version: str, plural: str, namespace: str, name: str) -> None:
        md = self.obj["metadata"]
        if (group, version, plural) != ("ray.io", "v1", "rayservices") or (namespace, name) != (
            md["namespace"],
            md["name"],
        ):
            raise LookupError(f"404: {group}/{version} {plural} {namespace}/{name}")

    def get_namespaced_custom_object(self, group, version, namespace, plural, name) -> dict[str, Any]:
        self._check(group, version, plural, namespace, name)
        apps = serve_status(self.dashboard_url)
        self.obj["status"] = {
            "observedGeneration": self.observed,
            "activeServiceStatus": {
                "applicationStatuses": {
                    n: {"status": a.get("status"), "message": a.get("message", "")} for n, a in apps.items()
                }
            },
        }
        return copy.deepcopy(self.obj)

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body) -> dict[str, Any]:
        self._check(group, version, plural, namespace, name)
        self.patches.append(copy.deepcopy(body))
        if set(body) != {"spec"} or set(body["spec"]) != {"serveConfigV2"}:
            raise ValueError(f"this stand-in takes serveConfigV2 patches only, got {body}")
        self.obj["spec"]["serveConfigV2"] = body["spec"]["serveConfigV2"]
        self.obj["metadata"]["generation"] = int(self.obj["metadata"]["generation"]) + 1
        self.apply()
        return copy.deepcopy(self.obj)


def put_serve_config(dashboard_url: str, serve_config_v2: str, box_options: dict[str, Any]) -> dict[str, Any]:
    """What KubeRay does with a RayService's ``serveConfigV2``: YAML -> JSON -> ``PUT
    /api/serve/applications/`` on the head's dashboard; returns the body sent."""
    body = {**yaml.safe_load(serve_config_v2), **box_options}
    r = httpx.put(f"{dashboard_url}/api/serve/applications/", json=body, timeout=120)
    if r.status_code != 200:
        raise RuntimeError(f"PUT /api/serve/applications/: {r.status_code} {r.text[-2000:]}")
    return body


def serve_status(dashboard_url: str) -> dict[str, dict[str, Any]]:
    """``{application: {status, message, deployed_app_config, ...}}`` from Serve's REST API."""
    r = httpx.get(f"{dashboard_url}/api/serve/applications/", timeout=30)
    r.raise_for_status()
    return r.json().get("applications") or {}


def wait_app_running(
    dashboard_url: str, app: str, timeout_s: float = 300, since_args: dict | None = None
) -> dict:
    """Poll Serve's REST API until ``app`` is RUNNING (with ``since_args`` deployed, when given).

    Raises:
        RuntimeError: DEPLOY_FAILED (with Serve's message) or not RUNNING within ``timeout_s``.
    """
    t0 = time.time()
    last: dict[str, Any] = {}
    while time.time() - t0 < timeout_s:
        last = serve_status(dashboard_url).get(app) or {}
        deployed = (last.get("deployed_app_config") or {}).get("args")
        if last.get("status") == "RUNNING" and (since_args is None or deployed == since_args):
            return last
        if last.get("status") == "DEPLOY_FAILED" and (since_args is None or deployed == since_args):
            raise RuntimeError(f"{app}: DEPLOY_FAILED: {last.get('message', '')[-4000:]}")
        time.sleep(1)
    raise RuntimeError(f"{app}: not RUNNING after {timeout_s}s: {str(last)[-2000:]}")
