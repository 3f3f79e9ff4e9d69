"""Canary rollout controller: step the canary weight up while it stays healthy, roll back when not.

The controller reads ``GET {prefix}/v1/rollout/stats?since=<step start>`` from the Router, compares
canary against stable with the limits of a policy file (``configs/rollout_policy.yaml``) and acts
through a *target*: :class:`LocalTarget` (the Serve app on the local Ray cluster: the Router's
``user_config`` is updated in place) or :class:`KubeTarget` (patches the RayService's
``serveConfigV2``; :func:`rayservice_patch` builds the patch). On success the MLflow alias
``champion`` moves to the canary's version; every decision is an MLflow model-version tag and a
line in an append-only JSONL event log.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from serving import contract
from troupe.cli import step_options
from troupe.config import ConfigError, path_of, repo_path, section

QUALITY_KEYS = ("markup_invalid_rate", "language_mismatch_rate", "assistant_phrase_rate")


@dataclass
class Policy:
    """Rollout policy (``configs/rollout_policy.yaml``).

    Attributes:
        steps: canary weights in percent, increasing, ending at 100 (e.g. 5, 25, 50, 100).
        min_requests: canary replies needed at a step before it can advance.
        min_seconds: seconds a step lasts at least.
        max_error_rate: absolute canary error-rate limit.
        max_error_rate_delta: canary error rate minus stable error rate limit.
        max_p95_ratio: canary p95 latency / stable p95 latency limit.
        max_quality_delta: per quality signal (``markup_invalid_rate``, ``language_mismatch_rate``,
            ``assistant_phrase_rate``): canary rate minus stable rate limit.
        poll_seconds: stats polling interval.
        timeout_seconds: a step that never gets enough traffic is rolled back after this long.
    """

    steps: list[float] = field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0])
    min_requests: int = 50
    min_seconds: float = 300.0
    max_error_rate: float = 0.05
    max_error_rate_delta: float = 0.02
    max_p95_ratio: float = 1.5
    max_quality_delta: dict[str, float] = field(default_factory=lambda: {k: 0.05 for k in QUALITY_KEYS})
    poll_seconds: float = 10.0
    timeout_seconds: float = 3600.0

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy YAML (unknown keys are an error).

        Raises:
            ConfigError: missing file, unknown key, or steps not increasing to 100.
        """
        p = repo_path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: rollout policy not found")
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{p}: unknown keys {sorted(unknown)}")
        pol = cls(**d)
        pol.steps = [float(s) for s in pol.steps]
        if not pol.steps or pol.steps != sorted(pol.steps) or pol.steps[-1] != 100.0 or pol.steps[0] <= 0:
            raise ConfigError(f"{p}: steps must increase from >0 to 100, got {pol.steps}")
        return pol


@dataclass
class Decision:
    """What the controller does next: ``hold``, ``advance``, ``promote`` or ``rollback`` (+ why)."""

    action: str
    reason: str
    weight: float
    next_weight: float | None = None
    canary: dict[str, Any] = field(default_factory=dict)
    stable: dict[str, Any] = field(default_factory=dict)


