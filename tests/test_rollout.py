"""Rollout units: the analysis rules (:func:`troupe.rollout.decide`), the policy file's checks, the
RayService patch, and the rollout record's lock and compare-and-set against a real MLflow store
(SQLite). The live rollouts run in tests/test_canary_drill.py, the shipped policy under noise in
tests/test_canary_sim.py."""

from __future__ import annotations

import pytest
import yaml

from serving.gateway import variant_summary
from troupe.config import ConfigError
from troupe.rollout import (
    ACTIVE,
    Policy,
    RolloutConflict,
    RolloutRecord,
    RolloutStore,
    decide,
    pin,
    rayservice_patch,
    version_of_uri,
)

POLICY = Policy(
    steps=[50.0],
    min_canary_requests=100,
    min_stable_requests=100,
    min_seconds=60,
    failure_threshold=2,
    hard_min_requests=20,
    poll_seconds=1,
    timeout_seconds=600,
)


def _v(n: int, errors: int = 0, markup: int = 0, ms: float = 100.0) -> dict:
    ok = n - errors
    return variant_summary(n, errors, {"markup_invalid": markup}, [ms] * ok)


def _stats(canary: dict, stable: dict | None = None, **extra) -> dict:
    return {"variants": {"canary": canary, "stable": stable or _v(400, 4, 40)}, **extra}


def test_decide_waits_for_evidence_and_time():
    d = decide(POLICY, 50.0, 0, 30, _stats(_v(400, 4, 40)))  # enough requests, window too short
    assert d.action == "hold" and d.verdict == "insufficient" and "30/60s" in d.reason
    d = decide(POLICY, 50.0, 0, 61, _stats(_v(50, 1, 5)))  # window long enough, too few canary requests
    assert d.action == "hold" and d.verdict == "insufficient" and "50/100 canary" in d.reason
    d = decide(POLICY, 50.0, 0, 601, _stats(_v(50, 1, 5)))
    assert d.action == "rollback" and "timed out" in d.reason
    d = decide(POLICY, 50.0, 0, 61, _stats(_v(400, 4, 40)))  # same rates as stable
    assert d.action == "promote" and d.verdict == "pass" and d.failures == 0
    assert d.canary["error_rate"] == {**d.canary["error_rate"], "n": 400, "k": 4, "method": "wilson"}
    assert all(c["status"] == "pass" for c in d.checks)


def test_decide_counts_consecutive_failures_before_rolling_back():
    worse = _stats(_v(400, 4, 100))  # 25 % invalid markup vs stable's 10 %
    d = decide(POLICY, 50.0, 0, 61, worse)
    assert d.action == "hold" and d.verdict == "fail" and d.failures == 1 and "1/2" in d.reason
    (chk,) = [c for c in d.checks if c["status"] == "fail"]
    assert chk["rule"].startswith("markup_invalid_rate") and chk["estimate"]["method"] == "newcombe"
    assert chk["estimate"]["lo"] > 0.05 and chk["estimate"]["n"] == 792  # ok replies of both
    d = decide(POLICY, 50.0, 0, 62, worse, failures=1)
    assert d.action == "rollback" and "2 consecutive failed analyses" in d.reason
    assert "markup_invalid_rate" in d.reason
    d = decide(POLICY, 50.0, 0, 62, _stats(_v(400, 4, 40)), failures=1)  # a pass resets the count
    assert d.action == "promote" and d.failures == 0


def test_decide_hard_limit_and_router_rollback_act_at_once():
    d = decide(POLICY, 50.0, 0, 1, _stats(_v(30, 20)))  # 20/30 failed: Wilson lo ~0.49 > 0.2
    assert d.action == "rollback" and d.verdict == "hard-fail" and d.reason.startswith("hard limit")
    d = decide(POLICY, 50.0, 0, 1, _stats(_v(1, 1)))  # one failed request is not evidence
    assert d.action == "hold" and d.verdict == "insufficient"
    d = decide(POLICY, 50.0, 0, 1, _stats(_v(5), rolled_back=True, rollback_reason="manual"))
    assert d.action == "rollback" and "manual" in d.reason


def test_decide_judges_p95_on_its_interval():
    slow = _stats(_v(400, 4, 40, ms=400.0))  # 4x stable's p95 (all latencies equal: a tight interval)
    d = decide(POLICY, 50.0, 0, 61, slow)
    assert d.verdict == "fail" and "p95 latency" in d.reason
    d = decide(POLICY, 50.0, 0, 61, _stats(_v(400, 4, 40, ms=120.0)))  # 1.2x: within the 1.5x tolerance
    assert d.action == "promote"


def test_policy_file_errors_name_the_field(tmp_path):
    shipped = Policy.load("configs/rollout_policy.yaml")
    assert shipped.steps[-1] < 100 and shipped.failure_threshold >= 2
    for body, match in [
        ({"steps": [5, 50, 100]}, "steps must increase within"),
        ({"steps": [25, 5]}, "steps must increase within"),
        ({"max_quality_delta": {"markup_invalid": 0.1}}, "max_quality_delta: unknown keys"),
        ({"alpha": 5}, "alpha must be in"),
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"min_requests": 5}, "unknown keys"),
    ]:
        p = tmp_path / "policy.yaml"
        p.write_text(yaml.safe_dump(body))
        with pytest.raises(ConfigError, match=match) as e:
            Policy.load(p)
        assert str(p) in str(e.value)


