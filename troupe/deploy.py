"""``troupe deploy`` and ``troupe chat``: update the Serve app of an environment.

Two targets, one application shape (names in :mod:`serving.contract`):

* locally (``dvc repro``, a workstation): the app is deployed declaratively on the local Ray cluster
  (a ``ServeDeploySchema``, the same shape as a RayService's ``serveConfigV2``): one application per
  environment named ``troupe-<env>`` at ``/<env>``, import path ``serving.app:build_app``;
* on Kubernetes (``--rayservice NAME``, the KFP ``deploy`` step): the RayService the serving chart
  installed is patched (:class:`troupe.rollout.KubeTarget`): its application's ``stable_model_uri``
  is set to the registered version pinned by number (``models:/<name>/<n>``); KubeRay applies the
  new ``serveConfigV2`` through Serve's REST API. Nothing starts a Ray cluster in the caller's pod.

Declarative deploys keep model replicas running when only the Router's ``user_config`` (the canary
weight) changes, which is what :mod:`troupe.rollout` relies on.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import click

from serving import contract
from troupe.cli import step_options
from troupe.config import ConfigError, path_of, section

IMPORT_PATH = contract.IMPORT_PATH
#: MLflow alias each environment serves as stable.
ALIASES = {"test": "challenger", "production": "champion"}
app_name = contract.app_name


def serving_config_path(env: str) -> Path:
    """``configs/serving/<env>.yaml`` (ConfigError when the environment has no config)."""
    from serving.app import CONFIG_DIR

    p = CONFIG_DIR / f"{env}.yaml"
    if not p.is_file():
        raise ConfigError(f"{p}: no serving config for env {env!r}")
    return p


def characters_path(params: dict[str, Any]) -> str | None:
    """First existing characters.jsonl: paths.splits, paths.validated, then data/sample (absolute).

    Only for a model given as a local directory (registered versions carry their own characters).
    """
    paths = params.get("paths", {})
    cands = [Path(paths[k]) / "characters.jsonl" for k in ("splits", "validated") if k in paths]
    cands.append(Path("data/sample/characters.jsonl"))
    for c in cands:
        if c.is_file():
            return str(c.resolve())
    return None


def app_config(
    env: str,
    params: dict[str, Any],
    *,
    model_uri: str | None = None,
    canary_uri: str | None = None,
    canary_weight_percent: float = 0.0,
    extra_args: dict[str, Any] | None = None,
    catalogue_uri: str | None = None,
) -> dict[str, Any]:
    """One ``ServeDeploySchema`` application entry for ``env``.

    Args:
        env: ``test`` or ``production`` (selects ``configs/serving/<env>.yaml``).
        params: params.yaml dict (``registry.model_name``, ``paths``).
        model_uri: stable model override (local dir or ``models:/name@alias``); default
            ``models:/<model_name>@challenger`` for test, ``@champion`` for production.
        canary_uri: canary model (production rollout), None for no canary.
        canary_weight_percent: initial canary share in percent (the Router's ``user_config``).
        extra_args: more ``build_app`` args (serving-config overrides).
        catalogue_uri: the character catalogue to serve (local path, made absolute, or ``s3://``);
            set as the ``catalogue_uri`` arg and, with its content version, in the Router
            ``user_config`` (:func:`catalogue_user_config`).

    Returns:
        ``{name, route_prefix, import_path, args, deployments, runtime_env}``.
    """
    import yaml

    cfg = yaml.safe_load(serving_config_path(env).read_text(encoding="utf-8")) or {}
    reg = params.get("registry", {})
    name = reg.get("model_name", cfg.get("model_name", "troupe-roleplay"))
    from troupe.tracking import tracking_uri

    tracking = reg.get("tracking_uri") or tracking_uri()
    args: dict[str, Any] = {
        "env": env,
        "model_name": name,
        "mlflow_tracking_uri": tracking,
        "stable_alias": ALIASES.get(env, "champion"),
        "canary_alias": "",
        contract.CANARY_WEIGHT: contract.check_weight(canary_weight_percent),
        "route_prefix": cfg.get("route_prefix", f"/{env}"),
    }
    local_model = False
    if model_uri:
        local_model = Path(model_uri).is_dir()
        args[contract.STABLE_MODEL_URI] = str(Path(model_uri).resolve()) if local_model else model_uri
    if canary_uri:
        args[contract.CANARY_MODEL_URI] = (
            str(Path(canary_uri).resolve()) if Path(canary_uri).is_dir() else canary_uri
        )
    chars = characters_path(params) if local_model else None
    if chars:  # a local model dir has no registered characters: serve those of this run
        args["characters"] = chars
    args.update(extra_args or {})
    user_config = contract.router_user_config(canary_weight_percent)
    if catalogue_uri:
        cat = catalogue_user_config(catalogue_uri)
        args[contract.CATALOGUE_URI] = cat[contract.CATALOGUE_URI]
        user_config.update(cat)
    env_vars = {k: os.environ[k] for k in (contract.API_KEYS_ENV, "HF_HUB_OFFLINE") if k in os.environ}
    out: dict[str, Any] = {
        "name": app_name(env),
        "route_prefix": args["route_prefix"],
        "import_path": IMPORT_PATH,
        "args": args,
        "deployments": [{"name": contract.ROUTER, "user_config": user_config}],
    }
    if env_vars:
        out["runtime_env"] = {"env_vars": env_vars}
    return out


def catalogue_user_config(uri: str) -> dict[str, str]:
    """Router ``user_config`` keys that make the Router serve the catalogue at ``uri``: the URI (a
    local path made absolute) and its content version now
    (:func:`troupe.characters.catalogue.load_catalogue`), so re-applying the same URI after the file
    changed is a new ``user_config`` and the Router reloads.

    Raises:
        CatalogueError / StorageError: the catalogue cannot be read or holds a bad record.
    """
    from troupe.characters.catalogue import load_catalogue

    uri = str(uri)
    if "://" not in uri:
        uri = str(Path(uri).resolve())
    return {contract.CATALOGUE_URI: uri, contract.CATALOGUE_VERSION: load_catalogue(uri).version}


def reload_characters(name: str, catalogue_uri: str, wait: bool = True) -> dict[str, Any]:
    """Make the deployed app ``name`` serve the catalogue at ``catalogue_uri`` now: only the Router's
    ``user_config`` changes (:func:`set_router_config`; canary settings kept), so model replicas keep
    running and the Router replicas reload the characters in place.

    Returns:
        The new Router ``user_config``.

    Raises:
        click.ClickException: the app is not deployed; CatalogueError / StorageError: bad catalogue.
    """
    cat = catalogue_user_config(catalogue_uri)
    current = deployed_apps().get(name)
    if current is None:
        raise click.ClickException(f"application {name!r} is not deployed (troupe deploy first)")
    router = next((d for d in current.get("deployments", []) if d.get("name") == contract.ROUTER), {})
    uc = {**(router.get("user_config") or {}), **cat}
    set_router_config(name, uc, wait=wait)
    return uc


def reload_characters_kubernetes(
    env: str, rayservice: str, namespace: str, catalogue_uri: str, timeout_s: float = 900, api: Any = None
) -> dict[str, Any]:
    """:func:`reload_characters` for the RayService the serving chart installed: one patch of the
    application's Router ``user_config`` in ``spec.serveConfigV2`` (canary keys kept), which KubeRay
    applies in place (Serve reconfigures the Router replicas; model replicas keep running). Waits
    until KubeRay reports the application RUNNING for the new generation.

    Args:
        catalogue_uri: the catalogue the Router pods read, an ``s3://`` URI (a local path exists
            only on this machine).
        api: a ``CustomObjectsApi`` or a stand-in (see :class:`troupe.rollout.KubeTarget`).

    Returns:
        The new Router ``user_config``.

    Raises:
        click.UsageError: a local catalogue path; CatalogueError / StorageError: bad catalogue;
        RuntimeError: KubeRay reports the application failed or not RUNNING in ``timeout_s``.
    """
    from troupe.rollout import KubeTarget

    if "://" not in str(catalogue_uri):
        raise click.UsageError(
            f"--catalogue {catalogue_uri}: a RayService's Router pods cannot read a local path; upload "
            "the catalogue (troupe characters import --catalogue s3://...) and pass its s3:// URI"
        )
    target = KubeTarget(rayservice, namespace, contract.app_name(env), "", api=api)
    router = next(
        (d for d in target.serve_app().get("deployments", []) if d.get("name") == contract.ROUTER), {}
    )
    uc = {**(router.get("user_config") or {}), **catalogue_user_config(catalogue_uri)}
    target.wait_running(target.patch(user_config=uc), timeout_s)
    return uc


def connect(address: str = "auto", num_cpus: int | None = None) -> None:
    """Connect to the local Ray cluster, starting ``ray start --head`` when none is running.

    Raises:
        click.ClickException: the cluster cannot be started.
    """
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, log_to_driver=False)
        return
    except ConnectionError:
        pass
    cmd = ["ray", "start", "--head", "--disable-usage-stats"]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise click.ClickException(f"ray start --head failed: {r.stderr.strip()[-500:]}")
    ray.init(address="auto", log_to_driver=False)


def deployed_apps() -> dict[str, dict[str, Any]]:
    """``{app name: deployed app config}`` of declaratively deployed apps on the connected cluster."""
    from ray.serve.context import _get_global_client

    try:
        details = _get_global_client().get_serve_details()
    except Exception:  # Serve not started
        return {}
    out = {}
    for name, app in (details.get("applications") or {}).items():
        cfg = app.get("deployed_app_config")
        if cfg:
            out[name] = cfg
    return out


class _ConfigLock:
    """A lease lock (one holder, expiring after ``ttl_s``) in a named Ray actor: every process that
    writes the Serve config (``troupe deploy``, rollout controllers of any environment) reads and
    writes it under this lock, so none writes back a stale copy of another environment's app."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self.expires = 0.0

    def acquire(self, token: str, ttl_s: float) -> bool:
        now = time.time()
        if self.holder in (None, token) or now > self.expires:
            self.holder, self.expires = token, now + ttl_s
            return True
        return False

    def release(self, token: str) -> None:
        if self.holder == token:
            self.holder = None


@contextlib.contextmanager
def serve_config_lock(ttl_s: float = 15.0, timeout_s: float = 300.0):
    """Hold the cluster-wide Serve config lock (:data:`serving.contract.SERVE_CONFIG_LOCK`, a
    detached actor created on first use) for one read-modify-write of the Serve config. A holder
    keeps it for the time of one read and one (non-blocking) ``deploy_apps`` call, well under a
    second; the lease of ``ttl_s`` only matters when a holder dies holding it (a killed rollout
    controller): the next writer then waits at most ``ttl_s``.

    Raises:
        click.ClickException: the lock stays held by another writer for ``timeout_s``.
    """
    import uuid

    import ray

    actor = (
        ray.remote(num_cpus=0)(_ConfigLock)
        .options(
            name=contract.SERVE_CONFIG_LOCK,
            namespace=contract.RAY_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
        )
        .remote()
    )
    token = uuid.uuid4().hex
    t0 = time.time()
    while not ray.get(actor.acquire.remote(token, ttl_s)):
        if time.time() - t0 > timeout_s:
            raise click.ClickException(
                f"Serve config lock {contract.SERVE_CONFIG_LOCK!r} held for {timeout_s}s"
            )
        time.sleep(0.2)
    try:
        yield
    finally:
        ray.get(actor.release.remote(token))


def apply_apps(
    apps: list[dict[str, Any]], host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 300
) -> None:
    """Deploy or update applications and wait until RUNNING; only the named applications change.

    Serve takes the whole config in one call, so the other applications are read back as deployed
    and written unchanged, under :func:`serve_config_lock` so that a concurrent writer (another
    environment's rollout) cannot be reverted by a stale copy. Serve is started detached with HTTP
    on ``host:port`` if it is not running (an already running Serve keeps its HTTP options).

    Raises:
        click.ClickException: an application ends DEPLOY_FAILED or is not RUNNING within ``timeout_s``.
    """
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options={"host": host, "port": int(port)})
    with serve_config_lock():
        current = deployed_apps()
        for a in apps:
            current[a["name"]] = a
        schema = ServeDeploySchema.model_validate({"applications": list(current.values())})
        _get_global_client().deploy_apps(schema)
    wait_running([a["name"] for a in apps], timeout_s)


