"""Contract, reply-markup parser, persona renderer, automatic checks and SFT encoding."""

from __future__ import annotations

import json

import pytest

from troupe.checks import check_reply, detect_language
from troupe.contract import Character, ContractError, Dialogue, Message, read_jsonl, to_chat, write_jsonl
from troupe.markup import parse_reply
from troupe.persona import render_system_prompt

ZH = Character(
    id="lin",
    name="林小雨",
    language="zh",
    profile={"职业": "花店老板"},
    style="温柔",
    examples=["今天的花真好看～"],
)
EN = Character(id="max", name="Max", language="en-US", profile={"job": "pilot"}, scene="A small airfield.")


def test_language_tag_is_normalised_to_primary_subtag():
    assert EN.language == "en"


@pytest.mark.parametrize(
    ("reply", "text", "emotions", "n_images", "valid"),
    [
        ("好呀<emotion>开心</emotion>", "好呀", ["happy"], 0, True),
        (
            "Sure.<emotion>neutral</emotion> Look!<emotion>surprised</emotion>",
            "Sure.Look!",
            ["neutral", "surprised"],
            0,
            True,
        ),
        (
            "给你<img><prompt>海边日落</prompt><includePerson>true</includePerson></img><emotion>开心</emotion>",
            "给你",
            ["happy"],
            1,
            True,
        ),
        ("plain text", "plain text", [None], 0, True),
        ("hi<emotion>joyful</emotion>", "hi", [None], 0, False),
        ("hi<emotion>happy", "hi<emotion>happy", [None], 0, False),
        ("<img><prompt></prompt><includePerson>maybe</includePerson></img>", "", [], 1, False),
        ("hello <b>bold</b>", "hello <b>bold</b>", [None], 0, False),
    ],
)
def test_parse_reply(reply, text, emotions, n_images, valid):
    p = parse_reply(reply)
    assert p.text == text
    assert [c.emotion for c in p.clauses] == emotions
    assert len(p.images) == n_images
    assert p.valid is valid, p.errors
    if not valid:
        assert p.errors


def test_image_include_person_parsed():
    p = parse_reply("<img><prompt>a cat</prompt><includePerson>false</includePerson></img>")
    assert p.images[0].prompt == "a cat" and p.images[0].include_person is False


def test_renderer_is_deterministic_and_localised():
    a, b = render_system_prompt(ZH), render_system_prompt(ZH)
    assert a == b
    assert "林小雨" in a and "花店老板" in a and "中文" in a and "今天的花真好看" in a
    e = render_system_prompt(EN)
    assert "Max" in e and "pilot" in e and "A small airfield." in e and "English" in e
    assert render_system_prompt(ZH) != render_system_prompt(ZH.model_copy(update={"style": "暴躁"}))


def test_to_chat_prefixes_user_speaker_names_only():
    msgs = [
        Message(role="system", content="场景：雨夜"),
        Message(role="user", content="你好", name="王五"),
        Message(role="assistant", content="嗯"),
    ]
    chat = to_chat(msgs, "CARD")
    assert chat[0] == {"role": "system", "content": "CARD\n\n场景：雨夜"}
    assert chat[1]["content"] == "王五: 你好" and chat[2]["content"] == "嗯"


@pytest.mark.parametrize(
    ("reply", "violation"),
    [
        ("As an AI, I cannot feel anything about planes.", "assistant phrase"),
        ("Max: Let's go flying today, buddy!", "name prefix"),
        ("*smiles* Ready for takeoff, friend?", "stage direction"),
        ("今天天气很好，我们一起去放风筝吧，好不好呀", "language"),
        ("Cool<emotion>ecstatic</emotion>", "markup"),
        (" ".join(["word"] * 60), "length"),
    ],
)
def test_check_reply_flags_each_rule(reply, violation):
    c = check_reply(reply, character_name="Max", language="en")
    assert any(v.startswith(violation) for v in c.violations), c.violations


