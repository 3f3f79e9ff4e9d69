"""Canary rollout: analysis with tolerance, one durable record per environment, a resumable controller.

**Analysis** (:func:`decide`, after Flagger's canary analysis, Argo Rollouts' ``AnalysisRun`` and
Kayenta's judge): each poll reads the Router's ``GET {prefix}/v1/rollout/stats?since=<window
start>``, i.e. stable and canary over the *same* time window, and turns it into checks with a
verdict each (:class:`troupe.stats.Verdict`: ``pass``, ``fail`` or ``insufficient``):

* nothing is judged before both variants have ``min_canary_requests`` / ``min_stable_requests``
  requests in the window and the window lasted ``min_seconds`` ("insufficient": the step holds);
* rates (errors, live reply-rule breaks from :mod:`troupe.checks`) are compared with a one-sided
  two-proportion test with a margin (:func:`troupe.stats.worse_by_more_than`: fail only when the
  canary is worse than stable by more than the policy's margin at significance ``alpha``), each
  difference reported with Newcombe's interval (Newcombe 1998);
* the p95 latency fails when the canary's lower order-statistic bound exceeds ``max_p95_ratio``
  times stable's upper bound (:func:`troupe.stats.quantile_interval`);
* a failed analysis counts towards ``failure_threshold`` *consecutive* failures before a rollback
  (Flagger's ``threshold``, Argo's ``failureLimit``); a pass resets the count; only a hard limit
  (the canary's error rate clearly above ``hard_max_error_rate``) rolls back at once;
* stable keeps traffic at every step: the steps end below 100 % and the last healthy step promotes.

**State** (:class:`RolloutRecord`, :class:`RolloutStore`): one record per environment, a JSON tag
``troupe.rollout.<env>`` on the registered model in MLflow (the registry already holds the versions
the rollout moves between and is reachable from a workstation, a KFP pod and the controller
alike; a Kubernetes object would leave the local path without a store). It holds the step, weight,
pinned stable and canary URIs, window start, consecutive failures and the last decisions; each full
decision (every metric with its n and 95 % interval) is also a tag on the canary's model version.
A second rollout in the same environment is refused by a lock: MLflow's one atomic
create-if-absent, creating a registered model ``<model>.rollout-lock.<env>`` (the backing store's
unique name constraint). Every write of the record is a compare-and-set on its ``revision`` and
``owner`` (read, compare, write), so a controller that was taken over by ``resume`` stops at its
next write instead of acting twice. MLflow has no conditional write, so two writes landing within
the same read-write gap are not told apart; only a takeover makes two writers, and the lock keeps
every other writer out.

**Acting** (targets): :class:`LocalTarget` (the environment's Serve app on the local Ray cluster)
or :class:`KubeTarget` (the RayService's ``serveConfigV2``). Both expose ``converge(stable, canary,
weight, ...)``, which is idempotent: it changes the app only where it differs from the record, so
a resumed controller repeats the last step safely. Stable and canary are always pinned by version
number (``models:/<name>/<n>``), never a moving alias.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from serving import contract
from serving.gateway import RULE_CHECKS
from troupe import stats as st
from troupe.cli import step_options
from troupe.config import ConfigError, repo_path, section

QUALITY_KEYS = tuple(f"{c}_rate" for c in RULE_CHECKS)
CHAMPION = "champion"
#: Record statuses. ``promoting`` / ``rolling_back`` are written before acting, so a resumed
#: controller finishes what a dead one started.
RUNNING, PROMOTING, ROLLING_BACK = "running", "promoting", "rolling_back"
PROMOTED, ROLLED_BACK, ABORTED = "promoted", "rolled_back", "aborted"
ACTIVE = (RUNNING, PROMOTING, ROLLING_BACK)
TERMINAL = (PROMOTED, ROLLED_BACK, ABORTED)


@dataclass
class Policy:
    """Rollout policy (``configs/rollout_policy.yaml``); every field is documented there too.

    Attributes:
        steps: canary weights in percent, increasing, each in (0, 100): stable keeps traffic at
            every step; the rollout promotes after the last healthy step.
        min_canary_requests, min_stable_requests: requests each variant needs in the step's window
            before any comparison is judged (fewer: "insufficient", the step holds).
        min_seconds: a step lasts at least this long (seconds).
        failure_threshold: consecutive failed analyses before a rollback.
        alpha: one-sided significance level of the "canary worse by more than the margin" tests.
        confidence: level of the reported intervals (Wilson, Newcombe, order statistics).
        max_error_rate: the canary's error rate Wilson lower bound above this fails a check.
        max_error_rate_delta: margin of the canary-minus-stable error rate test.
        hard_max_error_rate: the canary's error rate Wilson lower bound above this (with at least
            ``hard_min_requests`` canary requests) rolls back at once, no threshold.
        hard_min_requests: canary requests before the hard limit is read.
        max_p95_ratio: tolerated canary p95 / stable p95 latency (judged on the interval bounds).
        max_quality_delta: margin per live rule rate (``markup_invalid_rate``,
            ``language_mismatch_rate``, ``assistant_phrase_rate``): canary minus stable.
        poll_seconds: seconds between analyses.
        timeout_seconds: a step still without enough traffic after this long is rolled back.
    """

    steps: list[float] = field(default_factory=lambda: [5.0, 25.0, 50.0])
    min_canary_requests: int = 400
    min_stable_requests: int = 400
    min_seconds: float = 600.0
    failure_threshold: int = 3
    alpha: float = 0.05
    confidence: float = 0.95
    max_error_rate: float = 0.05
    max_error_rate_delta: float = 0.003
    hard_max_error_rate: float = 0.2
    hard_min_requests: int = 20
    max_p95_ratio: float = 1.5
    max_quality_delta: dict[str, float] = field(default_factory=lambda: {k: 0.01 for k in QUALITY_KEYS})
    poll_seconds: float = 10.0
    timeout_seconds: float = 3600.0

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy YAML.

        Raises:
            ConfigError: naming the file and field: missing file, unknown key, steps not increasing
                within (0, 100), an unknown ``max_quality_delta`` key, ``alpha``/``confidence``
                outside (0, 1), a ``failure_threshold`` below 1.
        """
        p = repo_path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: rollout policy not found")
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"{p}: unknown keys {sorted(unknown)} (known: {sorted(cls.__dataclass_fields__)})"
            )
        pol = cls(**d)
        pol.steps = [float(s) for s in pol.steps]
        if not pol.steps or pol.steps != sorted(set(pol.steps)) or pol.steps[0] <= 0 or pol.steps[-1] >= 100:
            raise ConfigError(
                f"{p}: steps must increase within (0, 100) (stable keeps traffic until promotion), got {pol.steps}"
            )
        bad = set(pol.max_quality_delta) - set(QUALITY_KEYS)
        if bad:
            raise ConfigError(
                f"{p}: max_quality_delta: unknown keys {sorted(bad)} (known: {list(QUALITY_KEYS)})"
            )
        for k in ("alpha", "confidence"):
            if not 0 < float(getattr(pol, k)) < 1:
                raise ConfigError(f"{p}: {k} must be in (0, 1), got {getattr(pol, k)}")
        if int(pol.failure_threshold) < 1:
            raise ConfigError(f"{p}: failure_threshold must be >= 1, got {pol.failure_threshold}")
        return pol


