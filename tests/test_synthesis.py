"""``troupe data synthesize`` -> ``troupe data import`` -> validate -> split, on a real HTTP stand-in.

The three agents are real ``openai`` clients talking to :class:`tests.openai_standin.StandIn` (a real
OpenAI-compatible server on loopback); import, validation (the GX suite with the tiny model's
tokenizer) and the split are the real steps, run through the CLI where the pipeline runs them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from tests.openai_standin import StandIn
from troupe.contract import Dialogue, read_jsonl
from troupe.data.cli import data
from troupe.data.importers import import_sources, synthetic_source
from troupe.data.split import cap_synthetic
from troupe.dialogue.contract import Conversation

ROOT = Path(__file__).resolve().parents[1]
CJK = re.compile(r"[\u4e00-\u9fff]")
ZH_WORDS = [
    "樱花",
    "火锅",
    "地铁",
    "小猫",
    "晚霞",
    "雨伞",
    "咖啡",
    "西瓜",
    "灯笼",
    "风筝",
    "书店",
    "月饼",
    "公园",
    "海边",
]
EN_WORDS = ["tulips", "noodles", "trains", "kittens", "sunsets", "umbrellas", "coffee", "melons", "kites",
            "bookshops", "harbours", "pancakes", "lanterns", "meadows"]  # fmt: skip


def respond(messages: list[dict[str, Any]], model: str, body: dict[str, Any]) -> str:
    """User / character / host answers by system prompt, in the character's language, varied by a
    hash of the request (distinct dialogues: validation drops near-duplicates); the host ends a scene
    after two character turns."""
    sys = messages[0]["content"] if messages[0]["role"] == "system" else ""
    h = int(hashlib.sha1(json.dumps(messages, ensure_ascii=False).encode()).hexdigest(), 16)
    zh = bool(CJK.search(sys))
    words = ZH_WORDS if zh else EN_WORDS
    a, b, c = (words[(h >> (8 * i)) % len(words)] for i in range(3))
    if "主持人" in sys or "You host" in sys:
        return "结束" if messages[-1]["content"].count("\n") >= 3 else "继续"
    if "扮演“用户”" in sys or "you play the *user*" in sys:
        return (
            f"你喜欢{a}还是{b}？我最近老想着{c}。"
            if zh
            else f"Do you like {a} or {b}? I keep thinking of {c}."
        )
    return (
        f"当然是{a}啦，{b}也不错，你呢？<emotion>开心</emotion>"
        if zh
        else f"Oh, {a} for sure, and {b} too. You?<emotion>happy</emotion>"
    )


def _params(tmp: Path, base_url: str, **synthesis: Any) -> Path:
    agents = {r: {"base_url": base_url, "model": f"{r}-m", "price_input_per_mtok": 1.0, "price_output_per_mtok": 2.0}
              for r in ("user", "character", "host")}  # fmt: skip
    p = {
        "paths": {k: str(tmp / k) for k in ("imported", "validated", "splits", "synthetic")},
        "data": {"source_set": "sample", "source_sets": {"sample": [{"kind": "troupe", "path": str(ROOT / "data/sample")}]}},
        "agents": agents,
        "synthesis": {"enabled": True, "characters": str(ROOT / "data/sample/characters.jsonl"),
                      "scenarios": str(ROOT / "configs/scenarios.yaml"), "conversations": 24, "max_turns": 3,
                      "concurrency": 4, **synthesis},
    }  # fmt: skip
    f = tmp / "params.yaml"
    f.write_text(yaml.safe_dump(p, allow_unicode=True))
    return f


def _invoke(*args: str) -> Any:
    r = CliRunner().invoke(data, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r


def test_disabled_writes_empty_source_and_import_ignores_it(tmp_path: Path) -> None:
    pf = _params(tmp_path, "http://127.0.0.1:9/v1", enabled=False)  # nothing listens there: never called
    _invoke("synthesize", "--params", str(pf))
    out = tmp_path / "synthetic"
    assert all(
        (out / f).read_text() == "" for f in ("conversations.jsonl", "failed.jsonl", "characters.jsonl")
    )
    assert json.loads((out / "summary.json").read_text())["status"] == "disabled"
    params = yaml.safe_load(pf.read_text())
    assert synthetic_source(params) is None
    params["synthesis"]["enabled"] = True
    assert synthetic_source(params) == {"kind": "synthetic", "path": str(out)}
    # an explicit synthetic source of the same path is not added twice
    params["data"]["source_sets"]["sample"].append({"kind": "synthetic", "path": str(out)})
    assert synthetic_source(params) is None


def test_synthesize_import_validate_split(tmp_path: Path, tiny_model_dir: Path) -> None:
    with StandIn(respond) as s:
        pf = _params(tmp_path, s.base_url)
        _invoke("synthesize", "--params", str(pf))
        n_requests = len(s.requests)
        # a re-run asks nothing: every scenario is finished
        _invoke("synthesize", "--params", str(pf))
        assert len(s.requests) == n_requests
    out = tmp_path / "synthetic"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "enabled" and summary["skipped"] == 24 and summary["finished"] == 0
    convs = [
        Conversation.model_validate_json(x) for x in (out / "conversations.jsonl").read_text().splitlines()
    ]
    assert len(convs) == 24 and {c.ended_by for c in convs} <= {"host", "turn_limit"}
    assert summary["characters"]["played"] == len({c.character_id for c in convs})

    # import: the selected set + the synthetic source (synthesis.enabled), bad lines reported with file:line
    with (out / "conversations.jsonl").open("a") as f:
        f.write("{not json\n")
        bad = convs[0].model_copy(update={"id": "broken", "status": "failed", "reason": "host: HTTP 500"})
        f.write(bad.model_dump_json() + "\n")
    _invoke("import", "--params", str(pf), "--set", f"paths.base_model={tiny_model_dir}")
    imp = tmp_path / "imported"
    report = json.loads((imp / "import_report.json").read_text())
    syn = next(x for x in report["sources"] if x["kind"] == "synthetic")
    assert (syn["seen"], syn["imported"], syn["errors"]) == (26, 24, 2)
    errors = [json.loads(x) for x in (imp / "import_errors.jsonl").read_text().splitlines()]
    cfile = str(out / "conversations.jsonl")
    assert {(e["file"], e["line"]) for e in errors} >= {(cfile, 25), (cfile, 26)}
    assert any("did not finish" in e["reason"] and "HTTP 500" in e["reason"] for e in errors)
    dialogues = read_jsonl(imp / "dialogues.jsonl", Dialogue)
    synth = [d for d in dialogues if d.source == "synthetic"]
    assert len(synth) == 24
    for d in synth:
        meta = d.meta["synthetic"]
        assert meta["prompt_version"] and meta["agents"]["character"]["model"] == "character-m"
        assert meta["scenario_id"] and meta["seed"] == 0 and d.messages[0].role == "system"

    # validate (real GX suite, the tiny model's tokenizer): synthetic dialogues pass like real ones
    _invoke("validate", "--params", str(pf), "--set", f"paths.base_model={tiny_model_dir}")
    accepted = read_jsonl(tmp_path / "validated" / "dialogues.jsonl", Dialogue)
    accepted_synth = [d for d in accepted if d.source == "synthetic"]
    quarantine = [
        json.loads(x) for x in (tmp_path / "validated" / "quarantine.jsonl").read_text().splitlines()
    ]
    assert len(accepted_synth) >= 20, [q["reason"] for q in quarantine if "synthetic" in json.dumps(q)][:5]

    # split: synthesis.mix_ratio caps the synthetic share of train; the report says how many were dropped
    _invoke("split", "--params", str(pf), "--set", "synthesis.mix_ratio=0.05")
    rep = json.loads((tmp_path / "splits" / "split_report.json").read_text())["synthetic"]
    train = read_jsonl(tmp_path / "splits" / "train.jsonl", Dialogue)
    n_syn = sum(d.source == "synthetic" for d in train)
    assert n_syn == rep["synthetic"] and rep["real"] == len(train) - n_syn
    assert n_syn / len(train) <= 0.05 and n_syn == int(0.05 * rep["real"] / 0.95)
    assert rep["dropped_by_mix_ratio"] == rep["synthetic_before_cap"] - n_syn > 0
    _invoke("split", "--params", str(pf), "--set", "synthesis.mix_ratio=1.0")
    rep = json.loads((tmp_path / "splits" / "split_report.json").read_text())["synthetic"]
    assert rep["dropped_by_mix_ratio"] == 0 and rep["synthetic"] == rep["synthetic_before_cap"] > n_syn


def test_cap_synthetic_is_seeded_and_exact() -> None:
    import random

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]
    real = [Dialogue(id=f"r{i}", character_id=f"c{i % 3}", messages=msgs) for i in range(30)]
    syn = [
        Dialogue(id=f"s{i}", character_id=f"c{i % 4}", messages=msgs, source="synthetic") for i in range(40)
    ]
    train = real + syn
    a, rep = cap_synthetic(train, 0.25, random.Random(1))
    b, _ = cap_synthetic(train, 0.25, random.Random(1))
    assert [d.id for d in a] == [d.id for d in b]
    assert rep["synthetic"] == 10 and rep["dropped_by_mix_ratio"] == 30 and rep["share"] == 0.25
    assert len({d.character_id for d in a if d.source == "synthetic"}) == 4  # spread over characters
    assert cap_synthetic(train, 0.0, random.Random(1))[1]["synthetic"] == 0
    assert cap_synthetic(train, 1.0, random.Random(1))[1]["synthetic"] == 40
    assert cap_synthetic(real, 0.5, random.Random(1))[0] == real


def test_synthetic_importer_without_files_names_them(tmp_path: Path) -> None:
    import pytest

    from troupe.contract import ContractError

    with pytest.raises(ContractError, match="characters.jsonl"):
        import_sources([{"kind": "synthetic", "path": str(tmp_path)}])
