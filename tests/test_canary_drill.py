"""Canary drill on a live Serve app: real Ray Serve, real HTTP, real MLflow (SQLite store), two and
then three registered versions of the tiny random model, the rollout CLI as a separate process.

1. Router statistics come from one stats actor: with two Router replicas the stats count every
   request, whichever replica served it and whichever answers the stats call.
2. A canary that breaks the reply rules (its replies are replaced by an assistant-phrase reply with
   invalid markup, ``canary_model.fault.reply``) is rolled back after ``failure_threshold`` failed
   analyses; the reason names the rules, the record and the version's tags hold it, the champion
   alias does not move and the canary gets no more traffic.
3. A healthy canary: ``troupe rollout start`` runs in its own process and is killed (SIGKILL) after
   it advanced; a second ``rollout start`` in the environment is refused while the record says the
   rollout runs; ``troupe rollout resume`` continues from the recorded step (not step 1) and
   promotes: the champion alias moves to the canary's version, which then serves as stable, pinned
   by number. The record shows every step.

The drill's policy is small (two steps, 6 requests per variant, 2 s windows) so it runs in about
two minutes on two cores; the shipped policy is exercised by tests/test_canary_sim.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serving import contract
from tests.conftest import REPO, free_port
from tests.serve_fixtures import characters_file, make_app, start_cluster, stop_cluster, tiny_model
from troupe.rollout import (
    Controller,
    LocalTarget,
    Policy,
    Registry,
    RolloutConflict,
    RolloutStore,
    rollout_cli,
)

pytestmark = pytest.mark.timeout(600)
NAME = "troupe-roleplay"
ENV = "production"
FAULTY = "作为一个AI，我无法回答<emotion>bogus</emotion>"
POLICY = {
    "steps": [30, 60],
    "min_canary_requests": 6,
    "min_stable_requests": 6,
    "min_seconds": 2,
    "failure_threshold": 2,
    "hard_min_requests": 1000,  # the drill's faulty canary must go through the failure threshold
    "max_p95_ratio": 20.0,  # CPU latencies of two replicas on two shared cores are not the subject
    "poll_seconds": 0.5,
    "timeout_seconds": 120,
}


def uri(version: int) -> str:
    return contract.model_version_uri(NAME, version)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import mlflow

    d = tmp_path_factory.mktemp("drill")
    os.environ["TROUPE_SCRATCH"] = str(d / "scratch")  # model replicas download versions here
    tracking = f"sqlite:///{d}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=tracking)
    client.create_registered_model(NAME)
    for _ in range(3):  # 1: stable (champion), 2: healthy canary, 3: faulty canary
        client.create_model_version(NAME, source=str(tiny_model()))
    client.set_registered_model_alias(NAME, "champion", "1")
    policy_path = d / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(POLICY))
    port = free_port()
    params = {
        "paths": {"deploy": str(d / "deploy")},
        "registry": {"model_name": NAME, "tracking_uri": tracking, "rollout_policy": str(policy_path)},
        "serve": {"env": ENV, "host": "127.0.0.1", "port": port},
    }
    (d / "params.yaml").write_text(yaml.safe_dump(params))
    try:
        start_cluster(port)  # inside the try: a failed start still shuts down the driver it attached
        yield {
            "dir": d,
            "tracking": tracking,
            "client": client,
            "port": port,
            "base": f"http://127.0.0.1:{port}/{ENV}",
            "chars": characters_file(d),
            "policy": policy_path,
            "params": d / "params.yaml",
        }
    finally:
        stop_cluster()
        os.environ.pop("TROUPE_SCRATCH", None)


def deploy(w, canary_model: dict) -> None:
    """Production serving version 1 alone, two Router replicas, the canary's fault settings."""
    from troupe.deploy import apply_apps

    app = make_app(
        ENV,
        w["chars"],
        uri(1),
        f"/{ENV}",
        mlflow_tracking_uri=w["tracking"],
        canary_model=canary_model,
        # the drill is a load generator from one client: production's per-client rate limit would
        # turn its traffic into 429s (rate limits are tested in tests/test_roleplay_api.py)
        gateway={"limits": {"requests_per_minute": 0}},
    )
    app["deployments"][0]["num_replicas"] = 2
    apply_apps([app], "127.0.0.1", w["port"], timeout_s=240)


