"""Validation: each bad-input class lands in quarantine with file:line and reason; counts add up."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from troupe.config import ConfigError
from troupe.contract import (
    Character,
    Dialogue,
    QuarantineRecord,
    load_characters,
    read_jsonl,
    to_chat,
    write_jsonl,
)
from troupe.data.importers import import_sources, selected_sources, write_import
from troupe.data.validate import (
    TokenCounter,
    find_duplicates,
    language_vote,
    load_tokenizer,
    reply_violations,
    scrub_pii,
    validate_dir,
)
from troupe.persona import render_system_prompt

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"

CHARS = [
    {
        "id": "kit",
        "name": "Kit",
        "language": "en",
        "profile": {"job": "bike courier in Bristol"},
        "style": "breezy",
    },
    {"id": "mei", "name": "小梅", "language": "zh", "profile": {"身份": "花店店主"}},
]
GOOD_EN = [
    ("Where are you riding today?", "Clifton, then down to the docks. Want to come?<emotion>happy</emotion>"),
    ("Is it raining?", "Buckets! My socks are basically ponds now.<emotion>sad</emotion>"),
    ("Favourite bike?", "My old steel frame. She squeaks but never quits.<emotion>happy</emotion>"),
    ("Ever crashed?", "Once, into a hedge. The hedge lost.<emotion>surprised</emotion>"),
    ("What do you eat on shift?", "Flapjacks, bananas, and far too much coffee.<emotion>neutral</emotion>"),
    ("Do you like hills?", "Love them going down, hate them going up.<emotion>other</emotion>"),
]


def _d(did: str, cid: str, *turns: tuple[str, str], raw: list | None = None) -> dict:
    msgs = (
        raw
        if raw is not None
        else [{"role": r, "content": c} for u, a in turns for r, c in (("user", u), ("assistant", a))]
    )
    return {"id": did, "character_id": cid, "messages": msgs}


def _dataset() -> list[dict | str]:
    ds: list[dict | str] = [_d(f"good{i}", "kit", t) for i, t in enumerate(GOOD_EN)]
    ds += [
        _d("mei_ok", "mei", ("今天有什么花？", "刚到的芍药，香得很！<emotion>开心</emotion>")),
        _d(
            "role_order",
            "kit",
            raw=[{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Hey"}],
        ),
        _d("empty", "kit", ("Hello?", "   ")),
        _d("too_long", "kit", (" ".join(["word"] * 700), "Long story.<emotion>neutral</emotion>")),
        _d(
            "wrong_lang",
            "mei",
            ("你好", "Hello there, I am selling lovely flowers today, would you like some?"),
        ),
        _d("markup", "kit", ("Mood?", "Great<emotion>joyful</emotion>")),
        _d(
            "pii",
            "kit",
            ("Call me on 13812345678 or mail kit@example.com", "Will do, mate.<emotion>happy</emotion>"),
        ),
        _d("exact_dup", "kit", GOOD_EN[0]),
        _d("near_dup", "kit", (GOOD_EN[1][0], GOOD_EN[1][1].replace("Buckets!", "Buckets!!"))),
        _d("ghost", "nobody", ("Hi", "Boo.")),
        _d(
            "capped",
            "kit",
            (
                "Last question: tea or coffee?",
                "Coffee, obviously. Tea is for rest days.<emotion>happy</emotion>",
            ),
        ),
    ]
    return ds


EXPECTED = {
    "role_order": "role_order",
    "empty": "empty_turn",
    "too_long": "too_long",
    "wrong_lang": "wrong_language",
    "markup": "markup",
    "exact_dup": "exact_duplicate",
    "near_dup": "near_duplicate",
    "capped": "character_cap",
}


def _params(tmp: Path, model: Path, **data) -> dict:
    d = {
        "cutoff_len": 512,
        "pii": "scrub",
        "max_dialogues_per_character": 7,
        "near_duplicate_threshold": 0.9,
        "max_rejected_share": 0.9,
        "language_min_share": 0.8,
    }
    d.update(data)
    return {
        "paths": {
            "imported": str(tmp / "imported"),
            "validated": str(tmp / "validated"),
            "base_model": str(model),
        },
        "data": d,
    }


def _prepare(tmp: Path) -> Path:
    src = tmp / "src"
    write_jsonl(src / "characters.jsonl", CHARS)
    write_jsonl(src / "dialogues.jsonl", [r for r in _dataset() if r["id"] != "ghost"])
    # the unknown-character dialogue is appended to the *imported* file (validation must catch it too)
    res = import_sources([{"kind": "troupe", "path": str(src)}])
    write_import(res, tmp / "imported")
    with open(tmp / "imported" / "dialogues.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(_d("ghost", "nobody", ("Hi", "Boo."))) + "\n")
        f.write('{"id": "broken", \n')
    return src


@pytest.fixture(scope="module")
def scrub_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("val_scrub")
    src = _prepare(tmp)
    res = validate_dir(_params(tmp, tiny_model_dir))
    return tmp, src, res


def test_counts_conserved_and_files_written(scrub_run):
    tmp, _, res = scrub_run
    rep = json.loads((tmp / "validated" / "report.json").read_text())
    assert rep["in"] == rep["accepted"] + rep["quarantined"] == len(_dataset()) + 1
    assert len(read_jsonl(tmp / "validated" / "dialogues.jsonl", Dialogue)) == rep["accepted"]
    assert len(read_jsonl(tmp / "validated" / "quarantine.jsonl", QuarantineRecord)) == rep["quarantined"]
    assert sum(pc["in"] for pc in rep["per_character"].values()) == rep["in"] - 1  # minus the unreadable line
    assert (tmp / "validated" / "data_docs" / "index.html").is_file()
    assert len((tmp / "validated" / "features.csv").read_text().splitlines()) == rep["in"]  # header + rows-1
    assert rep["import_errors"]["count"] == 0


@pytest.mark.parametrize("did", sorted(EXPECTED))
def test_each_bad_class_quarantined_with_source_line_and_reason(scrub_run, did):
    tmp, src, res = scrub_run
    q = {r.record_id: r for r in res.quarantined}
    rec = q[did]
    assert rec.reason.startswith(EXPECTED[did] + ":") or f"; {EXPECTED[did]}:" in rec.reason
    assert Path(rec.file) == src / "dialogues.jsonl"
    lines = (src / "dialogues.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[rec.line - 1])["id"] == did


def test_unknown_character_and_unreadable_line(scrub_run):
    _, _, res = scrub_run
    q = {r.record_id: r for r in res.quarantined}
    assert q["ghost"].reason.startswith("unknown_character")
    bad = [r for r in res.quarantined if r.record_id is None]
    assert len(bad) == 1 and bad[0].line == len(_dataset()) + 1 and "malformed JSON" in bad[0].reason
    assert res.report["by_reason"]["unreadable"] == 1


def test_good_dialogues_accepted_and_pii_scrubbed(scrub_run):
    _, _, res = scrub_run
    acc = {d.id: d for d in res.accepted}
    assert set(acc) == {f"good{i}" for i in range(6)} | {"mei_ok", "pii"}
    assert acc["pii"].messages[0].content == "Call me on [PHONE] or mail [EMAIL]"
    assert res.report["flags"]["pii_scrubbed_matches"] == 2


def test_reasons_come_from_gx_results(scrub_run):
    tmp, _, res = scrub_run
    html = (tmp / "validated" / "data_docs" / "index.html").read_text()
    assert "troupe_rows" in html and "troupe_character_cap" in html
    feats = res.features.set_index("dialogue_id")
    assert feats.loc["too_long", "n_tokens"] > 512 and feats.loc["capped", "cap_rank"] == 8


def test_pii_reject_and_cli_exit_over_threshold(tmp_path, tiny_model_dir):
    from troupe.cli import cli

    _prepare(tmp_path)
    p = _params(tmp_path, tiny_model_dir, pii="reject")
    sets = [f"--set=paths.{k}={v}" for k, v in p["paths"].items()]
    sets += [f"--set=data.{k}={v}" for k, v in p["data"].items() if k != "max_rejected_share"]
    r = CliRunner().invoke(cli, ["data", "validate", *sets, "--set=data.max_rejected_share=0.2"])
    assert r.exit_code != 0
    assert "data.max_rejected_share" in r.output and "quarantined" in r.output
    q = {x.record_id: x for x in read_jsonl(tmp_path / "validated" / "quarantine.jsonl", QuarantineRecord)}
    assert q["pii"].reason.startswith("pii: personal data: 2 match")
    assert "13812345678" in json.dumps(q["pii"].raw)  # rejected, not scrubbed
    r = CliRunner().invoke(cli, ["data", "validate", *sets, "--set=data.max_rejected_share=0.9"])
    assert r.exit_code == 0, r.output


def test_sample_dataset_validates_clean(tmp_path, tiny_model_dir):
    """The project's sample passes every rule; zh cards need cutoff_len > 512 with SmolLM2's tokenizer."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"] = {
        "imported": str(tmp_path / "i"),
        "validated": str(tmp_path / "v"),
        "base_model": str(tiny_model_dir),
    }
    res = import_sources(selected_sources(params), ROOT)
    cards = load_characters(ROOT / "data/sample/characters.jsonl")
    assert res.report()["totals"]["errors"] == 0 and len(res.characters) == len(cards) > 1
    write_import(res, tmp_path / "i")
    params["data"]["cutoff_len"] = max(params["data"]["cutoff_len"], 1024)  # 8-turn zh dialogues reach ~1,000
    out = validate_dir(params)
    assert out.report["quarantined"] == 0, [q.reason for q in out.quarantined]
    langs = {c.language for c in res.characters.values()}
    assert langs == {"zh", "en"}
    per_char = out.report["per_character"]
    dialogues = read_jsonl(ROOT / "data/sample/dialogues.jsonl", Dialogue)
    assert {c: v["accepted"] for c, v in per_char.items()} == dict(Counter(d.character_id for d in dialogues))
    en_ids = {c.id for c in res.characters.values() if c.language == "en"}
    en = out.features[out.features.character_id.isin(en_ids)]
    zh = out.features[~out.features.character_id.isin(en_ids)]
    assert en.n_tokens.median() < zh.n_tokens.median()  # SmolLM2's tokenizer spends more tokens on Chinese