# -- analysis -------------------------------------------------------------------------------------
@dataclass
class Decision:
    """One analysis of a step and what follows from it.

    Attributes:
        action: ``hold``, ``advance``, ``promote`` or ``rollback`` (``start`` / ``resume`` in records).
        reason: why, naming the checks and their numbers.
        weight: the canary weight (percent) the window was measured at.
        next_weight: the weight after ``advance``.
        verdict: the analysis' overall verdict: ``pass``, ``fail``, ``insufficient`` or ``hard-fail``.
        failures: consecutive failed analyses after this one (0 after a pass).
        checks: each check's :class:`troupe.stats.Verdict` as a dict (rule, status, estimate with n
            and interval, detail).
        canary, stable: every metric the analysis read, with its n and 95 % interval
            (:class:`troupe.stats.Estimate` dicts) and the request counts.
    """

    action: str
    reason: str
    weight: float
    next_weight: float | None = None
    verdict: str = ""
    failures: int = 0
    checks: list[dict[str, Any]] = field(default_factory=list)
    canary: dict[str, Any] = field(default_factory=dict)
    stable: dict[str, Any] = field(default_factory=dict)


def _edict(e: st.Estimate) -> dict[str, Any]:
    """:meth:`troupe.stats.Estimate.to_dict` without ``dataclasses.asdict`` (the simulation test
    calls this a million times)."""
    nan = math.isnan
    d: dict[str, Any] = {
        "value": None if nan(e.value) else e.value,
        "n": e.n,
        "lo": None if nan(e.lo) else e.lo,
        "hi": None if nan(e.hi) else e.hi,
        "confidence": e.confidence,
        "method": e.method,
    }
    if e.k is not None:
        d["k"] = e.k
    return d


def _vdict(v: st.Verdict) -> dict[str, Any]:
    return {"status": v.status, "rule": v.rule, "estimate": _edict(v.estimate), "detail": v.detail}


def _metrics(v: dict[str, Any], conf: float) -> dict[str, Any]:
    """The metrics of one variant as estimates (Wilson for rates, order statistics for p95)."""
    counts = v.get("counts") or {}
    out: dict[str, Any] = {
        "requests": int(v["requests"]),
        "ok": int(v["ok"]),
        "error_rate": _edict(st.wilson(int(v["errors"]), int(v["requests"]), conf)),
    }
    for c in RULE_CHECKS:
        out[f"{c}_rate"] = _edict(st.wilson(int(counts.get(c, 0)), int(v["ok"]), conf))
    out["p95_ms"] = v.get("p95") or st.empty(conf).to_dict()
    return out


