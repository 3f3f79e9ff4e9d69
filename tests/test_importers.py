"""Importers: every kind on small fixtures and on the real shared data; errors carry file:line:reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from troupe.contract import ContractError, Dialogue, read_jsonl
from troupe.data.importers import charactereval_turns, import_sources, iter_json_records, write_import

FIX = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _conserved(res) -> None:
    for s in res.sources:
        assert s.seen == s.imported + s.errors, s
        assert s.characters_seen == s.characters_imported + s.character_errors, s
    assert sum(s.imported for s in res.sources) == len(res.dialogues)
    assert sum(s.errors + s.character_errors for s in res.sources) == len(res.errors)


def _errors(res) -> dict[int | None, str]:
    return {e.line: e.reason for e in res.errors}


def test_sharegpt_cards_from_system_turn_and_errors():
    res = import_sources([{"kind": "sharegpt", "path": str(FIX / "sharegpt/chats.jsonl")}])
    _conserved(res)
    assert [d.id for d in res.dialogues] == ["sharegpt-a1", "sharegpt-a2"]
    (card,) = res.characters.values()
    assert card.name == "Captain Rook" and card.language == "en"
    assert all(d.character_id == card.id and d.messages[0].role == "user" for d in res.dialogues)
    errs = _errors(res)
    assert "malformed JSON" in errs[3]
    assert "unsupported role 'function_call'" in errs[4]
    assert "no character" in errs[5]
    assert all(e.file.endswith("chats.jsonl") for e in res.errors)
    assert res.dialogues[0].meta["origin"]["line"] == 1


def test_alpaca_json_array_with_history_and_inline_card():
    card = {"id": "rook", "name": "Captain Rook", "language": "en", "profile": {"job": "tea shop owner"}}
    res = import_sources([{"kind": "alpaca", "path": str(FIX / "alpaca/rook.json"), "character": card}])
    _conserved(res)
    assert len(res.dialogues) == 2 and res.sources[0].errors == 1
    d = res.dialogues[1]
    assert [m.role for m in d.messages] == ["user", "assistant", "user", "assistant"]
    assert d.messages[2].content == "And the parrot?\nBe honest."
    # line numbers point at the start of each array element in the pretty-printed file
    lines = Path(FIX / "alpaca/rook.json").read_text().splitlines()
    err = res.errors[0]
    assert lines[err.line - 1].strip() == "{" and "No answer here" in lines[err.line]


def test_memotrace_merges_quick_inputs_and_needs_a_card():
    card = {"id": "xiaoyu", "name": "小雨", "language": "zh"}
    res = import_sources(
        [{"kind": "memotrace", "path": str(FIX / "memotrace/export.json"), "character": card}]
    )
    _conserved(res)
    assert res.dialogues[0].messages[0].content == "在吗\n今晚吃啥[委屈]"
    assert res.sources[0].errors == 1 and "conversations" in res.errors[0].reason
    with pytest.raises(ContractError, match="needs a `character`"):
        import_sources([{"kind": "memotrace", "path": str(FIX / "memotrace/export.json")}])


def test_charactereval_fixture_roles_and_script_shape():
    res = import_sources([{"kind": "charactereval", "path": str(FIX / "charactereval")}])
    _conserved(res)
    card = res.characters["ce-阿福"]
    assert card.language == "zh" and card.profile["工作"] == "客栈伙计" and card.profile["作品"] == "小镇"
    d1, d2 = res.dialogues
    assert [m.role for m in d1.messages] == ["user", "assistant", "user", "assistant"]
    assert (
        d1.messages[0].name == "掌柜" and d1.messages[1].content == "（挠头）扫了扫了。"
    )  # stage direction kept
    assert (
        d1.messages[2].name is None and d1.messages[2].content == "掌柜: 那地上怎么还有叶子？\n伙计: 风刮的。"
    )
    assert d1.meta["trailing_user_turns"][0]["content"] == "再去扫一遍。"
    assert d2.messages[0].role == "system" and d2.messages[0].content == "阿福：掌柜的早！"
    assert "has no line" in res.errors[0].reason and res.errors[0].line is not None


def test_charactereval_turns_merges_consecutive_role_lines():
    msgs, trailing = charactereval_turns("甲：你好\n乙：嗯\n乙：在\n甲：走吧", "乙")
    assert [(m.role, m.content) for m in msgs] == [("user", "你好"), ("assistant", "嗯\n在")]
    assert trailing[0].content == "走吧"


def test_character100_fixture():
    res = import_sources([{"kind": "character100", "path": str(FIX / "character100")}])
    _conserved(res)
    card = res.characters["c100-ada_byron"]
    assert card.language == "en" and card.profile["summary"].startswith("Ada Byron was")
    by_part = {d.meta["part"]: d for d in res.dialogues}
    assert [m.role for m in by_part["qr_test"].messages] == [
        "user",
        "assistant",
    ]  # lede == card: no system turn
    assert by_part["dev"].messages[0].content.startswith("Basic information: She corresponded")
    reasons = sorted(e.reason for e in res.errors)
    assert any("tab-separated" in r for r in reasons) and any("Imagine you are" in r for r in reasons)


def test_troupe_bad_lines_unknown_character_and_duplicate_ids():
    res = import_sources([{"kind": "troupe", "path": str(FIX / "troupe_bad")}])
    _conserved(res)
    assert [d.id for d in res.dialogues] == ["k1"]
    errs = {(Path(e.file).name, e.line): e.reason for e in res.errors}
    assert "name" in errs[("characters.jsonl", 2)]
    assert "malformed JSON" in errs[("dialogues.jsonl", 2)]
    assert errs[("dialogues.jsonl", 3)] == "unknown character id 'ghost'"
    assert "messages.0.role" in errs[("dialogues.jsonl", 4)]
    assert "duplicate dialogue id" in errs[("dialogues.jsonl", 5)]


def test_missing_and_non_utf8_files_stop_with_the_file_named(tmp_path):
    with pytest.raises(ContractError, match="nope.jsonl: file not found"):
        import_sources([{"kind": "sharegpt", "path": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(ContractError, match=r"not_utf8.jsonl: not UTF-8"):
        import_sources([{"kind": "sharegpt", "path": str(FIX / "not_utf8.jsonl")}])
    with pytest.raises(ContractError, match="characters.jsonl: file not found"):
        import_sources([{"kind": "troupe", "path": str(tmp_path)}])
    with pytest.raises(ContractError, match="need kind"):
        import_sources([{"kind": "csv", "path": "x"}])


def test_broken_json_array_names_file_and_line(tmp_path):
    f = tmp_path / "arr.json"
    f.write_text('[\n {"a": 1},\n {"a": \n]\n', encoding="utf-8")
    with pytest.raises(ContractError, match=r"arr.json:4"):
        list(iter_json_records(f))


def test_cli_import_writes_outputs(tmp_path):
    from troupe.cli import cli

    out = tmp_path / "imp"
    r = CliRunner().invoke(
        cli,
        [
            "data",
            "import",
            "--set",
            f"paths.imported={out}",
            "--set",
            "data.source_set=fixtures",
            "--set",
            f"data.source_sets.fixtures=[{{kind: troupe, path: {FIX / 'troupe_bad'}}}, {{kind: charactereval, path: {FIX / 'charactereval'}}}]",
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "import_report.json").read_text())
    t = rep["totals"]
    assert t["seen"] == t["imported"] + t["errors"] == 8
    assert len(read_jsonl(out / "dialogues.jsonl", Dialogue)) == t["imported"] == 3
    assert len((out / "import_errors.jsonl").read_text().splitlines()) == t["errors"] + t["character_errors"]


def test_real_charactereval_and_character100_every_record_accounted(tmp_path):
    res = import_sources(
        [
            {"kind": "charactereval", "path": str(SHARED / "charactereval")},
            {"kind": "character100", "path": str(SHARED / "character100")},
        ]
    )
    _conserved(res)
    ce, c100 = res.sources
    assert ce.seen == len(json.loads((SHARED / "charactereval/test_data.jsonl").read_text(encoding="utf-8")))
    assert ce.characters_imported == 77 and c100.characters_imported == 106
    n_qr = sum(
        1
        for f in (SHARED / "character100/QR_test").glob("*.txt")
        for line in f.read_text(encoding="utf-8").splitlines()
        if line.strip()
    )
    n_json = sum(len(json.loads((SHARED / f"character100/{p}.json").read_text())) for p in ("train", "dev"))
    assert c100.seen == n_qr + n_json and c100.errors == 0
    assert all(e.file and e.line and e.reason for e in res.errors)
    assert all(c.language == "zh" for c in res.characters.values() if c.id.startswith("ce-"))
    report = write_import(res, tmp_path)
    assert report["totals"]["seen"] == report["totals"]["imported"] + report["totals"]["errors"]


def test_charactereval_cuts_of_one_scene_share_a_source_dialogue(tmp_path):
    """Two roles' cuts of one scene (one a prefix of the other) get one ``source_dialogue``; another
    scene of the same novel gets another."""
    (tmp_path / "character_profiles.json").write_text("{}", encoding="utf-8")
    scene = "掌柜：阿福，门口扫了没？\n阿福：扫了扫了。\n掌柜：那地上怎么还有叶子？\n阿福：风刮的！"
    recs = [
        {"id": 1, "role": "阿福", "novel_name": "客栈", "context": scene},
        {"id": 2, "role": "掌柜", "novel_name": "客栈", "context": scene.rsplit("\n", 1)[0]},
        {"id": 3, "role": "阿福", "novel_name": "客栈", "context": "  " + scene.replace("\n", "\n\n", 1)},
        {"id": 4, "role": "阿福", "novel_name": "客栈", "context": "掌柜：今天进货。\n阿福：进多少？"},
    ]
    (tmp_path / "test_data.jsonl").write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    res = import_sources([{"kind": "charactereval", "path": str(tmp_path)}])
    src = {d.meta["charactereval_id"]: d.meta["source_dialogue"] for d in res.dialogues}
    assert len(src) == 4 and src[1] == src[2] == src[3] != src[4]
    assert {d.character_id for d in res.dialogues if d.meta["charactereval_id"] in (1, 2)} == {
        "ce-阿福",
        "ce-掌柜",
    }