def test_token_counter_is_exact(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    res = import_sources([{"kind": "troupe", "path": str(ROOT / "data/sample")}])
    if (SHARED / "charactereval").is_dir():
        ce = import_sources([{"kind": "charactereval", "path": str(SHARED / "charactereval")}])
        res.dialogues += ce.dialogues[:40]
        res.characters.update(ce.characters)
    cards = [render_system_prompt(res.characters[d.character_id]) for d in res.dialogues]
    convs = [to_chat(d.messages, c) for d, c in zip(res.dialogues, cards, strict=True)]
    counter = TokenCounter(tok, self_check=0)
    fast = counter.count(convs, cards)
    direct = [
        len(tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False)["input_ids"])
        for c in convs
    ]
    assert fast == direct


def test_scrub_pii_patterns():
    text, n = scrub_pii(
        "id 11010519491231002X, card 4111 1111 1111 1111, tel +1 415-555-0134, 010-12345678 [委屈]"
    )
    assert text == "id [ID], card [ID], tel [PHONE], [PHONE] [委屈]" and n == 4
    assert scrub_pii("Born 1809, died April 15, 1865; 2014-08-11.") == (
        "Born 1809, died April 15, 1865; 2014-08-11.",
        0,
    )


def test_find_duplicates_within_character_only():
    a = "u:tell me about the sea\na:the sea is wide and deep and cold in winter, kid."
    exact, near = find_duplicates(["x", "y", "x", "x"], [a, a, a, a.replace("kid.", "kid!")], 0.9)
    assert exact == [None, None, "0", None]
    assert near == [None, None, None, "0"]