def decide(policy: Policy, weight: float, step_started: float, now: float, stats: dict[str, Any]) -> Decision:
    """Judge one rollout step from Router stats (pure function).

    Args:
        policy: limits and step plan.
        weight: current canary weight (percent; one of ``policy.steps``).
        step_started: unix time the step began (stats are counted since then).
        now: current unix time.
        stats: ``/v1/rollout/stats`` JSON (``variants.{stable,canary}``).

    Returns:
        ``rollback`` as soon as a limit is broken (the reason names the limit and values), else
        ``hold`` until ``min_requests`` canary requests and ``min_seconds`` passed, then ``advance``
        to the next step or ``promote`` after the last one.
    """
    c = stats["variants"]["canary"]
    s = stats["variants"]["stable"]
    d = Decision("hold", "", weight, canary=c, stable=s)
    if stats.get("rolled_back"):
        d.action, d.reason = "rollback", f"router reports rolled back: {stats.get('rollback_reason', '')}"
        return d
    broken = []
    if c["requests"]:
        if c["error_rate"] > policy.max_error_rate:
            broken.append(f"canary error rate {c['error_rate']:.3f} > {policy.max_error_rate}")
        if c["error_rate"] - s["error_rate"] > policy.max_error_rate_delta:
            broken.append(
                f"canary-stable error rate {c['error_rate']:.3f}-{s['error_rate']:.3f} > {policy.max_error_rate_delta}"
            )
    if c["ok"]:
        for k, lim in policy.max_quality_delta.items():
            if c.get(k, 0.0) - s.get(k, 0.0) > lim:
                broken.append(f"{k} canary {c.get(k, 0.0):.3f} vs stable {s.get(k, 0.0):.3f} (limit +{lim})")
        if c.get("p95_ms") and s.get("p95_ms") and c["ok"] >= policy.min_requests // 2 + 1:
            ratio = c["p95_ms"] / max(s["p95_ms"], 1e-6)
            if ratio > policy.max_p95_ratio:
                broken.append(f"p95 latency ratio {ratio:.2f} > {policy.max_p95_ratio}")
    if broken:
        d.action, d.reason = "rollback", "; ".join(broken)
        return d
    elapsed = now - step_started
    if c["requests"] < policy.min_requests or elapsed < policy.min_seconds:
        if elapsed > policy.timeout_seconds:
            d.action, d.reason = "rollback", f"step {weight}% timed out with {c['requests']} canary requests"
            return d
        d.reason = f"waiting: {c['requests']}/{policy.min_requests} canary requests, {elapsed:.0f}/{policy.min_seconds:.0f}s"
        return d
    later = [w for w in policy.steps if w > weight]
    if later:
        d.action, d.next_weight = "advance", later[0]
        d.reason = f"step {weight}% healthy over {c['requests']} canary requests"
    else:
        d.action, d.reason = "promote", f"100% healthy over {c['requests']} canary requests"
    return d


# -- targets --------------------------------------------------------------------------------------
def rayservice_patch(
    serve_config_v2: str,
    app_name: str,
    user_config: dict[str, Any] | None = None,
    args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """JSON merge patch for a RayService that changes one application of its ``serveConfigV2``.

    Args:
        serve_config_v2: the RayService's current ``spec.serveConfigV2`` (YAML string).
        app_name: application to change (:func:`serving.contract.app_name`, e.g. ``troupe-production``).
        user_config: new Router user config (``{"canary_weight_percent": 25.0}``), validated by
            :func:`serving.contract.check_user_config`; None leaves it.
        args: application args to set (a None value removes the key), e.g. ``{"stable_model_uri":
            "models:/troupe-roleplay/7"}``; None leaves the args.

    Returns:
        ``{"spec": {"serveConfigV2": <YAML>}}``. With ``user_config`` alone only the Router's
        ``user_config`` differs, so KubeRay applies it in place (model replicas untouched); changed
        ``args`` make Serve rebuild the application (new model replicas where their model changed).

    Raises:
        KeyError: the application is not in the config.
        ValueError: an invalid user config.
    """
    cfg = yaml.safe_load(serve_config_v2) or {}
    apps = cfg.get("applications", [])
    app = next((a for a in apps if a.get("name") == app_name), None)
    if app is None:
        raise KeyError(
            f"application {app_name!r} not in serveConfigV2 (have {[a.get('name') for a in apps]})"
        )
    if user_config is not None:
        contract.check_user_config(user_config)
        deps = app.setdefault("deployments", [])
        router = next((d for d in deps if d.get("name") == contract.ROUTER), None)
        if router is None:
            router = {"name": contract.ROUTER}
            deps.append(router)
        router["user_config"] = dict(user_config)
    if args is not None:
        new_args = dict(app.get("args") or {})
        for k, v in args.items():
            if v is None:
                new_args.pop(k, None)
            else:
                new_args[k] = v
        app["args"] = new_args
    return {"spec": {"serveConfigV2": yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)}}


