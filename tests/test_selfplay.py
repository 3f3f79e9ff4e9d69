"""Self-play evaluation (troupe/dialogue/selfplay.py): conversation metrics on hand-built
conversations (each rule broken and kept), the paired comparison, run_selfplay against stand-in
gateways (real HTTP servers on loopback, the real ``openai`` client), and the registry gate's
``selfplay`` section."""

from __future__ import annotations

import math

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
    # a probe metric no conversation had: n = 0, not a pass
    assert got["paired"]["photo_probe_image"].n == 0 and math.isnan(got["paired"]["photo_probe_image"].value)
    # 0/1 per conversation -> Wilson; shares -> bootstrap
    assert got["metrics"][sp.CHAMPION]["early_rule_break"].method == "wilson"
    assert got["metrics"][sp.CHAMPION]["rule_breaks"].method == "bootstrap"
    assert got["values"]["repetition"]["s11"] == {sp.CANDIDATE: None, sp.CHAMPION: 0.0}