def wait_running(names: list[str], timeout_s: float = 300) -> None:
    """Poll ``serve.status()`` until every named application is RUNNING (ClickException otherwise)."""
    from ray import serve

    t0 = time.time()
    while True:
        st = serve.status().applications
        states = {n: (st[n].status if n in st else "NOT_STARTED") for n in names}
        if all(s == "RUNNING" for s in states.values()):
            time.sleep(0.5)  # let the proxy pick up new routes
            return
        failed = [n for n, s in states.items() if s == "DEPLOY_FAILED"]
        if failed:
            raise click.ClickException(f"deploy failed: {failed}: {st[failed[0]].message[-2000:]}")
        if time.time() - t0 > timeout_s:
            raise click.ClickException(f"applications not RUNNING after {timeout_s}s: {states}")
        time.sleep(1)


def set_router_config(name: str, user_config: dict[str, Any], wait: bool = True) -> dict[str, Any]:
    """Set the Router ``user_config`` of a deployed app (in-place reconfigure; models untouched).

    Only this application's Router changes (the others are written back as read, under
    :func:`serve_config_lock`). Catalogue keys (``catalogue_uri``, ``catalogue_version``) of the
    deployed ``user_config`` are kept unless ``user_config`` names them, so a canary-weight update
    does not drop the catalogue a reload set. Returns the new app config.

    Raises:
        click.ClickException: the app is not deployed declaratively.
    """
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    contract.check_user_config(user_config)
    with serve_config_lock():
        current = deployed_apps()
        if name not in current:
            raise click.ClickException(f"application {name!r} is not deployed (troupe deploy first)")
        app = current[name]
        deps = [d for d in app.get("deployments", []) if d.get("name") != contract.ROUTER]
        router = next((d for d in app.get("deployments", []) if d.get("name") == contract.ROUTER), {})
        merged = contract.merged_user_config(router.get("user_config"), user_config)
        deps.append({**router, "name": contract.ROUTER, "user_config": merged})
        app["deployments"] = deps
        _get_global_client().deploy_apps(
            ServeDeploySchema.model_validate({"applications": list(current.values())})
        )
    if wait:
        wait_running([name])
    return app