def _stage_run(tmp: Path, model: Path, mode: str):
    src = tmp / "src"
    write_jsonl(src / "characters.jsonl", CHARS)
    write_jsonl(
        src / "dialogues.jsonl",
        [
            _d("plain", "kit", GOOD_EN[0]),
            _d(
                "stage_zh", "mei", ("在忙吗？", "（低头整理花束）在包花呢，要看看吗？<emotion>开心</emotion>")
            ),
            _d("stage_en", "kit", ("Tired?", "Bit knackered *yawns* but fine.<emotion>neutral</emotion>")),
            _d("stage_only", "kit", ("Hello?", "*waves*")),
        ],
    )
    write_import(import_sources([{"kind": "troupe", "path": str(src)}]), tmp / "imported")
    res = validate_dir(_params(tmp, model, stage_directions=mode))
    acc = {d.id: d for d in read_jsonl(tmp / "validated" / "dialogues.jsonl", Dialogue)}
    q = {x.record_id: x for x in read_jsonl(tmp / "validated" / "quarantine.jsonl", QuarantineRecord)}
    assert res.report["in"] == len(acc) + len(q) == 4
    return res.report, acc, q


@pytest.mark.parametrize("mode", ["flag", "reject", "strip"])
def test_stage_direction_modes(tmp_path, tiny_model_dir, mode):
    rep, acc, q = _stage_run(tmp_path, tiny_model_dir, mode)
    if mode == "flag":
        assert set(acc) == {"plain", "stage_zh", "stage_en", "stage_only"}
        assert acc["stage_zh"].messages[1].content.startswith("（低头整理花束）")
        assert rep["flags"]["stage_directions"] == 3
    elif mode == "reject":
        assert set(acc) == {"plain"}
        assert all(
            q[i].reason.startswith("stage_direction: ") for i in ("stage_zh", "stage_en", "stage_only")
        )
    else:
        assert set(acc) == {"plain", "stage_zh", "stage_en"}
        assert acc["stage_zh"].messages[1].content == "在包花呢，要看看吗？<emotion>开心</emotion>"
        assert acc["stage_en"].messages[1].content == "Bit knackered but fine.<emotion>neutral</emotion>"
        assert q["stage_only"].reason.startswith("empty_turn: ")
        assert "*waves*" in json.dumps(q["stage_only"].raw)  # the quarantine keeps the original reply
        assert rep["flags"]["stage_directions"] == 0
        assert rep["flags"]["stage_directions_stripped_dialogues"] == 3
        assert rep["flags"]["stage_directions_stripped_spans"] == 3


