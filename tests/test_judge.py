"""The rubric judge against a scripted OpenAI-compatible stand-in (tests/openai_standin.py: a real
uvicorn HTTP server on loopback, talked to by the real ``openai`` client through AgentClient). The
stand-in replaces a hosted LLM judge, which cannot be reached here; its answers are scripted per test
(messy, garbage, position-biased, copying the humans, random), and the judge's own parsing,
retries, aggregation and statistics are what is under test.
"""

from __future__ import annotations

import json
import math
import random
import re

import pytest

from tests.openai_standin import Fail, StandIn
from troupe.contract import Character
from troupe.dialogue import judge
from troupe.dialogue.client import AgentClient
from troupe.dialogue.contract import DIMENSIONS, JUDGED_RULE_IDS, HumanLabel
from troupe.persona import render_system_prompt

LIN = Character(
    id="lin",
    name="林黛玉",
    language="zh",
    profile={"身份": "贾府的表小姐", "性格": "多愁善感，才思敏捷"},
    style="说话含蓄，爱用诗句",
    examples=["你又来取笑我了。"],
)
MAX = Character(id="max", name="Max", language="en", profile={"job": "bush pilot"}, style="laconic")
YUKI = Character(id="yuki", name="Yuki", language="ja", profile={"job": "barista"})
CHARS = {c.id: c for c in (LIN, MAX, YUKI)}
CONTEXT = [{"role": "user", "content": "今天天气真好，要不要出去走走？"}]

GOOD = {
    "dimensions": {"human_likeness": 8, "purposefulness": 6, "consistency": 9, "engagement": 7},
    "rules": {r: r == "no_goodbye" for r in JUDGED_RULE_IDS},
    "narration": False,
    "reason": "ok",
}


def _client(url: str, **kw) -> AgentClient:
    return AgentClient(base_url=url, model="judge-1", temperature=0.0, max_tokens=400, role="judge", **kw)


def _user(body: dict) -> str:
    return body["messages"][-1]["content"]


def test_rubric_is_in_the_characters_language_and_carries_the_card():
    with StandIn(lambda m, model, b: json.dumps(GOOD)) as s:
        c = _client(s.base_url)
        zh = judge.score_reply(c, LIN, CONTEXT, "好呀，去沁芳闸桥那边看看花吧？", "i1", model="dpo", turn=1)
        en = judge.score_reply(c, MAX, [{"role": "user", "content": "Fly today?"}], "Sure, dawn.", "i2")
        ja = judge.score_reply(c, YUKI, [{"role": "user", "content": "コーヒーは?"}], "はい、どうぞ。", "i3")
        tr = judge.score_transcript(
            c,
            LIN,
            [*CONTEXT, {"role": "assistant", "content": "好呀"}, {"role": "user", "content": "走吧"}],
            "t1",
        )
    zh_sys, zh_user = (m["content"] for m in s.requests[0]["messages"])
    assert render_system_prompt(LIN) in zh_user  # the full persona card, as the model saw it
    assert "今天天气真好" in zh_user and "沁芳闸桥" in zh_user
    for word in ("评分维度", "拟人", "聊天目的性", "角色一致性", "吸引力", "旁白测试", "“我”换成“林黛玉”"):
        assert word in zh_sys, word
    assert all(r in zh_sys for r in JUDGED_RULE_IDS) and "sensitive_topics" not in zh_sys
    assert "Dimensions" not in zh_sys
    en_sys, en_user = (m["content"] for m in s.requests[1]["messages"])
    assert "Narration test" in en_sys and "human-likeness" in en_sys and render_system_prompt(MAX) in en_user
    ja_sys = s.requests[2]["messages"][0]["content"]
    assert "Japanese" in ja_sys and "Narration test" in ja_sys  # English rubric, the language named
    assert "整段对话" in _user(s.requests[3]) and "走吧" in _user(s.requests[3])
    assert zh.status == "ok" and zh.dimensions == GOOD["dimensions"] and zh.rules["no_goodbye"] is True
    assert (zh.item_id, zh.model, zh.turn, zh.character_id, zh.judge_model) == (
        "i1",
        "dpo",
        1,
        "lin",
        "judge-1",
    )
    assert en.status == ja.status == tr.status == "ok" and tr.turn is None
    assert c.usage.calls == 4  # the sync wrappers' calls are accounted on the caller's client


