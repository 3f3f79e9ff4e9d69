"""Serving over real HTTP on loopback: a declarative Serve app with the tiny random model."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from tests.serve_fixtures import characters_file, free_port, make_app, start_cluster, stop_cluster, tiny_model

KEY = "sk-test-123"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from troupe.deploy import apply_apps

    d = tmp_path_factory.mktemp("serving")
    model, chars = tiny_model(), characters_file(d)
    port = free_port()
    start_cluster(port)
    try:
        app = make_app(
            "test",
            chars,
            model,
            "/test",
            gateway={
                "api_keys_sha256": [hashlib.sha256(KEY.encode()).hexdigest()],
                "limits": {"max_body_bytes": 4000, "max_messages": 6, "history_token_budget": 200},
            },
        )
        apply_apps([app], "127.0.0.1", port, timeout_s=240)
        yield f"http://127.0.0.1:{port}/test"
    finally:
        stop_cluster()


def _model_calls() -> int:
    from ray import serve

    return serve.get_deployment_handle("stable", "troupe-test").info.remote().result()["calls"]


def test_openai_client_chat_completion(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served}/v1", api_key=KEY, max_retries=0, timeout=60)
    r = client.chat.completions.create(
        model="bob", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert r.object == "chat.completion" and r.model == "bob"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens <= 8
    assert r.model_extra["troupe"]["variant"] == "stable"
    chunks = list(
        client.chat.completions.create(
            model="daiyu", messages=[{"role": "user", "content": "你好"}], max_tokens=8, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_roleplay_returns_parsed_markup(served):
    h = {"Authorization": f"Bearer {KEY}"}
    body = {
        "character_id": "daiyu",
        "conversation_id": "c-1",
        "messages": [{"role": "user", "content": "在吗"}, {"role": "user", "content": "陪我聊聊"}],
    }
    r = httpx.post(f"{served}/v1/roleplay", json=body, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    d = r.json()
    for k in ("text", "emotion", "clauses", "images", "messages", "variant", "model_version", "markup_valid"):
        assert k in d
    assert d["variant"] == "stable" and d["model_version"] == "troupe-test-tiny"
    assert all({"text", "delay_ms"} <= set(m) for m in d["messages"])


def test_rejections_never_reach_the_model(served):
    before = _model_calls()
    ok = {"character_id": "bob", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ({}, ok, 401),  # missing key
        ({"Authorization": "Bearer wrong"}, ok, 401),
        ({"x-api-key": "wrong"}, ok, 401),
        (auth, {**ok, "messages": [{"role": "user", "content": "x" * 5000}]}, 413),  # body > 4000 bytes
        (auth, {**ok, "messages": [{"role": "user", "content": "hi"}] * 7}, 400),  # > 6 messages
        (auth, {**ok, "messages": [{"role": "user", "content": "word " * 300}]}, 400),  # > token budget
        (auth, {**ok, "messages": [{"role": "assistant", "content": "hi"}]}, 400),  # must end with user
        (auth, {**ok, "character_id": "nobody"}, 404),
        (auth, {**ok, "max_tokens": 100000}, 400),
    ]
    for headers, body, status in cases:
        r = httpx.post(f"{served}/v1/roleplay", content=json.dumps(body), headers=headers, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert "error" in r.json() and r.json()["error"]["message"]
    r = httpx.post(f"{served}/v1/chat/completions", content=b"{not json", headers=auth, timeout=30)
    assert r.status_code == 400
    assert _model_calls() == before
    stats = httpx.get(f"{served}/v1/rollout/stats", headers=auth, timeout=30).json()
    assert stats["variants"]["stable"]["requests"] >= 2 and stats["canary_available"] is False


def test_deploy_command_writes_smoke(served, tmp_path):
    """`troupe deploy --env test --model-uri DIR` on the running cluster (runs last: replaces the app)."""
    import yaml
    from click.testing import CliRunner

    from troupe.deploy import deploy_cmd

    port = int(served.split(":")[2].split("/")[0])
    splits = tmp_path / "splits"
    splits.mkdir()
    characters_file(splits)
    params = {
        "paths": {"splits": str(splits), "deploy": str(tmp_path / "deploy")},
        "registry": {"model_name": "troupe-roleplay"},
        "serve": {"env": "test", "host": "127.0.0.1", "port": port},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = CliRunner().invoke(
        deploy_cmd,
        [
            "--params",
            str(tmp_path / "params.yaml"),
            "--model-uri",
            str(tiny_model()),
            "--set",
            "serve.env=test",
        ],
    )
    assert r.exit_code == 0, r.output + repr(r.exception)
    smoke = json.loads((tmp_path / "deploy" / "smoke.json").read_text())
    assert smoke["env"] == "test" and smoke["variant"] == "stable" and isinstance(smoke["reply"], str)
    assert smoke["app_config"]["route_prefix"] == "/test"
