"""Characters as versioned assets: Character Card V2/V3 import/export, the catalogue, lorebooks.

Reference cards are the hand-written dicts of ``characters/make_example_cards.py`` (the source of the
committed example cards); PNG cards are built and read back here with a small chunk reader/writer
(``struct`` + ``zlib``), independent of the Pillow code under test. S3 is moto's server on loopback.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import importlib.util
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from serving import contract
from troupe.characters.cards import CardError, character_to_card, read_card
from troupe.characters.catalogue import (
    CatalogueError,
    build_catalogue,
    catalogue_version,
    export_character,
    import_card,
    import_cards,
    load_catalogue,
    persona_tokens,
    save_catalogue,
    validate_character,
)
from troupe.characters.lorebook import render_lore, select_lore
from troupe.contract import Character, read_jsonl
from troupe.persona import render_system_prompt

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "characters" / "cards"
SAMPLE_CHARACTERS = ROOT / "data" / "sample" / "characters.jsonl"
TROUPE = str(Path(sys.executable).parent / "troupe")


def _load_examples():
    spec = importlib.util.spec_from_file_location(
        "make_example_cards", ROOT / "characters" / "make_example_cards.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


EX = _load_examples()
WREN_V2: dict = EX.WREN_V2
SHEN_V3: dict = EX.SHEN_V3


# ------------------------------------------------------------------------------ PNG helpers (independent)
def png_chunks(raw: bytes) -> list[tuple[bytes, bytes]]:
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(raw):
        (n,) = struct.unpack(">I", raw[i : i + 4])
        kind, data = raw[i + 4 : i + 8], raw[i + 8 : i + 8 + n]
        assert struct.unpack(">I", raw[i + 8 + n : i + 12 + n])[0] == zlib.crc32(kind + data)
        out.append((kind, data))
        i += 12 + n
    return out


def text_chunks(raw: bytes) -> dict[str, str]:
    return {
        d.split(b"\0", 1)[0].decode("latin-1"): d.split(b"\0", 1)[1].decode("latin-1")
        for k, d in png_chunks(raw)
        if k == b"tEXt"
    }


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_text(png: bytes, texts: dict[str, str]) -> bytes:
    """``png`` with tEXt chunks inserted before IEND (where SillyTavern writes them)."""
    body = b"".join(_chunk(k, d) for k, d in png_chunks(png) if k not in (b"IEND", b"tEXt"))
    extra = b"".join(
        _chunk(b"tEXt", k.encode("latin-1") + b"\0" + v.encode("latin-1")) for k, v in texts.items()
    )
    return png[:8] + body + extra + _chunk(b"IEND", b"")


def b64json(card: dict) -> str:
    return base64.b64encode(json.dumps(card, ensure_ascii=False).encode("utf-8")).decode("ascii")


def card_in_png(raw: bytes, chunk: str) -> dict:
    return json.loads(base64.b64decode(text_chunks(raw)[chunk]).decode("utf-8"))


def pixels(png: bytes) -> tuple[tuple[int, int], bytes]:
    im = Image.open(io.BytesIO(png))
    return im.size, im.convert("RGBA").tobytes()


def rgba_avatar() -> bytes:
    im = Image.new("RGBA", (20, 12), (10, 20, 30, 255))
    im.putpixel((3, 4), (200, 100, 50, 128))
    im.putpixel((19, 11), (0, 0, 0, 0))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


SOURCES = {
    ("v2", "png"): (WREN_V2, EX.wren_avatar(), "chara"),
    ("v2", "json"): (WREN_V2, None, None),
    ("v3", "png"): (SHEN_V3, rgba_avatar(), "ccv3"),
    ("v3", "json"): (SHEN_V3, None, None),
}


def write_source(tmp_path: Path, spec: str, fmt: str, name: str = "card") -> Path:
    card, avatar, chunk = SOURCES[(spec, fmt)]
    p = tmp_path / f"{name}.{fmt}"
    if fmt == "png":
        p.write_bytes(with_text(avatar, {chunk: b64json(card)}))
    else:
        p.write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    return p


def read_exported(path: Path, spec: str) -> dict:
    if path.suffix == ".png":
        return card_in_png(path.read_bytes(), "ccv3" if spec == "v3" else "chara")
    return json.loads(path.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ committed example cards
def test_committed_example_cards_are_their_source_and_tiny():
    png = (CARDS / "wren_calloway.png").read_bytes()
    assert len(png) < 20_000 and (CARDS / "shen_xinghe.json").stat().st_size < 20_000
    assert card_in_png(png, "chara") == WREN_V2 and "ccv3" not in text_chunks(png)
    assert json.loads((CARDS / "shen_xinghe.json").read_text(encoding="utf-8")) == SHEN_V3
    assert read_card(CARDS / "wren_calloway.png").card == WREN_V2
    assert pixels(read_card(CARDS / "wren_calloway.png").avatar_png) == pixels(EX.wren_avatar())
    training_ids = {c.id for c in read_jsonl(SAMPLE_CHARACTERS, Character)}
    names = {c.name for c in read_jsonl(SAMPLE_CHARACTERS, Character)}
    for card, cid in ((WREN_V2, "wren_calloway"), (SHEN_V3, "shen_xinghe")):
        assert cid not in training_ids and card["data"]["name"] not in names
        assert card["data"]["first_mes"] and card["data"]["character_book"]["entries"]


def test_example_cards_pass_validation_and_map_onto_the_contract():
    cat = []
    for f in ("wren_calloway.png", "shen_xinghe.json"):
        cf = read_card(CARDS / f)
        from troupe.characters.cards import card_to_character

        c = card_to_character(cf.card, file=f)
        assert validate_character(c) == [], f
        cat.append(c)
    wren, shen = cat
    d = WREN_V2["data"]
    assert (wren.id, wren.name, wren.language) == ("wren_calloway", d["name"], "en")
    assert wren.profile == {
        "occupation": "owner of a night bakery by the river",
        "age": "38",
        "known for": "cardamom buns and terrible puns",
        "companion": "a one-eyed ginger cat called Biscuit",
    }
    assert wren.style == d["personality"] and wren.greetings == [d["first_mes"], *d["alternate_greetings"]]
    assert (
        wren.scene
        == "It is three in the morning in Wren Calloway's bakery; the user has wandered in from the cold fog."
    )
    assert wren.examples == [
        "Sleep is for people who don't own ovens, sunshine.",
        "Cardamom buns. They are always good, that's the whole trick.",
    ]
    assert wren.lorebook == d["character_book"] and wren.tags == d["tags"] and wren.creator == "troupe"
    assert (
        wren.system_prompt == d["system_prompt"] and wren.post_history_instructions == "Stay warm and brief."
    )
    s = SHEN_V3["data"]
    assert (shen.id, shen.language, shen.profile) == ("shen_xinghe", "zh", {"简介": s["description"]})
    assert shen.examples == ["因为大气在晃呀，就像隔着热气看路灯。", "织女星，亮得很安静，像我一样。"]
    assert shen.scene == "夏夜的天文馆屋顶，用户第一次来看流星雨。"


# ------------------------------------------------------------------------------ lossless round trips
@pytest.mark.parametrize(("spec", "fmt"), sorted(SOURCES))
def test_import_export_import_is_lossless(tmp_path, spec, fmt):
    card, avatar, _ = SOURCES[(spec, fmt)]
    src = write_source(tmp_path, spec, fmt)
    cat1, cat2 = tmp_path / "a" / "characters.jsonl", tmp_path / "b" / "characters.jsonl"
    c1 = import_card(src, str(cat1))
    out = export_character(str(cat1), c1.id, tmp_path / f"out.{fmt}")
    assert read_exported(out, spec) == card  # every field, extensions and character_book included
    if fmt == "png":
        assert pixels(out.read_bytes()) == pixels(avatar)
        if spec == "v3":  # V2-only readers get the chara chunk too
            assert card_in_png(out.read_bytes(), "chara")["data"]["name"] == card["data"]["name"]
    c2 = import_card(out, str(cat2))
    assert c2 == c1
    assert load_catalogue(str(cat1)).version == load_catalogue(str(cat2)).version


def test_lossless_with_nulls_absent_fields_unknown_keys_and_short_lines(tmp_path):
    """Nulls, absent fields, bullet descriptions, a mes_example without <START>, unknown keys at the root
    and in data: all come back; the language of short English lines is told from them together."""
    card = {"spec": "chara_card_v2", "spec_version": "2.0", "avatar": "none", "name": "Ada Finch", "description": "old",
            "data": {"name": "Ada Finch", "description": "- job: pilot\n- age: 40", "personality": None,
                     "scenario": "  {{char}} flies.  ", "first_mes": "",
                     "alternate_greetings": ["Hello there, {{user}}! Ready to fly today?"],
                     "mes_example": "{{char}}: Wheels up.\n{{user}}: ok\n<START>\nJust a plain line here, no prefix.",
                     "creator_notes": "", "tags": None, "character_book": None, "extensions": {"x": 1},
                     "weird": [1, {"a": None}]}}  # fmt: skip
    p = tmp_path / "ada.json"
    p.write_text(json.dumps(card), encoding="utf-8")
    cat = str(tmp_path / "c" / "characters.jsonl")
    c = import_card(p, cat)
    assert (c.id, c.language, c.profile, c.scene) == (
        "ada_finch",
        "en",
        {"job": "pilot", "age": "40"},
        "Ada Finch flies.",
    )
    assert c.examples == ["Wheels up.", "Just a plain line here, no prefix."] and c.style == ""
    out = read_exported(export_character(cat, c.id, tmp_path / "o.json"), "v2")
    assert out["data"]["extensions"].pop("troupe") == {"id": "ada_finch", "language": "en"}
    assert out == card


def test_png_card_prefers_ccv3_over_chara(tmp_path):
    p = tmp_path / "both.png"
    other = copy.deepcopy(WREN_V2)
    p.write_bytes(with_text(EX.wren_avatar(), {"chara": b64json(other), "ccv3": b64json(SHEN_V3)}))
    assert read_card(p).card == SHEN_V3


def test_v3_to_v2_keeps_v3_fields_in_extensions_and_back(tmp_path):
    cat = str(tmp_path / "c" / "characters.jsonl")
    c = import_card(write_source(tmp_path, "v3", "json"), cat)
    v2 = read_exported(export_character(cat, c.id, tmp_path / "s2.json", spec="v2"), "v2")
    assert v2["spec"] == "chara_card_v2" and v2["spec_version"] == "2.0"
    v3_only = {k: SHEN_V3["data"][k] for k in ("assets", "nickname", "creator_notes_multilingual", "source",
                                              "group_only_greetings", "creation_date", "modification_date")}  # fmt: skip
    assert not set(v3_only) & set(v2["data"])
    assert v2["data"]["extensions"]["troupe"]["v3"] == v3_only
    for k in ("name", "description", "first_mes", "mes_example", "character_book", "system_prompt", "tags"):
        assert v2["data"][k] == SHEN_V3["data"][k], k
    cat2 = str(tmp_path / "d" / "characters.jsonl")
    c2 = import_card(tmp_path / "s2.json", cat2)
    assert read_exported(export_character(cat2, c2.id, tmp_path / "s3.json", spec="v3"), "v3") == SHEN_V3


def test_v2_to_v3_and_back_keeps_the_v2_data(tmp_path):
    cat = str(tmp_path / "c" / "characters.jsonl")
    c = import_card(write_source(tmp_path, "v2", "png"), cat)
    v3 = read_exported(export_character(cat, c.id, tmp_path / "w3.png", spec="v3"), "v3")
    assert v3["spec"] == "chara_card_v3" and v3["spec_version"] == "3.0"
    assert v3["data"]["group_only_greetings"] == [] and set(v3) == {"spec", "spec_version", "data"}
    cat2 = str(tmp_path / "d" / "characters.jsonl")
    c2 = import_card(tmp_path / "w3.png", cat2)
    back = read_exported(export_character(cat2, c2.id, tmp_path / "w2.json", spec="v2"), "v2")
    assert back["data"] == WREN_V2["data"]  # V3 has no top-level V1 mirrors: only data comes back


def test_card_without_troupe_extension_gets_language_and_id(tmp_path):
    card = copy.deepcopy(SHEN_V3)
    del card["data"]["extensions"]["troupe"]
    p = tmp_path / "x.json"
    p.write_text(json.dumps(card, ensure_ascii=False), encoding="utf-8")
    cat = str(tmp_path / "c" / "characters.jsonl")
    c = import_card(p, cat)
    assert c.language == "zh"  # detected from greetings/examples
    assert c.id == "char-" + hashlib.sha256("沈星河".encode()).hexdigest()[:8]
    out = read_exported(export_character(cat, c.id, tmp_path / "y.json"), "v3")
    assert out["data"]["extensions"]["troupe"] == {"id": c.id, "language": "zh"}
    del out["data"]["extensions"]["troupe"]
    assert out == card
    en = copy.deepcopy(WREN_V2)
    del en["data"]["extensions"]["troupe"]
    (tmp_path / "e.json").write_text(json.dumps(en), encoding="utf-8")
    got = import_card(tmp_path / "e.json", cat, id="wren2")
    assert (got.id, got.language) == ("wren2", "en")


def test_edited_character_exports_its_new_fields(tmp_path):
    """A field changed after import wins over the source text kept for the lossless export."""
    cat = str(tmp_path / "c" / "characters.jsonl")
    c = import_card(write_source(tmp_path, "v2", "json"), cat)
    edited = c.model_copy(update={"examples": ["Flour everywhere, sunshine."], "style": "Grumpy."})
    card = character_to_card(edited)
    assert card["data"]["mes_example"] == "<START>\n{{char}}: Flour everywhere, sunshine."
    assert card["data"]["personality"] == "Grumpy." and card["personality"] == "Grumpy."  # V1 mirror follows
    assert card["data"]["scenario"] == WREN_V2["data"]["scenario"]  # unedited: the source text, macros kept


def test_character_without_card_exports_a_valid_card(tmp_path):
    c = read_jsonl(SAMPLE_CHARACTERS, Character)[0]
    card = character_to_card(c, "v2")
    d = card["data"]
    assert card["spec"] == "chara_card_v2" and d["name"] == c.name and d["personality"] == c.style
    assert d["extensions"]["troupe"] == {"id": c.id, "language": c.language}
    assert {"creator_notes", "alternate_greetings", "tags", "creator", "character_version"} <= set(d)
    from troupe.characters.cards import card_to_character

    back = card_to_character(card, file="x.json")
    assert (back.profile, back.examples, back.scene) == (c.profile, c.examples, c.scene)


# ------------------------------------------------------------------------------ bad input
def _png(texts: dict[str, str]) -> bytes:
    return with_text(EX.wren_avatar(), texts)


def _json_card(mutate) -> bytes:
    card = copy.deepcopy(WREN_V2)
    mutate(card)
    return json.dumps(card).encode()


def _many_entries(c):
    e = c["data"]["character_book"]["entries"][0]
    c["data"]["character_book"]["entries"] = [dict(e, id=i) for i in range(2001)]


def _big_book(c):
    c["data"]["character_book"]["entries"][0]["content"] = "lore " * 220_000


BAD = [
    ("card.png", b"definitely not an image", "card.png: image: not a PNG file"),
    ("card.png", EX.wren_avatar()[:60], "card.png: image: not a readable PNG"),
    ("card.png", EX.wren_avatar(), "card.png: chunk 'chara': missing"),
    ("card.png", _png({"chara": "not*base64!"}), "card.png: chunk 'chara': invalid base64"),
    (
        "card.png",
        _png({"chara": base64.b64encode(b"{oops").decode()}),
        "card.png: chunk 'chara': invalid JSON",
    ),
    ("card.png", _png({"chara": b64json(WREN_V2), "ccv3": "%%%"}), "card.png: chunk 'ccv3': invalid base64"),
    ("card.json", b'{"spec": "chara_card_v2", ', "card.json: json: invalid JSON"),
    ("card.json", _json_card(lambda c: c.update(spec="chara_card_v9")), "card.json: spec: unknown spec"),
    ("card.json", _json_card(lambda c: c.update(spec_version="1.0")), "card.json: spec_version: unknown"),
    ("card.json", _json_card(lambda c: c["data"].update(tags="x")), "card.json: data.tags: expected a list"),
    ("card.json", _json_card(lambda c: c["data"].update(name="")), "card.json: data.name: missing or empty"),
    ("card.json", _json_card(_many_entries), "card.json: data.character_book.entries: 2001 entries > 2000"),
    ("card.json", _json_card(_big_book), "card.json: data.character_book: "),
    (
        "card.json",
        _json_card(lambda c: c["data"].update(first_mes="As an AI, I cannot bake anything.")),
        "card.json: greetings[0]: blacklisted assistant phrase 'as an ai'",
    ),
]


@pytest.mark.parametrize(("name", "raw", "message"), BAD, ids=[m for _, _, m in BAD])
def test_bad_card_names_file_and_field_and_changes_nothing(tmp_path, name, raw, message):
    cat = tmp_path / "cat" / "characters.jsonl"
    import_card(write_source(tmp_path, "v3", "png"), str(cat))
    before = {p: p.read_bytes() for p in cat.parent.rglob("*") if p.is_file()}
    bad = tmp_path / name
    bad.write_bytes(raw)
    with pytest.raises(CardError) as e:
        import_cards([write_source(tmp_path, "v2", "json", "good"), bad], str(cat))
    assert message in str(e.value)
    assert {p: p.read_bytes() for p in cat.parent.rglob("*") if p.is_file()} == before


def test_duplicate_id_is_an_error_unless_replace(tmp_path):
    cat = tmp_path / "c" / "characters.jsonl"
    import_card(write_source(tmp_path, "v2", "png"), str(cat))
    before = cat.read_bytes()
    with pytest.raises(CatalogueError, match="'wren_calloway' already in the catalogue"):
        import_card(write_source(tmp_path, "v2", "json"), str(cat))
    assert cat.read_bytes() == before
    with pytest.raises(CatalogueError, match="'wren_calloway' also comes from"):
        import_cards(
            [write_source(tmp_path, "v2", "json", "a"), write_source(tmp_path, "v2", "json", "b")], str(cat)
        )
    assert cat.read_bytes() == before
    replaced = import_card(write_source(tmp_path, "v2", "json"), str(cat), replace=True)
    assert load_catalogue(str(cat)).get("wren_calloway") == replaced and "avatar" not in replaced.card


# ------------------------------------------------------------------------------ catalogue versions
def test_catalogue_version_changes_iff_content_changes(tmp_path):
    chars = read_jsonl(SAMPLE_CHARACTERS, Character)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    va = save_catalogue(chars, str(a))
    vb = save_catalogue(list(reversed(chars)), str(b))
    assert va == vb == "sha256:" + hashlib.sha256(a.read_bytes()).hexdigest()[:16]
    assert a.read_bytes() == b.read_bytes()
    ids = [json.loads(x)["id"] for x in a.read_text(encoding="utf-8").splitlines()]
    assert ids == sorted(c.id for c in chars)
    assert save_catalogue(chars, str(a)) == va and load_catalogue(str(a)).version == va
    changed = [chars[0].model_copy(update={"style": chars[0].style + "!"}), *chars[1:]]
    vc = save_catalogue(changed, str(a))
    assert vc != va and vc == catalogue_version(a.read_text(encoding="utf-8"))
    with pytest.raises(CatalogueError, match="duplicate character id"):
        save_catalogue([*chars, chars[0]], str(a))
    assert load_catalogue(str(a)).version == vc  # a failed save leaves the file as it was
    with pytest.raises(CatalogueError, match="changed while this import ran"):
        save_catalogue(chars, str(a), expected_version=va)


def test_records_without_card_fields_keep_their_bytes(tmp_path):
    from troupe.contract import write_jsonl

    out = tmp_path / "chars.jsonl"
    write_jsonl(out, read_jsonl(SAMPLE_CHARACTERS, Character))
    assert out.read_bytes() == SAMPLE_CHARACTERS.read_bytes()


def test_build_catalogue_from_training_characters_and_cards(tmp_path):
    out = tmp_path / "cat" / "characters.jsonl"
    cat = build_catalogue(SAMPLE_CHARACTERS, CARDS, str(out))
    training = read_jsonl(SAMPLE_CHARACTERS, Character)
    assert set(cat.characters) == {c.id for c in training} | {"wren_calloway", "shen_xinghe"}
    assert cat.version == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()[:16]
    assert pixels(Path(cat.avatar_uri("wren_calloway")).read_bytes()) == pixels(EX.wren_avatar())
    bad = tmp_path / "cards"
    bad.mkdir()
    (bad / "broken.json").write_text("{", encoding="utf-8")
    (bad / "twin.json").write_text(json.dumps(dict(SHEN_V3, data={**SHEN_V3["data"], "extensions": {
        "troupe": {"id": training[0].id, "language": "zh"}}})), encoding="utf-8")  # fmt: skip
    with pytest.raises(CatalogueError) as e:
        build_catalogue(SAMPLE_CHARACTERS, bad, str(tmp_path / "x" / "characters.jsonl"))
    assert "broken.json: json: invalid JSON" in str(
        e.value
    ) and f"twin.json: id: character id {training[0].id!r}" in str(e.value)
    assert not (tmp_path / "x").exists()


def test_the_general_data_placeholder_is_not_served(tmp_path):
    """A run with general instruction data has the placeholder card in its split's characters; the
    catalogue built from it leaves that card out (nobody to chat with)."""
    from troupe.contract import GENERAL_CHARACTER_ID, write_jsonl
    from troupe.data.importers import general_card

    chars = tmp_path / "characters.jsonl"
    write_jsonl(chars, [*read_jsonl(SAMPLE_CHARACTERS, Character), general_card()])
    cat = build_catalogue(chars, None, str(tmp_path / "cat" / "characters.jsonl"))
    assert GENERAL_CHARACTER_ID not in cat.characters
    assert set(cat.characters) == {c.id for c in read_jsonl(SAMPLE_CHARACTERS, Character)}


# ------------------------------------------------------------------------------ S3
@pytest.fixture
def s3_env(tmp_path, monkeypatch):
    import boto3
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": str(tmp_path / "none"),
                 "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="cards")
    try:
        yield client
    finally:
        server.stop()


def test_catalogue_on_s3(tmp_path, s3_env):
    uri = "s3://cards/catalogue/characters.jsonl"
    srcs = [write_source(tmp_path, "v2", "png"), write_source(tmp_path, "v3", "json")]
    import_cards(srcs, uri)
    local = tmp_path / "local" / "characters.jsonl"
    import_cards(srcs, str(local))
    body = s3_env.get_object(Bucket="cards", Key="catalogue/characters.jsonl")["Body"].read()
    assert body == local.read_bytes()
    cat = load_catalogue(uri)
    assert (
        cat.version == load_catalogue(str(local)).version == "sha256:" + hashlib.sha256(body).hexdigest()[:16]
    )
    key = cat.avatar_uri("wren_calloway").removeprefix("s3://cards/")
    assert key.startswith("catalogue/avatars/")
    assert pixels(s3_env.get_object(Bucket="cards", Key=key)["Body"].read()) == pixels(EX.wren_avatar())
    out = export_character(uri, "wren_calloway", tmp_path / "w.png")
    assert card_in_png(out.read_bytes(), "chara") == WREN_V2 and pixels(out.read_bytes()) == pixels(
        EX.wren_avatar()
    )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(dict(WREN_V2, spec="nope")), encoding="utf-8")
    with pytest.raises(CardError, match="bad.json: spec"):
        import_card(bad, uri)
    with pytest.raises(CatalogueError, match="already in the catalogue"):
        import_card(srcs[0], uri)
    assert s3_env.get_object(Bucket="cards", Key="catalogue/characters.jsonl")["Body"].read() == body


# ------------------------------------------------------------------------------ lorebook
BOOK = {
    "scan_depth": 4,
    "extensions": {},
    "entries": [
        {"keys": ["dragon"], "content": "A lore", "insertion_order": 5, "enabled": True, "extensions": {}},
        {"keys": ["Castle"], "case_sensitive": True, "content": "B lore", "insertion_order": 1, "enabled": True,
         "extensions": {}},
        {"keys": [], "constant": True, "content": "C lore", "insertion_order": 3, "enabled": True, "extensions": {}},
        {"keys": ["KING"], "selective": True, "secondary_keys": ["crown", "throne"], "content": "D lore",
         "insertion_order": 2, "enabled": True, "extensions": {}},
        {"keys": ["dragon"], "content": "E lore", "insertion_order": 0, "enabled": False, "extensions": {}},
        {"keys": ["sword"], "content": "F lore", "insertion_order": 4, "enabled": True, "extensions": {"scan_depth": 1}},
        {"keys": ["harp"], "content": "G lore", "insertion_order": 6, "enabled": True, "extensions": {"scan_depth": 1}},
    ],
}  # fmt: skip
CHAT = [
    {"role": "system", "content": "a harp and a dragon in the system prompt are not chat"},
    {"role": "user", "content": "The dragon flew over us."},
    {"role": "assistant", "content": "I play the harp."},
    {"role": "user", "content": "The castle of the king!"},
    {"role": "assistant", "content": "A crown glints there."},
    {"role": "user", "content": "Where is my sword?"},
]


def _contents(entries):
    return [e["content"] for e in entries]


def test_lore_selection_keys_depth_constant_selective_order():
    got = select_lore(BOOK, CHAT, budget_tokens=1000)
    # dragon: 5 messages back (> scan_depth 4); Castle: case-sensitive; E: disabled; harp: entry depth 1
    assert _contents(got) == ["D lore", "C lore", "F lore"]
    assert _contents(select_lore({**BOOK, "scan_depth": 5}, CHAT, budget_tokens=1000)) == [
        "D lore", "C lore", "F lore", "A lore"]  # fmt: skip
    no_crown = [*CHAT[:4], {"role": "assistant", "content": "Nothing there."}, CHAT[5]]
    assert "D lore" not in _contents(select_lore(BOOK, no_crown, budget_tokens=1000))
    assert _contents(select_lore(BOOK, [], budget_tokens=1000)) == ["C lore"]
    assert _contents(select_lore({**BOOK, "scan_depth": 0}, CHAT, budget_tokens=1000)) == ["C lore", "F lore"]
    assert render_lore(got) == "D lore\n\nC lore\n\nF lore"
    assert select_lore(None, CHAT, budget_tokens=100) == []


def test_lore_budget_keeps_constant_then_highest_order():
    ten = lambda text: 10  # noqa: E731
    assert _contents(select_lore(BOOK, CHAT, budget_tokens=25, count_tokens=ten)) == ["C lore", "F lore"]
    assert _contents(
        select_lore({**BOOK, "token_budget": 15}, CHAT, budget_tokens=100, count_tokens=ten)
    ) == ["C lore"]
    prio = copy.deepcopy(BOOK)
    prio["entries"][3]["priority"] = 5  # D outranks F under the budget now
    assert _contents(select_lore(prio, CHAT, budget_tokens=25, count_tokens=ten)) == ["D lore", "C lore"]


def test_lore_regex_keys_and_decorators():
    book = {"entries": [
        {"keys": ["drag(on|ons)"], "use_regex": True, "content": "@@depth 4\nDragons hoard.", "insertion_order": 1,
         "enabled": True},
        {"keys": ["/c[a]t+/i"], "content": "Cats purr.", "insertion_order": 2, "enabled": True},
        {"keys": ["(broken"], "use_regex": True, "content": "never", "insertion_order": 3, "enabled": True},
        {"keys": ["art"], "content": "Art.", "insertion_order": 4, "enabled": True,
         "extensions": {"match_whole_words": True}},
    ]}  # fmt: skip
    chat = [{"role": "user", "content": "Two dragons and a CAT at the party."}]
    assert render_lore(select_lore(book, chat, budget_tokens=100)) == "Dragons hoard.\n\nCats purr."


# ------------------------------------------------------------------------------ validation
def _wren() -> Character:
    from troupe.characters.cards import card_to_character

    return card_to_character(WREN_V2, file="wren")


def test_validate_reports_too_long_wrong_language_blacklist_pii():
    wren = _wren()
    assert validate_character(wren, context_tokens=4096) == []
    long = validate_character(wren, context_tokens=200)
    assert [(p.field, p.code) for p in long] == [("persona", "too_long")] and "> context 200 tokens" in long[
        0
    ].reason
    bad = wren.model_copy(update={
        "examples": [*wren.examples, "这是一句中文的示例，角色却应该说英语。"],
        "greetings": ["As an AI, I cannot smell the bread.", *wren.greetings[1:]],
        "lorebook": {"entries": [{"keys": ["phone"], "content": "Call Wren at +1 415-555-0134.", "enabled": True}]},
    })  # fmt: skip
    got = {(p.field, p.code) for p in validate_character(bad, context_tokens=4096)}
    assert got == {
        ("examples[2]", "wrong_language"),
        ("greetings[0]", "blacklist"),
        ("lorebook.entries[0].content", "pii"),
    }


def test_persona_estimate_is_an_upper_bound_of_the_real_count(tiny_model_dir):
    from troupe.characters.cards import card_to_character
    from troupe.data.validate import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    chars = [card_to_character(SHEN_V3, file="s"), _wren(), *read_jsonl(SAMPLE_CHARACTERS, Character)]
    for c in chars:
        real = persona_tokens(c, context_tokens=1024, tokenizer=tok)
        assert real <= persona_tokens(c, context_tokens=1024) <= 1.5 * real, c.id
    assert validate_character(chars[0], tokenizer=tok) == []


def test_card_system_prompt_is_a_section_after_the_rules():
    wren = _wren()
    p = render_system_prompt(wren)
    rules, extra = p.index("## Basic rules"), p.index("## Additional instructions")
    assert rules < extra and p.endswith(
        "## Additional instructions\nWren Calloway never gives medical or legal advice; she changes the subject to bread instead."
    )
    plain = render_system_prompt(wren.model_copy(update={"system_prompt": ""}))
    assert plain == p[: p.index("\n\n## Additional instructions")]
    shen = render_system_prompt(
        Character(id="s", name="沈星河", language="zh", system_prompt="{{original}}\n{{char}}只讲天文学。")
    )
    assert shen.endswith("## 补充说明\n沈星河只讲天文学。") and "## 基本规则" in shen


# ------------------------------------------------------------------------------ registry
def test_registered_version_names_its_catalogue(mlflow_server, tmp_path, tiny_model_dir, monkeypatch):
    import mlflow

    from tests.test_registry import _params, make_result, worse
    from troupe.registry import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("TROUPE_PIPELINE_RUN", "catalogue-run")
    name = "troupe-catalogue-test"
    params = _params(tmp_path, tiny_model_dir, make_result({"dpo": worse(language_consistency=0.99)}), name)
    cat = tmp_path / "catalogue" / "characters.jsonl"
    build_catalogue(Path(params["paths"]["splits"]) / "characters.jsonl", CARDS, str(cat))
    params["paths"]["catalogue"] = str(cat)
    d = register(params)
    client = mlflow.MlflowClient(mlflow_server)
    tags = client.get_model_version(name, d["version"]).tags
    assert (
        tags[contract.CATALOGUE_VERSION_TAG] == "sha256:" + hashlib.sha256(cat.read_bytes()).hexdigest()[:16]
    )
    assert tags[contract.CATALOGUE_URI_TAG] == str(cat.resolve())
    assert tags[contract.CHARACTERS_URI_TAG].endswith("/characters.jsonl")  # the characters tags stay
    params["paths"]["catalogue"] = str(tmp_path / "no-catalogue" / "characters.jsonl")
    d2 = register(params)
    tags2 = client.get_model_version(name, d2["version"]).tags
    chars = (Path(params["paths"]["splits"]) / "characters.jsonl").read_bytes()
    assert tags2[contract.CATALOGUE_VERSION_TAG] == "sha256:" + hashlib.sha256(chars).hexdigest()[:16]
    assert tags2[contract.CATALOGUE_URI_TAG] == tags2[contract.CHARACTERS_URI_TAG]


# ------------------------------------------------------------------------------ CLI
def _troupe(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([TROUPE, "characters", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_import_list_show_export_import(tmp_path):
    cat, cat2 = str(tmp_path / "a" / "characters.jsonl"), str(tmp_path / "b" / "characters.jsonl")
    r = _troupe(
        "import", str(CARDS / "wren_calloway.png"), str(CARDS / "shen_xinghe.json"), "--catalogue", cat
    )
    assert r.returncode == 0, r.stderr
    version = "sha256:" + hashlib.sha256(Path(cat).read_bytes()).hexdigest()[:16]
    r = _troupe("list", "--catalogue", cat)
    assert r.returncode == 0 and version in r.stdout
    rows = {ln.split("│")[1].strip(): [x.strip() for x in ln.split("│")[2:6]] for ln in r.stdout.splitlines()
            if ln.count("│") >= 6 and "_" in ln}  # fmt: skip
    assert rows == {
        "shen_xinghe": ["沈星河", "zh", "2", "2"],
        "wren_calloway": ["Wren Calloway", "en", "2", "3"],
    }
    r = _troupe("show", "shen_xinghe", "--catalogue", cat, "--prompt")
    assert r.returncode == 0 and json.loads(r.stdout.split("\n--- system prompt ---")[0])["name"] == "沈星河"
    assert r.stdout.rstrip().endswith("## 补充说明\n沈星河不讲占星术，只讲天文学。")
    for cid, out in (("wren_calloway", "w.png"), ("shen_xinghe", "s.json")):
        r = _troupe("export", cid, "--catalogue", cat, "--out", str(tmp_path / out))
        assert r.returncode == 0, r.stderr
    assert card_in_png((tmp_path / "w.png").read_bytes(), "chara") == WREN_V2
    r = _troupe("import", str(tmp_path / "w.png"), str(tmp_path / "s.json"), "--catalogue", cat2)
    assert r.returncode == 0, r.stderr
    assert load_catalogue(cat2).characters == load_catalogue(cat).characters
    r = _troupe("import", str(CARDS / "wren_calloway.png"), "--catalogue", cat)
    assert r.returncode == 2 and "'wren_calloway' already in the catalogue" in r.stderr
    r = _troupe("validate", "--catalogue", cat)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_validate_lists_problems_and_exits_1(tmp_path):
    bad = copy.deepcopy(WREN_V2)
    bad["data"]["first_mes"] = "As an AI language model I do not bake."
    (tmp_path / "bad.json").write_text(json.dumps(bad), encoding="utf-8")
    (tmp_path / "broken.png").write_bytes(EX.wren_avatar())
    r = _troupe(
        "validate", str(tmp_path / "bad.json"), str(tmp_path / "broken.png"), str(CARDS / "shen_xinghe.json")
    )
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        "bad.json: greetings[0]: blacklisted assistant phrase 'as an ai'",
        "broken.png: chunk 'chara': missing (no 'chara' or 'ccv3' tEXt chunk)",
    ]
    r = _troupe("validate", str(CARDS / "shen_xinghe.json"), "--set", "data.cutoff_len=300")
    assert r.returncode == 1 and "shen_xinghe.json: persona: rendered persona card" in r.stdout


def test_cli_build(tmp_path):
    out = tmp_path / "cat" / "characters.jsonl"
    r = _troupe("build", "--from", str(SAMPLE_CHARACTERS), "--cards", str(CARDS), "--out", str(out))
    assert r.returncode == 0, r.stderr
    n = len(SAMPLE_CHARACTERS.read_text(encoding="utf-8").splitlines()) + 2
    assert len(out.read_text(encoding="utf-8").splitlines()) == n and f"{n} characters" in r.stdout
