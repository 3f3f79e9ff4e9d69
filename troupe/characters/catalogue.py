"""The character catalogue: persona cards as a versioned asset that serving reads without retraining.

A catalogue is one JSON Lines file of :class:`troupe.contract.Character` records sorted by id, at a
local path or an ``s3://`` URI (read and written through :mod:`troupe.storage`), with card images
beside it under ``avatars/<sha256>.png`` (content-addressed, so a record names its image by content).
Its version is the content hash of the file (:func:`catalogue_version`); the avatars are covered by
it because records name them by hash.

Writes are all-or-nothing: an import parses, maps and validates every card first and changes
nothing on any error; the file is replaced atomically (a temp file renamed over it locally; one
object write on S3, which becomes visible only when complete), so no reader ever sees a half-written
catalogue. Concurrent writers are detected, not serialised: a save with ``expected_version`` fails
when the file changed since it was read.

Validation (:func:`validate_character`) applies the training data's rules to a card: the rendered
persona against the serving context (``data.cutoff_len``), the language of greetings and speaking
examples (:func:`troupe.data.validate.reply_violations`), the assistant-phrase blacklist
(:func:`troupe.checks.has_assistant_phrase`) and personal data (:func:`troupe.data.validate.scrub_pii`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from troupe import storage
from troupe.characters.cards import CardError, card_to_character, read_card, write_card
from troupe.characters.lorebook import estimate_tokens, render_lore, select_lore
from troupe.contract import GENERAL_CHARACTER_ID, Character, ContractError, describe_error, load_characters

#: Where ``troupe characters build`` writes the catalogue by default (a ``dvc.yaml`` stage output).
DEFAULT_CATALOGUE = "work/catalogue/characters.jsonl"
AVATAR_DIR = "avatars"
#: Tokens left for the conversation when checking a persona card against the context.
RESERVE_TOKENS = 128


class CatalogueError(ContractError):
    """A catalogue that cannot be read or changed; the message names the URI (and line or id)."""


def catalogue_version(text: str) -> str:
    """The version of a catalogue file's text: ``"sha256:"`` + the first 16 hex digits of its SHA-256."""
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def render_catalogue(characters: Iterable[Character]) -> str:
    """The catalogue file text: one JSON record per line, sorted by id (duplicate ids: CatalogueError)."""
    by_id: dict[str, Character] = {}
    for c in characters:
        if c.id in by_id:
            raise CatalogueError(f"duplicate character id {c.id!r}")
        by_id[c.id] = c
    # the same line format as troupe.contract.write_jsonl (UTF-8, non-ASCII kept readable)
    return "".join(
        json.dumps(by_id[k].model_dump(mode="json"), ensure_ascii=False) + "\n" for k in sorted(by_id)
    )


