"""The CharacterEval protocol suite (troupe.dialogue.charactereval) on ten real items
(tests/fixtures/charactereval_mini) with the tiny random model generating and a scripted judge
(tests/openai_standin.py: a real HTTP server spoken to by the real `openai` client).

Proves: only the item's id2metric metrics are asked; the judge sees the generation's first line; an
item without id2metric is counted and never generated or asked; unparseable and failed judgements are
counted and are missing values, not zeros; every metric and dimension has n and an interval; the
report names the judge and says the figures are not leaderboard-comparable; malformed records are
reported with file:line; CharacterEval's characters stay out of training when the suite is on.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.openai_standin import Fail, StandIn
from troupe.config import ConfigError
from troupe.contract import Character, Dialogue, Message
from troupe.data.split import SPLITS, charactereval_characters, split_dialogues
from troupe.dialogue import charactereval as ce

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "tests/fixtures/charactereval_mini"
REAL = ROOT.parent / "shared/data/charactereval"
UNPARSEABLE_ITEM = "3136"  # 佟湘玉, metrics Exposure + Consistency; context "莫小贝：你们仨不要欺人太甚。"
FAILED_ITEM = "7254"  # 佟湘玉, metric Empathy; context "郭芙蓉：怎么灰这样呢小青"
HIGH_ITEM = "2859"  # 老默, 7 metrics, judged 5 (every other item 3)


def _asked(prompt: str) -> list[str]:
    """The metric names a judge prompt asks for (lines "- Name（zh）：definition")."""
    return re.findall(r"^- ([A-Za-z_]+)（", prompt, re.M)


def _reply_in(prompt: str) -> str:
    return prompt.split("的下一句）\n", 1)[1].split("\n\n【评价指标】", 1)[0]


def _judge(messages, model, body):
    """Scores: 5 for every metric of HIGH_ITEM, 3 otherwise; prose for UNPARSEABLE_ITEM; 500 for FAILED_ITEM."""
    prompt = messages[-1]["content"]
    if "你们仨不要欺人太甚" in prompt:
        return "我觉得这句回复还不错，挺符合角色的。"
    if "怎么灰这样呢小青" in prompt:
        raise Fail(500)
    score = 5 if "哪来的娃" in prompt else 3
    return "好的，评分如下：\n```json\n" + json.dumps({m: score for m in _asked(prompt)}) + "\n```"


def _params(tmp_path: Path, model_dir: Path, base_url: str, **ce_overrides) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"].update(charactereval=str(tmp_path / "ce"), sft_model=str(model_dir))
    params["charactereval"].update(path=str(MINI), model="sft", max_new_tokens=24, **ce_overrides)
    params["agents"]["judge"].update(
        base_url=base_url, model="stand-in-judge", max_retries=0, parse_retries=1
    )
    return params


@pytest.fixture(scope="module")
def lines_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny random model rewired so that greedy decoding writes "Yes", a newline, "Yes", ...: the
    transformer blocks' output projections are zeroed (each position's hidden state is its own token's
    embedding) and an untied output head maps a newline to "Yes" and "Yes" to a newline. A real
    checkpoint through the real generator whose first line is known (the random one writes only
    newlines, which the generator strips)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("lines_model")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    (nl,), (yes,) = (tok.encode(t, add_special_tokens=False) for t in ("\n", "Yes"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        h = model.model.norm(emb[[nl, yes]])
        head = emb.detach().clone()
        head[yes], head[nl] = 50 * h[0] / h[0].norm(), 50 * h[1] / h[1].norm()
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def suite_run(lines_model_dir, tmp_path_factory):
    """One whole run of the suite on the mini fixture (generation, judge, files); shared by the tests."""
    tmp = tmp_path_factory.mktemp("ce_run")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
    mp.chdir(tmp)
    try:
        with StandIn(_judge) as judge:
            result = ce.run_suite(_params(tmp, lines_model_dir, judge.base_url))
            requests = list(judge.requests)
    finally:
        mp.undo()
    out = tmp / "ce"
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines()]  # noqa: E731
    return {"result": result, "requests": requests, "out": out, "replies": read("replies.jsonl"),
            "scores": read("scores.jsonl"), "base_url": judge.base_url}  # fmt: skip


def test_only_the_items_id2metric_metrics_are_asked(suite_run):
    bench = ce.load_benchmark(MINI)
    by_context = {i.context.split("\n")[-1]: i for i in bench.items}
    asked_items = set()
    for body in suite_run["requests"]:
        prompt = body["messages"][-1]["content"]
        item = next(i for tail, i in by_context.items() if tail in prompt)
        assert _asked(prompt) == list(item.metrics), item.id  # exactly its metrics, in id2metric order
        asked_items.add(item.id)
    assert asked_items == {i.id for i in bench.scoreable}
    assert "9486" not in asked_items and "9486" not in {r["id"] for r in suite_run["replies"]}
    # every metric of the benchmark is defined in the rubric the judge gets
    assert {m for i in bench.items for m in i.metrics} == set(ce.METRICS)


def test_the_judge_scores_the_first_line_of_the_generation(suite_run):
    replies = {r["id"]: r for r in suite_run["replies"]}
    for r in replies.values():
        assert r["raw"].startswith("Yes\nYes") and r["reply"] == "Yes"
        assert {"id", "role", "context", "raw", "reply"} <= set(r)
    for body in suite_run["requests"]:
        prompt = body["messages"][-1]["content"]
        rid = next(i for i, r in replies.items() if r["context"] in prompt)
        assert _reply_in(prompt) == "Yes"  # the first line, not the whole generation
        assert replies[rid]["raw"] not in prompt
    assert ce.first_line("额滴神呀。\n白展堂：掌柜的！") == "额滴神呀。"
    assert ce.first_line("  \n") == "" and ce.first_line("一句") == "一句"


def test_unparseable_and_failed_are_counted_and_never_zero(suite_run):
    cov = suite_run["result"]["coverage"]
    assert cov["records"] == cov["items"] + cov["malformed_records"] == 10
    assert cov["items"] == cov["scoreable"] + cov["without_id2metric"] and cov["without_id2metric_ids"] == [
        "9486"
    ]
    assert cov["sampled"] == 9 == cov["scored"] + cov["unparseable"] + cov["failed"]
    assert (cov["scored"], cov["unparseable"], cov["failed"]) == (7, 1, 1)
    assert cov["metric_pairs"] == cov["scored_pairs"] + cov["unscored_pairs"] and cov["unscored_pairs"] == 3
    scores = {s["item_id"]: s for s in suite_run["scores"]}
    bad = scores[UNPARSEABLE_ITEM]
    assert bad["status"] == "unparseable" and bad["attempts"] == 2  # 1 + parse_retries
    assert bad["dimensions"] == {"Exposure": None, "Consistency": None} and "不错" in bad["raw"]
    assert scores[FAILED_ITEM]["status"] == "failed" and scores[FAILED_ITEM]["dimensions"] == {
        "Empathy": None
    }
    assert "500" in scores[FAILED_ITEM]["raw"]
    m = suite_run["result"]["metrics"]
    # Exposure: HIGH_ITEM 5 + the unparseable item; a zero for the latter would give 2.5
    assert m["Exposure"]["value"] == 5.0 and m["Exposure"]["n"] == 1
    # Empathy asked of 3040 (3), 2865 (3) and the failed 7254: mean 3 over n=2
    assert m["Empathy"]["value"] == 3.0 and m["Empathy"]["n"] == 2
    # Accuracy: 3040 (3), 2859 (5), 10983 (3)
    assert m["Accuracy"]["value"] == pytest.approx(11 / 3) and m["Accuracy"]["n"] == 3


def test_metrics_and_dimensions_have_n_and_intervals(suite_run):
    res = suite_run["result"]
    on_disk = json.loads((suite_run["out"] / "metrics.json").read_text())
    assert on_disk["coverage"] == res["coverage"] and on_disk["comparable_with_leaderboard"] is False
    assert set(res["dimensions"]) == set(ce.CE_DIMENSIONS) and set(res["metrics"]) == set(ce.METRICS)
    for est in [*res["metrics"].values(), *res["dimensions"].values(), res["overall"]["overall"]]:
        assert est["n"] >= 1 and est["confidence"] == 0.95 and est["method"] == "bootstrap"
        if est["clusters"] == 1:  # one scene: no between-scene variation, no interval (troupe.stats)
            assert est["lo"] is None and est["hi"] is None
        else:
            assert 1 <= est["lo"] <= est["value"] <= est["hi"] <= 5
    assert all(e["clusters"] >= 2 for e in [*res["dimensions"].values(), res["overall"]["overall"]])
    # character consistency = mean of its five metric means (the paper's dimension average)
    cc = ce.CE_DIMENSIONS["character_consistency"][1]
    expect = sum(res["metrics"][k]["value"] for k in cc) / len(cc)
    assert res["dimensions"]["character_consistency"]["value"] == pytest.approx(expect)
    assert res["dimensions"]["character_consistency"]["n"] == sum(res["metrics"][k]["n"] for k in cc)
    assert (
        res["dimensions"]["conversational_ability"]["hi"] > res["dimensions"]["conversational_ability"]["lo"]
    )


def test_report_names_the_judge_and_is_not_leaderboard_comparable(suite_run):
    doc = (suite_run["out"] / "report.html").read_text()
    assert suite_run["base_url"] in doc and "stand-in-judge" in doc
    assert "NOT comparable" in doc and "CharacterRM" in doc
    assert (
        "data:image/png;base64," in doc and (suite_run["out"] / "plots/charactereval.png").stat().st_size > 0
    )
    assert suite_run["result"]["judge"] == {"base_url": suite_run["base_url"], "model": "stand-in-judge"}


def test_parse_scores_is_tolerant_but_strict_on_range_and_coverage():
    assert ce.parse_scores('{"accuracy": "4分", "言语一致性": 5.0} 以上', ["Accuracy", "Utterance"]) == {
        "Accuracy": 4,
        "Utterance": 5,
    }
    assert ce.parse_scores("```json\n{'Empathy': '3/5',}\n```", ["Empathy"]) == {"Empathy": 3}
    for bad in ('{"Accuracy": 0}', '{"Accuracy": 6}', '{"Accuracy": 3.5}', '{"Fluency": 3}', "四分"):
        with pytest.raises(ValueError):
            ce.parse_scores(bad, ["Accuracy"])


def test_malformed_records_and_entries_are_reported_with_file_and_line(tmp_path):
    d = tmp_path / "ce"
    shutil.copytree(MINI, d)
    recs = json.loads((d / "test_data.jsonl").read_text())
    lines = [json.dumps(r, ensure_ascii=False) for r in recs]
    lines.insert(2, '{"id": 77, "role": "老默", "context": ')  # broken JSON line
    lines.insert(4, json.dumps({"id": 78, "context": "x"}))  # no role
    lines.append(json.dumps(recs[0], ensure_ascii=False))  # duplicate id
    (d / "test_data.jsonl").write_text("\n".join(lines) + "\n")  # JSON Lines this time
    m = json.loads((d / "id2metric.jsonl").read_text())
    m["208"] = [["Coherence", "对话连贯性"], ["Charm", "魅力"]]
    (d / "id2metric.jsonl").write_text(json.dumps(m, ensure_ascii=False, indent=4))
    bench = ce.load_benchmark(d)
    where = {(Path(p["file"]).name, p["line"]): p["reason"] for p in bench.problems}
    assert "JSON" in where[("test_data.jsonl", 3)]
    assert "role" in where[("test_data.jsonl", 5)] and "duplicate id 3040" in where[("test_data.jsonl", 13)]
    line_208 = next(
        n for n, x in enumerate((d / "id2metric.jsonl").read_text().splitlines(), 1) if '"208"' in x
    )
    assert "Charm" in where[("id2metric.jsonl", line_208)]
    assert bench.records == len(bench.items) + 3 == 13
    assert next(i for i in bench.items if i.id == "208").metrics == ("Coherence",)  # the known metric stays


def test_seeded_sample_and_config_errors(tmp_path, tiny_model_dir):
    items = ce.load_benchmark(MINI).scoreable
    a, b = ce.sample_items(items, 4, 1), ce.sample_items(items, 4, 1)
    assert [i.id for i in a] == [i.id for i in b] and len(a) == 4
    assert [i.id for i in a] == [i.id for i in items if i in a]  # file order kept
    assert ce.sample_items(items, 0, 1) == items
    p = _params(tmp_path, tiny_model_dir, "")
    with pytest.raises(ConfigError, match="agents.judge.base_url"):
        ce.run_suite(p)
    p = _params(tmp_path, tmp_path / "no-model", "http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="paths.sft_model"):
        ce.run_suite(p)


def test_prompt_is_the_persona_card_and_the_script_as_turns():
    from troupe.persona import render_system_prompt

    bench = ce.load_benchmark(MINI)
    item = next(i for i in bench.items if i.id == "2865")  # 老默 speaks first, then 李响
    card = ce.item_card(item, bench.profiles)
    msgs = ce.prompt_messages(item, card)
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith(render_system_prompt(card))
    assert card.profile["姓名"] == "陈金默" and card.language == "zh"
    assert msgs[-1] == {"role": "user", "content": "李响: 意思是，你有一个女儿，亲生的。"}
    assert [m["role"] for m in msgs[1:]] == ["user", "assistant", "user"]
    # an item whose role never speaks in the context (the importer would reject it) still has a prompt
    solo = next(i for i in bench.items if i.id == "3040")
    assert ce.prompt_messages(solo, ce.item_card(solo, bench.profiles))[1:] == [
        {"role": "user", "content": "高启强: 李宏伟醒了！"}
    ]


@pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/charactereval not present")
def test_real_benchmark_loads_whole():
    bench = ce.load_benchmark(REAL)
    assert bench.records == len(bench.items) == 4564 and not bench.problems
    assert len(bench.without_metrics) == 33 and len({i.role for i in bench.items}) == 77
    assert {m for i in bench.items for m in i.metrics} == set(ce.METRICS)


def test_split_keeps_charactereval_characters_out_of_training():
    chars = {
        "ce-lao": Character(id="ce-lao", name="老默", language="zh"),
        "max": Character(id="max", name="Max", language="en"),
        "ann": Character(id="ann", name="Ann", language="en"),
    }

    def dia(i: int, cid: str, **kw) -> Dialogue:
        msgs = [Message(role="user", content=f"hi {cid} {i}"), Message(role="assistant", content=f"yo {i}")]
        return Dialogue(id=f"{cid}-{i}", character_id=cid, messages=msgs, **kw)

    ds = [dia(i, "ce-lao", source="charactereval", meta={"charactereval_id": i}) for i in range(5)]
    ds += [dia(i, c) for c in ("max", "ann") for i in range(5)]
    split = {"heldout_characters": 0, "heldout_dialogue_share": 0.2, "seed": 0}
    assert charactereval_characters(ds) == {"ce-lao"}
    off = split_dialogues(ds, chars, split)
    assert "ce-lao" in {d.character_id for d in off.train}  # without the suite they train
    on = split_dialogues(ds, chars, split, charactereval_characters(ds))
    assert all(d.character_id != "ce-lao" for s in SPLITS for d in getattr(on, s))
    rep = on.report
    assert rep["excluded"]["characters"] == ["ce-lao"] and rep["excluded"]["dialogues"] == 5
    assert rep["in"] == len(ds) == rep["excluded"]["dialogues"] + sum(rep["before_caps"].values())


def test_split_dir_reads_eval_suites(tmp_path):
    from troupe.contract import write_jsonl
    from troupe.data.split import split_dir

    src = tmp_path / "validated"
    src.mkdir()
    chars = [
        Character(id="ce-lao", name="老默", language="zh"),
        Character(id="max", name="Max", language="en"),
    ]
    ds = [
        Dialogue(id=f"{c}-{i}", character_id=c, source="charactereval" if c == "ce-lao" else "",
                 messages=[Message(role="user", content=f"q {c} {i}"), Message(role="assistant", content="a")])
        for c in ("ce-lao", "max") for i in range(3)
    ]  # fmt: skip
    write_jsonl(src / "characters.jsonl", chars)
    write_jsonl(src / "dialogues.jsonl", ds)
    params = {"paths": {"validated": str(src), "splits": str(tmp_path / "splits")},
              "split": {"heldout_characters": 0, "heldout_dialogue_share": 0.0, "seed": 0}}  # fmt: skip
    assert {d.character_id for d in split_dir(params).train} == {"ce-lao", "max"}
    params["eval"] = {"suites": ["heldout", "charactereval"]}
    res = split_dir(params)
    assert {d.character_id for d in res.train} == {"max"}
    on_disk = json.loads((tmp_path / "splits/split_report.json").read_text())
    assert on_disk["excluded"]["dialogues"] == 3