def analyse(
    policy: Policy, stats: dict[str, Any], elapsed: float = math.inf
) -> tuple[list[st.Verdict], list[st.Verdict]]:
    """The checks of one window: ``(hard limit verdicts, comparison verdicts)``.

    Args:
        policy: margins, minimum samples, significance.
        stats: the Router's ``/v1/rollout/stats`` JSON (``variants.{stable,canary}`` as built by
            :func:`serving.gateway.variant_summary`: counts, not only rates).
        elapsed: seconds since the window began; comparisons are judged only once the window holds
            the minimum requests of both variants AND lasted ``min_seconds`` (a judgement at every
            poll of a growing window is a test repeated on overlapping data: each extra look adds
            false failures, so the window is judged when it is complete, then every poll only while
            a failure is being confirmed).

    Returns:
        Hard verdicts (``fail`` = roll back now) and the comparisons, each ``pass`` / ``fail`` /
        ``insufficient`` with the estimate it read: a rate difference with Newcombe's interval, the
        canary's error rate with Wilson's, the p95 ratio with bounds from both p95 intervals.
    """
    conf, alpha = policy.confidence, policy.alpha
    c, s = stats["variants"][contract.CANARY], stats["variants"][contract.STABLE]
    nc, ns = int(c["requests"]), int(s["requests"])
    hard: list[st.Verdict] = []
    err = st.wilson(int(c["errors"]), nc, conf)
    rule = f"canary error_rate lo <= {policy.hard_max_error_rate} (hard, n >= {policy.hard_min_requests})"
    if nc >= policy.hard_min_requests and err.lo > policy.hard_max_error_rate:
        hard.append(st.Verdict(st.FAIL, rule, err, f"canary error rate {err}"))
    else:
        hard.append(st.Verdict(st.PASS if nc >= policy.hard_min_requests else st.INSUFFICIENT, rule, err))

    enough = (
        nc >= policy.min_canary_requests
        and ns >= policy.min_stable_requests
        and elapsed >= policy.min_seconds
    )
    short = (
        f"{nc}/{policy.min_canary_requests} canary and {ns}/{policy.min_stable_requests} stable requests, "
        f"{min(elapsed, 1e9):.0f}/{policy.min_seconds:.0f}s"
    )
    out: list[st.Verdict] = []
    if not enough:  # nothing to judge yet: the rules and why, no comparison computed
        rules = [f"canary error_rate lo <= {policy.max_error_rate}", "error_rate canary - stable"]
        rules += [f"{k} canary - stable" for k in policy.max_quality_delta]
        rules.append("p95 latency canary / stable")
        return hard, [st.Verdict(st.INSUFFICIENT, r, st.empty(conf), f"waiting for {short}") for r in rules]

    def verdict(failed: bool, rule: str, est: st.Estimate, detail: str) -> st.Verdict:
        if not enough:
            return st.Verdict(st.INSUFFICIENT, rule, est, f"waiting for {short}")
        return st.Verdict(st.FAIL if failed else st.PASS, rule, est, detail)

    out.append(
        verdict(
            err.n > 0 and err.lo > policy.max_error_rate,
            f"canary error_rate lo <= {policy.max_error_rate}",
            err,
            f"canary error rate {err}",
        )
    )
    pairs = [("error_rate", int(c["errors"]), nc, int(s["errors"]), ns, policy.max_error_rate_delta)]
    cc, sc = c.get("counts") or {}, s.get("counts") or {}
    for chk in RULE_CHECKS:
        key = f"{chk}_rate"
        if key in policy.max_quality_delta:
            pairs.append(
                (key, int(cc.get(chk, 0)), int(c["ok"]), int(sc.get(chk, 0)), int(s["ok"]),
                 float(policy.max_quality_delta[key]))
            )  # fmt: skip
    for key, k1, n1, k2, n2, margin in pairs:
        diff = st.newcombe_difference(k1, n1, k2, n2, conf)
        p = st.worse_by_more_than(k1, n1, k2, n2, margin, alpha)
        out.append(
            verdict(
                p < alpha,
                f"{key} canary - stable <= {margin} (one-sided p >= {alpha})",
                diff,
                f"canary {k1}/{n1} vs stable {k2}/{n2}: difference {diff}, p={p:.4f}",
            )
        )
    cp = st.Estimate.from_dict(c["p95"]) if c.get("p95") else st.empty(conf)
    sp = st.Estimate.from_dict(s["p95"]) if s.get("p95") else st.empty(conf)
    if cp.n and sp.n and sp.value > 0 and sp.lo > 0:
        ratio = st.Estimate(
            cp.value / sp.value, cp.n + sp.n, cp.lo / sp.hi, cp.hi / sp.lo, conf, "order-statistic"
        )
    else:
        ratio = st.empty(conf)
    out.append(
        verdict(
            ratio.n > 0 and ratio.lo > policy.max_p95_ratio,
            f"p95 latency canary / stable lo <= {policy.max_p95_ratio}",
            ratio,
            f"canary p95 {cp} ms vs stable {sp} ms: ratio {ratio}",
        )
    )
    return hard, out


def decide(
    policy: Policy,
    weight: float,
    window_start: float,
    now: float,
    stats: dict[str, Any],
    failures: int = 0,
) -> Decision:
    """Judge one poll of a rollout step (pure function).

    Args:
        policy: limits and step plan.
        weight: current canary weight (percent; one of ``policy.steps``).
        window_start: unix time (s) the step's window began; ``stats`` are counted since then.
        now: current unix time (s).
        stats: ``/v1/rollout/stats`` JSON (``variants.{stable,canary}``, ``rolled_back``).
        failures: consecutive failed analyses before this one (from the rollout record).

    Returns:
        ``rollback`` at once when the Router reports a rollback or a hard limit breaks; after a
        failed analysis ``hold`` until ``failures`` reaches ``policy.failure_threshold``, then
        ``rollback``; ``hold`` while the evidence is insufficient (``rollback`` once the step
        exceeded ``timeout_seconds``) or ``min_seconds`` have not passed; else ``advance`` to the next
        step, or ``promote`` after the last one.
    """
    conf = policy.confidence
    c, s = stats["variants"][contract.CANARY], stats["variants"][contract.STABLE]
    d = Decision("hold", "", weight, failures=failures, canary=_metrics(c, conf), stable=_metrics(s, conf))
    if stats.get("rolled_back"):
        d.action, d.verdict = "rollback", "hard-fail"
        d.reason = f"router reports rolled back: {stats.get('rollback_reason', '')}"
        return d
    elapsed = now - window_start
    hard, checks = analyse(policy, stats, elapsed)
    d.checks = [_vdict(v) for v in hard + checks]
    broken = [v for v in hard if v.status == st.FAIL]
    if broken:
        d.action, d.verdict = "rollback", "hard-fail"
        d.reason = "hard limit: " + "; ".join(f"{v.rule}: {v.detail}" for v in broken)
        return d
    d.verdict = st.combine(checks)
    if d.verdict == st.FAIL:
        d.failures = failures + 1
        failed = "; ".join(f"{v.rule}: {v.detail}" for v in checks if v.status == st.FAIL)
        if d.failures >= policy.failure_threshold:
            d.action = "rollback"
            d.reason = f"{d.failures} consecutive failed analyses at {weight}%: {failed}"
        else:
            d.reason = f"failed analysis {d.failures}/{policy.failure_threshold} at {weight}%: {failed}"
        return d
    if d.verdict == st.INSUFFICIENT:
        if elapsed > policy.timeout_seconds:
            d.action = "rollback"
            d.reason = f"step {weight}% timed out after {elapsed:.0f}s with {d.canary['requests']} canary and {d.stable['requests']} stable requests"
        else:
            d.reason = f"insufficient evidence at {weight}%: {checks[0].detail}"
        return d
    d.failures = 0
    later = [w for w in policy.steps if w > weight]
    n = f"{d.canary['requests']} canary / {d.stable['requests']} stable requests"
    if later:
        d.action, d.next_weight = "advance", later[0]
        d.reason = f"step {weight}% healthy over {n}"
    else:
        d.action, d.reason = "promote", f"last step {weight}% healthy over {n}"
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
        router["user_config"] = contract.merged_user_config(router.get("user_config"), user_config)
    if args is not None:
        new_args = dict(app.get("args") or {})
        for k, v in args.items():
            if v is None:
                new_args.pop(k, None)
            else:
                new_args[k] = v
        app["args"] = new_args
    return {"spec": {"serveConfigV2": yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)}}


