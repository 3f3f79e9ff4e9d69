"""Character Card V2/V3 <-> :class:`troupe.contract.Character`: read, map, write (JSON and PNG).

Specs: Character Card V2 (github.com/malfoyslastname/character-card-spec-v2, ``spec_v2.md``:
``spec: "chara_card_v2"``, ``spec_version: "2.0"``, all fields under ``data``) and V3
(github.com/kwaroran/character-card-spec-v3, ``SPEC_V3.md``: ``spec: "chara_card_v3"``,
``spec_version: "3.0"``, a superset of V2's ``data``). A card is a JSON file, or a PNG whose ``tEXt``
chunk ``chara`` (V2) or ``ccv3`` (V3) holds the card JSON as UTF-8 -> base64; when both chunks are
there ``ccv3`` wins (V3 spec, "Embedding Methods"), as in SillyTavern's ``src/character-card-parser.js``.

Card -> Character (``data.*``; macros are filled with :func:`troupe.persona.fill_macros`, the V3
``nickname`` standing in for the name when set):

=============================================  ===============================================
``name``                                       ``name``
``description``                                ``profile``: ``{"key": "value"}`` when every line
                                               is ``key: value`` (2+ lines, unique keys), else
                                               ``{"description"|"简介": text}``
``personality``                                ``style``
``scenario``                                   ``scene``
``mes_example``                                ``examples``: the ``{{char}}:`` turns of each
                                               ``<START>`` block (``{{user}}:`` turns dropped;
                                               a block without speaker prefixes gives its lines)
``first_mes`` + ``alternate_greetings``        ``greetings`` (macros kept: filled at serve time)
``system_prompt``                              ``system_prompt`` (rendered after the rules)
``post_history_instructions``, ``tags``,       the fields of the same name
``creator``, ``character_version``
``character_book``                             ``lorebook`` (verbatim)
``extensions.troupe.id``                       ``id`` (else a slug of the name, :func:`slug`)
``extensions.troupe.language``                 ``language`` (else detected, :func:`detect_card_language`)
=============================================  ===============================================

Everything else is kept in ``Character.card`` so an export gives back the card it came from::

    {"spec", "spec_version",
     "data":      {data fields no Character field holds: creator_notes, extensions, V3 fields
                   (assets, nickname, group_only_greetings, creator_notes_multilingual, source,
                   creation_date, modification_date), unknown fields},
     "overrides": {group: {the source's own fields}} for a mapping the Character fields do not
                  regenerate byte for byte (e.g. a description written as a bullet list, macros);
                  used on export only while the Character field still equals what they map to,
                  so an edited field wins,
     "root":      {top-level fields besides spec/spec_version/data, e.g. SillyTavern's},
     "mirrored":  [top-level V1 fields that mirrored data.*; written again from data on export],
     "avatar":    "avatars/<sha256>.png" (PNG cards: the image, relative to the catalogue file)}

Export writes ``data.extensions.troupe`` = ``{"id", "language"}`` (kept with any other keys there).
Converting between specs keeps what the target can hold: V3 -> V2 moves the V3-only ``data`` fields
into ``data.extensions.troupe.v3`` (restored by a later V3 export; an empty ``group_only_greetings``
is dropped, as a V3 export adds it back); V2 -> V3 adds the required
``group_only_greetings: []`` and drops V2's top-level fields (V3 has only spec/spec_version/data).
A V3 PNG also carries a V2 ``chara`` chunk for V2-only readers (as SillyTavern writes both), without
the spec's optional "loaded as V2" note in ``creator_notes``. JSON cards carry no image.

Errors: :class:`CardError` names the file and field, e.g. ``card.png: chunk 'chara': invalid base64``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from troupe.contract import Character, ContractError, describe_error
from troupe.persona import fill_macros

SPEC_V2, SPEC_V3 = "chara_card_v2", "chara_card_v3"
#: PNG tEXt chunk keyword of each spec.
CHUNKS = {SPEC_V2: "chara", SPEC_V3: "ccv3"}
SPEC_VERSIONS = {SPEC_V2: "2.0", SPEC_V3: "3.0"}
#: ``--spec`` names.
SPEC_NAMES = {"v2": SPEC_V2, "v3": SPEC_V3}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Largest card JSON accepted (bytes, after base64 decoding for PNG cards).
MAX_CARD_BYTES = 8 * 1024 * 1024
#: Largest lorebook accepted: entries and bytes of its JSON.
MAX_LORE_ENTRIES = 2000
MAX_LORE_BYTES = 1024 * 1024
#: ``Character.id`` pattern (contract recommendation).
ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]+$")

V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
V2_DATA_ORDER = (
    *V1_FIELDS,
    "creator_notes",
    "system_prompt",
    "post_history_instructions",
    "alternate_greetings",
    "character_book",
    "tags",
    "creator",
    "character_version",
    "extensions",
)
V3_ONLY_FIELDS = (
    "assets",
    "nickname",
    "creator_notes_multilingual",
    "source",
    "group_only_greetings",
    "creation_date",
    "modification_date",
)
#: profile key holding a description that is not a ``key: value`` list
DESCRIPTION_KEY = {"zh": "简介"}


class CardError(ContractError):
    """A card that cannot be imported; ``str()`` is ``"<file>: <field>: <reason>"``."""

    def __init__(self, file: str, field: str, reason: str):
        super().__init__(f"{file}: {field}: {reason}")
        self.file, self.field, self.reason = file, field, reason


@dataclass
class CardFile:
    """A card as read from a file: the card JSON and, for PNG cards, the image without card chunks."""

    card: dict[str, Any]
    avatar_png: bytes | None
    file: str


# --------------------------------------------------------------------------------------- reading
def read_card(path: str | Path) -> CardFile:
    """Read a card file: PNG (by its signature, whatever the suffix) or JSON.

    Raises:
        CardError: unreadable file, bad PNG, missing chunk, invalid base64/UTF-8/JSON, too large.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise CardError(p.name, "file", f"cannot be read ({e.strerror or e})") from e
    if raw.startswith(PNG_SIGNATURE):
        card, avatar = parse_png(raw, p.name)
        return CardFile(card, avatar, p.name)
    if p.suffix.lower() == ".png":
        raise CardError(p.name, "image", "not a PNG file (no PNG signature)")
    return CardFile(parse_json(raw, p.name, "json"), None, p.name)


