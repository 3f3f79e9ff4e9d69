"""DPO pairs: chosen replies pass the accepted-data rules (else the prompt is quarantined with the reason),
``samples_per_prompt`` candidates per prompt and the worst one rejected, counts add up; one run of the
real step on the tiny model; CharacterEval's narrated references never become chosen."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from troupe.config import ConfigError
from troupe.contract import (
    Character,
    Dialogue,
    Message,
    PreferencePair,
    QuarantineRecord,
    read_jsonl,
    write_jsonl,
)
from troupe.train.pairs import (
    DROP_CHOSEN,
    DROP_NO_REJECTED,
    assemble_pairs,
    build_pairs,
    contexts,
    select_prompts,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
CHARS = {
    "mei": Character(id="mei", name="小梅", language="zh", profile={"身份": "花店店主"}),
    "kit": Character(id="kit", name="Kit", language="en", profile={"job": "bike courier"}),
}
NARRATION = re.compile(r"（[^）]*）|\*[^*]+\*")  # the test's own spelling of "narrates an action"

CLEAN_ZH = "刚到的芍药，香得很！<emotion>开心</emotion>"
REFS = {
    "clean_zh": ("mei", "今天有什么花？", CLEAN_ZH),
    "clean_en": ("kit", "Where to today?", "Clifton, then the docks. Coming?<emotion>happy</emotion>"),
    "narrated": ("mei", "你在干嘛？", "（低头修剪花枝）修花呢，别吵。"),
    "wrong_language": ("mei", "玫瑰多少钱？", "Ten pounds a bunch, lovely and fresh this morning."),
    "bad_markup": ("kit", "Mood?", "Great<emotion>joyful</emotion>"),
    "empty": ("kit", "Hello?", "   "),
}


def _dialogues() -> list[Dialogue]:
    return [
        Dialogue(
            id=k,
            character_id=c,
            messages=[Message(role="user", content=u), Message(role="assistant", content=a)],
        )
        for k, (c, u, a) in REFS.items()
    ]


def _fixed(replies: dict[str, list[str]], calls: list):
    """A sampler returning ``replies[dialogue id][:s]`` for each prompt (records its calls)."""

    def sample(idx: list[int], s: int) -> list[list[str]]:
        calls.append((list(idx), s))
        return [replies[sample.prompts[i].dialogue.id][:s] for i in idx]

    return sample


def _run(prompts, sft: dict, base: dict, s: int):
    calls_sft, calls_base = [], []
    a, b = _fixed(sft, calls_sft), _fixed(base, calls_base)
    a.prompts = b.prompts = prompts
    pairs, dropped, counts = assemble_pairs(prompts, CHARS, a, b, s)
    return pairs, dropped, counts, calls_sft, calls_base


def test_chosen_that_breaks_a_rule_drops_the_prompt_with_the_reason():
    ctx = contexts(_dialogues(), seed=3)
    kept, dropped, walked = select_prompts(ctx, CHARS, max_pairs=0, file="train.jsonl")
    assert walked == len(ctx) == len(kept) + len(dropped) == len(REFS)
    assert {c.dialogue.id for c in kept} == {"clean_zh", "clean_en"}
    reasons = {q.record_id.split("#")[0]: q.reason for q in dropped}
    assert reasons["narrated"] == f"{DROP_CHOSEN}: stage direction"
    assert reasons["wrong_language"] == f"{DROP_CHOSEN}: language en != zh"
    assert reasons["bad_markup"].startswith(f"{DROP_CHOSEN}: markup:")
    assert reasons["empty"] == f"{DROP_CHOSEN}: empty reply"
    for q in dropped:
        assert q.stage == "pairs" and q.file == "train.jsonl"
        assert q.line == list(REFS).index(q.record_id.split("#")[0]) + 1  # line of the dialogue in the file
        assert q.raw["chosen"] == REFS[q.record_id.split("#")[0]][2]


def test_max_pairs_stops_the_walk_and_the_order_is_seeded():
    ds = _dialogues()
    assert [c.id for c in contexts(ds, 5)] == [c.id for c in contexts(ds, 5)]
    kept, dropped, walked = select_prompts(contexts(ds, 5), CHARS, max_pairs=1)
    assert len(kept) == 1 and walked == 1 + len(dropped) and walked <= len(ds)


def test_samples_per_prompt_draws_that_many_and_rejects_the_worst():
    prompts, _, _ = select_prompts(contexts(_dialogues(), 0), CHARS, 0)
    sft = {
        "clean_zh": [
            "芍药今天刚到，很香。",  # clean
            "（笑）芍药！",  # stage direction only
            "（笑）作为一个AI，我闻不到花香。",  # stage direction + assistant phrase
        ],
        "clean_en": [
            "Clifton, mate.",
            "Clifton. (grins) See you there!",
            "Kit: Clifton, obviously, where else?",
        ],
    }
    for s in (1, 3):
        pairs, dropped, counts, calls_sft, calls_base = _run(
            prompts, sft, {"clean_zh": ["好的。"] * 3, "clean_en": ["Sure."] * 3}, s
        )
        assert calls_sft == [([0, 1], s)]
        by = {p.id.split("#")[0]: p for p in pairs}
        if s == 1:  # each prompt's only sample breaks no rule: the base model is asked for both
            assert calls_base == [([0, 1], 1)]
            assert {p.meta["rejected_source"] for p in pairs} == {"base"}
        else:
            assert by["clean_zh"].rejected == sft["clean_zh"][2]  # two rules broken beat one
            assert by["clean_zh"].meta["rejected_source"] == "sft_violation"
            assert len(by["clean_zh"].meta["violations"]) >= 2
            assert counts["candidates"] == {"sft": 2 * 3, "base": 0} and not calls_base
            assert by["clean_en"].rejected != sft["clean_en"][0]  # the clean sample is never the rejected one
        assert all(p.meta["samples_per_prompt"] == s for p in pairs)
        assert len(pairs) + len(dropped) == len(prompts)
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        _run(prompts, sft, {}, 0)


def test_base_fallback_and_no_usable_sample_is_dropped():
    ds = [d for d in _dialogues() if d.id in ("clean_zh", "clean_en")]
    prompts, _, _ = select_prompts(contexts(ds, 0), CHARS, 0)
    ref = {d.id: d.messages[1].content for d in ds}
    sft = {"clean_zh": ["芍药很香。", ""], "clean_en": [ref["clean_en"], " "]}
    base = {"clean_zh": ["Sure! How can I help you today?", "好"], "clean_en": [ref["clean_en"], ""]}
    pairs, dropped, counts, _, calls_base = _run(prompts, sft, base, 2)
    assert sorted(calls_base[0][0]) == [0, 1]  # neither prompt had a rule-breaking SFT sample
    (p,) = pairs
    assert p.chosen == CLEAN_ZH and p.rejected == base["clean_zh"][0]
    assert p.meta["rejected_source"] == "base_violation"
    (q,) = dropped
    assert q.reason.startswith(DROP_NO_REJECTED) and q.record_id.startswith("clean_en#")
    assert counts["dropped_no_rejected"] == 1 and counts["rejected_source"] == {"base_violation": 1}


def test_build_pairs_step_on_the_tiny_model(tmp_path, tiny_model_dir):
    splits = tmp_path / "splits"
    write_jsonl(splits / "train.jsonl", _dialogues())
    write_jsonl(splits / "characters.jsonl", CHARS.values())
    params = {
        "paths": {
            "splits": str(splits),
            "sft_model": str(tiny_model_dir),
            "base_model": str(tiny_model_dir),
            "pairs": str(tmp_path / "pairs"),
        },
        "pairs": {"samples_per_prompt": 2, "max_new_tokens": 8, "temperature": 0.9, "max_pairs": 32},
        "sft": {"seed": 17},
    }
    build_pairs(params)
    out = tmp_path / "pairs"
    rep = json.loads((out / "pairs_report.json").read_text())
    pairs = read_jsonl(out / "pairs.jsonl", PreferencePair)
    quarantine = read_jsonl(out / "quarantine.jsonl", QuarantineRecord)
    assert rep["prompts"] == rep["pairs"] + sum(rep["dropped"].values()) == len(REFS)
    assert rep["contexts"] == rep["prompts"] + rep["not_considered"]
    assert len(pairs) == rep["pairs"] and len(quarantine) == sum(rep["dropped"].values())
    assert rep["dropped"][DROP_CHOSEN] == 4 and rep["chosen_violations"]["stage direction"] == 1
    assert rep["candidates"]["sft"] == 2 * (len(REFS) - 4)
    assert {p.chosen for p in pairs} <= {REFS["clean_zh"][2], REFS["clean_en"][2]}
    assert all(q.file.endswith("train.jsonl") and q.line for q in quarantine)


@pytest.mark.skipif(not (SHARED / "charactereval").is_dir(), reason="../shared/data not present")
def test_charactereval_narrated_references_never_become_chosen():
    """CharacterEval's replies are mostly narrated (``（...）``): none of them is kept as chosen, every
    one walked over is quarantined with the reason, and clean ones remain."""
    from troupe.data.importers import import_sources

    imp = import_sources([{"kind": "charactereval", "path": str(SHARED / "charactereval")}])
    ctx = contexts(imp.dialogues, 17)
    kept, dropped, walked = select_prompts(ctx, imp.characters, max_pairs=0)
    narrated = sum(1 for c in ctx if NARRATION.search(c.reference))
    print(
        f"\nCharacterEval: {len(ctx)} contexts, {len(kept)} chosen pass, {len(dropped)} dropped "
        f"({narrated} narrated by the test's own pattern)"
    )
    assert walked == len(ctx) == len(kept) + len(dropped)
    assert kept and narrated > 0
    assert not [c.reference for c in kept if NARRATION.search(c.reference)]
    assert sum(1 for q in dropped if "stage direction" in q.reason) >= narrated