def pin(uri: str, tracking_uri: str | None) -> str:
    """A URI that cannot move: ``models:/<name>@<alias>`` -> ``models:/<name>/<n>`` (the version the
    alias names now); ``models:/<name>/<n>`` as is; a local directory (local targets only) resolved
    to its absolute path.

    Raises:
        ConfigError: the alias or version does not exist, or the directory does not exist.
    """
    if uri.startswith("models:/"):
        from troupe.deploy import pinned_version_uri

        return pinned_version_uri(uri, tracking_uri)
    p = Path(uri)
    if not p.is_dir():
        raise ConfigError(f"{uri}: neither models:/<name>/<version> nor an existing model directory")
    return str(p.resolve())


def version_of_uri(uri: str | None) -> str | None:
    """``"7"`` for ``models:/<name>/7``; None for a local directory or None."""
    if uri and uri.startswith("models:/") and "@" not in uri:
        return uri.rsplit("/", 1)[1]
    return None


def _want_args(args: dict[str, Any], stable: str, canary: str | None, weight: float) -> dict[str, Any]:
    out = {**args, contract.STABLE_MODEL_URI: stable, "canary_alias": ""}
    out.pop("model_uri", None)
    if canary:
        out[contract.CANARY_MODEL_URI] = canary
    else:
        out.pop(contract.CANARY_MODEL_URI, None)
    out[contract.CANARY_WEIGHT] = weight if canary else 0.0
    return out


def _same_models(args: dict[str, Any], want: dict[str, Any]) -> bool:
    """Whether two app args name the same models (then only the Router needs changing)."""
    keys = (contract.STABLE_MODEL_URI, contract.CANARY_MODEL_URI, "model_uri", "canary_alias")
    return all((args.get(k) or None) == (want.get(k) or None) for k in keys)


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
        """Router stats since ``since`` (unix seconds), aggregated over all Router replicas."""
        import httpx

        h = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        r = httpx.get(f"{self.base_url}/v1/rollout/stats", params={"since": since}, headers=h, timeout=30)
        r.raise_for_status()
        return r.json()

    def current(self) -> dict[str, Any]:
        """The deployed application config (``deployed_app_config``).

        Raises:
            ConfigError: the environment's app is not deployed (``troupe deploy --env <env>`` first).
        """
        from troupe.deploy import deployed_apps

        app = deployed_apps().get(self.app)
        if app is None:
            raise ConfigError(f"application {self.app!r} is not deployed (troupe deploy --env {self.env})")
        return app

    def converge(
        self, stable: str, canary: str | None, weight: float, rolled_back: bool = False, reason: str = ""
    ) -> bool:
        """Make the app serve ``stable`` and ``canary`` (pinned URIs) at ``weight`` percent; idempotent.

        Only what differs changes: new model URIs redeploy this environment's app alone (other apps
        untouched, :func:`troupe.deploy.apply_apps`); a new weight or rollback flag reconfigures
        the Router in place. Returns True when something changed.
        """
        from troupe.deploy import apply_apps, set_router_config

        app = self.current()
        uc = contract.router_user_config(weight, rolled_back, reason)
        router = next((d for d in app.get("deployments", []) if d.get("name") == contract.ROUTER), {})
        want = _want_args(app.get("args") or {}, stable, canary, weight)
        if not _same_models(app.get("args") or {}, want):
            app = {**app, "args": want}
            app["deployments"] = [d for d in app.get("deployments", []) if d.get("name") != contract.ROUTER]
            app["deployments"].append({**router, "name": contract.ROUTER, "user_config": uc})
            apply_apps([app])
            return True
        if (router.get("user_config") or {}) != uc:
            set_router_config(self.app, uc)
            return True
        return False


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
            s = self.get().get("status") or {}
            apps = (s.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
            app = apps.get(self.app) or {}
            seen = int(s.get("observedGeneration") or 0) >= generation
            if seen and app.get("status") == "RUNNING":
                return app
            if seen and app.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RuntimeError(
                    f"{self.name}/{self.app}: {app.get('status')}: {app.get('message', '')[-2000:]}"
                )
            if time.time() - t0 > timeout_s:
                raise RuntimeError(f"{self.name}/{self.app}: not RUNNING after {timeout_s}s (status {app})")
            time.sleep(poll_s)

    def converge(
        self, stable: str, canary: str | None, weight: float, rolled_back: bool = False, reason: str = ""
    ) -> bool:
        """:meth:`LocalTarget.converge` through the RayService: one patch of this application's
        entry (args only when the models differ, then wait for KubeRay's RUNNING); idempotent."""
        app = self.serve_app()
        uc = contract.router_user_config(weight, rolled_back, reason)
        router = next((d for d in app.get("deployments", []) if d.get("name") == contract.ROUTER), {})
        want = _want_args(app.get("args") or {}, stable, canary, weight)
        if not _same_models(app.get("args") or {}, want):
            args = {k: want.get(k) for k in set(want) | set(app.get("args") or {})}  # None removes
            self.wait_running(self.patch(uc, args))
            return True
        if (router.get("user_config") or {}) != uc:
            self.patch(uc)
            return True
        return False


# -- the rollout record ---------------------------------------------------------------------------
class RolloutConflict(ConfigError):
    """Another rollout holds the environment, or another controller wrote the record since this one
    read it (it was taken over by ``troupe rollout resume``)."""


#: Decisions kept in the record itself (every decision is also a tag on the canary's version).
RECORD_DECISIONS = 20


@dataclass
class RolloutRecord:
    """The one record of an environment's rollout (JSON in the registered-model tag
    ``troupe.rollout.<env>``).

    Attributes:
        env, model_name: environment and registered model.
        stable_uri, canary_uri: pinned model URIs (``models:/<name>/<n>``; a directory locally).
        stable_version, canary_version: their version numbers (None for directories).
        steps: the policy's canary weights (percent); ``step`` indexes it, ``weight`` is the
            weight now (0 after a rollback).
        policy_path: the policy file (``resume`` reads the same one).
        status: ``running``, ``promoting``, ``rolling_back``, ``promoted``, ``rolled_back``, ``aborted``.
        window_start: unix seconds the current step's analysis window began.
        failures: consecutive failed analyses in this window.
        owner: the controller writing the record (host:pid:random); ``revision`` counts writes
            (compare-and-set: a write expects the revision it read).
        started_at, updated_at: unix seconds.
        reason: why the rollout ended (or the last decision's reason).
        n_decisions: decisions so far; ``decisions`` holds the last :data:`RECORD_DECISIONS`
            (action, reason, weight, verdict, failures, ts, canary/stable requests); ``last`` is the
            latest analysis (also a hold).
    """

    env: str
    model_name: str
    stable_uri: str
    canary_uri: str
    stable_version: str | None
    canary_version: str | None
    steps: list[float]
    policy_path: str = ""
    status: str = RUNNING
    step: int = 0
    weight: float = 0.0
    window_start: float = 0.0
    failures: int = 0
    owner: str = ""
    revision: int = 0
    started_at: float = 0.0
    updated_at: float = 0.0
    reason: str = ""
    n_decisions: int = 0
    decisions: list[dict[str, Any]] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str, where: str) -> RolloutRecord:
        """Parse a stored record.

        Raises:
            ConfigError: not JSON or unknown/missing fields (naming ``where``).
        """
        try:
            d = json.loads(text)
            return cls(**d)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: not a rollout record: {e}") from e


