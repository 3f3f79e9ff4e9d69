"""Sticky weighted routing: split accuracy, stickiness across weight changes, no failures while changing."""

from __future__ import annotations

import threading

import httpx
import pytest

from serving import contract
from serving.gateway import StickyRouter, bucket, choose_variant, sticky_key
from tests.conftest import free_port
from tests.serve_fixtures import characters_file, make_app, start_cluster, stop_cluster, tiny_model


@pytest.mark.parametrize("weight", [5.0, 25.0, 50.0])
def test_split_accuracy_over_conversations(weight):
    ids = [f"conv-{i}" for i in range(20000)]
    share = 100 * sum(choose_variant(c, weight) == "canary" for c in ids) / len(ids)
    assert abs(share - weight) < 2.0


def test_sticky_and_monotone_across_weight_changes():
    r = StickyRouter(5.0)
    ids = [f"u{i}" for i in range(5000)]
    first = {c: r.route(c) for c in ids}
    assert all(0 <= bucket(c) < 100 for c in ids[:100])
    assert {c: r.route(c) for c in ids} == first  # same weight: same answer
    r.set_weight(25.0)
    second = {c: r.route(c) for c in ids}
    assert all(second[c] == "canary" for c in ids if first[c] == "canary")  # never canary -> stable
    r.set_weight(10.0)  # lowering keeps pinned canary conversations on canary
    assert all(r.route(c) == "canary" for c in ids if second[c] == "canary")
    r.rollback()  # only a rollback moves them back
    assert all(r.route(c) == "stable" for c in ids)
    assert r.route("x", canary_available=False) == "stable"


def test_sticky_key_never_uses_the_message_text():
    """Conversation id, then the client's user / session id, else a fresh random id (returned to the
    client by the Router); the old fallback hashed the character and the first user message, so
    every "你好" opener of a character went to the same variant."""
    assert sticky_key("c-1", "alice", {"x-session-id": "s"}) == ("c-1", "conversation_id")
    assert sticky_key(None, "alice", {"X-Conversation-Id": "c-2"}) == ("c-2", "conversation_id")
    assert sticky_key(None, "alice", {"x-session-id": "s"}) == ("user:alice", "user")
    assert sticky_key("", None, {"X-Session-Id": "s-9"}) == ("session:s-9", "session")
    generated = [sticky_key(None, None, {}) for _ in range(400)]
    assert {src for _, src in generated} == {"generated"} and len({k for k, _ in generated}) == 400
    share = sum(choose_variant(k, 25.0) == "canary" for k, _ in generated) / 400
    assert 0.15 < share < 0.35  # anonymous "你好" openers spread over both variants by the weight


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_http_split_and_weight_changes_without_failures(tmp_path):
    from troupe.deploy import apply_apps, set_router_config

    model = tiny_model()
    canary = tmp_path / "canary-model"
    canary.symlink_to(model, target_is_directory=True)
    port = free_port()
    start_cluster(port)
    try:
        apply_apps(
            [
                make_app(
                    "production",
                    characters_file(tmp_path),
                    model,
                    "/production",
                    canary,
                    30.0,
                    gateway={"limits": {"requests_per_minute": 0}},  # one client, hundreds of requests
                )
            ],
            "127.0.0.1",
            port,
            timeout_s=240,
        )
        url = f"http://127.0.0.1:{port}/production/v1/roleplay"
        client = httpx.Client(timeout=60)

        def ask(conv: str) -> str:
            body = {
                "character_id": "bob",
                "conversation_id": conv,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 1,
            }
            r = client.post(url, json=body)
            assert r.status_code == 200, r.text
            return r.json()["variant"]

        convs = [f"h{i}" for i in range(300)]
        got = {c: ask(c) for c in convs}
        assert got == {c: choose_variant(c, 30.0) for c in convs}  # HTTP agrees with the pure function
        share = 100 * sum(v == "canary" for v in got.values()) / len(convs)
        assert abs(share - 30.0) < 8.0  # 300 samples: binomial sd ~2.6 points

        failures: list[str] = []
        stop = threading.Event()

        def load() -> None:
            i = 0
            while not stop.is_set():
                try:
                    ask(f"bg{i % 40}")
                except Exception as e:  # any failed request fails the test
                    failures.append(repr(e))
                i += 1

        t = threading.Thread(target=load)
        t.start()
        try:
            for w in (50.0, 80.0):
                set_router_config("troupe-production", contract.router_user_config(w))
        finally:
            stop.set()
            t.join()
        assert not failures
        after = {c: ask(c) for c in convs[:100]}
        assert all(after[c] == "canary" for c in convs[:100] if got[c] == "canary")  # sticky
        stats = client.get(f"http://127.0.0.1:{port}/production/v1/rollout/stats").json()
        assert stats[contract.CANARY_WEIGHT] == 80.0 and stats["variants"]["canary"]["errors"] == 0
    finally:
        stop_cluster()