def ask(client: httpx.Client, base: str, conv: str) -> dict:
    body = {
        "character_id": "bob",
        "conversation_id": conv,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "hello there"}],
    }
    r = client.post(f"{base}/v1/roleplay", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def traffic(base: str, n: int, tag: str) -> list[dict]:
    with httpx.Client(timeout=60) as c:
        return [ask(c, base, f"{tag}-{i}") for i in range(n)]


class Load:
    """Background traffic (fresh conversation ids) while a controller runs elsewhere."""

    def __init__(self, base: str) -> None:
        self.base, self.stop, self.failures, self.n = base, threading.Event(), [], 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                try:
                    ask(c, self.base, f"load-{self.n}")
                except Exception as e:  # a failed request during a rollout fails the drill
                    self.failures.append(repr(e))
                self.n += 1

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def test_stats_cover_every_router_replica_and_stickiness_ignores_text(world):
    deploy(world, {})
    hello = {"character_id": "daiyu", "max_tokens": 1, "messages": [{"role": "user", "content": "你好"}]}
    keys = set()
    for _ in range(3):  # no conversation id: a random key per request, returned to the client
        r = httpx.post(f"{world['base']}/v1/roleplay", json=hello, timeout=60)
        assert r.headers["x-conversation-id"] == r.json()["conversation_id"]
        keys.add(r.json()["conversation_id"])
    assert len(keys) == 3
    r = httpx.post(
        f"{world['base']}/v1/chat/completions",
        json={"model": "daiyu", "user": "alice", "max_tokens": 1, "messages": hello["messages"]},
        timeout=60,
    )
    assert r.json()["troupe"]["conversation_id"] == "user:alice" == r.headers["x-conversation-id"]
    t0 = time.time()  # the stats below count the 24 requests sent now
    traffic(world["base"], 24, "replicas")
    replicas, counts = set(), set()
    for _ in range(12):
        s = httpx.get(f"{world['base']}/v1/rollout/stats", params={"since": t0}, timeout=30).json()
        replicas.add(s["router_replica"])
        counts.add(s["variants"]["stable"]["requests"])
    assert len(replicas) == 2  # the stats calls were answered by both replicas...
    assert counts == {24}  # ...and each saw all 24 requests (per-replica stats would split them)
    v = s["variants"]["stable"]
    assert v["p95"]["n"] == 24 and v["p95"]["lo"] <= v["p95"]["value"] <= v["p95"]["hi"]


def test_rule_breaking_canary_is_rolled_back_with_the_reason(world):
    deploy(world, {"fault": {"reply": FAULTY}})
    policy = Policy.load(world["policy"])
    store = RolloutStore(world["tracking"], NAME, ENV)
    registry = Registry(world["tracking"], NAME)
    target = LocalTarget(ENV, world["base"])
    ctl = Controller.begin(target, policy, store, uri(1), uri(3), registry, str(world["policy"]))
    decisions = []
    for round_ in range(8):
        traffic(world["base"], 30, f"faulty-{round_}")
        time.sleep(max(0.0, ctl.record.window_start + policy.min_seconds - time.time()))
        decisions.append(ctl.tick())
        if ctl.record.status == "rolled_back":
            break
    assert [d.action for d in decisions][-1] == "rollback", [d.reason for d in decisions]
    assert [d.verdict for d in decisions][-2:] == ["fail", "fail"], [d.reason for d in decisions]
    d = decisions[-1]
    assert "2 consecutive failed analyses" in d.reason
    assert "markup_invalid_rate" in d.reason and "assistant_phrase_rate" in d.reason
    failed = [c for c in d.checks if c["status"] == "fail"]
    assert failed and all(c["estimate"]["n"] > 0 and c["estimate"]["lo"] is not None for c in failed)
    rec = store.load()
    assert rec.status == "rolled_back" and rec.weight == 0.0 and rec.reason == d.reason
    assert [x["action"] for x in rec.decisions] == ["start", "rollback"]
    tags = world["client"].get_model_version(NAME, "3").tags
    assert tags["rollout.status"] == "rollback" and "markup_invalid_rate" in tags["rollout.reason"]
    event = json.loads(tags[f"rollout.{ENV}.event.{rec.n_decisions:03d}"])
    assert event["canary"]["markup_invalid_rate"]["n"] > 0  # every metric with its n and interval
    assert registry.version_of("champion") == "1"
    stats = httpx.get(f"{world['base']}/v1/rollout/stats", timeout=30).json()
    assert (
        stats["rolled_back"] and stats[contract.CANARY_WEIGHT] == 0.0 and stats["pinned_conversations"] == 0
    )
    after = traffic(world["base"], 10, "after-rollback")
    assert {r["variant"] for r in after} == {"stable"}


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "troupe"), "rollout", *args]


def test_killed_controller_resumes_and_a_second_start_is_refused(world):
    from click.testing import CliRunner

    deploy(world, {})
    store = RolloutStore(world["tracking"], NAME, ENV)
    env = {**os.environ, "RAY_ADDRESS": _gcs_address(), "PYTHONPATH": str(REPO)}
    log = world["dir"] / "controller.log"
    with Load(world["base"]) as load:
        with log.open("w") as out:
            proc = subprocess.Popen(
                [*_cli("start", "--env", ENV, "--canary-uri", uri(2)), "--params", str(world["params"])],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.time() + 240
            while True:  # kill the controller once it advanced past the first step
                rec = store.load()
                if rec is not None and rec.canary_uri == uri(2) and rec.step >= 1:
                    break
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
        killed = store.load()
        assert killed.status == "running" and killed.weight == 60.0, killed

        r = CliRunner().invoke(
            rollout_cli,
            ["start", "--env", ENV, "--canary-uri", uri(2), "--no-wait", "--params", str(world["params"])],
        )
        assert isinstance(r.exception, RolloutConflict), r.output + repr(r.exception)
        assert "in progress" in str(r.exception) and "troupe rollout resume" in str(r.exception)
        assert store.load().revision == killed.revision  # the refused start wrote nothing

        r = CliRunner().invoke(rollout_cli, ["resume", "--env", ENV, "--params", str(world["params"])])
        assert r.exit_code == 0, r.output + repr(r.exception)
    # Weight changes reconfigure the Router in place (no failed request, tests/test_router.py); the
    # two model changes (canary added, canary promoted) replace the Router replicas, and Serve kills
    # a replica whose request outlives its graceful shutdown, so a request in flight then may fail.
    assert len(load.failures) <= 2 and load.n > 20, (load.n, load.failures[:3])
    rec = store.load()
    assert rec.status == "promoted", rec
    assert [x["action"] for x in rec.decisions] == ["start", "advance", "resume", "promote"]
    assert rec.decisions[2]["weight"] == 60.0  # resumed at the recorded step, not step 1
    assert Registry(world["tracking"], NAME).version_of("champion") == "2"
    from troupe.deploy import deployed_apps

    args = deployed_apps()[contract.app_name(ENV)]["args"]
    assert args[contract.STABLE_MODEL_URI] == uri(2) and contract.CANARY_MODEL_URI not in args  # pinned
    assert {r["model_version"] for r in traffic(world["base"], 5, "promoted")} == {f"{NAME}/2"}


def _gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address
