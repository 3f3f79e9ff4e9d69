"""Rollout controller against a live Serve app: a faulty canary rolls back, a healthy one is promoted."""

from __future__ import annotations

import httpx
import pytest
import yaml

from tests.conftest import free_port
from tests.serve_fixtures import characters_file, make_app, start_cluster, stop_cluster, tiny_model
from troupe.rollout import Controller, EventLog, LocalTarget, Policy, Registry, decide, rayservice_patch

NAME = "troupe-roleplay"
POLICY = Policy(steps=[50.0, 100.0], min_requests=5, min_seconds=0, max_p95_ratio=5.0, poll_seconds=0)
FAULTY = "作为一个AI，我无法回答<emotion>bogus</emotion>"


def _stats(c_over=None):
    base = {
        "requests": 20,
        "ok": 20,
        "errors": 0,
        "error_rate": 0.0,
        "p50_ms": 10.0,
        "p95_ms": 20.0,
        "markup_invalid_rate": 0.0,
        "language_mismatch_rate": 0.0,
        "assistant_phrase_rate": 0.0,
    }
    return {"variants": {"stable": dict(base), "canary": {**base, **(c_over or {})}}}


def test_decide_rules():
    assert decide(POLICY, 50.0, 0, 1, _stats()).action == "advance"
    assert decide(POLICY, 100.0, 0, 1, _stats()).action == "promote"
    assert decide(POLICY, 50.0, 0, 1, _stats({"requests": 2, "ok": 2})).action == "hold"
    d = decide(POLICY, 50.0, 0, 1, _stats({"errors": 5, "ok": 15, "error_rate": 0.25}))
    assert d.action == "rollback" and "error rate" in d.reason
    d = decide(POLICY, 50.0, 0, 1, _stats({"p95_ms": 200.0}))
    assert d.action == "rollback" and "p95" in d.reason
    d = decide(POLICY, 50.0, 0, 1, _stats({"language_mismatch_rate": 0.5}))
    assert d.action == "rollback" and "language_mismatch_rate" in d.reason


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


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import mlflow

    d = tmp_path_factory.mktemp("rollout")
    model = tiny_model()
    canary = d / "canary-model"
    canary.symlink_to(model, target_is_directory=True)
    tracking = f"sqlite:///{d}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=tracking)
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=str(model))
    client.set_registered_model_alias(NAME, "champion", "1")
    port = free_port()
    start_cluster(port)
    try:
        yield {
            "dir": d,
            "model": model,
            "canary": canary,
            "tracking": tracking,
            "port": port,
            "chars": characters_file(d),
            "client": client,
        }
    finally:
        stop_cluster()


def _deploy(w, fault):
    from troupe.deploy import apply_apps

    app = make_app(
        "production", w["chars"], w["model"], "/production", w["canary"], 0.0, canary_model={"fault": fault}
    )
    apply_apps([app], "127.0.0.1", w["port"], timeout_s=240)
    return f"http://127.0.0.1:{w['port']}/production"


def _traffic(base, n=30):
    with httpx.Client(timeout=60) as c:
        for i in range(n):
            body = {
                "character_id": "bob",
                "conversation_id": f"t{i}",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "hello there"}],
            }
            assert c.post(f"{base}/v1/roleplay", json=body).status_code == 200


def _controller(w, base, version, name):
    reg = Registry(w["tracking"], NAME)
    w["client"].set_registered_model_alias(NAME, "challenger", version)
    log = EventLog(w["dir"] / f"{name}.jsonl")
    ctl = Controller(
        LocalTarget("production", base),
        POLICY,
        log,
        reg,
        reg.version_of("challenger"),
        str(w["canary"]),
        w["dir"] / f"{name}.json",
    )
    return ctl, log


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_faulty_canary_is_rolled_back_with_reason(world):
    base = _deploy(world, {"reply": FAULTY})
    ctl, log = _controller(world, base, "2", "faulty")
    ctl.start()
    _traffic(base)
    d = ctl.tick()
    assert d.action == "rollback"
    assert "markup_invalid_rate" in d.reason and "assistant_phrase_rate" in d.reason
    stats = httpx.get(f"{base}/v1/rollout/stats").json()
    assert (
        stats["rolled_back"] and stats["canary_weight_percent"] == 0.0 and stats["pinned_conversations"] == 0
    )
    _traffic(base, 5)
    assert (
        httpx.get(f"{base}/v1/rollout/stats", params={"since": stats["now"]}).json()["variants"]["canary"][
            "requests"
        ]
        == 0
    )
    events = log.read()
    assert [e["action"] for e in events] == ["start", "rollback"] and events[-1]["reason"] == d.reason
    mv = world["client"].get_model_version(NAME, "2")
    assert mv.tags["rollout.status"] == "rollback" and "markup_invalid_rate" in mv.tags["rollout.reason"]
    assert Registry(world["tracking"], NAME).version_of("champion") == "1"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_healthy_canary_is_promoted_and_alias_moves(world):
    base = _deploy(world, {})
    ctl, log = _controller(world, base, "3", "healthy")
    ctl.start()
    _traffic(base)
    assert ctl.tick().action == "advance" and ctl.weight == 100.0
    _traffic(base)
    d = ctl.tick()
    assert d.action == "promote", d.reason
    assert Registry(world["tracking"], NAME).version_of("champion") == "3"
    assert [e["action"] for e in log.read()] == ["start", "advance", "promote"]
    assert world["client"].get_model_version(NAME, "3").tags["rollout.status"] == "promote"
    stats = httpx.get(f"{base}/v1/rollout/stats").json()
    assert stats["canary_available"] is False  # the canary now serves as stable
    r = httpx.post(
        f"{base}/v1/roleplay",
        json={"character_id": "bob", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert r.json()["model_version"] == "canary-model"