def test_rayservice_patch_only_touches_router_user_config():
    cfg = {
        "applications": [
            {
                "name": "troupe-production",
                "import_path": "serving.app:build_app",
                "args": {"env": "production"},
                "deployments": [
                    {"name": "stable", "num_replicas": 2},
                    {"name": "Router", "user_config": {"canary_weight_percent": 5}},
                ],
            },
            {"name": "troupe-test", "import_path": "serving.app:build_app", "args": {"env": "test"}},
        ]
    }
    patch = rayservice_patch(yaml.safe_dump(cfg), "troupe-production", {"canary_weight_percent": 25.0})
    new = yaml.safe_load(patch["spec"]["serveConfigV2"])
    assert set(patch) == {"spec"} and set(patch["spec"]) == {"serveConfigV2"}
    prod = new["applications"][0]
    assert prod["deployments"][1] == {"name": "Router", "user_config": {"canary_weight_percent": 25.0}}
    assert prod["deployments"][0] == {"name": "stable", "num_replicas": 2}
    assert new["applications"][1] == cfg["applications"][1] and prod["args"] == {"env": "production"}
    # a weight change keeps the catalogue the Router was reloaded with (troupe deploy --reload-characters)
    router = cfg["applications"][0]["deployments"][1]
    router["user_config"] = {
        "canary_weight_percent": 5,
        "catalogue_uri": "s3://b/c.jsonl",
        "catalogue_version": "v9",
    }
    patch = rayservice_patch(yaml.safe_dump(cfg), "troupe-production", {"canary_weight_percent": 50.0})
    kept = yaml.safe_load(patch["spec"]["serveConfigV2"])["applications"][0]["deployments"][1]["user_config"]
    assert kept == {
        "canary_weight_percent": 50.0,
        "catalogue_uri": "s3://b/c.jsonl",
        "catalogue_version": "v9",
    }
    with pytest.raises(KeyError):
        rayservice_patch(yaml.safe_dump(cfg), "nope", {"canary_weight_percent": 1})
    with pytest.raises(ValueError, match="canary_weight_percent"):  # a unit-less key is refused
        rayservice_patch(yaml.safe_dump(cfg), "troupe-production", {"canary_weight": 0.05})
    with pytest.raises(ValueError, match="0-100"):
        rayservice_patch(yaml.safe_dump(cfg), "troupe-production", {"canary_weight_percent": 500})


def test_rayservice_patch_pins_a_model_version_in_args():
    cfg = {
        "applications": [
            {
                "name": "troupe-test",
                "args": {"env": "test", "stable_alias": "challenger", "canary_model_uri": "models:/m/1"},
                "deployments": [{"name": "Router", "user_config": {"canary_weight_percent": 0.0}}],
            }
        ]
    }
    patch = rayservice_patch(
        yaml.safe_dump(cfg), "troupe-test", args={"stable_model_uri": "models:/m/7", "canary_model_uri": None}
    )
    (app,) = yaml.safe_load(patch["spec"]["serveConfigV2"])["applications"]
    assert app["args"] == {"env": "test", "stable_alias": "challenger", "stable_model_uri": "models:/m/7"}
    assert app["deployments"] == cfg["applications"][0]["deployments"]  # Router untouched


def test_pin_never_keeps_a_moving_alias(store):
    client = store.client
    client.set_registered_model_alias("troupe-roleplay", "challenger", "2")
    tracking = store.tracking
    assert pin("models:/troupe-roleplay@challenger", tracking) == "models:/troupe-roleplay/2"
    assert pin("models:/troupe-roleplay/1", tracking) == "models:/troupe-roleplay/1"
    assert version_of_uri("models:/troupe-roleplay/2") == "2" and version_of_uri("/some/dir") is None
    with pytest.raises(ConfigError, match="nope"):
        pin("models:/troupe-roleplay@nope", tracking)


@pytest.fixture()
def store(tmp_path):
    import mlflow

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=tracking)
    client.create_registered_model("troupe-roleplay")
    for _ in range(2):
        client.create_model_version("troupe-roleplay", source=str(tmp_path))
    s = RolloutStore(tracking, "troupe-roleplay", "production")
    s.tracking = tracking
    return s


def _record(owner: str) -> RolloutRecord:
    return RolloutRecord(
        env="production",
        model_name="troupe-roleplay",
        stable_uri="models:/troupe-roleplay/1",
        canary_uri="models:/troupe-roleplay/2",
        stable_version="1",
        canary_version="2",
        steps=[5.0, 25.0, 50.0],
        weight=5.0,
        owner=owner,
    )