def smoke_request(base_url: str, character_id: str, api_key: str | None = None) -> dict[str, Any]:
    """One chat completion through the ``openai`` client; returns request, reply and timing."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "none", timeout=120, max_retries=0)
    msgs = [{"role": "user", "content": "你好" if character_id else "hello"}]
    t0 = time.perf_counter()
    r = client.chat.completions.create(
        model=character_id, messages=msgs, max_tokens=16, extra_body={"conversation_id": "smoke"}
    )
    extra = (r.model_extra or {}).get("troupe", {})
    return {
        "base_url": base_url,
        "request": {"model": character_id, "messages": msgs},
        "reply": r.choices[0].message.content,
        "variant": extra.get("variant"),
        "model_version": extra.get("model_version"),
        "latency_ms": round((time.perf_counter() - t0) * 1000, 1),
        "usage": r.usage.model_dump() if r.usage else None,
    }


def first_character(base_url: str, api_key: str | None) -> str:
    """Id of the first character served (``GET /v1/models``)."""
    import httpx

    h = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{base_url}/models", headers=h, timeout=30)
    r.raise_for_status()
    data = r.json()["data"]
    if not data:
        raise click.ClickException("the app serves no characters")
    return data[0]["id"]


def check_model_uri(uri: str, tracking_uri: str | None, params: dict[str, Any]) -> None:
    """Fail before touching the cluster when ``models:/name@alias`` names no version.

    Raises:
        ConfigError: the alias is unset (for ``challenger``: the gate did not pass; the message points
            at ``paths.registry/gate.md``), or a local model directory does not exist.
    """
    if not uri.startswith("models:/"):
        if not Path(uri).is_dir():
            raise ConfigError(f"{uri}: model directory not found (--model-uri)")
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = uri[len("models:/") :]
    if "@" not in ref:
        return
    name, alias = ref.split("@", 1)
    try:
        mlflow.MlflowClient(tracking_uri or None).get_model_version_by_alias(name, alias)
    except MlflowException as e:
        gate = Path(params.get("paths", {}).get("registry", "work/registry")) / "gate.md"
        hint = f"; the gate decision is in {gate}" if gate.is_file() else ""
        raise ConfigError(
            f"{uri}: no version of {name!r} has alias {alias!r} (the gate did not pass or `troupe registry "
            f"register` has not run{hint}); deploy another version with --model-uri models:/{name}/<version>"
        ) from e


def pinned_version_uri(uri: str, tracking_uri: str | None) -> str:
    """``models:/<name>/<n>`` for a ``models:/`` URI (an alias resolved to its version number now).

    Raises:
        ConfigError: ``uri`` is a local directory (it exists only on this machine or pod) or names
            no version.
    """
    if not uri.startswith("models:/"):
        raise ConfigError(
            f"{uri}: a RayService serves registered versions only (models:/<name>/<version>); a local "
            "directory exists only where it was written"
        )
    from troupe.registry import model_version

    mv = model_version(uri, tracking_uri)
    return contract.model_version_uri(mv.name, mv.version)


def deploy_kubernetes(
    env: str,
    params: dict[str, Any],
    rayservice: str,
    namespace: str,
    model_uri: str | None = None,
    serve_url: str | None = None,
    timeout_s: float = 900,
    api: Any = None,
) -> dict[str, Any]:
    """Point the RayService's application at a registered version pinned by number and smoke it.

    Patches ``spec.serveConfigV2`` of RayService ``namespace/rayservice`` (the serving chart's
    release) so that application :func:`serving.contract.app_name` ``(env)`` serves
    ``stable_model_uri: models:/<name>/<n>`` (the version the env's alias names now, or
    ``model_uri``); the Router's canary settings are left as they are. Then waits until KubeRay
    reports the application RUNNING for the new generation and sends one chat request.

    Args:
        api: a ``kubernetes.client.CustomObjectsApi`` or a stand-in with its
            ``get_namespaced_custom_object`` / ``patch_namespaced_custom_object`` (tests: no API
            server runs here, see :class:`troupe.rollout.KubeTarget`); default in-cluster/kubeconfig.
        serve_url: base URL of the serve Service (default
            ``http://<rayservice>-serve-svc.<namespace>.svc.cluster.local:8000``).

    Returns:
        The smoke record (``troupe.deploy.smoke_request`` + env, app, rayservice, model_uri).
    """
    from troupe.rollout import KubeTarget
    from troupe.tracking import tracking_uri as default_tracking

    reg = params.get("registry", {})
    name = reg.get("model_name", "troupe-roleplay")
    tracking = reg.get("tracking_uri") or default_tracking()
    uri = model_uri or f"models:/{name}@{ALIASES.get(env, 'champion')}"
    if uri.startswith("models:/"):
        check_model_uri(uri, tracking, params)  # names the gate decision when the alias is unset
    pinned = pinned_version_uri(uri, tracking)
    svc = (serve_url or f"http://{rayservice}-serve-svc.{namespace}.svc.cluster.local:8000").rstrip("/")
    key = os.environ.get("TROUPE_API_KEY")
    target = KubeTarget(rayservice, namespace, contract.app_name(env), svc, key, api=api)
    prefix = str(target.serve_app().get("route_prefix") or "/").rstrip("/")
    click.echo(f"[deploy] RayService {namespace}/{rayservice} app {target.app}: stable -> {pinned}")
    generation = target.patch(args={contract.STABLE_MODEL_URI: pinned})
    target.wait_running(generation, timeout_s)
    base = f"{svc}{prefix}/v1"
    smoke = smoke_request(base, first_character(base, key), key)
    smoke.update(env=env, app=target.app, rayservice=f"{namespace}/{rayservice}", model_uri=pinned)
    return smoke


@click.command("deploy")
@click.option("--env", type=click.Choice(list(contract.ENVS)), default=None, help="default: serve.env")
@click.option(
    "--model-uri",
    default=None,
    help="local checkpoint dir (local Ray only) or models:/name/<version> | models:/name@alias (default: env alias)",
)
@click.option("--address", default="auto", show_default=True, help="local Ray cluster address")
@click.option(
    "--rayservice",
    default=None,
    help="update this RayService (the serving chart's release) on Kubernetes instead of the local Ray cluster",
)
@click.option(
    "--namespace", default=None, help="namespace of --rayservice (default: this pod's, else troupe-<env>)"
)
@click.option(
    "--serve-url", default=None, help="serve Service URL (default: the RayService's in-cluster Service)"
)
@click.option("--timeout", "timeout_s", default=900.0, show_default=True, help="seconds to wait for RUNNING")
@click.option(
    "--if-gate-passed",
    is_flag=True,
    help="deploy only when paths.registry/decision.json says pass; otherwise write paths.deploy/skipped.json "
    "with the gate's status and exit 0 (what the KFP pipeline's condition does; used by dvc.yaml)",
)
@click.option(
    "--catalogue",
    "catalogue_uri",
    default=None,
    help="character catalogue to serve (local path or s3:// URI, `troupe characters ...`); "
    "default: the characters stored with the model version",
)
@click.option(
    "--reload-characters",
    "reload_only",
    is_flag=True,
    help="only make the running app serve --catalogue (Router user_config; model replicas keep running)",
)
@step_options
def deploy_cmd(
    params: dict,
    env: str | None,
    model_uri: str | None,
    address: str,
    rayservice: str | None,
    namespace: str | None,
    serve_url: str | None,
    timeout_s: float,
    if_gate_passed: bool,
    catalogue_uri: str | None,
    reload_only: bool,
) -> None:
    """Deploy/update the Serve app of an environment and write paths.deploy/smoke.json."""
    s = section(params, "serve")
    env = env or s.get("env", "test")
    out = path_of(params, "deploy")
    if reload_only:
        if not catalogue_uri:
            raise click.UsageError("--reload-characters needs --catalogue URI")
        if rayservice:
            ns = namespace or _pod_namespace() or f"troupe-{'prod' if env == 'production' else env}"
            uc = reload_characters_kubernetes(env, rayservice, ns, catalogue_uri, timeout_s)
        else:
            connect(address)
            uc = reload_characters(app_name(env), catalogue_uri)
        click.echo(
            f"[deploy] {app_name(env)} serves {uc[contract.CATALOGUE_URI]} ({uc[contract.CATALOGUE_VERSION]})"
        )
        return
    if if_gate_passed:
        decision = path_of(params, "registry") / "decision.json"
        status = (
            json.loads(decision.read_text(encoding="utf-8")).get("status") if decision.is_file() else None
        )
        if status != "pass":
            out.mkdir(parents=True, exist_ok=True)
            (out / "smoke.json").unlink(missing_ok=True)
            skipped = {
                "deployed": False,
                "env": env,
                "gate_status": status,
                "reason": f"the gate did not pass ({status or 'no decision'}): see {decision.parent / 'gate.md'}",
                "deploy_anyway": "troupe deploy --env test --model-uri models:/<name>/<version> (decision.json)",
            }
            (out / "skipped.json").write_text(json.dumps(skipped, indent=2), encoding="utf-8")
            click.echo(f"[deploy] skipped: {skipped['reason']} -> {out / 'skipped.json'}")
            return
        (out / "skipped.json").unlink(missing_ok=True)
    if rayservice:
        ns = namespace or _pod_namespace() or f"troupe-{'prod' if env == 'production' else env}"
        if catalogue_uri:
            raise click.UsageError("--catalogue with --rayservice: set the chart's catalogue value instead")
        smoke = deploy_kubernetes(env, params, rayservice, ns, model_uri, serve_url, timeout_s)
    else:
        smoke = deploy_local(env, params, model_uri, address, s, catalogue_uri)
    out.mkdir(parents=True, exist_ok=True)
    (out / "smoke.json").write_text(json.dumps(smoke, ensure_ascii=False, indent=2), encoding="utf-8")
    click.echo(
        f"[deploy] smoke ok: {smoke['latency_ms']} ms, model {smoke['model_version']} -> {out / 'smoke.json'}"
    )


def _pod_namespace() -> str | None:
    p = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return p.read_text().strip() if p.is_file() else None


def deploy_local(
    env: str,
    params: dict[str, Any],
    model_uri: str | None,
    address: str,
    s: dict[str, Any],
    catalogue_uri: str | None = None,
) -> dict[str, Any]:
    """Deploy on the local Ray cluster (started when none runs) and send one chat request.

    ``catalogue_uri``: serve that character catalogue (:func:`app_config`).

    A ``models:/<name>@<alias>`` stable model is pinned to the version the alias names now.

    Raises:
        ConfigError: the model URI names nothing, or a canary rollout runs in ``env`` (its record
            in MLflow; redeploying would drop the canary under the controller).
    """
    host, port = s.get("host", "127.0.0.1"), int(s.get("port", 8000))
    app = app_config(env, params, model_uri=model_uri, catalogue_uri=catalogue_uri)
    uri = (
        app["args"].get(contract.STABLE_MODEL_URI)
        or f"models:/{app['args']['model_name']}@{app['args']['stable_alias']}"
    )
    check_model_uri(uri, app["args"].get("mlflow_tracking_uri"), params)
    if uri.startswith("models:/"):  # serve the version the alias names now, never the moving alias
        from troupe.rollout import ACTIVE, RolloutStore

        tracking = app["args"].get("mlflow_tracking_uri")
        rec = RolloutStore(tracking, app["args"]["model_name"], env).load()
        if rec is not None and rec.status in ACTIVE:
            raise ConfigError(
                f"a rollout runs in {env!r} (canary {rec.canary_uri} at {rec.weight}%, {rec.status}); "
                f"finish it (troupe rollout resume|promote|rollback --env {env}) before deploying"
            )
        uri = pinned_version_uri(uri, tracking)
        app["args"][contract.STABLE_MODEL_URI] = uri
    connect(address)
    click.echo(f"[deploy] {app['name']} at http://{host}:{port}{app['route_prefix']} ({uri})")
    apply_apps([app], host, port)
    base = f"http://{host}:{port}{app['route_prefix']}/v1"
    key = os.environ.get("TROUPE_API_KEY")
    smoke = smoke_request(base, first_character(base, key), key)
    smoke.update(env=env, app=app["name"], app_config=app)
    return smoke


@click.command("chat")
@click.option("--env", type=click.Choice(["test", "production"]), default="test", show_default=True)
@click.option("--character", "character_id", required=True, help="character id (GET /v1/models)")
@click.option("--conversation", default=None, help="conversation id (default: random)")
@click.option("--delay/--no-delay", default=False, help="sleep each message's typing delay")
@step_options
def chat_cmd(params: dict, env: str, character_id: str, conversation: str | None, delay: bool) -> None:
    """Terminal chat with a character of the running app (shows emotion and image requests)."""
    import uuid

    import httpx

    s = section(params, "serve")
    prefix = f"/{env}"
    try:
        prefix = app_config(env, params)["route_prefix"]
    except ConfigError:
        pass
    url = f"http://{s.get('host', '127.0.0.1')}:{int(s.get('port', 8000))}{prefix}/v1/roleplay"
    key = os.environ.get("TROUPE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    conv = conversation or uuid.uuid4().hex[:12]
    history: list[dict[str, str]] = []
    click.echo(f"chatting with {character_id} ({url}, conversation {conv}); empty line or Ctrl-D quits")
    while True:
        try:
            line = click.prompt("you", default="", show_default=False)
        except (EOFError, click.Abort):
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        r = httpx.post(
            url,
            json={"character_id": character_id, "conversation_id": conv, "messages": history},
            headers=headers,
            timeout=120,
        )
        if r.status_code != 200:
            click.echo(f"[{r.status_code}] {r.text}", err=True)
            history.pop()
            continue
        d = r.json()
        for m in d["messages"] or [{"text": d["text"], "delay_ms": 0}]:
            if delay:
                time.sleep(m["delay_ms"] / 1000)
            click.echo(f"{character_id}: {m['text']}")
        tags = [f"emotion={d['emotion']}"] if d.get("emotion") else []
        tags += [
            f"image({'with' if i['include_person'] else 'without'} person): {i['prompt']}"
            for i in d["images"]
        ]
        tags.append(f"{d['variant']} {d['model_version']}")
        click.echo("  [" + " | ".join(tags) + "]")
        history.append({"role": "assistant", "content": d["raw"]})