def parse_json(raw: bytes, file: str, field: str) -> dict[str, Any]:
    """The card object of UTF-8 JSON bytes (a leading BOM dropped); ``field`` names the source in errors."""
    if len(raw) > MAX_CARD_BYTES:
        raise CardError(file, field, f"{len(raw)} bytes > {MAX_CARD_BYTES} (MAX_CARD_BYTES)")
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise CardError(file, field, f"not UTF-8 (byte {e.start})") from e
    try:
        card = json.loads(text)
    except json.JSONDecodeError as e:
        raise CardError(file, field, f"invalid JSON ({e.msg}, line {e.lineno} column {e.colno})") from e
    if not isinstance(card, dict):
        raise CardError(file, field, f"expected a JSON object, got {type(card).__name__}")
    return card


def parse_png(raw: bytes, file: str) -> tuple[dict[str, Any], bytes]:
    """``(card, avatar PNG bytes)`` of a PNG card: the ``ccv3`` chunk if present, else ``chara``.

    The avatar is the image re-encoded by Pillow without text chunks (same pixels, same mode).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(raw))
        if im.format != "PNG":
            raise CardError(file, "image", f"not a PNG image ({im.format})")
        im.load()  # text chunks after the image data are read by load()
        text = dict(im.text)
    except CardError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise CardError(file, "image", f"not a readable PNG ({e})") from e
    chunk = CHUNKS[SPEC_V3] if CHUNKS[SPEC_V3] in text else CHUNKS[SPEC_V2]
    if chunk not in text:
        raise CardError(file, f"chunk {CHUNKS[SPEC_V2]!r}", "missing (no 'chara' or 'ccv3' tEXt chunk)")
    value = "".join(str(text[chunk]).split())
    try:
        payload = base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as e:
        raise CardError(file, f"chunk {chunk!r}", "invalid base64") from e
    card = parse_json(payload, file, f"chunk {chunk!r}")
    plain = im.copy()
    plain.info = {k: v for k, v in im.info.items() if k in ("transparency", "gamma", "icc_profile")}
    buf = io.BytesIO()
    plain.save(buf, "PNG")
    return card, buf.getvalue()


# --------------------------------------------------------------------------------------- mapping
@dataclass(frozen=True)
class _Ctx:
    name: str  # what {{char}} becomes (V3 nickname, else name)
    language: str


def _text(orig: dict[str, Any], key: str) -> str:
    v = orig.get(key)
    return v if isinstance(v, str) else ""


_KV_LINE = re.compile(r"^\s*(?:[-*•]\s*)?([^:：\n]{1,40}?)\s*[:：]\s*(\S.*?)\s*$")


def parse_description(text: str, language: str) -> dict[str, str]:
    """``profile`` from a card description: ``{key: value}`` when it has 2+ non-blank lines, each
    ``key: value`` (``：`` too, optional bullet, key <= 40 characters) with unique keys; otherwise
    ``{"description": text}`` (``{"简介": text}`` for zh); ``{}`` for a blank description."""
    s = text.strip()
    if not s:
        return {}
    lines = [ln for ln in s.splitlines() if ln.strip()]
    matches = [_KV_LINE.match(ln) for ln in lines]
    if len(lines) >= 2 and all(matches):
        pairs = [(m.group(1).strip(), m.group(2)) for m in matches if m]
        if len({k for k, _ in pairs}) == len(pairs):
            return dict(pairs)
    return {DESCRIPTION_KEY.get(language, "description"): s}


def profile_to_description(profile: dict[str, str], language: str) -> str:
    """Inverse of :func:`parse_description`: the lone description value, else ``key: value`` lines."""
    key = DESCRIPTION_KEY.get(language, "description")
    if list(profile) == [key]:
        return profile[key]
    sep = "：" if language == "zh" else ": "
    return "\n".join(f"{k}{sep}{v}" for k, v in profile.items())


_START = re.compile(r"<start>", re.I)
_SPEAKER = re.compile(r"^\s*(\{\{char\}\}|<bot>|\{\{user\}\}|<user>)\s*[:：]\s?", re.I)


def _example_turns(mes_example: str) -> list[tuple[str | None, str]]:
    """``(speaker, text)`` turns of ``mes_example``: speaker ``char``/``user``, None for a line of a
    block that has no speaker prefixes (one turn per line)."""
    turns: list[tuple[str | None, str]] = []
    for block in _START.split(mes_example.replace("\r\n", "\n")):
        lines = block.split("\n")
        if not any(_SPEAKER.match(ln) for ln in lines):
            turns += [(None, ln.strip()) for ln in lines if ln.strip()]
            continue
        who: str | None = None
        buf: list[str] = []
        for ln in lines:
            m = _SPEAKER.match(ln)
            if m:
                if who is not None:
                    turns.append((who, "\n".join(buf).strip()))
                who = "user" if "user" in m.group(1).lower() else "char"
                buf = [ln[m.end() :]]
            elif who is not None:
                buf.append(ln)
        if who is not None:
            turns.append((who, "\n".join(buf).strip()))
    return turns


def parse_examples(mes_example: str, name: str, language: str) -> list[str]:
    """Speaking examples from ``mes_example``: the character's turns (``{{char}}:`` / ``<BOT>:``) of each
    ``<START>`` block with the prefix stripped and macros filled as speech; ``{{user}}`` turns dropped."""
    out = []
    for who, text in _example_turns(mes_example):
        if who != "user" and text:
            filled = fill_macros(text, name, language, speech=True).strip()
            if filled:
                out.append(filled)
    return out


def examples_to_mes(examples: list[str]) -> str:
    """Inverse of :func:`parse_examples`: one ``<START>`` block with one ``{{char}}:`` turn per example."""
    return "\n".join(f"<START>\n{{{{char}}}}: {e}" for e in examples)


@dataclass(frozen=True)
class _Group:
    """Card ``data`` keys mapped onto one Character field, with the inverse used on export."""

    name: str
    keys: tuple[str, ...]
    field: str
    to_value: Callable[[dict[str, Any], _Ctx], Any]
    from_value: Callable[[Any, _Ctx], dict[str, Any]]


def _same(key: str, field: str, default: Any = "") -> _Group:
    def to_value(o: dict[str, Any], c: _Ctx) -> Any:
        v = o.get(key)
        return default if v is None else v

    return _Group(key, (key,), field, to_value, lambda v, c: {key: v})


GROUPS: tuple[_Group, ...] = (
    _same("name", "name"),
    _Group(
        "description",
        ("description",),
        "profile",
        lambda o, c: parse_description(fill_macros(_text(o, "description"), c.name, c.language), c.language),
        lambda v, c: {"description": profile_to_description(v, c.language)},
    ),
    _Group(
        "personality",
        ("personality",),
        "style",
        lambda o, c: fill_macros(_text(o, "personality"), c.name, c.language).strip(),
        lambda v, c: {"personality": v},
    ),
    _Group(
        "scenario",
        ("scenario",),
        "scene",
        lambda o, c: fill_macros(_text(o, "scenario"), c.name, c.language).strip(),
        lambda v, c: {"scenario": v},
    ),
    _Group(
        "mes_example",
        ("mes_example",),
        "examples",
        lambda o, c: parse_examples(_text(o, "mes_example"), c.name, c.language),
        lambda v, c: {"mes_example": examples_to_mes(v)},
    ),
    _Group(
        "greetings",
        ("first_mes", "alternate_greetings"),
        "greetings",
        lambda o, c: (
            ([o["first_mes"]] if o.get("first_mes") else []) + list(o.get("alternate_greetings") or [])
        ),
        lambda v, c: {"first_mes": v[0] if v else "", "alternate_greetings": list(v[1:])},
    ),
    _same("system_prompt", "system_prompt"),
    _same("post_history_instructions", "post_history_instructions"),
    _same("tags", "tags", []),
    _same("creator", "creator"),
    _same("character_version", "character_version"),
    _Group(
        "character_book",
        ("character_book",),
        "lorebook",
        lambda o, c: o.get("character_book"),
        lambda v, c: {} if v is None else {"character_book": v},
    ),
)
_GROUP_KEYS = frozenset(k for g in GROUPS for k in g.keys)
_STRING_FIELDS = (
    "name",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "creator_notes",
    "system_prompt",
    "post_history_instructions",
    "creator",
    "character_version",
    "nickname",
)


def slug(name: str) -> str:
    """A character id from a name: ASCII names (accents dropped) -> lower-case ``[a-z0-9_]`` words
    joined by ``_``; anything else (e.g. CJK) -> ``char-<first 8 hex of sha256(name)>`` (stable)."""
    ascii_name = "".join(ch for ch in unicodedata.normalize("NFKD", name) if not unicodedata.combining(ch))
    if ascii_name.isascii():
        s = re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")
        if s:
            return s
    return "char-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]


_MACRO = re.compile(r"\{\{[^{}]*\}\}|<bot>|<user>|<char>", re.I)


def detect_card_language(data: dict[str, Any]) -> str | None:
    """The language a card's character speaks: the majority vote (:func:`troupe.data.validate.language_vote`)
    of :func:`troupe.checks.detect_language` over its greetings and speaking examples; the
    description decides only when none of those is identified, and all of these texts together when
    no single one is (short lines rarely reach py3langid's confidence floor). None: nothing identified."""
    from troupe.checks import detect_language
    from troupe.data.validate import language_vote

    speech = [
        _text(data, "first_mes"),
        *[g for g in data.get("alternate_greetings") or [] if isinstance(g, str)],
    ]
    speech += [t for who, t in _example_turns(_text(data, "mes_example")) if who != "user"]
    description = _text(data, "description")
    for texts in (speech, [description], ["\n".join([*speech, description])]):
        detected = [detect_language(_MACRO.sub(" ", t)) for t in texts if t.strip()]
        if any(detected):
            return language_vote("", detected).language
    return None


def _check_lorebook(book: Any, file: str) -> None:
    f = "data.character_book"
    if not isinstance(book, dict):
        raise CardError(file, f, f"expected an object, got {type(book).__name__}")
    entries = book.get("entries")
    if not isinstance(entries, list):
        raise CardError(file, f"{f}.entries", "expected a list of entries")
    if len(entries) > MAX_LORE_ENTRIES:
        raise CardError(
            file, f"{f}.entries", f"{len(entries)} entries > {MAX_LORE_ENTRIES} (MAX_LORE_ENTRIES)"
        )
    size = len(json.dumps(book, ensure_ascii=False).encode("utf-8"))
    if size > MAX_LORE_BYTES:
        raise CardError(file, f, f"{size} bytes > {MAX_LORE_BYTES} (MAX_LORE_BYTES)")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise CardError(file, f"{f}.entries[{i}]", "expected an object")
        for k in ("keys", "secondary_keys"):
            if k in e and not (isinstance(e[k], list) and all(isinstance(x, str) for x in e[k])):
                raise CardError(file, f"{f}.entries[{i}].{k}", "expected a list of strings")
        if "content" in e and not isinstance(e["content"], str):
            raise CardError(file, f"{f}.entries[{i}].content", "expected a string")


def check_card(card: dict[str, Any], file: str) -> tuple[str, dict[str, Any]]:
    """``(spec, data)`` of a card object after checking spec, spec_version and field types.

    Accepted: ``chara_card_v2`` with ``spec_version`` ``"2.0"``; ``chara_card_v3`` with ``"3.x"`` (the
    V3 spec: minor versions stay importable). V1 cards (no ``spec``) are not accepted.

    Raises:
        CardError: naming the field (``spec``, ``spec_version``, ``data.tags``...).
    """
    spec = card.get("spec")
    if spec not in (SPEC_V2, SPEC_V3):
        raise CardError(file, "spec", f"unknown spec {spec!r} (expected {SPEC_V2!r} or {SPEC_V3!r})")
    version = card.get("spec_version")
    ok = (
        version == "2.0" if spec == SPEC_V2 else isinstance(version, str) and re.fullmatch(r"3\.\d+", version)
    )
    if not ok:
        raise CardError(file, "spec_version", f"unknown spec_version {version!r} for {spec}")
    data = card.get("data")
    if not isinstance(data, dict):
        raise CardError(file, "data", "expected an object")
    for k in _STRING_FIELDS:
        if data.get(k) is not None and not isinstance(data[k], str):
            raise CardError(file, f"data.{k}", f"expected a string, got {type(data[k]).__name__}")
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        raise CardError(file, "data.name", "missing or empty")
    for k in ("alternate_greetings", "tags", "group_only_greetings"):
        v = data.get(k)
        if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise CardError(file, f"data.{k}", "expected a list of strings")
    ext = data.get("extensions")
    if ext is not None and not isinstance(ext, dict):
        raise CardError(file, "data.extensions", "expected an object")
    troupe = (ext or {}).get("troupe")
    if troupe is not None and not isinstance(troupe, dict):
        raise CardError(file, "data.extensions.troupe", "expected an object")
    for k in ("id", "language"):
        if troupe and troupe.get(k) is not None and not isinstance(troupe[k], str):
            raise CardError(file, f"data.extensions.troupe.{k}", "expected a string")
    if data.get("character_book") is not None:
        _check_lorebook(data["character_book"], file)
    return spec, data


def _nickname(data: dict[str, Any]) -> str | None:
    v3 = ((data.get("extensions") or {}).get("troupe") or {}).get("v3") or {}
    nick = data.get("nickname", v3.get("nickname") if isinstance(v3, dict) else None)
    return nick if isinstance(nick, str) and nick.strip() else None


def card_to_character(
    card: dict[str, Any], *, file: str, id: str | None = None, avatar: str | None = None
) -> Character:
    """Map a card object onto the contract (table in the module docstring).

    Args:
        card: the card JSON object (V2 or V3).
        file: the file name, for errors.
        id: character id; default ``data.extensions.troupe.id``, else :func:`slug` of the name.
        avatar: the avatar's path relative to the catalogue (``avatars/<sha256>.png``), kept in ``card``.

    Raises:
        CardError: bad spec or field, unknown language, or a record the contract rejects.
    """
    spec, data = check_card(card, file)
    troupe = (data.get("extensions") or {}).get("troupe") or {}
    language = troupe.get("language") or detect_card_language(data)
    if not language:
        raise CardError(
            file,
            "data.extensions.troupe.language",
            "missing, and the language cannot be told from first_mes, mes_example or description",
        )
    ctx = _Ctx(_nickname(data) or data["name"], language.split("-")[0].lower())
    fields: dict[str, Any] = {}
    overrides: dict[str, dict[str, Any]] = {}
    for g in GROUPS:
        orig = {k: data[k] for k in g.keys if k in data}
        value = g.to_value(orig, ctx)
        if g.from_value(value, ctx) != orig:
            overrides[g.name] = copy.deepcopy(orig)
        fields[g.field] = copy.deepcopy(value)
    root = {k: copy.deepcopy(v) for k, v in card.items() if k not in ("spec", "spec_version", "data")}
    mirrored = [k for k in V1_FIELDS if k in root and k in data and root[k] == data[k]]
    stored: dict[str, Any] = {
        "spec": spec,
        "spec_version": card["spec_version"],
        # spec order, so a card and its own export give the same record (and catalogue version)
        "data": _ordered({k: copy.deepcopy(v) for k, v in data.items() if k not in _GROUP_KEYS}, SPEC_V3),
    }
    for k in mirrored:
        del root[k]
    for key, value in (("overrides", overrides), ("root", root), ("mirrored", mirrored), ("avatar", avatar)):
        if value:
            stored[key] = value
    cid = id or troupe.get("id") or slug(data["name"])
    if not ID_PATTERN.match(cid):
        raise CardError(file, "id", f"{cid!r} does not match {ID_PATTERN.pattern}")
    try:
        return Character(id=cid, language=language, card=stored, **fields)
    except ValidationError as e:
        raise CardError(file, "data", describe_error(e)) from e


def _ordered(data: dict[str, Any], spec: str) -> dict[str, Any]:
    order = V2_DATA_ORDER + (V3_ONLY_FIELDS if spec == SPEC_V3 else ())
    out = {k: data[k] for k in order if k in data}
    out.update((k, v) for k, v in data.items() if k not in out)
    return out


def character_to_card(character: Character, spec: str | None = None) -> dict[str, Any]:
    """The card object of a character (inverse of :func:`card_to_character`).

    Args:
        character: the character; ``character.card`` (when imported from a card) makes the export
            give back the source card.
        spec: ``chara_card_v2`` / ``chara_card_v3`` (or ``v2`` / ``v3``); default: the source card's
            spec, else V2.

    Raises:
        ValueError: an unknown ``spec``.
    """
    stored = copy.deepcopy(character.card or {})
    src_spec = stored.get("spec")
    spec = SPEC_NAMES.get(spec or "", spec) or src_spec or SPEC_V2
    if spec not in (SPEC_V2, SPEC_V3):
        raise ValueError(f"spec must be v2 or v3 ({SPEC_V2} / {SPEC_V3}), got {spec!r}")
    kept: dict[str, Any] = stored.get("data", {})
    ctx = _Ctx(_nickname(kept) or character.name, character.language)
    data: dict[str, Any] = {}
    for g in GROUPS:
        value = getattr(character, g.field)
        ov = stored.get("overrides", {}).get(g.name)
        data.update(ov if ov is not None and g.to_value(ov, ctx) == value else g.from_value(value, ctx))
    data.update(kept)
    if not stored:  # a character never imported from a card: the spec's required fields
        data.setdefault("creator_notes", "")
    ext = data.setdefault("extensions", {})
    troupe = ext.setdefault("troupe", {})
    troupe.update(id=character.id, language=character.language)
    if spec == SPEC_V2:
        if data.get("group_only_greetings") == []:  # V3's required default; a V3 export adds it back
            del data["group_only_greetings"]
        v3 = {k: data.pop(k) for k in V3_ONLY_FIELDS if k in data}
        if v3:
            troupe["v3"] = {**troupe.get("v3", {}), **v3}
    else:
        for k, v in (troupe.pop("v3", None) or {}).items():
            data.setdefault(k, v)
        data.setdefault("group_only_greetings", [])
    card: dict[str, Any] = {
        "spec": spec,
        "spec_version": stored["spec_version"] if spec == src_spec else SPEC_VERSIONS[spec],
        "data": _ordered(data, spec),
    }
    if spec == src_spec or spec == SPEC_V2:
        root = stored.get("root", {}) if spec == src_spec else {}
        card.update(root)
        for k in stored.get("mirrored", []) if spec == SPEC_V2 else ():
            if k in data:
                card[k] = data[k]
    return card


# --------------------------------------------------------------------------------------- writing
def plain_avatar(seed: str, size: int = 32) -> bytes:
    """A plain square PNG (one colour from ``sha256(seed)``) for cards that have no image."""
    from PIL import Image

    rgb = tuple(hashlib.sha256(seed.encode("utf-8")).digest()[:3])
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, "PNG")
    return buf.getvalue()


