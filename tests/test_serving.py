"""Serving over real HTTP on loopback: a declarative Serve app with the tiny random model."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from tests.conftest import free_port
from tests.serve_fixtures import characters_file, make_app, start_cluster, stop_cluster, tiny_model

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


def _model_calls(base: str) -> int:
    """Requests the Router forwarded to a model replica (``model_calls`` of ``GET /v1/rollout/stats``;
    the test app has one Router replica). Read over HTTP, not with a Serve handle from the pytest
    process: after earlier tests had connected this process to other Ray clusters, a driver-side
    handle call to the idle replica never returned (CI, 2026-11-25, reproduced locally)."""
    r = httpx.get(f"{base}/v1/rollout/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    r.raise_for_status()
    return int(r.json()["model_calls"])


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
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


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
    before = _model_calls(served)
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
    assert _model_calls(served) == before
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


def test_unknown_args_and_unit_less_weights_are_refused():
    """The app names the key it does not know (a chart drifting from the app fails at build time)."""
    from serving import contract
    from serving.app import check_args, load_serving_config

    with pytest.raises(ValueError, match="canary_weight"):
        check_args({"canary_weight": 0.05})
    with pytest.raises(ValueError, match="numReplicas"):
        check_args({"model": {"numReplicas": 4}})
    with pytest.raises(ValueError, match="0-100"):
        check_args({contract.CANARY_WEIGHT: 250})
    with pytest.raises(ValueError, match="canary_weight_percent"):
        contract.check_user_config({"canary_weight": 5})
    assert contract.router_user_config(25) == {contract.CANARY_WEIGHT: 25.0}
    for env in contract.ENVS:  # the shipped serving configs use only known keys
        cfg = load_serving_config({"env": env})
        assert cfg["characters"] == "" and cfg[contract.CANARY_WEIGHT] == 0


def test_vllm_replicas_request_their_device_in_bf16():
    from serving.backend import vllm_engine_config

    gpu = vllm_engine_config(
        "s3://bucket/run/dpo",
        {"served_model_name": "troupe", "max_model_len": 4096},
        {
            "dtype": "bfloat16",
            "num_cpus": 2,
            "num_gpus": 1,
            "num_replicas": 3,
            "resources": {"accelerator_slot": 1},
        },
    )
    assert gpu["engine_kwargs"]["dtype"] == "bfloat16"
    assert gpu["placement_group_config"]["bundle_per_worker"] == {
        "CPU": 2.0,
        "GPU": 1.0,
        "accelerator_slot": 1.0,
    }
    assert gpu["model_loading_config"]["model_source"] == {"bucket_uri": "s3://bucket/run/dpo"}
    assert gpu["deployment_config"]["autoscaling_config"] == {"min_replicas": 3, "max_replicas": 3}
    npu = vllm_engine_config("/models/x", {}, {"dtype": "bfloat16", "resources": {"NPU": 1}})
    assert npu["placement_group_config"]["bundle_per_worker"] == {"CPU": 1.0, "NPU": 1.0}
    assert npu["model_loading_config"]["model_source"] == "/models/x"


def test_characters_travel_with_the_model(tmp_path):
    """Without a configured characters file, the Router serves the characters stored with the stable
    model plus those only the canary carries (stable's card wins for a shared id)."""
    from serving.app import serving_characters

    stable, canary = tmp_path / "v1", tmp_path / "v2"
    stable.mkdir()
    canary.mkdir()
    characters_file(stable)
    extra = {"id": "alice", "name": "Alice", "language": "en", "profile": {}, "style": "", "examples": []}
    (canary / "characters.jsonl").write_text(json.dumps(extra) + "\n")
    chars = serving_characters({"characters": ""}, str(stable), str(canary))
    assert set(chars) == {"bob", "daiyu", "alice"}
    assert set(serving_characters({"characters": str(canary / "characters.jsonl")}, str(stable), None)) == {
        "alice"
    }
    with pytest.raises(FileNotFoundError, match="characters"):
        serving_characters({"characters": ""}, str(tmp_path), None)