def test_check_reply_clean_reply_has_no_violation():
    c = check_reply(
        "Sure thing, want to see the hangar first?<emotion>happy</emotion>",
        character_name="Max",
        language="en",
    )
    assert c.violations == []
    assert detect_language("你好，今天过得怎么样？") == "zh"


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        json.dumps({"id": "a", "character_id": "x", "messages": []}) + "\n{bad json\n", encoding="utf-8"
    )
    with pytest.raises(ContractError, match=r"d.jsonl:2: malformed JSON"):
        read_jsonl(f, Dialogue)
    bad = []
    assert len(read_jsonl(f, Dialogue, quarantine=bad.append)) == 1
    assert bad[0].line == 2 and "malformed JSON" in bad[0].reason
    (tmp_path / "latin1.jsonl").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ContractError, match="not UTF-8"):
        read_jsonl(tmp_path / "latin1.jsonl", Dialogue)
    with pytest.raises(ContractError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl", Dialogue)
    g = tmp_path / "f.jsonl"
    g.write_text(
        json.dumps({"id": "a", "character_id": "x", "messages": [{"role": "bot", "content": "x"}]}) + "\n"
    )
    with pytest.raises(ContractError, match=r"f.jsonl:1: field messages.0.role"):
        read_jsonl(g, Dialogue)


def test_write_read_roundtrip_keeps_unicode(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [ZH, EN])
    assert "林小雨" in (tmp_path / "c.jsonl").read_text(encoding="utf-8")
    assert [c.id for c in read_jsonl(tmp_path / "c.jsonl", Character)] == ["lin", "max"]


def test_encoding_masks_exactly_the_character_turns(tiny_model_dir):
    from transformers import AutoTokenizer

    from troupe.train.encoding import encode_dialogue

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    d = Dialogue(
        id="d",
        character_id="lin",
        messages=[
            Message(role="user", content="在吗"),
            Message(role="assistant", content="在呀～<emotion>开心</emotion>"),
            Message(role="user", content="买花"),
            Message(role="assistant", content="要什么花？"),
        ],
    )
    e = encode_dialogue(tok, d, ZH)
    assert len(e.input_ids) == len(e.assistant_masks)
    learned = tok.decode([t for t, m in zip(e.input_ids, e.assistant_masks, strict=True) if m])
    assert "在呀～<emotion>开心</emotion>" in learned and "要什么花？" in learned
    assert "在吗" not in learned and "买花" not in learned and "花店老板" not in learned
    short = encode_dialogue(tok, d, ZH, cutoff_len=10)
    assert len(short.input_ids) == 10


@pytest.mark.parametrize(
    ("text", "narrates"),
    [
        ("*smiles* Ready?", True),
        ("（低头整理花束）在包花呢。", True),
        ("(laughs) Fair enough.", True),
        ("Fine, fine. (sighs dramatically) Let's go.", True),
        ("我在维也纳（现在的奥地利）。", True),  # full-width brackets in zh replies are narration in practice
        ("I grew up in Vienna (present-day Austria).", False),
        ("The party (DAP) was tiny then.", False),
        ("My first book. (2001) was a long year.", False),
        ("Nothing to see here.", False),
    ],
)
def test_stage_direction_rule(text, narrates):
    from troupe.checks import has_stage_direction, strip_stage_directions

    assert has_stage_direction(text) is narrates
    stripped, n = strip_stage_directions(text)
    assert (n > 0) is narrates and (stripped == text) is not narrates


def test_last_user_text_reads_messages_and_dicts():
    from troupe.checks import last_user_text

    msgs = [
        Message(role="user", content="first"),
        Message(role="assistant", content="a"),
        Message(role="user", content="second"),
        Message(role="assistant", content="b"),
    ]
    assert last_user_text(msgs) == "second"
    assert last_user_text([m.model_dump() for m in msgs]) == "second"
    assert last_user_text([{"role": "system", "content": "card"}]) is None