def encode_chunk(card: dict[str, Any]) -> str:
    """The tEXt chunk value of a card: its UTF-8 JSON, base64 (ASCII)."""
    return base64.b64encode(json.dumps(card, ensure_ascii=False).encode("utf-8")).decode("ascii")


def card_png(cards: dict[str, dict[str, Any]], avatar_png: bytes) -> bytes:
    """PNG bytes of ``avatar_png`` with one tEXt chunk per ``{chunk keyword: card}`` (Pillow ``PngInfo``)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    im = Image.open(io.BytesIO(avatar_png))
    im.load()
    info = PngInfo()
    for chunk, card in cards.items():
        info.add_text(chunk, encode_chunk(card))
    kw: dict[str, Any] = {k: im.info[k] for k in ("transparency", "gamma", "icc_profile") if k in im.info}
    buf = io.BytesIO()
    im.save(buf, "PNG", pnginfo=info, **kw)
    return buf.getvalue()


def write_card(
    character: Character, path: str | Path, *, spec: str | None = None, avatar_png: bytes | None = None
) -> Path:
    """Write the character as a card file: PNG when ``path`` ends in ``.png``, else JSON.

    A PNG gets ``avatar_png`` (else :func:`plain_avatar`), the card in the spec's chunk and, for V3,
    the V2 card in ``chara`` as well. JSON is indented UTF-8 (non-ASCII kept). Returns ``path``.
    """
    p = Path(path)
    card = character_to_card(character, spec)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() == ".png":
        chunks = {CHUNKS[card["spec"]]: card}
        if card["spec"] == SPEC_V3:
            chunks[CHUNKS[SPEC_V2]] = character_to_card(character, SPEC_V2)
        p.write_bytes(card_png(chunks, avatar_png or plain_avatar(character.id)))
    else:
        p.write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return p
