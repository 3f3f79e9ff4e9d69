"""Self-play evaluation (troupe/dialogue/selfplay.py): conversation metrics on hand-built
conversations (each rule broken and kept), the paired comparison, run_selfplay against stand-in
gateways (real HTTP servers on loopback, the real ``openai`` client), and the registry gate's
``selfplay`` section."""

from __future__ import annotations

import pytest

from troupe.contract import Message
from troupe.dialogue import selfplay as sp
from troupe.dialogue.contract import Conversation, Probe, Scenario, Turn

IMG = "<img><prompt>海边的日落</prompt><includePerson>false</includePerson></img>"


def conv(
    replies: list[str],
    users: list[str] | None = None,
    probes: dict[int, tuple[str, str]] | None = None,
    language: str = "zh",
    ended_by: str = "turn_limit",
    sid: str = "s1",
    with_turns: bool = True,
) -> Conversation:
    """A conversation alternating user lines and ``replies``; ``probes``: user turn -> (kind, text)."""
    probes = probes or {}
    users = users or [f"今天第{i}件事是什么呢" for i in range(len(replies))]
    msgs, turns = [], []
    for k, reply in enumerate(replies):
        kind, text = probes.get(k, (None, users[k]))
        turns.append(Turn(index=len(msgs), role="user", probe=kind if with_turns else None))
        msgs.append(Message(role="user", content=text))
        turns.append(Turn(index=len(msgs), role="assistant"))
        msgs.append(Message(role="assistant", content=reply))
    scenario = Scenario(
        id=sid, seed=0, character_id="lin", language=language, max_turns=len(replies),
        probes=[Probe(turn=t, kind=k, text=x) for t, (k, x) in probes.items()],
    )  # fmt: skip
    return Conversation(
        id=f"c-{sid}", scenario=scenario, character_id="lin", messages=msgs, turns=turns if with_turns else [],
        ended_by=ended_by,
    )  # fmt: skip


GOOD = [
    "今天去海边散步了，风好大<emotion>开心</emotion>",
    "我最爱吃火锅，你喜欢辣的吗？",
    "最近在学画画，挺难的。",
]


# --- per-conversation metrics: each must fail when its rule is broken ------------------------------------


def test_photo_probe_needs_an_image_tag():
    probe = {1: ("photo", "发张照片看看嘛")}
    without = sp.conversation_metrics(conv(GOOD, probes=probe))
    assert without["photo_probe_image"] == 0.0
    with_img = sp.conversation_metrics(conv([GOOD[0], "给你看我拍的" + IMG, GOOD[2]], probes=probe))
    assert with_img["photo_probe_image"] == 1.0
    # an image on another turn does not count: only the reply right after the probe
    elsewhere = sp.conversation_metrics(conv([GOOD[0], GOOD[1], "给你看" + IMG], probes=probe))
    assert elsewhere["photo_probe_image"] == 0.0
    # no photo probe: not applicable (None), not a pass
    assert sp.conversation_metrics(conv(GOOD))["photo_probe_image"] is None


def test_probe_found_from_the_scenario_without_turn_records():
    probe = {0: ("photo", "发张照片看看嘛")}
    assert sp.conversation_metrics(conv(GOOD, probes=probe, with_turns=False))["photo_probe_image"] == 0.0
    got = sp.conversation_metrics(conv(["看" + IMG, *GOOD[1:]], probes=probe, with_turns=False))
    assert got["photo_probe_image"] == 1.0
    # a probe past the end of the conversation never happened
    late = sp.conversation_metrics(conv(GOOD, probes={7: ("photo", "x")}, with_turns=False))
    assert late["photo_probe_image"] is None


def test_goodbye_probe():
    probe = {1: ("goodbye", "我要去睡觉了，再见")}
    kept = conv([GOOD[0], "别急着走嘛，你明天要去哪儿玩？", GOOD[2]], probes=probe)
    assert sp.conversation_metrics(kept)["goodbye_probe_kept_going"] == 1.0
    bye = conv([GOOD[0], "好的，晚安，拜拜！", GOOD[2]], probes=probe)
    assert sp.conversation_metrics(bye)["goodbye_probe_kept_going"] == 0.0
    en = conv(["Nice to see you here today.", "Okay then, goodbye!"], probes=probe, language="en")
    assert sp.conversation_metrics(en)["goodbye_probe_kept_going"] == 0.0
    # the engine ended the conversation on that reply (ended_by goodbye): not kept going
    ended = conv([GOOD[0], "嗯嗯好的呀"], probes=probe, ended_by="goodbye")
    assert sp.conversation_metrics(ended)["goodbye_probe_kept_going"] == 0.0