def test_one_rollout_per_environment_with_compare_and_set(store):
    a = store.acquire(_record("controller-a"))
    assert a.revision == 1 and store.load().owner == "controller-a"
    with pytest.raises(RolloutConflict, match="in progress.*troupe rollout resume"):
        store.acquire(_record("controller-b"))
    other_env = RolloutStore(store.tracking, "troupe-roleplay", "test")  # another environment: its own lock
    assert other_env.acquire(_record("controller-t")).revision == 1

    a.step, a.weight = 1, 25.0
    store.save(a)
    assert store.load().revision == 2 and store.load().weight == 25.0
    stale = store.load()
    stale.revision = 1
    with pytest.raises(RolloutConflict, match="written by"):
        store.save(stale)  # a write based on an old read is refused

    taken, previous = store.take_over("controller-c")  # resume after controller-a died
    assert previous == "controller-a" and taken.owner == "controller-c"
    assert taken.step == 1 and taken.weight == 25.0 and taken.status in ACTIVE  # nothing reset
    with pytest.raises(RolloutConflict):
        store.save(a)  # controller-a, were it still alive, stops at its next write

    taken.status = "promoted"
    store.save(taken)
    store.release(taken)
    assert store.acquire(_record("controller-d")).revision == 1  # the environment is free again


def test_a_lock_left_by_a_finished_rollout_is_cleared(store):
    rec = store.acquire(_record("controller-a"))
    rec.status = "rolled_back"
    store.save(rec)  # the controller died before releasing the lock
    assert store.acquire(_record("controller-b")).owner == "controller-b"
    with pytest.raises(ConfigError, match="no rollout in progress"):
        RolloutStore(store.tracking, "troupe-roleplay", "test").take_over("x")


class FakeRayServiceApi:
    """Stand-in for the Kubernetes API server (no API server runs here): the two
    ``CustomObjectsApi`` calls :class:`troupe.rollout.KubeTarget` makes, on one RayService object
    whose status reports every generation reconciled and RUNNING (KubeRay's part is the cluster
    box's, tests/test_cluster_serving.py)."""

    def __init__(self, serve_config: dict) -> None:
        self.obj = {
            "metadata": {"name": "troupe-serving", "namespace": "troupe-prod", "generation": 1},
            "spec": {"serveConfigV2": yaml.safe_dump(serve_config)},
        }
        self.patches: list[dict] = []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name) -> dict:
        gen = self.obj["metadata"]["generation"]
        apps = {"troupe-production": {"status": "RUNNING"}}
        return {
            **self.obj,
            "status": {"observedGeneration": gen, "activeServiceStatus": {"applicationStatuses": apps}},
        }

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body) -> dict:
        self.patches.append(body)
        self.obj["spec"]["serveConfigV2"] = body["spec"]["serveConfigV2"]
        self.obj["metadata"]["generation"] += 1
        return self.obj


def test_kube_target_converge_is_idempotent_and_pins():
    from troupe.rollout import KubeTarget

    cfg = {
        "applications": [
            {
                "name": "troupe-production",
                "args": {"env": "production", "stable_alias": "champion", "stable_model_uri": "models:/m/1"},
                "deployments": [
                    {"name": "Router", "num_replicas": 2, "user_config": {"canary_weight_percent": 0}}
                ],
            },
            {"name": "troupe-test", "args": {"env": "test"}},
        ]
    }
    api = FakeRayServiceApi(cfg)
    t = KubeTarget("troupe-serving", "troupe-prod", "troupe-production", "http://unused", api=api)
    assert t.converge("models:/m/1", "models:/m/2", 5.0) is True  # canary added: args + Router
    app = t.serve_app()
    assert (
        app["args"]["canary_model_uri"] == "models:/m/2" and app["args"]["stable_model_uri"] == "models:/m/1"
    )
    assert app["deployments"] == [
        {"name": "Router", "num_replicas": 2, "user_config": {"canary_weight_percent": 5.0}}
    ]
    assert t.converge("models:/m/1", "models:/m/2", 5.0) is False and len(api.patches) == 1  # idempotent
    assert t.converge("models:/m/1", "models:/m/2", 25.0) is True  # a weight: Router only
    assert t.serve_app()["args"] == app["args"] and len(api.patches) == 2
    t.converge("models:/m/2", None, 0.0)  # promotion: the canary's version is stable, pinned
    app = t.serve_app()
    assert app["args"]["stable_model_uri"] == "models:/m/2" and "canary_model_uri" not in app["args"]
    others = yaml.safe_load(api.obj["spec"]["serveConfigV2"])["applications"][1]
    assert others == cfg["applications"][1]  # the other environment's app untouched


def test_deploy_refuses_an_environment_in_rollout(store):
    """``troupe deploy`` would replace the app under the controller (dropping the canary): refused
    while the environment's record says a rollout runs, before any cluster is touched."""
    from troupe.deploy import deploy_local

    store.client.set_registered_model_alias("troupe-roleplay", "champion", "1")
    store.acquire(_record("controller-a"))
    params = {"registry": {"model_name": "troupe-roleplay", "tracking_uri": store.tracking}}
    with pytest.raises(ConfigError, match="a rollout runs in 'production'.*troupe rollout resume"):
        deploy_local("production", params, None, "auto", {})