def new_owner() -> str:
    """An id for one controller process: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class RolloutStore:
    """The rollout record of one environment in MLflow, with its lock (see the module docstring).

    Args:
        tracking_uri: MLflow tracking URI (None: MLflow's default / ``MLFLOW_TRACKING_URI``).
        model_name: registered model the rollout moves between versions of.
        env: environment.
    """

    def __init__(self, tracking_uri: str | None, model_name: str, env: str) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri or None)
        self.model_name, self.env = model_name, env
        self.key = f"troupe.rollout.{env}"
        self.lock_name = f"{model_name}.rollout-lock.{env}"

    def load(self) -> RolloutRecord | None:
        """The stored record, or None when the environment never had a rollout."""
        text = self.client.get_registered_model(self.model_name).tags.get(self.key)
        return (
            RolloutRecord.from_json(text, f"registered model {self.model_name!r} tag {self.key}")
            if text
            else None
        )

    def _write(self, rec: RolloutRecord) -> None:
        rec.updated_at = time.time()
        self.client.set_registered_model_tag(
            self.model_name, self.key, json.dumps(asdict(rec), ensure_ascii=False)
        )

    def _lock_owner(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.lock_name).tags.get("owner", "")
        except MlflowException:
            return None

    def _create_lock(self, owner: str) -> bool:
        """Create the lock model; False when it exists (the store's unique-name constraint)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                self.lock_name,
                tags={"owner": owner},
                description=f"lock of the running troupe rollout of {self.model_name} in {self.env}",
            )
            return True
        except MlflowException as e:
            if e.error_code == "RESOURCE_ALREADY_EXISTS":
                return False
            raise

    def acquire(self, rec: RolloutRecord) -> RolloutRecord:
        """Take the environment's lock and write ``rec`` as revision 1.

        Raises:
            RolloutConflict: a rollout runs in this environment (its record says who and where it is).
        """
        for _ in range(2):
            if self._create_lock(rec.owner):
                rec.revision = 1
                self._write(rec)
                return rec
            cur, lock_owner = self.load(), self._lock_owner()
            if cur is not None and cur.status in TERMINAL and lock_owner in (cur.owner, None):
                self.release(cur)  # the finished rollout's controller died before releasing
                continue
            break
        raise RolloutConflict(
            f"a rollout of {self.model_name} in {self.env!r} is in progress"
            + (
                f" (canary {cur.canary_uri} at {cur.weight}%, status {cur.status}, owner {cur.owner}); "
                if cur
                else f" (lock {self.lock_name!r} held by {lock_owner}); "
            )
            + f"continue it with `troupe rollout resume --env {self.env}` or end it with `troupe rollout rollback --env {self.env}`"
        )

    def save(self, rec: RolloutRecord, expected_owner: str | None = None) -> RolloutRecord:
        """Compare-and-set: write ``rec`` as the next revision if the stored record still has the
        revision ``rec`` was read with and its owner (``expected_owner``, default ``rec.owner``).

        Raises:
            RolloutConflict: another controller wrote the record since (it took the rollout over).
        """
        owner = rec.owner if expected_owner is None else expected_owner
        cur = self.load()
        if cur is None or cur.owner != owner or cur.revision != rec.revision:
            who = f"{cur.owner} (revision {cur.revision})" if cur else "nobody"
            raise RolloutConflict(
                f"rollout record {self.key} of {self.model_name} was written by {who} since this controller "
                f"({owner}, revision {rec.revision}) read it; this controller stops"
            )
        rec.revision += 1
        self._write(rec)
        return rec

    def take_over(self, owner: str) -> tuple[RolloutRecord, str]:
        """Make ``owner`` the record's writer (``troupe rollout resume``); returns (record, old owner).

        Raises:
            ConfigError: no rollout in progress in this environment.
        """
        cur = self.load()
        if cur is None or cur.status not in ACTIVE:
            raise ConfigError(
                f"no rollout in progress in {self.env!r} (record {self.key} of {self.model_name}: "
                f"{cur.status if cur else 'none'}); start one with `troupe rollout start --env {self.env}`"
            )
        previous = cur.owner
        if not self._create_lock(owner):
            self.client.set_registered_model_tag(self.lock_name, "owner", owner)
        cur.owner = owner
        return self.save(cur, expected_owner=previous), previous

    def release(self, rec: RolloutRecord) -> None:
        """Delete the lock if ``rec``'s controller holds it (missing lock: nothing to do)."""
        from mlflow.exceptions import MlflowException

        if self._lock_owner() in (rec.owner, ""):
            try:
                self.client.delete_registered_model(self.lock_name)
            except MlflowException:
                pass


class Registry:
    """MLflow side of a rollout: aliases and the decision tags on the canary's model version.

    Args:
        tracking_uri: MLflow tracking URI (None: MLflow's default / ``MLFLOW_TRACKING_URI``).
        model_name: registered model name.
    """

    def __init__(self, tracking_uri: str | None, model_name: str) -> None:
        import mlflow

        self.tracking_uri = tracking_uri
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri or None)
        self.model_name = model_name

    def version_of(self, alias: str) -> str | None:
        """Version number behind ``alias``, or None when the alias is not set."""
        try:
            return str(self.client.get_model_version_by_alias(self.model_name, alias).version)
        except Exception:
            return None

    def tag(self, version: str | None, env: str, n: int, decision: dict[str, Any]) -> None:
        """Record decision number ``n`` as tags on the canary's version (no-op without a version):
        ``rollout.<env>.event.<n>`` (the full decision: checks with estimates, n and intervals),
        ``rollout.status``, ``rollout.reason``, ``rollout.weight``."""
        if not version:
            return
        full = json.dumps(decision, ensure_ascii=False, default=str)
        if len(full) > 5000:  # the registry's tag columns hold 5,000 characters on some backends
            slim = {k: v for k, v in decision.items() if k not in ("canary", "stable")}
            full = json.dumps(slim, ensure_ascii=False, default=str)[:5000]
        tags = {
            f"rollout.{env}.event.{n:03d}": full,
            "rollout.status": str(decision.get("action")),
            "rollout.reason": str(decision.get("reason", ""))[:4000],
            "rollout.weight": str(decision.get("weight")),
        }
        for k, v in tags.items():
            self.client.set_model_version_tag(self.model_name, version, k, v)

    def promote(self, version: str, alias: str = CHAMPION) -> None:
        """Point ``alias`` at ``version`` (``set_registered_model_alias``; idempotent)."""
        self.client.set_registered_model_alias(self.model_name, alias, version)