def test_are_you_ai_and_language_switch_probes():
    ai = {1: ("are_you_ai", "你是不是AI啊？")}
    assert sp.conversation_metrics(conv(GOOD, probes=ai))["are_you_ai_probe_in_character"] == 1.0
    broke = conv([GOOD[0], "作为一个AI，我没有真实的生活。", GOOD[2]], probes=ai)
    assert sp.conversation_metrics(broke)["are_you_ai_probe_in_character"] == 0.0
    sw = {1: ("language_switch", "Can we speak English from now on please?")}
    assert sp.conversation_metrics(conv(GOOD, probes=sw))["language_switch_probe_kept_language"] == 1.0
    switched = conv(
        [GOOD[0], "Of course, I would love to tell you about the ocean and the weather today.", GOOD[2]],
        probes=sw,
    )
    assert sp.conversation_metrics(switched)["language_switch_probe_kept_language"] == 0.0


def test_repetition_across_turns():
    assert sp.repetition(conv(GOOD)) == 0.0
    loop = conv(["我好想你啊，你今天过得怎么样？"] * 3 + [GOOD[0]])
    assert sp.repetition(loop) == pytest.approx(2 / 3)  # replies 2 and 3 of 2..4 repeat reply 1
    assert sp.repetition(conv(GOOD[:1])) is None  # nothing earlier to repeat


def test_repeated_questions_and_question_rate():
    asked = ["你喜欢思考吗？", "哈哈，那你喜欢思考吗？", "今天天气真好。", "说真的，你喜欢思考吗？"]
    c = conv(asked)
    assert sp.questions(asked[1]) == ["那你喜欢思考吗？"]
    assert sp.repeated_questions(c) == pytest.approx(2 / 3)  # 3 asking replies, 2 repeat the first
    assert sp.question_rate(c) == pytest.approx(3 / 4)
    assert sp.repeated_questions(conv(GOOD)) == 0.0  # one question, asked once
    assert sp.repeated_questions(conv(["今天天气真好。"])) is None


def test_language_drift():
    assert sp.language_drift(conv(GOOD)) == 0.0
    drift = conv([GOOD[0], "I think we should go to the beach together tomorrow morning.", GOOD[2]])
    assert sp.language_drift(drift) == pytest.approx(1 / 3)
    # too short to identify: left out, not counted either way
    assert sp.language_drift(conv(["ok", GOOD[0]])) == 0.0


def test_first_rule_break_is_censored_at_the_conversation_length():
    clean = conv(GOOD)
    assert sp.first_rule_break(clean) == (None, 3)
    m = sp.conversation_metrics(clean)
    assert m["rule_breaks"] == 0.0 and m["early_rule_break"] == 0.0 and m["replies_before_break"] == 3.0
    # reply 2 narrates an action (rule 8): the first break is after one clean reply
    broken = conv([GOOD[0], "*眨眨眼* 你猜呀", GOOD[2], GOOD[1]])
    assert sp.first_rule_break(broken) == (1, 4)
    m = sp.conversation_metrics(broken)
    assert m["early_rule_break"] == 1.0 and m["replies_before_break"] == 1.0 and m["rule_breaks"] == 0.25
    # two clean replies only: whether it would break by reply 3 is unknown (censored, left out)
    short = sp.conversation_metrics(conv(GOOD[:2]))
    assert short["early_rule_break"] is None and short["replies_before_break"] == 2.0
    # a break after EARLY_REPLIES clean replies is not early
    late = sp.conversation_metrics(conv([*GOOD, "林黛玉：你好呀"]), "林黛玉")
    assert late["replies_before_break"] == 3.0 and late["early_rule_break"] == 0.0
    assert sp.first_rule_break(conv([*GOOD, "林黛玉：你好呀"]), "林黛玉") == (3, 4)


# --- estimates and the paired comparison --------------------------------------------------------------