MESSY = [
    # fenced, with prose around it
    ('好的，我的评分如下：\n```json\n{"拟人": 8, "聊天目的性": 6, "角色一致性": 9, "吸引力": 7}\n```\n以上。',
     {"human_likeness": 8, "purposefulness": 6, "consistency": 9, "engagement": 7}, {}, None),
    # single quotes, trailing commas, Python literals, nested rules dict with 是/否
    ("Scores: {'dimensions': {'human_likeness': '8/10', 'purposefulness': '6分', 'consistency': 9.0, "
     "'engagement': '7',}, 'rules': {'no_goodbye': '是', 'in_character': '否，没有前缀'}, 'narration': False,}",
     {"human_likeness": 8, "purposefulness": 6, "consistency": 9, "engagement": 7},
     {"no_goodbye": True, "in_character": False}, False),
    # full-width digits and punctuation, Chinese keys, scores as nested objects
    ("｛“拟人”：｛“分数”：“８”｝，“吸引力”：“７分”，“旁白”：“是”｝",
     {"human_likeness": 8, "engagement": 7}, {}, True),
    # yes/no, rule numbers inside a rules object, English display names, a missing dimension
    ('{"human-likeness": 5, "character consistency": "4", "Purposefulness": 3, '
     '"rules": {"1": "yes", "4b": "no", "8": "YES - it narrates"}, "narration": "no"}',
     {"human_likeness": 5, "consistency": 4, "purposefulness": 3},
     {"in_character": True, "no_goodbye": False, "no_stage_directions": True}, False),
    # no JSON at all, but key: value lines
    ("human_likeness: 9\npurposefulness: 2\nnarration: no",
     {"human_likeness": 9, "purposefulness": 2}, {}, False),
    # a list of broken rules; an answer cut off by max_tokens
    ('{"scores": {"engagement": 6}, "broken_rules": ["no_goodbye"], "narration": tr',
     {"engagement": 6}, {"no_goodbye": True, "in_character": False}, None),
]  # fmt: skip


@pytest.mark.parametrize("text,dims,rules,narration", MESSY)
def test_messy_but_recoverable_answers_parse(text, dims, rules, narration):
    got = judge.parse_rubric(text)
    assert {d: v for d, v in got["dimensions"].items() if v is not None} == dims
    assert set(got["dimensions"]) == set(DIMENSIONS) and set(got["rules"]) == set(JUDGED_RULE_IDS)
    for r, v in rules.items():
        assert got["rules"][r] is v, r
    assert got["narration"] is narration


def test_out_of_range_or_odd_values_are_none_never_zero():
    got = judge.parse_rubric(
        '{"human_likeness": 0, "purposefulness": 11, "consistency": "4/5", "engagement": true, '
        '"rules": {"no_goodbye": "maybe"}, "narration": "是"}'
    )
    assert got["dimensions"] == dict.fromkeys(DIMENSIONS)
    assert got["rules"]["no_goodbye"] is None and got["narration"] is True
    assert (
        judge.parse_score("7.5") == 8 and judge.parse_score("八分") == 8 and judge.parse_score("10/10") == 10
    )
    for garbage in ("I think the reply is quite good.", "", '{"reason": "fine"}', "[1, 2, 3]"):
        with pytest.raises(ValueError):
            judge.parse_rubric(garbage)
    assert judge.parse_json_answer("答：{'a': 1,}") == {"a": 1}