class LocalTarget:
    """The Serve application of an environment on the local Ray cluster.

    Args:
        env: environment (application :func:`serving.contract.app_name`).
        base_url: ``http://host:port/<prefix>`` of the app (stats are read from it).
        api_key: key for the stats endpoint (``TROUPE_API_KEY``), if the gateway requires one.
    """

    def __init__(self, env: str, base_url: str, api_key: str | None = None) -> None:
        self.env, self.base_url, self.api_key = env, base_url.rstrip("/"), api_key

    @property
    def app(self) -> str:
        return contract.app_name(self.env)

    def stats(self, since: float) -> dict[str, Any]:
        """Router stats since ``since`` (unix seconds)."""
        import httpx

        h = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        r = httpx.get(f"{self.base_url}/v1/rollout/stats", params={"since": since}, headers=h, timeout=30)
        r.raise_for_status()
        return r.json()

    def set_weight(self, weight: float) -> None:
        """Router ``user_config`` -> ``{"canary_weight_percent": weight}`` (in-place reconfigure)."""
        from troupe.deploy import set_router_config

        set_router_config(self.app, contract.router_user_config(weight))

    def rollback(self, reason: str) -> None:
        """Weight 0 and all pinned conversations back to stable."""
        from troupe.deploy import set_router_config

        set_router_config(self.app, contract.router_user_config(0.0, rolled_back=True, reason=reason))

    def finish_promotion(self, canary_uri: str | None) -> None:
        """Serve the canary as the new stable, without a canary (a full redeploy of the app)."""
        from troupe.deploy import apply_apps, deployed_apps

        app = deployed_apps()[self.app]
        app["args"] = promoted_args(app["args"], canary_uri)
        app["deployments"] = [{"name": contract.ROUTER, "user_config": contract.router_user_config(0.0)}]
        apply_apps([app])


def promoted_args(args: dict[str, Any], canary_uri: str | None) -> dict[str, Any]:
    """App args after a promotion: the canary's URI as stable, no canary, weight 0."""
    out = dict(args)
    if canary_uri:
        out[contract.STABLE_MODEL_URI] = canary_uri
    out.pop(contract.CANARY_MODEL_URI, None)
    out["canary_alias"] = ""
    out[contract.CANARY_WEIGHT] = 0.0
    return out