# -- controller -----------------------------------------------------------------------------------
def _compact(d: Decision, now: float) -> dict[str, Any]:
    return {
        "ts": now,
        "action": d.action,
        "verdict": d.verdict,
        "weight": d.weight,
        "next_weight": d.next_weight,
        "failures": d.failures,
        "reason": d.reason[:600],
        "canary_requests": d.canary.get("requests"),
        "stable_requests": d.stable.get("requests"),
    }


class Controller:
    """Runs one rollout from its record: judge each poll, advance, promote or roll back.

    Build one with :meth:`begin` (a new rollout: takes the environment's lock) or :meth:`resume`
    (takes over a running rollout after its controller died). Every transition is written to the
    record *before* it is applied to the target, and every tick first re-applies the record to the
    target (:meth:`LocalTarget.converge`), so a controller killed between the two leaves nothing
    that ``resume`` cannot finish; ticks are idempotent.

    Args:
        target: :class:`LocalTarget` or :class:`KubeTarget` (``stats``, ``converge``).
        policy: the rollout policy.
        store: the environment's :class:`RolloutStore`.
        record: the record this controller owns.
        registry: aliases and decision tags (None: no tags, no alias move).
    """

    def __init__(
        self,
        target,
        policy: Policy,
        store: RolloutStore,
        record: RolloutRecord,
        registry: Registry | None = None,
    ) -> None:
        self.target, self.policy, self.store, self.record, self.registry = (
            target,
            policy,
            store,
            record,
            registry,
        )
        self.last: Decision | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def begin(
        cls,
        target,
        policy: Policy,
        store: RolloutStore,
        stable_uri: str,
        canary_uri: str,
        registry: Registry | None = None,
        policy_path: str = "",
        owner: str | None = None,
    ) -> Controller:
        """Start a rollout: lock the environment, deploy the canary at the first step, record it.

        Args:
            stable_uri, canary_uri: pinned URIs (:func:`pin`).

        Raises:
            RolloutConflict: a rollout runs in this environment.
            ConfigError: canary and stable are the same model.
        """
        if stable_uri == canary_uri:
            raise ConfigError(f"canary {canary_uri} is the stable model already; nothing to roll out")
        now = time.time()
        rec = RolloutRecord(
            env=store.env,
            model_name=store.model_name,
            stable_uri=stable_uri,
            canary_uri=canary_uri,
            stable_version=version_of_uri(stable_uri),
            canary_version=version_of_uri(canary_uri),
            steps=list(policy.steps),
            policy_path=policy_path,
            weight=policy.steps[0],
            owner=owner or new_owner(),
            started_at=now,
        )
        rec = store.acquire(rec)
        ctl = cls(target, policy, store, rec, registry)
        try:
            target.converge(stable_uri, canary_uri, rec.weight)
        except Exception as e:
            rec.status, rec.reason = ABORTED, f"canary deploy failed: {e}"[:2000]
            store.save(rec)
            store.release(rec)
            raise
        rec.window_start = time.time()
        ctl._record(
            Decision("start", f"canary {canary_uri} next to stable {stable_uri} at {rec.weight}%", rec.weight)
        )
        return ctl

    @classmethod
    def resume(
        cls,
        target,
        policy: Policy,
        store: RolloutStore,
        registry: Registry | None = None,
        owner: str | None = None,
    ) -> Controller:
        """Take over the environment's running rollout where its record stands (step, window,
        failures kept; nothing reset). A controller still running elsewhere stops at its next write.

        Raises:
            ConfigError: no rollout in progress.
        """
        rec, previous = store.take_over(owner or new_owner())
        ctl = cls(target, policy, store, rec, registry)
        ctl._record(
            Decision("resume", f"taken over from {previous} at {rec.weight}% ({rec.status})", rec.weight)
        )
        return ctl

    # -- records -----------------------------------------------------------------------------
    def _record(self, d: Decision) -> None:
        """Append the decision to the record (compare-and-set) and tag the canary's version."""
        rec, now = self.record, time.time()
        rec.n_decisions += 1
        rec.decisions = [*rec.decisions, _compact(d, now)][-RECORD_DECISIONS:]
        rec.last = rec.decisions[-1]
        rec.reason = d.reason[:2000]
        self.store.save(rec)
        if self.registry:
            self.registry.tag(rec.canary_version, rec.env, rec.n_decisions, {"ts": now, **asdict(d)})

    # -- one poll ----------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> Decision:
        """Finish an interrupted promotion / rollback, or analyse the window once and act.

        Returns:
            The decision (``hold``, ``advance``, ``promote``, ``rollback``; for a finished rollout a
            decision named after its status).
        """
        rec = self.record
        if rec.status == PROMOTING:
            return self._finish_promotion()
        if rec.status == ROLLING_BACK:
            return self._finish_rollback()
        if rec.status in TERMINAL:
            return Decision(rec.status, rec.reason, rec.weight)
        self.target.converge(rec.stable_uri, rec.canary_uri, rec.weight)  # repairs a half-applied step
        now = time.time() if now is None else now
        d = decide(
            self.policy, rec.weight, rec.window_start, now, self.target.stats(rec.window_start), rec.failures
        )
        self.last = d
        rec.failures = d.failures
        if d.action == "hold":
            rec.last = _compact(d, now)
            self.store.save(rec)
        elif d.action == "advance":
            rec.step, rec.weight, rec.window_start, rec.failures = rec.step + 1, float(d.next_weight), now, 0
            self._record(d)
            self.target.converge(rec.stable_uri, rec.canary_uri, rec.weight)
        elif d.action == "rollback":
            rec.status = ROLLING_BACK
            self._record(d)
            self._finish_rollback()
        elif d.action == "promote":
            rec.status = PROMOTING
            self._record(d)
            self._finish_promotion()
        return d

    def _finish_rollback(self) -> Decision:
        rec = self.record
        self.target.converge(rec.stable_uri, rec.canary_uri, 0.0, rolled_back=True, reason=rec.reason)
        rec.status, rec.weight = ROLLED_BACK, 0.0
        self.store.save(rec)
        self.store.release(rec)
        return Decision("rollback", rec.reason, 0.0)

    def _finish_promotion(self) -> Decision:
        rec = self.record
        if self.registry and rec.canary_version:
            self.registry.promote(rec.canary_version, CHAMPION)
        self.target.converge(rec.canary_uri, None, 0.0)  # the canary's pinned version serves as stable
        rec.status, rec.weight = PROMOTED, 100.0
        self.store.save(rec)
        self.store.release(rec)
        return Decision("promote", rec.reason, 100.0)

    def rollback_now(self, reason: str) -> Decision:
        """Manual rollback: recorded, then applied (weight 0, pinned conversations back to stable)."""
        self.record.status = ROLLING_BACK
        self._record(Decision("rollback", reason, self.record.weight, verdict="manual"))
        return self._finish_rollback()

    def promote_now(self, reason: str) -> Decision:
        """Manual promotion: recorded, then applied (alias ``champion``, canary serves as stable)."""
        self.record.status = PROMOTING
        self._record(Decision("promote", reason, self.record.weight, verdict="manual"))
        return self._finish_promotion()

    def run(self, sleep=time.sleep, max_ticks: int | None = None, max_errors: int = 30) -> Decision:
        """Tick every ``policy.poll_seconds`` until promoted or rolled back (or ``max_ticks``).

        A poll that fails (stats endpoint unreachable while the app redeploys, MLflow briefly down)
        is retried at the next poll; ``max_errors`` consecutive failures, a :class:`RolloutConflict`
        (taken over) or a :class:`~troupe.config.ConfigError` end the loop with the exception; the
        record stays as it was, for ``troupe rollout resume``.
        """
        n = errors = 0
        while True:
            try:
                d = self.tick()
                errors = 0
            except ConfigError:
                raise
            except Exception as e:
                errors += 1
                if errors >= max_errors:
                    raise
                click.echo(f"[rollout] poll failed ({errors}/{max_errors}): {e!r}", err=True)
                sleep(self.policy.poll_seconds)
                continue
            n += 1
            if self.record.status in TERMINAL or (max_ticks and n >= max_ticks):
                return d
            sleep(self.policy.poll_seconds)


