"""The data contract: the one place Troupe's record formats are defined.

Every importer writes these records, every step reads them. Files are JSON Lines (one record per
line, UTF-8). A directory of contract data holds ``characters.jsonl`` (persona cards) and
``dialogues.jsonl``; preference pairs live in ``pairs.jsonl``.

Errors: :func:`read_jsonl` raises :class:`ContractError` naming ``file:line`` for the first bad line
unless a ``quarantine`` callback is given, in which case bad lines are handed to it and skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer

Role = Literal["system", "user", "assistant"]


class ContractError(ValueError):
    """A contract file or record that cannot be read; the message names file, line and field."""


class Character(BaseModel):
    """A persona card: who the model plays.

    Fields:
        id: stable identifier used by dialogues and the serving API (``[A-Za-z0-9_.:-]+`` recommended).
        name: display name, e.g. ``"林黛玉"`` or ``"Elon Musk"``.
        language: BCP-47 primary language tag the character always replies in (``zh``, ``en``...).
        profile: facts about the character (key -> text), rendered as "character information".
        style: how the character talks (free text).
        examples: speaking examples (lines the character would say).
        scene: optional story/scene the conversation happens in.

    Card fields (Character Card V2/V3, :mod:`troupe.characters.cards`); all optional and empty by
    default, and left out of the serialised record while empty, so characters without them keep their
    bytes in JSONL files and their rendered prompts:

        greetings: opening messages, the card's ``first_mes`` then its ``alternate_greetings``.
        system_prompt: the card's ``system_prompt``: an additional prompt section after Troupe's rules
            (it never replaces them).
        post_history_instructions: the card's ``post_history_instructions`` (text for after the chat
            history, :func:`troupe.persona.render_post_history`).
        tags: the card's ``tags`` (sorting/filtering only, never in a prompt).
        creator: the card's ``creator`` (never in a prompt).
        character_version: the card's ``character_version`` (never in a prompt).
        lorebook: the card's ``character_book``, verbatim (:mod:`troupe.characters.lorebook`).
        card: what else of the source card a lossless export needs (layout in
            :mod:`troupe.characters.cards`: spec, spec_version, the ``data`` fields held by no other
            field incl. ``extensions`` and V3 fields, root fields, the avatar); None for characters
            that were not imported from a card.

    Serving field (:data:`SERVING_FIELDS`; left out of the record while empty, like card fields):

        adapter: local path or ``s3://`` URI of the PEFT LoRA adapter directory this character is
            served with on the shared base model (multi-LoRA serving, :mod:`troupe.adapters`);
            several characters naming one URI share it (a per-group adapter). ``""`` = the base
            model. A field of the card rather than a catalogue-level map, so the catalogue stays one
            versioned JSONL and a character moves with its adapter. With the vLLM backend the URI
            must lie under ``vllm.lora_path`` (:func:`serving.backend.vllm_lora_model`). Never in a
            prompt or a card export.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    language: str = Field(min_length=2)
    profile: dict[str, str] = Field(default_factory=dict)
    style: str = ""
    examples: list[str] = Field(default_factory=list)
    scene: str = ""
    greetings: list[str] = Field(default_factory=list)
    system_prompt: str = ""
    post_history_instructions: str = ""
    tags: list[str] = Field(default_factory=list)
    creator: str = ""
    character_version: str = ""
    lorebook: dict[str, Any] | None = None
    card: dict[str, Any] | None = None
    adapter: str = ""

    @field_validator("language")
    @classmethod
    def _primary_subtag(cls, v: str) -> str:
        return v.split("-")[0].lower()

    @model_serializer(mode="wrap")
    def _drop_empty_card_fields(self, handler: Any) -> Any:
        # card fields at their empty default are not written: records of characters without a card
        # keep the bytes they had before these fields existed (and so their content hashes)
        d = handler(self)
        if isinstance(d, dict):
            for k in CARD_FIELDS + SERVING_FIELDS:
                if k in d and (d[k] is None or d[k] == "" or d[k] == []):
                    del d[k]
        return d


#: Character fields that come from a Character Card and are left out of a record while empty.
CARD_FIELDS: tuple[str, ...] = (
    "greetings",
    "system_prompt",
    "post_history_instructions",
    "tags",
    "creator",
    "character_version",
    "lorebook",
    "card",
)

#: Character fields about how a character is served (not from a card), left out while empty.
SERVING_FIELDS: tuple[str, ...] = ("adapter",)


class Message(BaseModel):
    """One chat turn. ``name`` carries the speaker for multi-party scripts (CharacterEval)."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str
    name: str | None = None


class Dialogue(BaseModel):
    """A multi-turn conversation with one character; assistant turns are the character's lines.

    ``messages`` must not contain the persona card: the system prompt is rendered from the
    :class:`Character` by :func:`troupe.persona.render_system_prompt` at train, eval and serve time.
    A leading ``system`` message is kept as an extra scene/behaviour instruction appended to the card.
    """

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    character_id: str = Field(min_length=1)
    messages: list[Message]
    source: str = ""
    split: str = ""
    meta: dict[str, Any] = Field(default_factory=dict)


class PreferencePair(BaseModel):
    """A DPO preference pair: ``messages`` is the context ending in a user turn.

    ``chosen`` is the in-character reference reply; ``rejected`` a rule-breaking or off-character one
    (see DPO, Rafailov et al. 2023, arXiv:2305.18290).
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    character_id: str
    messages: list[Message]
    chosen: str
    rejected: str
    meta: dict[str, Any] = Field(default_factory=dict)