def test_unknown_stage_direction_mode(tmp_path, tiny_model_dir):
    from troupe.config import ConfigError

    with pytest.raises(ConfigError, match="data.stage_directions"):
        _stage_run(tmp_path, tiny_model_dir, "drop")


# ------------------------------------------------------------------------------------------ language

ZH_REPLIES = [
    ("去国贸多少钱？", "四十来块吧，晚高峰得加点儿，您坐稳了！"),
    ("师傅开车多久了？", "二十多年喽，北京的胡同我闭着眼都能钻。"),
    ("今天堵不堵？", "堵啊，三环跟停车场似的，咱走辅路。"),
]
EN_REPLIES = [
    ("How much to Soho?", "About twelve quid, love, unless the Strand is gridlocked again."),
    ("How long have you driven?", "Thirty years this spring, and I still know every back street."),
    ("Is traffic bad today?", "Murder on the Embankment, so we'll nip round by Covent Garden."),
]


def _sharegpt(card: str, pairs: list[tuple[str, str]]) -> list[dict]:
    return [
        {
            "conversations": [
                {"from": "system", "value": card},
                {"from": "human", "value": u},
                {"from": "gpt", "value": a},
            ]
        }
        for u, a in pairs
    ]


def _validate_sharegpt(tmp: Path, model: Path, records: list[dict]):
    f = tmp / "chats.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    imp = import_sources([{"kind": "sharegpt", "path": str(f)}])
    write_import(imp, tmp / "imported")
    res = validate_dir(_params(tmp, model, max_rejected_share=1.0))
    cards = {c.name: c for c in read_jsonl(tmp / "validated" / "characters.jsonl", Character)}
    return imp, res, cards