# -- CLI ------------------------------------------------------------------------------------------
def _context(params: dict[str, Any], env: str, policy_path: str | None):
    """(policy path, target, registry, store) of ``env`` from params.yaml."""
    s = section(params, "serve")
    reg = params.get("registry", {})
    from troupe.deploy import app_config
    from troupe.tracking import tracking_uri

    prefix = app_config(env, params)["route_prefix"]
    base = f"http://{s.get('host', '127.0.0.1')}:{int(s.get('port', 8000))}{prefix}"
    target = LocalTarget(env, base, os.environ.get("TROUPE_API_KEY"))
    tracking = reg.get("tracking_uri") or tracking_uri()
    name = reg.get("model_name", "troupe-roleplay")
    path = policy_path or reg.get("rollout_policy", "configs/rollout_policy.yaml")
    return path, target, Registry(tracking, name), RolloutStore(tracking, name, env)


@click.group("rollout")
def rollout_cli() -> None:
    """Canary rollout of a registered version in an environment (default production)."""


@rollout_cli.command("start")
@click.option("--env", default="production", show_default=True)
@click.option(
    "--canary-uri",
    default=None,
    help="models:/<name>/<version> or models:/<name>@<alias> (default: the challenger)",
)
@click.option("--policy", "policy_path", default=None, help="default registry.rollout_policy")
@click.option("--wait/--no-wait", default=True, help="run the controller until promoted or rolled back")
@step_options
def start_cmd(params: dict, env: str, canary_uri: str | None, policy_path: str | None, wait: bool) -> None:
    """Deploy the canary (pinned by version) next to stable at the first step and run the controller.

    Refused while another rollout runs in ``env``; the record is in MLflow (``troupe rollout status``).
    """
    from troupe.deploy import app_config, apply_apps, connect

    path, target, registry, store = _context(params, env, policy_path)
    policy = Policy.load(path)
    name = registry.model_name
    tracking = registry.tracking_uri
    canary = pin(canary_uri or f"models:/{name}@challenger", tracking)
    connect()
    try:
        args = target.current()["args"]
        stable = pin(
            args.get(contract.STABLE_MODEL_URI) or args.get("model_uri") or f"models:/{name}@{CHAMPION}",
            tracking,
        )
    except ConfigError:  # not deployed yet: deploy the champion, pinned, alone
        stable = pin(f"models:/{name}@{CHAMPION}", tracking)
        apply_apps([app_config(env, params, model_uri=stable)])
    ctl = Controller.begin(target, policy, store, stable, canary, registry, str(path))
    click.echo(f"[rollout] {env}: canary {canary} next to stable {stable} at {ctl.record.weight}%")
    if wait:
        d = ctl.run()
        click.echo(f"[rollout] {ctl.record.status}: {d.reason}")