def test_garbage_is_retried_then_recorded_unparseable_and_the_run_goes_on():
    """Item "bad" always gets prose: asked 1 + parse_retries times, then unparseable (raw kept, values
    None); item "down" hits HTTP 500: failed; the other items are scored; summaries show both rates."""

    def respond(messages, model, body):
        user = messages[-1]["content"]
        if "BAD-REPLY" in user:
            return "I think it is a lovely reply, well done!"
        if "DOWN-REPLY" in user:
            raise Fail(500)
        return "```json\n" + json.dumps(GOOD) + "\n```"

    replies = ["好呀", "BAD-REPLY", "走吧", "DOWN-REPLY", "嗯嗯"]
    items = [judge.JudgeItem(f"i{k}", LIN, CONTEXT, r, model="m") for k, r in enumerate(replies)]
    with StandIn(respond) as s:
        scores = judge.score_many(_client(s.base_url, parse_retries=2, max_retries=0), items, concurrency=3)
    assert [x.item_id for x in scores] == [i.item_id for i in items]  # in order, none lost
    bad, down = scores[1], scores[3]
    assert sum("BAD-REPLY" in _user(b) for b in s.requests) == 3 and bad.attempts == 3
    assert bad.status == "unparseable" and bad.raw.startswith("I think") and bad.dimensions == {}
    assert down.status == "failed" and "500" in down.raw
    assert all(x.status == "ok" for k, x in enumerate(scores) if k not in (1, 3))
    assert judge.item_values(bad)["judge_human_likeness"] is None
    m = judge.summarise(scores)
    hl = m["judge_human_likeness"]
    assert hl.n == 3 and hl.value == 8  # unparseable and failed are not zeros
    assert (m["judge_unparseable"].k, m["judge_unparseable"].n) == (1, 5)
    assert (m["judge_failed"].k, m["judge_failed"].n) == (1, 5)
    assert (m["judge_rule_no_goodbye"].k, m["judge_rule_no_goodbye"].n) == (3, 3)
    assert m["judge_unparseable"].lo < 0.2 < m["judge_unparseable"].hi  # Wilson interval around 1/5
    for e in m.values():
        assert e.n > 0


def _reply_blocks(user: str) -> tuple[str, str]:
    a = re.search(r"\[(?:回复A|Reply A)\]\n(.*?)\n\[/", user, re.S).group(1)
    b = re.search(r"\[(?:回复B|Reply B)\]\n(.*?)\n\[/", user, re.S).group(1)
    return a, b


def test_pairwise_position_bias_gives_ties_and_a_consistent_judge_the_right_winner():
    good, bad = "好呀，去桥边看花？", "作为一个AI，我无法出门。"
    with StandIn(lambda m, model, b: '{"winner": "A", "reason": "first is better"}') as s:
        c = _client(s.base_url)
        r = judge.compare(c, LIN, CONTEXT, good, bad, "p1", "dpo", "base")
    assert r.status == "ok" and r.winner == "tie" and r.consistent is False and r.verdicts == ["a", "b"]
    assert len(r.raw) == 2 and _reply_blocks(_user(s.requests[0])) == (good, bad)
    assert _reply_blocks(_user(s.requests[1])) == (bad, good)  # asked in both orders

    def prefers_the_in_character_reply(messages, model, body):
        a, b = _reply_blocks(messages[-1]["content"])
        return "Reply " + ("B" if "AI" in a else "A") + " is better." if "AI" in a + b else "tie"

    with StandIn(prefers_the_in_character_reply) as s:
        c = _client(s.base_url)
        one = judge.compare(c, LIN, CONTEXT, good, bad)
        two = judge.compare(c, LIN, CONTEXT, bad, good)
    assert one.winner == "a" and two.winner == "b" and one.consistent and two.consistent

    with StandIn(lambda m, model, b: "no idea") as s:
        r = judge.compare(_client(s.base_url, parse_retries=1), LIN, CONTEXT, good, bad)
    assert r.status == "unparseable" and r.winner is None and len(s.requests) == 4


def _simulate(true: dict[str, float], n: int, seed: int) -> list[tuple[str, str, float]]:
    rng = random.Random(seed)
    names = list(true)
    out = []
    for _ in range(n):
        i, j = rng.sample(names, 2)
        p = 1 / (1 + math.exp(true[j] - true[i]))
        u = rng.random()
        out.append((i, j, 0.5 if abs(u - p) < 0.03 else 1.0 if u < p else 0.0))  # a few ties
    return out