def _dir(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if storage.is_remote(uri) else str(Path(uri).parent)


@dataclass
class Catalogue:
    """A loaded catalogue: ``uri``, ``version`` (:func:`catalogue_version`) and ``characters`` by id."""

    uri: str
    version: str
    characters: dict[str, Character] = field(default_factory=dict)

    def get(self, id: str) -> Character | None:
        """The character ``id``, or None when the catalogue has none."""
        return self.characters.get(id)

    def avatar_uri(self, id: str) -> str | None:
        """Location of character ``id``'s card image (None: no character or no image)."""
        c = self.characters.get(id)
        rel = (c.card or {}).get("avatar") if c else None
        return storage.join(_dir(self.uri), *rel.split("/")) if rel else None


def load_catalogue(uri: str, *, missing_ok: bool = False) -> Catalogue:
    """Read the catalogue at ``uri`` (local path or ``s3://``).

    Args:
        uri: the catalogue file.
        missing_ok: a missing file is an empty catalogue (else an error).

    Raises:
        CatalogueError: a bad line (``uri:line: field ...``) or a duplicate id.
        StorageError: the file is missing (unless ``missing_ok``) or cannot be read.
    """
    uri = str(uri)
    try:
        text = storage.read_text(uri)
    except storage.StorageError as e:
        if missing_ok and e.reason == "missing":
            text = ""
        else:
            raise
    chars: dict[str, Character] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            c = Character.model_validate_json(line)
        except ValidationError as e:
            raise CatalogueError(f"{uri}:{i}: {describe_error(e)}") from e
        if c.id in chars:
            raise CatalogueError(f"{uri}:{i}: duplicate character id {c.id!r}")
        chars[c.id] = c
    return Catalogue(uri, catalogue_version(text), chars)


def save_catalogue(
    characters: Iterable[Character] | dict[str, Character], uri: str, *, expected_version: str | None = None
) -> str:
    """Write ``characters`` as the catalogue at ``uri``; returns its version.

    Args:
        characters: the records (or ``{id: Character}``); written sorted by id.
        uri: local path or ``s3://`` URI of the catalogue file.
        expected_version: the version the caller read (a missing file reads as ``catalogue_version("")``);
            when the file changed since, nothing is written.

    Raises:
        CatalogueError: duplicate ids, or the catalogue changed since ``expected_version``.
        StorageError: the location cannot be written.
    """
    uri = str(uri)
    chars = characters.values() if isinstance(characters, dict) else characters
    text = render_catalogue(chars)
    if expected_version is not None:
        now = load_catalogue(uri, missing_ok=True).version
        if now != expected_version:
            raise CatalogueError(
                f"{uri}: changed while this import ran (version {now}, read {expected_version}); run it again"
            )
    storage.write_text(uri, text)  # atomic: temp file + rename locally, one PUT on S3
    return catalogue_version(text)


def avatar_path(png: bytes) -> str:
    """The catalogue-relative path of an avatar image: ``avatars/<sha256 of the PNG bytes>.png``."""
    return f"{AVATAR_DIR}/{hashlib.sha256(png).hexdigest()}.png"


def save_avatar(png: bytes, catalogue_uri: str) -> str:
    """Store a card image beside the catalogue (once per content); returns :func:`avatar_path`."""
    rel = avatar_path(png)
    loc = storage.join(_dir(str(catalogue_uri)), *rel.split("/"))
    if not storage.exists(loc):
        storage.write_bytes(loc, png)
    return rel


def read_avatar(catalogue: Catalogue, id: str) -> bytes | None:
    """The PNG bytes of character ``id``'s card image, None when it has none."""
    loc = catalogue.avatar_uri(id)
    return storage.read_bytes(loc) if loc else None


# --------------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class Problem:
    """One rule a character breaks: ``where`` (file or id), ``field`` (e.g. ``greetings[1]``), ``reason``
    and a short ``code`` (too_long, wrong_language, blacklist, pii, markup, empty, card)."""

    where: str
    field: str
    reason: str
    code: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.reason}"


def default_context_tokens() -> int:
    """The serving context the card must fit: ``data.cutoff_len``'s default (the training cutoff)."""
    from troupe.params import Data

    return int(Data.model_fields["cutoff_len"].default)


def persona_tokens(character: Character, *, context_tokens: int, tokenizer: Any = None) -> int:
    """Tokens of the rendered system prompt plus the lorebook's constant entries (always inserted):
    the chat-template count when a tokenizer is given (:func:`troupe.data.validate.token_lengths`),
    else :func:`troupe.characters.lorebook.estimate_tokens`."""
    from troupe.persona import render_system_prompt

    text = render_system_prompt(character)
    lore = render_lore(select_lore(character.lorebook, [], budget_tokens=context_tokens))
    if lore:
        text = f"{text}\n\n{lore}"
    if tokenizer is None:
        return estimate_tokens(text)
    from troupe.data.validate import token_lengths

    return token_lengths(tokenizer, [[{"role": "system", "content": text}]])[0]


_VIOLATION_CODES = (
    ("language ", "wrong_language"),
    ("personal data", "pii"),
    ("markup", "markup"),
    ("empty", "empty"),
)