class QuarantineRecord(BaseModel):
    """A record that was not accepted: where it came from, why, and the raw record itself."""

    file: str
    line: int | None = None
    stage: str
    reason: str
    record_id: str | None = None
    raw: Any = None


M = TypeVar("M", bound=BaseModel)


def read_text(path: str | Path) -> str:
    """Whole file as UTF-8 text (a leading BOM dropped): the one file reader of contract and importers.

    Raises:
        ContractError: the file is missing or not valid UTF-8 (names the file and byte offset).
    """
    p = Path(path)
    if not p.is_file():
        raise ContractError(f"{p}: file not found")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ContractError(f"{p}: not UTF-8 (byte {e.start}: {e.reason})") from e
    return text.removeprefix("\ufeff")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for non-blank lines of a UTF-8 file (1-based line numbers).

    Raises:
        ContractError: the file is missing or not valid UTF-8 (names the file and byte offset).
    """
    for i, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            yield i, line


def read_jsonl(
    path: str | Path,
    model: type[M],
    quarantine: Callable[[QuarantineRecord], None] | None = None,
) -> list[M]:
    """Read a JSONL file of ``model`` records.

    Args:
        path: file to read.
        model: pydantic model class for each line.
        quarantine: if given, bad lines are passed to it (stage ``read``) instead of raising.

    Raises:
        ContractError: missing/non-UTF-8 file, or a bad line when no ``quarantine`` is given.
    """
    out: list[M] = []
    for lineno, line in iter_jsonl(path):
        try:
            out.append(model.model_validate(json.loads(line)))
        except (json.JSONDecodeError, ValidationError) as e:
            reason = describe_error(e)
            if quarantine is None:
                raise ContractError(f"{path}:{lineno}: {reason}") from e
            quarantine(QuarantineRecord(file=str(path), line=lineno, stage="read", reason=reason, raw=line))
    return out


def describe_error(e: Exception) -> str:
    """One-line reason for a JSON or pydantic error, naming the field path for the latter."""
    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<record>"
            parts.append(f"field {loc}: {err['msg']}")
        return "; ".join(parts)
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON: {e.msg} (column {e.colno})"
    return str(e)


def write_jsonl(path: str | Path, records: Iterable[BaseModel | dict]) -> int:
    """Write records as UTF-8 JSON Lines (non-ASCII kept readable); returns the count written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with p.open("w", encoding="utf-8") as f:
        for r in records:
            d = r.model_dump(mode="json", exclude_none=True) if isinstance(r, BaseModel) else r
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            n += 1
    return n


def load_characters(path: str | Path) -> dict[str, Character]:
    """Read ``characters.jsonl`` into ``{id: Character}``; duplicate ids are an error."""
    chars: dict[str, Character] = {}
    for c in read_jsonl(path, Character):
        if c.id in chars:
            raise ContractError(f"{path}: duplicate character id {c.id!r}")
        chars[c.id] = c
    return chars


#: the placeholder card every general-data dialogue names (``Dialogue.meta["general"]``): it exists so the
#: contract's "every dialogue names a card" holds; it is never rendered (:func:`general_chat`)
GENERAL_CHARACTER_ID = "general-assistant"


def is_general(dialogue: Dialogue) -> bool:
    """True for general instruction data (a source with ``general: true``): no character, no persona card."""
    return dialogue.meta.get("general") is True


def general_chat(dialogue_messages: list[Message]) -> list[dict[str, str]]:
    """Chat-template messages of a general-data dialogue: its own turns, no persona card.

    A leading ``system`` turn of the dialogue stays the system message; without one the list starts
    with the user turn and the tokenizer's chat template adds its own default (SmolLM2 / Qwen2.5 do).
    The card's role-play rules (reply length, markup, one language) would contradict a general
    assistant's answers and teach the model to ignore the card, so none is rendered.
    """
    out = to_chat(dialogue_messages, "")
    return out[1:] if not out[0]["content"] else out


def to_chat(dialogue_messages: list[Message], system_prompt: str) -> list[dict[str, str]]:
    """Chat-template messages: the rendered persona card as system + user/assistant turns.

    A leading ``system`` message of the dialogue is appended to the card (scene instruction);
    ``name`` of user turns from multi-party scripts is prefixed as ``"Name: text"`` on the *user*
    side only (the character's own turns never carry a name prefix, rule 1 of DOMAIN.md).
    """
    msgs = list(dialogue_messages)
    system = system_prompt
    if msgs and msgs[0].role == "system":
        system = f"{system_prompt}\n\n{msgs[0].content}".strip()
        msgs = msgs[1:]
    out = [{"role": "system", "content": system}]
    for m in msgs:
        content = m.content
        if m.role == "user" and m.name:
            content = f"{m.name}: {content}"
        out.append({"role": m.role, "content": content})
    return out