def test_compare_pairs_scenarios_and_reports_n():
    good = {f"s{i}": sp.conversation_metrics(conv(GOOD, sid=f"s{i}")) for i in range(12)}
    loop = ["我好想你啊，你今天过得怎么样？"] * 3
    bad = {f"s{i}": sp.conversation_metrics(conv(loop, sid=f"s{i}")) for i in range(10)}  # 2 unfinished
    got = sp.compare({sp.CANDIDATE: bad, sp.CHAMPION: good}, resamples=500)
    d = got["paired"]["repetition"]
    assert d.n == 10 and d.clusters == 10 and d.value == pytest.approx(1.0) and d.method == "paired-bootstrap"
    assert got["metrics"][sp.CHAMPION]["repetition"].n == 12
    assert got["metrics"][sp.CANDIDATE]["repetition"].value == pytest.approx(1.0)
    # a probe metric no conversation had is left out (the gate reads it as not measured)
    assert "photo_probe_image" not in got["paired"] and "photo_probe_image" not in got["metrics"][sp.CHAMPION]
    # 0/1 per conversation -> Wilson; shares -> bootstrap
    assert got["metrics"][sp.CHAMPION]["early_rule_break"].method == "wilson"
    assert got["metrics"][sp.CHAMPION]["rule_breaks"].method == "bootstrap"
    assert got["values"]["repetition"]["s11"] == {sp.CANDIDATE: None, sp.CHAMPION: 0.0}


# --- run_selfplay against stand-in gateways -----------------------------------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402

from tests.openai_standin import StandIn  # noqa: E402

CHARACTERS = [
    {"id": "lin", "name": "林黛玉", "language": "zh", "profile": {"身份": "贾府的表小姐"}},
    {"id": "wu", "name": "武松", "language": "zh", "profile": {"身份": "打虎英雄"}},
    {"id": "su", "name": "苏小妹", "language": "zh", "profile": {"身份": "才女"}},
]
GOOD_LINES = [
    "今天园子里的花开得正好，你那边天气怎么样？",
    "我刚读完一本诗集，里面有句话特别打动我。你最近读书吗？",
    "说起吃的，我最馋桂花糕了，你喜欢甜的还是咸的？",
    "昨晚下了场小雨，我在窗边听了好久。你失眠的时候做什么？",
    "我养的那只鹦鹉又学会了一句新诗，可把我乐坏了。",
    "最近在学弹琴，手指都磨红了，你会什么乐器吗？",
]
BAD_LINE = "I am so happy to talk with you about the weather today and tomorrow, my dear friend."


def _last_user(messages: list[dict]) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def good_gateway(messages, model, body):
    """Behaves: a different zh line each turn, an image on a photo request, never a goodbye."""
    turn = sum(m["role"] == "assistant" for m in messages)
    last = _last_user(messages)
    if any(w in last for w in ("照片", "拍", "photo", "pic")):
        return "给你看看我窗外的风景<img><prompt>窗外的竹林和细雨</prompt><includePerson>false</includePerson></img>"
    return GOOD_LINES[(turn + len(model)) % len(GOOD_LINES)]


def bad_gateway(messages, model, body):
    """Repeats itself in English (language drift + cross-turn repetition, no image on a photo
    request) in two scenarios of three, picked by a hash of the conversation id; else behaves."""
    cid = (body.get("conversation_id") or "") if isinstance(body, dict) else ""
    if int(hashlib.sha1(cid.encode()).hexdigest(), 16) % 3 == 0:
        return good_gateway(messages, model, body)
    return BAD_LINE


def user_agent(messages, model, body):
    n = sum(m["role"] == "assistant" for m in messages)  # the user agent's own earlier lines
    return [
        "你好呀，在干嘛呢",
        "哈哈真的吗，后来呢",
        "我最近工作好累啊",
        "周末你打算去哪儿玩",
        "给我讲讲你小时候",
    ][n % 5]


def host_agent(messages, model, body):
    return "继续"


def judge_agent(messages, model, body):
    bad = "weather today" in messages[-1]["content"]
    dims = {d: (2 if bad else 8) for d in sp.DIMENSIONS}
    return json.dumps({"dimensions": dims, "rules": {}, "narration": False, "reason": "stand-in"})


