"""Dialogue engine: seeded scenarios, and user / character / host agents on a real HTTP stand-in.

The agents are real :class:`~troupe.dialogue.client.AgentClient` objects (the ``openai`` client, its
retries, the rate limiter) talking to :class:`tests.openai_standin.StandIn`, a real OpenAI-compatible
server on loopback whose answers are scripted by which agent's system prompt it sees. Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.openai_standin import Fail, StandIn
from troupe.config import ConfigError
from troupe.contract import Character, to_chat
from troupe.dialogue.client import AgentClient
from troupe.dialogue.contract import PROBE_KINDS, Conversation
from troupe.dialogue.engine import ENGINE_ROLES, parse_host, run
from troupe.dialogue.scenarios import load_spec, sample_scenarios
from troupe.persona import render_system_prompt

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "configs" / "scenarios.yaml"

MEI = Character(id="mei", name="小梅", language="zh", profile={"身份": "花店店主"}, style="温柔")
KIT = Character(id="kit", name="Kit", language="en", profile={"job": "bike courier in Bristol"})
OTTO = Character(id="otto", name="Otto", language="en", profile={"job": "lighthouse keeper"})
CHARS = {c.id: c for c in (MEI, KIT, OTTO)}
CJK = re.compile(r"[\u4e00-\u9fff]")


def _who(messages: list[dict[str, Any]]) -> str:
    """Which agent a request is for, from its system prompt (the engine's prompt texts)."""
    sys = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    if "扮演“用户”" in sys or "you play the *user*" in sys:
        return "user"
    if "主持人" in sys or "You host" in sys:
        return "host"
    return "character"


class Script:
    """The stand-in's answers: varied, in the character's language; the host ends 小梅's scenes after
    two character turns, answers gibberish for Otto (unparseable -> continue) and CONTINUE for Kit.
    ``fail`` maps an agent to ``(status, how many times)``; every answer text is kept per request."""

    def __init__(self, fail: dict[str, tuple[int, int]] | None = None):
        self.fail = dict(fail or {})
        self.lock = threading.Lock()
        self.answers: list[tuple[str, str]] = []  # (agent, text) per answered request, in order
        self.calls: dict[str, int] = {}

    def __call__(self, messages: list[dict[str, Any]], model: str, body: dict[str, Any]) -> str:
        who = _who(messages)
        text_all = json.dumps(messages, ensure_ascii=False)
        with self.lock:
            self.calls[who] = self.calls.get(who, 0) + 1
            status, times = self.fail.get(who, (0, 0))
            if times != 0 and (who != "host" or "Otto" in text_all):
                self.fail[who] = (status, times - 1)
                raise Fail(status, retry_after=0.0)
            h = int(hashlib.sha1(text_all.encode()).hexdigest()[:6], 16)
            zh = bool(CJK.search(messages[0]["content"])) if messages else False
            if who == "host":
                transcript = messages[-1]["content"]
                if "小梅" in transcript:
                    text = "**结束**" if transcript.count("小梅：") >= 2 else "继续吧"
                elif "Otto" in transcript:
                    text = "hmm, hard to say"
                else:
                    text = "CONTINUE."
            elif who == "user":
                n = len(messages)
                text = f"第{n}句：你今天忙不忙呀，编号{h}？" if zh else f"Line {n}: busy today, code {h}?"
            else:
                text = (
                    f"还行吧，刚忙完，编号{h}。<emotion>开心</emotion>"
                    if zh
                    else f"Not bad, just done, code {h}.<emotion>happy</emotion>"
                )
            self.answers.append((who, text))
            return text


def _agents(base_url: str, **over: Any) -> dict[str, AgentClient]:
    return {
        r: AgentClient(**{"base_url": base_url, "model": f"{r}-model", "role": r, **over.get(r, {})})
        for r in ENGINE_ROLES
    }


def _read(path: Path) -> list[Conversation]:
    return [Conversation.model_validate_json(x) for x in path.read_text().splitlines() if x.strip()]


# ------------------------------------------------------------------------------------------ scenarios


def test_scenarios_are_seeded_stable_and_balanced() -> None:
    spec = load_spec(SPEC)
    a = sample_scenarios(spec, CHARS, 20, seed=3, max_turns=5, probe_share=0.5)
    assert a == sample_scenarios(spec, CHARS, 20, seed=3, max_turns=5, probe_share=0.5)
    assert a[:8] == sample_scenarios(
        spec, CHARS, 8, seed=3, max_turns=5, probe_share=0.5
    )  # prefix-stable ids
    assert len({s.id for s in a}) == 20
    other = sample_scenarios(spec, CHARS, 20, seed=4, max_turns=5, probe_share=0.5)
    assert {s.id for s in other}.isdisjoint({s.id for s in a})
    per_char = {c: sum(s.character_id == c for s in a) for c in CHARS}
    assert max(per_char.values()) - min(per_char.values()) <= 1  # round-robin
    probed = [s for s in a if s.probes]
    assert len(probed) == 10 and all(len(s.probes) == 1 for s in probed)
    assert {s.probes[0].kind for s in probed} == set(PROBE_KINDS)  # kinds cycle
    assert all(1 <= s.probes[0].turn <= 4 for s in probed)
    for s in a:
        assert set(s.variables) == {"personality", "profession", "user_persona", "scene", "topic"}
        zh = s.language == "zh"
        assert all(bool(CJK.search(v)) == zh for v in s.variables.values()), s
        for p in s.probes:
            if p.kind == "language_switch":  # written in another language than the character's
                assert bool(CJK.search(p.text)) != zh
    assert not any(s.probes for s in sample_scenarios(spec, CHARS, 10, seed=3, probe_share=0.0))
    # the ids follow the file's content: an edited file gives new scenarios
    assert spec.content_hash == hashlib.sha256(SPEC.read_bytes()).hexdigest()


def test_scenario_file_errors_name_file_and_keys(tmp_path: Path) -> None:
    f = tmp_path / "sc.yaml"
    f.write_text(
        "variables:\n  scene: [{zh: 雨天, en: rainy day}]\n  mood: [{zh: 好, en: good}]\n"
        "probes:\n  photo: {en: [a pic please]}\n  dance: {en: [dance!]}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_spec(f)
    assert str(f) in str(e.value) and "mood" in str(e.value) and "dance" in str(e.value)
    f.write_text("variables:\n  scene: [{zh: 雨天, en: rainy day, fr: pluie}]\nextras: 1\n")
    with pytest.raises(ConfigError, match=r"sc\.yaml.*unknown key\(s\) \['extras'\]"):
        load_spec(f)
    f.write_text("variables:\n  scene: [{zh: 雨天, en: rainy day, fr: pluie}]\n")
    with pytest.raises(ConfigError, match=r"variables\.scene\.0\.fr"):
        load_spec(f)
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "missing.yaml")


def test_parse_host_is_tolerant() -> None:
    assert parse_host("END") and parse_host("**结束**") and parse_host("I think it should end now.")
    assert not parse_host("CONTINUE") and not parse_host("继续吧") and not parse_host("不要结束，继续")
    assert not parse_host("continue — it shouldn't end yet")
    with pytest.raises(ValueError):
        parse_host("hmm, hard to say")


# ------------------------------------------------------------------------------------------ runs


def test_run_probes_host_turn_limit_and_usage(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    scenarios = sample_scenarios(spec, CHARS, 9, seed=0, max_turns=4, probe_share=0.5)
    script = Script()
    prices = {"price_input_per_mtok": 3.0, "price_output_per_mtok": 15.0}
    with StandIn(script) as s:
        summary = run(scenarios, CHARS, _agents(s.base_url, character=prices), tmp_path, concurrency=3,
                      progress=False)  # fmt: skip
        requests = list(s.requests)
    convs = _read(tmp_path / "conversations.jsonl")
    assert summary["scenarios"] == 9 == summary["finished"] + summary["failed"] + summary["skipped"]
    assert summary["finished"] == 9 and len(convs) == 9 and not (tmp_path / "failed.jsonl").read_text()
    for c in convs:
        sc = c.scenario
        users = [t for t in c.turns if t.role == "user"]
        chars = [t for t in c.turns if t.role == "assistant"]
        assert [t.role for t in c.turns] == ["user", "assistant"] * len(chars)
        assert c.messages[0].role == "system" and sc.variables["scene"] in c.messages[0].content
        for p in sc.probes:  # the probe replaced the user agent at its turn
            assert users[p.turn].agent == "probe" and users[p.turn].probe == p.kind
            assert c.messages[users[p.turn].index].content == p.text
        assert sum(t.agent == "probe" for t in users) == len(sc.probes)
        if c.character_id == "mei":  # the host ends after 2 character turns (not before the probe)
            assert c.ended_by == "host"
            assert len(chars) == max(2, max((p.turn + 1 for p in sc.probes), default=0))
        else:
            assert c.ended_by == "turn_limit" and len(chars) == 4
        assert c.provenance["prompt_version"] and c.provenance["agents"]["user"]["model"] == "user-model"
        assert c.provenance["variables"] == sc.variables and c.provenance["scenario_seed"] == 0
    assert summary["ended_by"] == {
        "host": sum(c.character_id == "mei" for c in convs),
        "turn_limit": sum(c.character_id != "mei" for c in convs),
    }
    otto = [c for c in convs if c.character_id == "otto"]
    assert summary["host"]["unparseable"] == sum(c.provenance["host"]["asked"] for c in otto) > 0
    assert summary["probes_played"] == {
        k: sum(p.kind == k for c in convs for p in c.scenario.probes) for k in PROBE_KINDS if any(
            p.kind == k for c in convs for p in c.scenario.probes)
    }  # fmt: skip
    # the character agent saw the one persona renderer's card + the scene note, as training renders it
    mei = next(c for c in convs if c.character_id == "mei")
    card_reqs = [
        r for r in requests if _who(r["messages"]) == "character" and "小梅" in r["messages"][0]["content"]
    ]
    first = to_chat(mei.messages[:2], render_system_prompt(MEI))
    assert any(r["messages"] == first for r in card_reqs)
    # the user agent sees the dialogue from its side: the character's last line is its "user" turn
    for r in requests:
        if _who(r["messages"]) == "user" and len(r["messages"]) > 2:
            assert r["messages"][-1]["role"] == "user" and r["messages"][-2]["role"] == "assistant"
    # usage: the stand-in's own token counts (prompt = chars/4 + 1, completion = chars/4 + 1) per role
    assert len(requests) == len(script.answers)
    for role in ENGINE_ROLES:
        pairs = [(r, a) for r, (who, a) in zip(requests, script.answers, strict=True) if who == role]
        pt = sum(sum(len(str(m["content"])) for m in r["messages"]) // 4 + 1 for r, _ in pairs)
        ct = sum(len(a) // 4 + 1 for _, a in pairs)
        u = summary["usage"][role]
        assert (u["calls"], u["prompt_tokens"], u["completion_tokens"]) == (len(pairs), pt, ct), role
        assert sum(c.usage[role].prompt_tokens for c in convs) == pt
        if role == "character":
            assert u["cost_usd"] == pytest.approx((pt * 3.0 + ct * 15.0) / 1e6)
    assert summary["tokens"] == sum(
        u["prompt_tokens"] + u["completion_tokens"] for u in summary["usage"].values()
    )
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_429_is_retried_and_failures_are_recorded_then_retried(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    scenarios = sample_scenarios(spec, CHARS, 6, seed=1, max_turns=3, probe_share=0.0)
    # 429 twice on the character, then OK: the openai client's backoff retries it
    script = Script(fail={"character": (429, 2)})
    with StandIn(script) as s:
        summary = run(scenarios[:1], CHARS, _agents(s.base_url), tmp_path / "a", progress=False)
    assert summary["finished"] == 1 and summary["usage"]["character"]["retries"] == 2
    # the host always answers 500 for Otto's scenes: they fail with the reason and their turns so far
    script = Script(fail={"host": (500, -1)})
    out = tmp_path / "b"
    with StandIn(script) as s:
        over = {r: {"max_retries": 1} for r in ENGINE_ROLES}
        first = run(scenarios, CHARS, _agents(s.base_url, **over), out, concurrency=2, progress=False)
    n_otto = sum(sc.character_id == "otto" for sc in scenarios)
    assert n_otto >= 1
    failed = _read(out / "failed.jsonl")
    assert first["failed"] == len(failed) == n_otto and first["finished"] == 6 - n_otto
    for c in failed:
        assert c.status == "failed" and c.character_id == "otto"
        assert "host" in c.reason and "500" in c.reason and len(c.messages) == 3  # note + user + character
        assert c.usage["host"].calls == 1
    assert first["failures"] and first["usage"]["host"]["retries"] == 0
    # a re-run skips the finished ones (no request for them) and retries the failed ones
    script2 = Script()
    with StandIn(script2) as s:
        second = run(scenarios, CHARS, _agents(s.base_url), out, concurrency=2, progress=False)
        firsts = [r for r in s.requests if _who(r["messages"]) == "user" and len(r["messages"]) == 2]
    assert second["skipped"] == 6 - n_otto and second["finished"] == n_otto and second["failed"] == 0
    assert second["retried_failed"] == n_otto
    assert len(firsts) == n_otto  # one opening user line per conversation played
    assert (out / "failed.jsonl").read_text() == ""
    convs = _read(out / "conversations.jsonl")
    assert sorted(c.scenario.id for c in convs) == sorted(sc.id for sc in scenarios)
    # a third run has nothing to do and asks nothing
    with StandIn(Script()) as s:
        third = run(scenarios, CHARS, _agents(s.base_url), out, progress=False)
        assert not s.requests
    assert third["skipped"] == 6 and third["finished"] == 0


def test_crash_cut_line_is_dropped_and_played_again(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    scenarios = sample_scenarios(spec, CHARS, 2, seed=2, max_turns=2, probe_share=0.0)
    with StandIn(Script()) as s:
        run(scenarios, CHARS, _agents(s.base_url), tmp_path, progress=False)
    f = tmp_path / "conversations.jsonl"
    lines = f.read_text().splitlines()
    f.write_text(lines[0] + "\n" + lines[1][:40])  # the process died while writing the second record
    with StandIn(Script()) as s:
        summary = run(scenarios, CHARS, _agents(s.base_url), tmp_path, progress=False)
    assert summary["unreadable_lines"] == 1 and summary["finished"] == 1 and summary["skipped"] == 1
    assert len(_read(f)) == 2


def test_gateway_character_gets_history_model_and_sticky_id(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    scenarios = sample_scenarios(spec, {"mei": MEI}, 1, seed=5, max_turns=2, probe_share=0.0)
    with StandIn(Script()) as s:
        agents = _agents(s.base_url, character={"model": "{character_id}"})
        run(scenarios, {"mei": MEI}, agents, tmp_path, label="candidate", progress=False)
        reqs = [r for r in s.requests if _who(r["messages"]) == "character"]
    conv = _read(tmp_path / "conversations.jsonl")[0]
    assert conv.id == f"{scenarios[0].id}-candidate" and conv.label == "candidate"
    assert conv.provenance["character_model"] == "mei"
    assert reqs and all(r["model"] == "mei" and r["conversation_id"] == conv.id for r in reqs)
    first = reqs[0]["messages"]
    assert first[0] == {"role": "system", "content": conv.messages[0].content}  # the scene note, no card
    assert render_system_prompt(MEI) not in json.dumps(first, ensure_ascii=False)
    assert [m["role"] for m in first] == ["system", "user"]


def test_unknown_character_is_a_config_error(tmp_path: Path) -> None:
    spec = load_spec(SPEC)
    scenarios = sample_scenarios(spec, CHARS, 3, seed=0)
    with pytest.raises(ConfigError, match="otto|kit|mei"):
        run(scenarios, {"mei": MEI}, _agents("http://127.0.0.1:9/v1"), tmp_path, progress=False)