def test_language_from_replies_not_card_both_directions(tmp_path, tiny_model_dir):
    """An English card for a driver who speaks Chinese, a Chinese card for one who speaks English and a
    mixed card: the card's own language disagrees with the replies, every dialogue is accepted and the
    cards come out with the replies' language, sourced "replies"."""
    en_card = "You are Lao Zhang, a Beijing taxi driver. Cheerful, talkative, loves Peking opera."
    zh_card = "你是Sam，一位伦敦的出租车司机，说话风趣，喜欢足球，总爱抱怨天气和交通。"
    mixed_card = "You are 阿May, a 香港 bartender. 性格爽朗, loves jazz and 奶茶, 讲话直接。"
    records = (
        _sharegpt(en_card, ZH_REPLIES)
        + _sharegpt(zh_card, EN_REPLIES)
        + _sharegpt(mixed_card, [(u, a) for u, a in ZH_REPLIES])
    )
    imp, res, cards = _validate_sharegpt(tmp_path, tiny_model_dir, records)
    by_card = {c.profile["description"]: c for c in imp.characters.values()}
    assert by_card[en_card].language == "en" and by_card[zh_card].language == "zh"  # what the cards say
    assert res.report["quarantined"] == 0, [q.reason for q in res.quarantined]
    assert res.report["accepted"] == len(records)
    langs = res.report["character_languages"]
    for card, want in ((en_card, "zh"), (zh_card, "en"), (mixed_card, "zh")):
        c = by_card[card]
        assert langs[c.id]["language"] == want and langs[c.id]["source"] == "replies", langs[c.id]
        assert langs[c.id]["card"] == c.language and set(langs[c.id]["votes"]) == {want}
        assert 2 <= langs[c.id]["identified"] <= langs[c.id]["replies"] == 3
        assert cards[c.name].language == want  # the accepted cards carry the replies' language
    assert set(res.report["language_differs_from_card"]) >= {by_card[en_card].id, by_card[zh_card].id}
    feats = res.features.set_index("dialogue_id")
    assert set(feats["language_source"]) == {"replies"}


def test_minority_wrong_language_still_quarantined_and_card_is_the_fallback(tmp_path, tiny_model_dir):
    """The majority decides the language; a dialogue in another language is still wrong_language; a
    character with no identifiable reply keeps its card's language (source "card")."""
    card = "You are Lao Zhang, a Beijing taxi driver. Cheerful, talkative, loves Peking opera."
    terse = "You are Kiki, a cat who answers only in sounds. Loves naps and sunny windows."
    records = _sharegpt(card, ZH_REPLIES + [EN_REPLIES[0]]) + _sharegpt(
        terse, [("Hi", "Mrr."), ("Food?", "Mew!")]
    )
    imp, res, cards = _validate_sharegpt(tmp_path, tiny_model_dir, records)
    by_card = {c.profile["description"]: c for c in imp.characters.values()}
    langs = res.report["character_languages"]
    zhang, kiki = by_card[card].id, by_card[terse].id
    assert langs[zhang]["language"] == "zh" and langs[zhang]["votes"] == {"zh": 3, "en": 1}
    assert langs[kiki] == {
        "language": "en",
        "source": "card",
        "card": "en",
        "votes": {},
        "replies": 2,
        "identified": 0,
    }
    assert res.report["language_source"] == {"replies": 1, "card": 1}
    (bad,) = res.quarantined
    assert bad.reason.startswith("wrong_language") and EN_REPLIES[0][1] in json.dumps(
        bad.raw, ensure_ascii=False
    )
    assert res.report["in"] == res.report["accepted"] + res.report["quarantined"] == len(records)


def test_language_vote_ties_and_fallback():
    assert language_vote("en", ["zh", "zh", None, "en"]).language == "zh"
    assert language_vote("en", ["zh", "en"]).language == "en"  # tie: the card's language among the tied
    assert language_vote("ja", ["zh", "en"]).language == "en"  # tie without the card: alphabetical
    v = language_vote("zh", [None, None])
    assert (v.language, v.source, v.replies, v.identified) == ("zh", "card", 2, 0)


def test_reply_violations_are_the_data_rules():
    assert reply_violations("刚到的芍药，香得很！<emotion>开心</emotion>", "zh") == []
    assert reply_violations("（笑着递过花）刚到的芍药！", "zh") == ["stage direction"]
    assert reply_violations("（笑着递过花）刚到的芍药！", "zh", stage_directions="flag") == []
    assert reply_violations("Hello there, would you like some lovely flowers?", "zh") == ["language en != zh"]
    assert reply_violations("好呀<emotion>joyful</emotion>", "zh")[0].startswith("markup:")
    assert reply_violations("  ", "zh") == ["empty reply"]
    assert reply_violations("打我电话13812345678吧", "zh") == ["personal data (1 match(es))"]
    with pytest.raises(ConfigError, match="stage_directions"):
        reply_violations("好", "zh", stage_directions="drop")
