"""Split: whole held-out characters never reach train; per-character held-out dialogues; caps; determinism."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from troupe.contract import Character, Dialogue, Message, load_characters, read_jsonl, write_jsonl
from troupe.data.split import SPLITS, choose_heldout_characters, split_dialogues

ROOT = Path(__file__).resolve().parents[1]


def _data():
    chars = {c.id: c for c in load_characters(ROOT / "data/sample/characters.jsonl").values()}
    dialogues = read_jsonl(ROOT / "data/sample/dialogues.jsonl", Dialogue)
    return chars, dialogues


SPLIT = {
    "heldout_characters": 2,
    "heldout_dialogue_share": 0.15,
    "seed": 17,
    "max_train_dialogues": 0,
    "max_eval_dialogues": 0,
}


def test_heldout_characters_never_in_train_and_everything_accounted():
    chars, ds = _data()
    res = split_dialogues(ds, chars, SPLIT)
    held = set(res.heldout_character_ids)
    assert len(held) == 2
    assert not held & {d.character_id for d in res.train}
    assert not held & {d.character_id for d in res.heldout_dialogues}
    assert {d.character_id for d in res.heldout_characters} == held
    ids = [d.id for s in SPLITS for d in getattr(res, s)]
    assert sorted(ids) == sorted(d.id for d in ds)  # a partition: nothing lost, nothing doubled
    for s in SPLITS:
        assert all(d.split == s for d in getattr(res, s))


def test_both_languages_held_out_and_seed_deterministic():
    chars, ds = _data()
    a = split_dialogues(ds, chars, SPLIT)
    b = split_dialogues(ds, chars, SPLIT)
    assert a.heldout_character_ids == b.heldout_character_ids
    assert [d.id for d in a.heldout_dialogues] == [d.id for d in b.heldout_dialogues]
    assert {chars[c].language for c in a.heldout_character_ids} == {"zh", "en"}
    other = split_dialogues(ds, chars, {**SPLIT, "seed": 3})
    assert {chars[c].language for c in other.heldout_character_ids} == {"zh", "en"}


def test_each_seen_character_holds_out_dialogues_but_keeps_training_data():
    chars, ds = _data()
    res = split_dialogues(ds, chars, SPLIT)
    seen = set(chars) - set(res.heldout_character_ids)
    per_held = res.report["per_character"]["heldout_dialogues"]
    per_train = res.report["per_character"]["train"]
    for c in seen:
        n = sum(1 for d in ds if d.character_id == c)
        assert per_held[c] == max(1, round(0.15 * n)) and per_train[c] == n - per_held[c]


def test_prefers_characters_with_several_dialogues_and_keeps_one_for_training():
    counts = {"a": 1, "b": 5, "c": 4, "d": 1}
    langs = {"a": "en", "b": "en", "c": "zh", "d": "zh"}
    assert choose_heldout_characters(counts, langs, 2, 0) == ["b", "c"]
    assert len(choose_heldout_characters({"a": 3, "b": 3}, langs, 5, 0)) == 1
    # a character with 2 dialogues keeps one in train
    cs = {"x": Character(id="x", name="X", language="en"), "y": Character(id="y", name="Y", language="en")}
    ds = [
        Dialogue(id=f"{c}{i}", character_id=c, messages=[Message(role="user", content="hi")])
        for c in "xy"
        for i in range(2)
    ]
    res = split_dialogues(ds, cs, {**SPLIT, "heldout_characters": 1, "heldout_dialogue_share": 0.9})
    assert len(res.train) == 1 and len(res.heldout_dialogues) == 1


def test_caps():
    chars, ds = _data()
    res = split_dialogues(ds, chars, {**SPLIT, "max_train_dialogues": 10, "max_eval_dialogues": 3})
    assert res.report["counts"] == {"train": 10, "heldout_dialogues": 3, "heldout_characters": 3}
    assert res.report["dropped_by_caps"]["train"] == res.report["before_caps"]["train"] - 10
    assert not set(res.heldout_character_ids) & {d.character_id for d in res.train}


def test_caps_spread_over_characters():
    """A capped split keeps as many characters as the cap allows, none with two more than another."""
    chars, ds = _data()
    res = split_dialogues(ds, chars, {**SPLIT, "max_train_dialogues": 8, "max_eval_dialogues": 2})
    per = res.report["per_character"]
    assert set(per["heldout_characters"]) == set(res.heldout_character_ids)  # one dialogue of each
    seen = set(chars) - set(res.heldout_character_ids)
    assert len(per["train"]) == min(8, len(seen))
    assert max(per["train"].values()) - min(per["train"].values()) <= 1


def test_cli_split_writes_files(tmp_path):
    from troupe.cli import cli

    chars, ds = _data()
    val = tmp_path / "validated"
    write_jsonl(val / "characters.jsonl", chars.values())
    write_jsonl(val / "dialogues.jsonl", ds)
    r = CliRunner().invoke(
        cli, ["data", "split", f"--set=paths.validated={val}", f"--set=paths.splits={tmp_path / 's'}"]
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "s" / "split_report.json").read_text())
    for s in SPLITS:
        assert len(read_jsonl(tmp_path / "s" / f"{s}.jsonl", Dialogue)) == rep["counts"][s]
    assert len(load_characters(tmp_path / "s" / "characters.jsonl")) == 8
    train_chars = {d.character_id for d in read_jsonl(tmp_path / "s" / "train.jsonl", Dialogue)}
    assert not train_chars & {c["id"] for c in rep["heldout_characters"]}