def validate_character(
    character: Character,
    *,
    context_tokens: int | None = None,
    tokenizer: Any = None,
    reserve_tokens: int = RESERVE_TOKENS,
    where: str | None = None,
) -> list[Problem]:
    """The rules a servable character holds (empty list = passes).

    * ``persona`` (too_long): :func:`persona_tokens` + ``reserve_tokens`` must fit ``context_tokens``;
    * ``greetings[i]`` / ``examples[i]``: what the character says passes the training data's per-reply
      rules (:func:`troupe.data.validate.reply_violations` with stage directions allowed: language vs
      ``character.language``, markup, personal data, non-empty) and holds no blacklisted assistant phrase;
    * personal data anywhere else in the prompt or lorebook (``profile.<key>``, ``style``, ``scene``,
      ``system_prompt``, ``post_history_instructions``, ``lorebook.entries[i].content``).

    Args:
        character: the character.
        context_tokens: the serving context in tokens (default :func:`default_context_tokens`).
        tokenizer: the served model's tokenizer for exact counts (default: estimate).
        reserve_tokens: tokens that must stay free for the conversation.
        where: label of the problems (default the character id).
    """
    from troupe.checks import has_assistant_phrase
    from troupe.data.validate import reply_violations, scrub_pii
    from troupe.persona import fill_macros

    where = where or character.id
    ctx = context_tokens or default_context_tokens()
    out: list[Problem] = []
    n = persona_tokens(character, context_tokens=ctx, tokenizer=tokenizer)
    if n + reserve_tokens > ctx:
        unit = "tokens" if tokenizer is not None else "tokens (estimated)"
        out.append(
            Problem(
                where,
                "persona",
                f"rendered persona card {n} {unit} + {reserve_tokens} reserved for the conversation "
                f"> context {ctx} tokens (data.cutoff_len)",
                "too_long",
            )
        )
    said = [(f"greetings[{i}]", g) for i, g in enumerate(character.greetings)]
    said += [(f"examples[{i}]", e) for i, e in enumerate(character.examples)]
    for name, text in said:
        text = fill_macros(text, character.name, character.language, speech=True)
        for v in reply_violations(text, character.language, stage_directions="flag"):
            code = next((c for prefix, c in _VIOLATION_CODES if v.startswith(prefix)), "reply")
            out.append(Problem(where, name, v, code))
        phrase = has_assistant_phrase(text)
        if phrase:
            out.append(Problem(where, name, f"blacklisted assistant phrase {phrase!r}", "blacklist"))
    other = [(f"profile.{k}", v) for k, v in character.profile.items()]
    other += [
        ("style", character.style),
        ("scene", character.scene),
        ("system_prompt", character.system_prompt),
        ("post_history_instructions", character.post_history_instructions),
    ]
    entries = (character.lorebook or {}).get("entries") or []
    other += [
        (f"lorebook.entries[{i}].content", str(e.get("content") or ""))
        for i, e in enumerate(entries)
        if isinstance(e, dict)
    ]
    for name, text in other:
        k = scrub_pii(text)[1] if text else 0
        if k:
            out.append(Problem(where, name, f"personal data ({k} match(es))", "pii"))
    return out


# --------------------------------------------------------------------------------------- import/export
def _problems_error(file: str, problems: list[Problem]) -> CardError:
    first, rest = problems[0], problems[1:]
    return CardError(file, first.field, first.reason + "".join(f"; {p.field}: {p.reason}" for p in rest))


def load_card(
    path: str | Path, *, id: str | None = None, context_tokens: int | None = None, tokenizer: Any = None
) -> tuple[Character, bytes | None]:
    """``(character, avatar PNG bytes or None)`` of a card file, validated; nothing is written.

    Raises:
        CardError: the card cannot be read or mapped, or breaks a rule (all problems in the message).
    """
    cf = read_card(path)
    avatar = avatar_path(cf.avatar_png) if cf.avatar_png else None
    c = card_to_character(cf.card, file=cf.file, id=id, avatar=avatar)
    problems = validate_character(c, context_tokens=context_tokens, tokenizer=tokenizer, where=cf.file)
    if problems:
        raise _problems_error(cf.file, problems)
    return c, cf.avatar_png


def import_cards(
    paths: Iterable[str | Path],
    catalogue_uri: str,
    *,
    id: str | None = None,
    replace: bool = False,
    context_tokens: int | None = None,
    tokenizer: Any = None,
) -> list[Character]:
    """Import card files into the catalogue at ``catalogue_uri`` (created when missing), all or none.

    Args:
        paths: card files (V2/V3, PNG or JSON).
        catalogue_uri: local path or ``s3://`` URI of the catalogue file.
        id: the character id (only with one card); default from the card (:func:`card_to_character`).
        replace: replace characters whose id is already in the catalogue (else that is an error).
        context_tokens, tokenizer: validation settings (:func:`validate_character`).

    Returns:
        The imported characters.

    Raises:
        CardError: a card that cannot be read, mapped or validated (file and field named).
        CatalogueError: ``id`` with several cards, an id already in the catalogue (without ``replace``)
            or twice among the cards, or the catalogue changed during the import.
    """
    paths = list(paths)
    if id is not None and len(paths) != 1:
        raise CatalogueError(f"--id names one character; {len(paths)} cards given")
    loaded = [load_card(p, id=id, context_tokens=context_tokens, tokenizer=tokenizer) for p in paths]
    seen: dict[str, str] = {}
    for (c, _), p in zip(loaded, paths, strict=True):
        if c.id in seen:
            raise CatalogueError(f"{Path(p).name}: character id {c.id!r} also comes from {seen[c.id]}")
        seen[c.id] = Path(p).name
    cat = load_catalogue(catalogue_uri, missing_ok=True)
    clash = sorted(c.id for c, _ in loaded if c.id in cat.characters)
    if clash and not replace:
        raise CatalogueError(
            f"{catalogue_uri}: character id(s) {', '.join(map(repr, clash))} already in the catalogue "
            "(--replace to replace, --id to import under another id)"
        )
    for _, png in loaded:
        if png is not None:
            save_avatar(png, catalogue_uri)
    chars = dict(cat.characters)
    chars.update((c.id, c) for c, _ in loaded)
    save_catalogue(chars, catalogue_uri, expected_version=cat.version)
    return [c for c, _ in loaded]