def test_bradley_terry_recovers_a_known_ordering_with_covering_intervals():
    true = {"v1": -1.2, "v2": -0.3, "v3": 0.4, "v4": 1.1}  # mean 0
    comps = _simulate(true, 800, seed=3)
    ratings = judge.bradley_terry(comps, resamples=300, seed=1)
    assert sorted(ratings, key=lambda m: ratings[m].value) == ["v1", "v2", "v3", "v4"]
    assert abs(sum(e.value for e in ratings.values())) < 1e-9  # anchored at mean 0
    for m, e in ratings.items():
        assert e.lo <= true[m] <= e.hi, (m, e)
        assert e.n == sum(m in c[:2] for c in comps) and e.method == "parametric-bootstrap"
        assert e.hi - e.lo < 0.8
    ref = judge.bradley_terry(comps, resamples=100, reference="v1")
    assert ref["v1"].value == ref["v1"].lo == ref["v1"].hi == 0.0
    assert ref["v4"].value == pytest.approx(ratings["v4"].value - ratings["v1"].value)
    # a model that wins every comparison still gets a finite rating (the prior's virtual ties)
    sweep = judge.bradley_terry([("a", "b", "a")] * 20 + [("b", "c", "tie")] * 5, resamples=50)
    assert all(math.isfinite(e.value) for e in sweep.values()) and sweep["a"].value > sweep["b"].value
    with pytest.raises(ValueError, match="outcome"):
        judge.bradley_terry([("a", "b", 2)])
    with pytest.raises(ValueError, match="reference"):
        judge.bradley_terry(comps, reference="nope")