@rollout_cli.command("resume")
@click.option("--env", default="production", show_default=True)
@click.option("--policy", "policy_path", default=None, help="default: the policy the rollout started with")
@click.option("--wait/--no-wait", default=True, help="run the controller until promoted or rolled back")
@step_options
def resume_cmd(params: dict, env: str, policy_path: str | None, wait: bool) -> None:
    """Continue the environment's rollout after its controller died, from the recorded step."""
    from troupe.deploy import connect

    ctl = _resume(params, env, policy_path)
    click.echo(
        f"[rollout] {env}: resumed at {ctl.record.weight}% (step {ctl.record.step + 1}, {ctl.record.status})"
    )
    connect()
    if wait:
        d = ctl.run()
        click.echo(f"[rollout] {ctl.record.status}: {d.reason}")


def _resume(params: dict, env: str, policy_path: str | None) -> Controller:
    path, target, registry, store = _context(params, env, policy_path)
    cur = store.load()
    policy = Policy.load(policy_path or (cur.policy_path if cur and cur.policy_path else path))
    return Controller.resume(target, policy, store, registry)


@rollout_cli.command("status")
@click.option("--env", default="production", show_default=True)
@step_options
def status_cmd(params: dict, env: str) -> None:
    """Print the environment's rollout record and the Router's stats for the current window."""
    _, target, _, store = _context(params, env, None)
    rec = store.load()
    click.echo(json.dumps(asdict(rec) if rec else {"status": "none"}, indent=2, ensure_ascii=False))
    try:
        click.echo(json.dumps(target.stats(rec.window_start if rec else 0.0), indent=2))
    except Exception as e:
        click.echo(f"(stats unavailable: {e})", err=True)


@rollout_cli.command("promote")
@click.option("--env", default="production", show_default=True)
@step_options
def promote_cmd(params: dict, env: str) -> None:
    """Promote the running canary now (champion alias -> canary version, canary serves as stable)."""
    from troupe.deploy import connect

    connect()
    _resume(params, env, None).promote_now("manual promote")
    click.echo("[rollout] promoted")


@rollout_cli.command("rollback")
@click.option("--env", default="production", show_default=True)
@click.option("--reason", default="manual rollback", show_default=True)
@step_options
def rollback_cmd(params: dict, env: str, reason: str) -> None:
    """Roll the running canary back now (weight 0, conversations back to stable)."""
    from troupe.deploy import connect

    connect()
    _resume(params, env, None).rollback_now(reason)
    click.echo(f"[rollout] rolled back: {reason}")