def import_card(
    path: str | Path,
    catalogue_uri: str,
    *,
    id: str | None = None,
    replace: bool = False,
    context_tokens: int | None = None,
    tokenizer: Any = None,
) -> Character:
    """Import one card file into the catalogue (see :func:`import_cards`); returns the character.

    Raises:
        CardError, CatalogueError: as :func:`import_cards`; on any error the catalogue is unchanged.
    """
    return import_cards(
        [path], catalogue_uri, id=id, replace=replace, context_tokens=context_tokens, tokenizer=tokenizer
    )[0]


def export_character(catalogue_uri: str, id: str, out: str | Path, *, spec: str | None = None) -> Path:
    """Write character ``id`` of the catalogue as a card file (``.png`` or ``.json``, see
    :func:`troupe.characters.cards.write_card`); a PNG carries the card's own image when it has one.

    Raises:
        CatalogueError: no character ``id`` in the catalogue.
    """
    cat = load_catalogue(catalogue_uri)
    c = cat.get(id)
    if c is None:
        raise CatalogueError(f"{catalogue_uri}: no character {id!r}")
    png = read_avatar(cat, id) if str(out).lower().endswith(".png") else None
    return write_card(c, out, spec=spec, avatar_png=png)


def card_files(cards_dir: str | Path) -> list[Path]:
    """The card files (``*.png``, ``*.json``) directly under ``cards_dir``, sorted by name."""
    d = Path(cards_dir)
    if not d.is_dir():
        raise CatalogueError(f"{d}: no such directory of cards")
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in (".png", ".json"))


def build_catalogue(
    characters_file: str | Path,
    cards_dir: str | Path | None,
    out_uri: str,
    *,
    context_tokens: int | None = None,
    tokenizer: Any = None,
) -> Catalogue:
    """Build a catalogue from a training run's characters plus committed card files, all validated.

    Args:
        characters_file: ``characters.jsonl`` of the run (``paths.splits``).
        cards_dir: directory of card files (None: none).
        out_uri: catalogue file to write (avatars go beside it).
        context_tokens, tokenizer: validation settings (:func:`validate_character`).

    Raises:
        CatalogueError: any problem, any card that cannot be read, or an id twice (every problem
            listed, one per line); nothing is written then.
    """
    # the general-data pseudo-character (troupe.contract.GENERAL_CHARACTER_ID) trains with no card and
    # is nobody to chat with: it stays out of the served catalogue
    chars = [c for c in load_characters(characters_file).values() if c.id != GENERAL_CHARACTER_ID]
    problems: list[str] = []
    for c in chars:
        problems += map(str, validate_character(c, context_tokens=context_tokens, tokenizer=tokenizer))
    avatars: list[bytes] = []
    source = {c.id: str(characters_file) for c in chars}
    for p in card_files(cards_dir) if cards_dir else []:
        try:
            c, png = load_card(p, context_tokens=context_tokens, tokenizer=tokenizer)
        except CardError as e:
            problems.append(str(e))
            continue
        if c.id in source:
            problems.append(f"{p.name}: id: character id {c.id!r} also in {source[c.id]}")
            continue
        source[c.id] = p.name
        chars.append(c)
        if png is not None:
            avatars.append(png)
    if problems:
        raise CatalogueError(f"{len(problems)} problem(s), catalogue not written:\n" + "\n".join(problems))
    for png in avatars:
        save_avatar(png, out_uri)
    version = save_catalogue(chars, out_uri)
    return Catalogue(str(out_uri), version, {c.id: c for c in sorted(chars, key=lambda c: c.id)})


def catalogue_location(params: dict[str, Any]) -> str:
    """The catalogue of a run: ``paths.catalogue`` when params define it, else :data:`DEFAULT_CATALOGUE`."""
    return str((params.get("paths") or {}).get("catalogue") or DEFAULT_CATALOGUE)