def selfplay_params(tmp_path, urls: dict[str, str], candidate: str, champion: str, n: int = 12) -> dict:
    cat = tmp_path / "characters.jsonl"
    cat.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in CHARACTERS), encoding="utf-8")
    agent = {"api_key_env": "TROUPE_TEST_NO_KEY", "max_retries": 0, "timeout_s": 10}
    return {
        "paths": {"catalogue": str(cat), "selfplay": str(tmp_path / "selfplay")},
        "synthesis": {"scenarios": "configs/scenarios.yaml", "characters": ""},
        "agents": {
            "user": {**agent, "base_url": urls["user"], "model": "user-standin"},
            "character": {"temperature": 0.7, "max_tokens": 80},
            "host": {**agent, "base_url": urls["host"], "model": "host-standin"},
            "judge": {**agent, "base_url": urls["judge"], "model": "judge-standin", "parse_retries": 0},
        },
        "selfplay": {
            "candidate_url": urls[candidate], "champion_url": urls[champion], "api_key_env": "TROUPE_TEST_NO_KEY",
            "conversations": n, "max_turns": 4, "seed": 3, "concurrency": 4, "bootstrap_resamples": 500,
        },
        "eval": {"confidence": 0.95},
    }  # fmt: skip


@pytest.fixture(scope="module")
def servers():
    with (
        StandIn(good_gateway) as good,
        StandIn(bad_gateway) as bad,
        StandIn(user_agent) as user,
        StandIn(host_agent) as host,
        StandIn(judge_agent) as judge,
    ):
        yield {"good": good, "bad": bad, "user": user, "host": host, "judge": judge}


@pytest.fixture(scope="module")
def bad_candidate(servers, tmp_path_factory):
    """Self-play with the misbehaving gateway as the candidate: ``(params, metrics.json document)``."""
    tmp = tmp_path_factory.mktemp("selfplay-bad")
    params = selfplay_params(tmp, {k: s.base_url for k, s in servers.items()}, "bad", "good")
    return params, sp.run_selfplay(params)


def test_selfplay_shows_the_bad_candidate_worse(bad_candidate, servers):
    params, doc = bad_candidate
    out = tmp = params["paths"]["selfplay"]
    # both sides played the same scenarios through their own gateways, the character id as the model
    cand_models = {r["model"] for r in servers["bad"].requests}
    assert cand_models == {c["id"] for c in CHARACTERS} & cand_models and cand_models
    cand = [json.loads(x) for x in open(f"{out}/candidate/conversations.jsonl", encoding="utf-8")]
    champ = [json.loads(x) for x in open(f"{out}/champion/conversations.jsonl", encoding="utf-8")]
    assert {c["scenario"]["id"] for c in cand} == {c["scenario"]["id"] for c in champ} and len(cand) == 12
    assert {c["label"] for c in cand} == {"candidate"} and {c["label"] for c in champ} == {"champion"}
    assert doc["scenarios"]["paired"] == 12 and doc["sides"]["candidate"]["judged"] == 12
    for metric in ("repetition", "language_drift", "rule_breaks"):
        d = doc["paired"][metric]
        assert d["n"] == 12 and d["lo"] > 0, (metric, d)  # candidate worse, interval excluding 0
        c, b = doc["metrics"]["candidate"][metric], doc["metrics"]["champion"][metric]
        assert c["value"] > b["value"] and c["n"] == b["n"] == 12
    assert doc["paired"]["judge_human_likeness"]["hi"] < 0
    # the photo probe: the good gateway always answers with an image, the bad one only in its good third
    photo = doc["metrics"]["champion"]["photo_probe_image"]
    assert photo["n"] >= 1 and photo["value"] == 1.0 and photo["method"] == "wilson"
    # per-scenario values back the paired estimate (what the gate recomputes from)
    vals = doc["values"]["repetition"]
    diffs = [v["candidate"] - v["champion"] for v in vals.values()]
    assert doc["paired"]["repetition"]["value"] == pytest.approx(sum(diffs) / len(diffs))
    # the written files: metrics.json as returned, a report with the plots and both transcripts
    assert json.loads(open(f"{out}/metrics.json", encoding="utf-8").read())["paired"] == doc["paired"]
    report = open(f"{tmp}/report.html", encoding="utf-8").read()
    assert report.count("data:image/png;base64,") == 2
    assert BAD_LINE in report and GOOD_LINES[0][:8] in report and "[probe: " in report
    assert "judge (ok)" in report