class KubeTarget:
    """A RayService on Kubernetes (``kubernetes`` client; in-cluster or kubeconfig credentials).

    Stats are read through ``base_url`` (the RayService's serve Service); weights and models are
    changed by patching ``spec.serveConfigV2`` with :func:`rayservice_patch`, which KubeRay then
    applies through Serve's REST API. No Kubernetes API server runs in this project's tests: they
    pass ``api``, a stand-in with the two ``CustomObjectsApi`` methods used here
    (``get_namespaced_custom_object``, ``patch_namespaced_custom_object``) that applies the patched
    ``serveConfigV2`` to a local Ray cluster the way KubeRay does.

    Args:
        name: RayService name (the serving chart's release name).
        namespace: its namespace.
        app: Serve application name (:func:`serving.contract.app_name`).
        base_url: ``http://<name>-serve-svc.<namespace>.svc.cluster.local:8000<prefix>``.
        api_key: key for the stats endpoint.
        api: a ``CustomObjectsApi`` (default: built from in-cluster config or kubeconfig).
    """

    GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"

    def __init__(
        self, name: str, namespace: str, app: str, base_url: str, api_key: str | None = None, api: Any = None
    ) -> None:
        self.name, self.namespace, self.app = name, namespace, app
        self._local = LocalTarget("production", base_url, api_key)
        self._api_obj = api

    def _api(self):
        if self._api_obj is not None:
            return self._api_obj
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._api_obj = client.CustomObjectsApi()
        return self._api_obj

    def get(self) -> dict[str, Any]:
        """The RayService object."""
        return self._api().get_namespaced_custom_object(
            self.GROUP, self.VERSION, self.namespace, self.PLURAL, self.name
        )

    def serve_app(self) -> dict[str, Any]:
        """This target's application entry of the current ``serveConfigV2``."""
        cfg = yaml.safe_load(self.get()["spec"]["serveConfigV2"]) or {}
        app = next((a for a in cfg.get("applications", []) if a.get("name") == self.app), None)
        if app is None:
            raise KeyError(f"RayService {self.namespace}/{self.name} has no application {self.app!r}")
        return app

    def stats(self, since: float) -> dict[str, Any]:
        return self._local.stats(since)

    def patch(self, user_config: dict[str, Any] | None = None, args: dict[str, Any] | None = None) -> int:
        """Patch the RayService's ``serveConfigV2``; returns the object's new ``metadata.generation``."""
        api = self._api()
        obj = self.get()
        body = rayservice_patch(obj["spec"]["serveConfigV2"], self.app, user_config, args)
        new = api.patch_namespaced_custom_object(
            self.GROUP, self.VERSION, self.namespace, self.PLURAL, self.name, body
        )
        return int((new or {}).get("metadata", {}).get("generation") or 0)

    def wait_running(self, generation: int = 0, timeout_s: float = 900, poll_s: float = 5) -> dict[str, Any]:
        """Wait until KubeRay has reconciled ``generation`` and the application is RUNNING.

        Reads ``status.observedGeneration`` and
        ``status.activeServiceStatus.applicationStatuses[app].status`` (KubeRay v1).

        Raises:
            RuntimeError: the application reports DEPLOY_FAILED / UNHEALTHY, or ``timeout_s`` passes.
        """
        t0 = time.time()
        while True:
            st = self.get().get("status") or {}
            apps = (st.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
            app = apps.get(self.app) or {}
            seen = int(st.get("observedGeneration") or 0) >= generation
            if seen and app.get("status") == "RUNNING":
                return app
            if seen and app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(
                    f"{self.name}/{self.app}: {app.get('status')}: {app.get('message', '')[-2000:]}"
                )
            if time.time() - t0 > timeout_s:
                raise RuntimeError(f"{self.name}/{self.app}: not RUNNING after {timeout_s}s (status {app})")
            time.sleep(poll_s)

    def set_weight(self, weight: float) -> None:
        self.patch(contract.router_user_config(weight))

    def rollback(self, reason: str) -> None:
        self.patch(contract.router_user_config(0.0, rolled_back=True, reason=reason))

    def finish_promotion(self, canary_uri: str | None) -> None:
        """Serve the canary's version as stable (pinned), drop the canary, weight 0."""
        args = promoted_args(self.serve_app().get("args") or {}, canary_uri)
        self.patch(contract.router_user_config(0.0), {**args, contract.CANARY_MODEL_URI: None})


# -- records --------------------------------------------------------------------------------------
class EventLog:
    """Append-only JSONL log of rollout decisions (one JSON object a line, UTF-8)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, event: dict[str, Any]) -> dict[str, Any]:
        """Write ``event`` with a ``ts`` field (unix seconds) added; returns it."""
        e = {"ts": time.time(), **event}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(e, ensure_ascii=False, default=str) + "\n")
        return e

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines() if x.strip()]


class Registry:
    """MLflow side of a rollout: the canary's model version, decision tags, the champion alias.

    Args:
        tracking_uri: MLflow tracking URI (None: MLflow's default / ``MLFLOW_TRACKING_URI``).
        model_name: registered model name.
    """

    def __init__(self, tracking_uri: str | None, model_name: str) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri or None)
        self.model_name = model_name

    def version_of(self, alias: str) -> str | None:
        """Version number behind ``alias``, or None when the alias is not set."""
        try:
            return str(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except Exception:
            return None

    def tag(self, version: str | None, decision: dict[str, Any]) -> None:
        """Record a decision as tags on the canary's model version (no-op without a version)."""
        if not version:
            return
        n = len(
            [
                k
                for k in self.client.get_model_version(self.model_name, version).tags
                if k.startswith("rollout.event.")
            ]
        )
        tags = {
            "rollout.status": decision["action"],
            "rollout.reason": decision.get("reason", "")[:4000],
            "rollout.weight": str(decision.get("weight")),
            f"rollout.event.{n:03d}": json.dumps(
                {k: decision.get(k) for k in ("action", "reason", "weight", "next_weight")},
                ensure_ascii=False,
            )[:4000],
        }
        for k, v in tags.items():
            self.client.set_model_version_tag(self.model_name, version, k, v)

    def promote(self, version: str, alias: str = "champion") -> None:
        """Point ``alias`` at ``version`` (``set_registered_model_alias``)."""
        self.client.set_registered_model_alias(self.model_name, alias, version)


# -- controller -----------------------------------------------------------------------------------
class Controller:
    """Runs a rollout over a target: start at the first step, judge, advance, promote or roll back.

    Args:
        target: :class:`LocalTarget` or :class:`KubeTarget` (anything with ``stats``, ``set_weight``,
            ``rollback``, ``finish_promotion``).
        policy: the rollout policy.
        log: event log.
        registry: MLflow registry helper, or None to skip tags and the alias move.
        canary_version: the canary's registered version (tags, promotion).
        canary_uri: the canary's model URI (served as stable after promotion).
        state_path: JSON file holding the controller state (resumable ``status``).
    """

    def __init__(
        self,
        target,
        policy: Policy,
        log: EventLog,
        registry: Registry | None = None,
        canary_version: str | None = None,
        canary_uri: str | None = None,
        state_path: str | Path | None = None,
    ) -> None:
        self.target, self.policy, self.log, self.registry = target, policy, log, registry
        self.canary_version, self.canary_uri = canary_version, canary_uri
        self.state_path = Path(state_path) if state_path else None
        self.weight = 0.0
        self.step_started = 0.0
        self.status = "idle"

    def _save(self) -> None:
        if self.state_path:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            st = {
                "status": self.status,
                "weight": self.weight,
                "step_started": self.step_started,
                "canary_version": self.canary_version,
                "canary_uri": self.canary_uri,
            }
            self.state_path.write_text(json.dumps(st, indent=2), encoding="utf-8")

    def _record(self, d: Decision) -> dict[str, Any]:
        e = self.log.append({"canary_version": self.canary_version, **asdict(d)})
        if self.registry:
            self.registry.tag(self.canary_version, e)
        return e

    def start(self) -> None:
        """Set the first step's weight and record it."""
        self.weight = self.policy.steps[0]
        self.target.set_weight(self.weight)
        self.step_started = time.time()
        self.status = "running"
        self._record(Decision("start", f"canary at {self.weight}%", self.weight))
        self._save()

    def tick(self, now: float | None = None) -> Decision:
        """Read stats since the step began, decide and act once; returns the decision."""
        now = time.time() if now is None else now
        d = decide(self.policy, self.weight, self.step_started, now, self.target.stats(self.step_started))
        if d.action == "advance":
            self.target.set_weight(d.next_weight)
            self.weight, self.step_started = float(d.next_weight), time.time()
        elif d.action == "rollback":
            self.rollback(d.reason, d)
            return d
        elif d.action == "promote":
            self.promote(d.reason, d)
            return d
        if d.action != "hold":
            self._record(d)
        self._save()
        return d

    def rollback(self, reason: str, d: Decision | None = None) -> None:
        """Weight 0, pins cleared, the reason recorded (status ``rolled_back``)."""
        self.target.rollback(reason)
        self.status = "rolled_back"
        self._record(d or Decision("rollback", reason, self.weight))
        self.weight = 0.0
        self._save()

    def promote(self, reason: str, d: Decision | None = None) -> None:
        """Move ``champion`` to the canary version and serve it as stable (status ``promoted``)."""
        if self.registry and self.canary_version:
            self.registry.promote(self.canary_version, "champion")
        self.target.finish_promotion(self.canary_uri)
        self.status = "promoted"
        self._record(d or Decision("promote", reason, self.weight))
        self._save()

    def run(self, sleep=time.sleep, max_ticks: int | None = None) -> Decision:
        """Tick every ``policy.poll_seconds`` until promoted or rolled back (or ``max_ticks``)."""
        n = 0
        while True:
            d = self.tick()
            n += 1
            if d.action in ("promote", "rollback") or (max_ticks and n >= max_ticks):
                return d
            sleep(self.policy.poll_seconds)


# -- CLI ------------------------------------------------------------------------------------------
def _files(params: dict[str, Any]) -> tuple[Path, Path]:
    d = path_of(params, "deploy")
    return d / "rollout_state.json", d / "rollout_events.jsonl"


def _context(params: dict[str, Any], env: str, policy_path: str | None):
    import os

    s = section(params, "serve")
    reg = params.get("registry", {})
    policy = Policy.load(policy_path or reg.get("rollout_policy", "configs/rollout_policy.yaml"))
    from troupe.deploy import app_config

    prefix = app_config(env, params)["route_prefix"]
    base = f"http://{s.get('host', '127.0.0.1')}:{int(s.get('port', 8000))}{prefix}"
    target = LocalTarget(env, base, os.environ.get("TROUPE_API_KEY"))
    from troupe.tracking import tracking_uri

    tracking = reg.get("tracking_uri") or tracking_uri()
    registry = Registry(tracking, reg.get("model_name", "troupe-roleplay"))
    state_path, log_path = _files(params)
    return policy, target, registry, state_path, EventLog(log_path)


@click.group("rollout")
def rollout_cli() -> None:
    """Canary rollout of the challenger in an environment (default production)."""


@rollout_cli.command("start")
@click.option("--env", default="production", show_default=True)
@click.option("--canary-uri", default=None, help="default models:/<model_name>/<challenger version>")
@click.option("--policy", "policy_path", default=None, help="default configs/rollout_policy.yaml")
@click.option("--wait/--no-wait", default=True, help="run the controller until promoted or rolled back")
@step_options
def start_cmd(params: dict, env: str, canary_uri: str | None, policy_path: str | None, wait: bool) -> None:
    """Deploy the canary next to stable at the first step and (by default) run the controller."""
    from troupe.deploy import app_config, apply_apps, connect, deployed_apps

    policy, target, registry, state_path, log = _context(params, env, policy_path)
    name = params.get("registry", {}).get("model_name", "troupe-roleplay")
    version = registry.version_of("challenger")
    if canary_uri is None:
        if version is None:
            raise ConfigError(f"model {name!r} has no challenger alias (run `troupe registry register`)")
        canary_uri = contract.model_version_uri(name, version)  # pinned by number, not by alias
    connect()
    app = deployed_apps().get(target.app) or app_config(env, params)
    app["args"] = {**app["args"], contract.CANARY_MODEL_URI: canary_uri, contract.CANARY_WEIGHT: 0.0}
    apply_apps([app])
    ctl = Controller(target, policy, log, registry, version, canary_uri, state_path)
    ctl.start()
    click.echo(f"[rollout] canary {canary_uri} (version {version}) at {ctl.weight}%")
    if wait:
        d = ctl.run()
        click.echo(f"[rollout] {d.action}: {d.reason}")


@rollout_cli.command("status")
@click.option("--env", default="production", show_default=True)
@step_options
def status_cmd(params: dict, env: str) -> None:
    """Print the controller state, the last events and the Router's live stats."""
    _, target, _, state_path, log = _context(params, env, None)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"status": "idle"}
    click.echo(json.dumps({"state": state, "events": log.read()[-5:]}, indent=2, ensure_ascii=False))
    try:
        click.echo(json.dumps(target.stats(state.get("step_started", 0.0)), indent=2))
    except Exception as e:
        click.echo(f"(stats unavailable: {e})", err=True)


def _resume(params: dict, env: str) -> Controller:
    from troupe.deploy import connect

    policy, target, registry, state_path, log = _context(params, env, None)
    if not state_path.is_file():
        raise ConfigError(f"{state_path}: no rollout in progress (troupe rollout start)")
    st = json.loads(state_path.read_text())
    ctl = Controller(
        target, policy, log, registry, st.get("canary_version"), st.get("canary_uri"), state_path
    )
    ctl.weight, ctl.step_started, ctl.status = st["weight"], st["step_started"], st["status"]
    connect()
    return ctl


@rollout_cli.command("promote")
@click.option("--env", default="production", show_default=True)
@step_options
def promote_cmd(params: dict, env: str) -> None:
    """Promote the canary now (champion alias -> canary version)."""
    _resume(params, env).promote("manual promote")
    click.echo("[rollout] promoted")


@rollout_cli.command("rollback")
@click.option("--env", default="production", show_default=True)
@click.option("--reason", default="manual rollback", show_default=True)
@step_options
def rollback_cmd(params: dict, env: str, reason: str) -> None:
    """Roll the canary back now (weight 0, conversations back to stable)."""
    _resume(params, env).rollback(reason)
    click.echo(f"[rollout] rolled back: {reason}")