def test_log_ratings_writes_one_run_per_table(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    ratings = judge.bradley_terry(_simulate({"troupe/3": 0.5, "troupe/4": -0.5}, 200, 0), resamples=50)
    run_id = judge.log_ratings(ratings, "selfplay", reference=None, comparisons=200)
    run = mlflow.MlflowClient().get_run(run_id)
    got = run.data.metrics
    assert got["rating.troupe/3"] == pytest.approx(ratings["troupe/3"].value)
    assert got["rating.troupe/3.n"] == 200 and got["rating.troupe/4.lo"] == pytest.approx(
        ratings["troupe/4"].lo
    )
    assert run.data.params["reference"] == "mean-0" and run.data.tags["troupe.ratings_table"] == "selfplay"


def _labels(n: int, seed: int) -> list[HumanLabel]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        dims = {s: {d: rng.randint(1, 10) for d in DIMENSIONS} for s in ("a", "b")}
        sa, sb = (sum(dims[s].values()) for s in ("a", "b"))
        out.append(
            HumanLabel(
                item_id=f"it{i}", annotator="ann", character_id="lin", context=CONTEXT,
                reply_a=f"reply-{i}-a", reply_b=f"reply-{i}-b", model_a="dpo", model_b="base",
                choice="a" if sa > sb else "b" if sb > sa else "tie", dimensions=dims,
                broken_rules={"a": ["no_goodbye"] if i % 3 == 0 else [], "b": []},
            )
        )  # fmt: skip
    return out


def test_calibration_agrees_for_a_copying_judge_and_not_for_a_random_one():
    labels = _labels(60, seed=0)
    truth = {f"{lab.reply_a}": (lab, "a") for lab in labels} | {
        f"{lab.reply_b}": (lab, "b") for lab in labels
    }

    def copies(messages, model, body):
        lab, side = truth[re.search(r"reply-\d+-[ab]", messages[-1]["content"]).group(0)]
        broken = side == "a" and "no_goodbye" in lab.broken_rules["a"]
        return json.dumps({"dimensions": lab.dimensions[side], "rules": {"no_goodbye": broken}})

    rng = random.Random(7)

    def random_judge(messages, model, body):
        return json.dumps({"dimensions": {d: rng.randint(1, 10) for d in DIMENSIONS},
                           "rules": {"no_goodbye": rng.random() < 0.5}})  # fmt: skip

    results = {}
    for name, respond in (("copy", copies), ("random", random_judge)):
        with StandIn(respond) as s:
            scores = judge.score_labels(_client(s.base_url), labels, CHARS, concurrency=8)
        assert len(s.requests) == 120 and all(x.status == "ok" for x in scores)
        results[name] = judge.calibration(scores, labels, resamples=500)
    copy, rand = results["copy"], results["random"]
    for d in DIMENSIONS:
        c, r = copy[f"spearman_{d}"], rand[f"spearman_{d}"]
        assert c.n == r.n == 120 and c.value == pytest.approx(1.0) and c.lo > 0.9
        assert r.lo < 0.0 < r.hi and r.value < 0.4  # no evidence of agreement
    strict = sum(lab.choice in ("a", "b") for lab in labels)
    assert copy["choice_agreement"].n == strict and copy["choice_agreement"].value == 1.0
    assert (
        rand["choice_agreement"].hi < 1.0 and rand["choice_agreement"].lo < 0.5 < rand["choice_agreement"].hi
    )
    assert copy["rule_no_goodbye_agreement"].value == 1.0 and copy["rule_no_goodbye_agreement"].n == 120
    assert rand["rule_no_goodbye_agreement"].value < 0.7
    # a dimension people did not score is reported as not measured, not as agreement
    unscored = [lab.model_copy(update={"dimensions": {}}) for lab in labels]
    assert judge.calibration(scores, unscored, resamples=50)["spearman_engagement"].n == 0
    # pairwise winners joined on item_id
    pw = [judge.PairwiseResult(item_id=lab.item_id, winner=lab.choice) for lab in labels]
    assert judge.calibration([], labels, pairwise=pw, resamples=10)["pairwise_agreement"].value == 1.0


def test_a_judge_score_for_an_unknown_label_character_is_named():
    lab = _labels(1, 0)[0].model_copy(update={"character_id": "ghost"})
    with pytest.raises(KeyError, match="ghost"):
        judge.label_items([lab], CHARS)


def test_evaluate_with_the_judge_on_writes_judge_metrics_with_n(tiny_model_dir, tmp_path, monkeypatch):
    """``troupe evaluate`` on the tiny model with eval.judge on and agents.judge at the stand-in: every
    sample carries per-item judge values (None when unparseable), each split's metrics the judge
    summaries with n; one answer of garbage does not stop the run."""
    from pathlib import Path

    import yaml

    from troupe.contract import Dialogue, read_jsonl, write_jsonl
    from troupe.eval_contract import EvalResult
    from troupe.evaluate import evaluate

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    repo = Path(__file__).resolve().parents[1]
    chars = read_jsonl(repo / "data" / "sample" / "characters.jsonl", Character)
    ds = read_jsonl(repo / "data" / "sample" / "dialogues.jsonl", Dialogue)
    splits = tmp_path / "splits"
    splits.mkdir()
    write_jsonl(splits / "characters.jsonl", chars)
    for name, part in (("train", ds[:2]), ("heldout_dialogues", ds[:2]), ("heldout_characters", ds[2:4])):
        write_jsonl(splits / f"{name}.jsonl", part)  # distinct items per split: one garbage prompt in all
    garbage_for: list[str] = []

    def respond(messages, model, body):
        user = messages[-1]["content"]
        if not garbage_for or garbage_for[0] == user:
            garbage_for[:1] = [user]
            return "Sorry, I cannot judge this."
        return json.dumps(GOOD)

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["paths"].update(splits=str(splits), base_model=str(tiny_model_dir), eval=str(tmp_path / "eval"))
    params["paths"]["eval_base"] = ""
    params["eval"].update(models=["base"], max_new_tokens=4, max_replies_per_split=2, judge=True)
    with StandIn(respond) as s:
        params["agents"]["judge"].update(base_url=s.base_url, model="judge-1", parse_retries=1)
        metrics = evaluate(params)
    assert len(s.requests) == 4 + 1  # 2 items x 2 splits, plus one retry of the garbage answer
    per_split = metrics["base"]
    assert sum(per_split[sp]["judge_unparseable"].k for sp in per_split) == 1
    for sp, m in per_split.items():
        assert m["judge_unparseable"].n == 2 and m["judge_failed"].k == 0
        hl = m["judge_human_likeness"]
        assert hl.n == 2 - m["judge_unparseable"].k and (hl.n == 0 or hl.value == 8), (sp, hl)
        assert m["judge_rule_no_goodbye"].n == hl.n
    written = EvalResult.read(tmp_path / "eval")
    assert written.metrics["base"]["heldout_dialogues"]["judge_unparseable"].n == 2
    values = [smp["scores"]["judge_consistency"] for smp in written.samples]
    assert sorted(values, key=lambda v: v is None) == [9.0, 9.0, 9.0, None]
    assert sum(smp["judge"]["status"] == "unparseable" for smp in written.samples) == 1