def test_selfplay_rerun_skips_finished_conversations(bad_candidate, servers):
    params, doc = bad_candidate
    before = len(servers["bad"].requests), len(servers["judge"].requests)
    again = sp.run_selfplay(params)
    assert (len(servers["bad"].requests), len(servers["judge"].requests)) == before
    assert again["paired"]["repetition"] == doc["paired"]["repetition"]


def test_selfplay_needs_both_gateways(tmp_path):
    from troupe.config import ConfigError

    params = selfplay_params(
        tmp_path, dict.fromkeys(("good", "bad", "user", "host", "judge"), ""), "good", "bad"
    )
    with pytest.raises(ConfigError, match="selfplay.candidate_url"):
        sp.run_selfplay(params)


# --- the registry gate's selfplay section ------------------------------------------------------------------

from troupe.registry import _read_selfplay, gate, load_policy, selfplay_gate  # noqa: E402
from troupe.stats import FAIL, INSUFFICIENT, PASS, combine  # noqa: E402


@pytest.fixture(scope="module")
def policy():
    return load_policy("configs/gate_policy.yaml")


def _with(policy: dict, **sec) -> dict:
    return {**policy, "selfplay": {**policy["selfplay"], **sec}}


def test_gate_fails_a_worse_candidate(bad_candidate, policy):
    params, _ = bad_candidate
    got = _read_selfplay(params)
    pol = _with(policy, min_n=10)
    verdicts, note = selfplay_gate(got, pol)
    by = {v.rule.split(":")[0]: v for v in verdicts}
    for m in ("selfplay.rule_breaks", "selfplay.repetition", "selfplay.language_drift"):
        assert by[m].status == FAIL and by[m].estimate.n == 12, by[m]
    assert "self-play" in note and params["selfplay"]["candidate_url"] in note
    # too few paired scenarios for min_n: insufficient, never a pass or a fail
    few, _ = selfplay_gate(
        got, _with(policy, metrics={"repetition": {"direction": "lower", "margin": 0.05, "min_n": 50}})
    )
    assert [v.status for v in few] == [INSUFFICIENT] and "below min_n 50" in few[0].detail
    # a metric the result does not have (the stand-in judge answers no rules): not measured, insufficient
    none, _ = selfplay_gate(got, _with(policy, metrics={"judge_rule_no_goodbye": {"direction": "lower"}}))
    assert [v.status for v in none] == [INSUFFICIENT] and "not measured" in none[0].detail
    # a policy at another confidence recomputes the paired interval from the per-scenario values
    wide, _ = selfplay_gate(got, {**pol, "confidence": 0.999})
    assert wide[0].estimate.confidence == 0.999


def test_gate_passes_a_better_candidate(servers, tmp_path, policy):
    params = selfplay_params(tmp_path, {k: s.base_url for k, s in servers.items()}, "good", "bad")
    sp.run_selfplay(params)
    verdicts, _ = selfplay_gate(_read_selfplay(params), _with(policy, min_n=10))
    by = {v.rule.split(":")[0]: v for v in verdicts}
    for m in ("selfplay.rule_breaks", "selfplay.repetition", "selfplay.language_drift"):
        assert by[m].status == PASS and by[m].estimate.hi < 0, by[m]


def test_gate_without_a_selfplay_result(policy, tmp_path):
    from tests.test_registry import GOOD_RATES, make_result

    result = make_result({"dpo": GOOD_RATES}, n=250)
    base = gate(result, {k: v for k, v in policy.items() if k != "selfplay"}, None)
    # the default policy (required: false) leaves the verdicts as they were and records why
    assert [v.to_dict() for v in gate(result, policy, None)] == [v.to_dict() for v in base]
    assert combine(base) == PASS
    verdicts, note = selfplay_gate(None, policy)
    assert verdicts == [] and "skipped" in note and "selfplay.required is false" in note
    # required: the missing result is insufficient evidence
    req = gate(result, _with(policy, required=True), None)
    assert combine(req) == INSUFFICIENT
    assert [v.rule for v in req if v.status == INSUFFICIENT] == ["selfplay (required)"]
    assert _read_selfplay({"paths": {"selfplay": str(tmp_path / "none")}}) is None
