"""Importers: map outside dataset formats onto the contract (:mod:`troupe.contract`).

One function per ``kind`` of ``data.sources`` entry (``{kind, path, ...options}``):

=============== ===========================================================================
kind            input
=============== ===========================================================================
troupe          directory with ``characters.jsonl`` + ``dialogues.jsonl`` (already contract)
sharegpt        JSON array or JSONL of ``conversations`` (``from``/``value``: human/gpt/system)
                or ``messages`` (``role``/``content``); LLaMA-Factory's ``system`` column
alpaca          JSON array or JSONL of ``instruction``/``input``/``output`` (+``system``,
                ``history`` = ``[[query, answer], ...]``)
charactereval   CharacterEval directory: ``test_data.jsonl`` (a JSON *array*),
                ``character_profiles.json`` (Baidu-Baike profile per character name)
character100    Character100 directory: ``train.json``, ``dev.json`` (Alpaca-style
                "Imagine you are X ..." prompts) and ``QR_test/NAME.txt`` (TSV)
memotrace       WeChat MemoTrace JSON export: records of ``conversations`` (``role``/``content``)
synthetic       ``troupe data synthesize`` directory: ``characters.jsonl`` + ``conversations.jsonl``
                (dialogue-engine :class:`~troupe.dialogue.contract.Conversation` records); added to
                the selected source set by ``troupe data import`` when ``synthesis.enabled``
=============== ===========================================================================

Options shared by sharegpt / alpaca / memotrace: ``character`` (an inline persona card, a
:class:`~troupe.contract.Character` dict), ``character_id`` (a card defined by another source),
``language`` (for cards built from a ``system`` turn), ``name`` (source label, default the kind).
For sharegpt/alpaca without a card option, each distinct ``system`` turn becomes a persona card.

General instruction data (sharegpt / alpaca with ``general: true``; the seeds mixed it in at most half
of the tokens so the model does not "turn dumb"): such a source is no character. Its dialogues carry
``meta["general"] = True`` and name the placeholder card :data:`~troupe.contract.GENERAL_CHARACTER_ID`
(:func:`general_card`, added once); a ``system`` turn stays the dialogue's system message; training
renders them without any persona card (:func:`troupe.contract.general_chat`). A ``character`` /
``character_id`` option on a general source is an error.

Accounting: every record read from a source is *seen*; it is either *imported* or reported as an
error (:class:`~troupe.contract.QuarantineRecord` with file, line, reason and the raw record), so
``seen == imported + errors`` holds per source. A missing or non-UTF-8 file stops the import with a
:class:`~troupe.contract.ContractError` naming the file. Dialogues whose ``character_id`` names no
imported card are quarantined ("unknown character id"). Every imported dialogue carries
``meta["origin"] = {"file", "line"}`` so later stages can name the source line of a rejection.
Records cut from one source conversation carry the same ``meta["source_dialogue"]`` (CharacterEval:
:func:`charactereval_scene_id`), so the split never puts two cuts of one scene on both sides.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from troupe.contract import (
    GENERAL_CHARACTER_ID,
    Character,
    ContractError,
    Dialogue,
    Message,
    QuarantineRecord,
    describe_error,
    iter_jsonl,
    read_text,
    write_jsonl,
)

KINDS = ("troupe", "sharegpt", "alpaca", "charactereval", "character100", "memotrace", "synthetic")

_ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """A record that cannot be mapped onto the contract (becomes an import error, not a stop)."""


@dataclass
class SourceReport:
    """Counts for one source: ``seen == imported + errors`` (dialogue records), same for cards."""

    kind: str
    path: str
    name: str
    seen: int = 0
    imported: int = 0
    errors: int = 0
    characters_seen: int = 0
    characters_imported: int = 0
    character_errors: int = 0
    seconds: float = 0.0


@dataclass
class ImportResult:
    """Everything an import produced: cards by id, dialogues, errors and one report per source."""

    characters: dict[str, Character] = field(default_factory=dict)
    dialogues: list[Dialogue] = field(default_factory=list)
    errors: list[QuarantineRecord] = field(default_factory=list)
    sources: list[SourceReport] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """JSON-ready report: per-source counts plus totals (``seen == imported + errors``)."""
        totals = {
            k: sum(getattr(s, k) for s in self.sources)
            for k in (
                "seen",
                "imported",
                "errors",
                "characters_seen",
                "characters_imported",
                "character_errors",
            )
        }
        return {
            "sources": [asdict(s) for s in self.sources],
            "totals": totals,
            "characters": len(self.characters),
            "dialogues": len(self.dialogues),
        }


class _Sink:
    """Collects one source's output into an :class:`ImportResult`, keeping the counts."""

    def __init__(self, result: ImportResult, report: SourceReport, owners: list[SourceReport]):
        self.result, self.rep, self._owners = result, report, owners
        self._ids = {d.id for d in result.dialogues}

    def seen(self) -> None:
        self.rep.seen += 1

    def character(self, c: Character, file: str, line: int | None) -> None:
        """Add a card; an identical re-definition is accepted, a conflicting one is an error."""
        self.rep.characters_seen += 1
        old = self.result.characters.get(c.id)
        if old is not None and old != c:
            self.rep.character_errors += 1
            self.result.errors.append(
                QuarantineRecord(
                    file=file,
                    line=line,
                    stage="import",
                    reason=f"character id {c.id!r} already defined with a different card",
                    record_id=c.id,
                    raw=c.model_dump(mode="json"),
                )
            )
            return
        self.result.characters[c.id] = c
        self.rep.characters_imported += 1

    def character_error(self, file: str, line: int | None, reason: str, raw: Any) -> None:
        self.rep.characters_seen += 1
        self.rep.character_errors += 1
        self.result.errors.append(
            QuarantineRecord(file=file, line=line, stage="import", reason=reason, raw=raw)
        )

    def dialogue(self, d: Dialogue, file: str, line: int | None, raw: Any = None) -> None:
        """Add a dialogue (the caller has already counted it as seen)."""
        if d.id in self._ids:
            self.error(file, line, f"duplicate dialogue id {d.id!r}", raw, record_id=d.id)
            return
        d.meta.setdefault("origin", {"file": file, "line": line})
        if not d.source:
            d.source = self.rep.name
        self._ids.add(d.id)
        self.result.dialogues.append(d)
        self._owners.append(self.rep)
        self.rep.imported += 1

    def error(self, file: str, line: int | None, reason: str, raw: Any, record_id: str | None = None) -> None:
        self.rep.errors += 1
        self.result.errors.append(
            QuarantineRecord(
                file=file, line=line, stage="import", reason=reason, record_id=record_id, raw=raw
            )
        )


# --------------------------------------------------------------------------------------- file reading


def iter_json_records(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line, record, error)`` for a JSON array file or a JSON Lines file.

    A file whose first non-blank character is ``[`` is read as one JSON array; ``line`` is the line
    where each element starts. Otherwise every non-blank line is one record; a malformed line yields
    ``(line, raw_text, reason)`` so the caller can report it and go on.

    Raises:
        ContractError: missing / non-UTF-8 file, or a JSON array that does not parse (file:line:col).
    """
    p = Path(path)
    text = read_text(p)
    stripped = text.lstrip()
    if stripped.startswith("["):
        dec = json.JSONDecoder()
        pos = len(text) - len(stripped) + 1
        ws = re.compile(r"\s*")
        line, last = 1, 0
        first = True
        while True:
            pos = ws.match(text, pos).end()
            if pos < len(text) and text[pos] == "]":
                return
            if not first:
                if pos >= len(text) or text[pos] != ",":
                    ln = text.count("\n", 0, pos) + 1
                    raise ContractError(f"{p}:{ln}: malformed JSON array: expected ',' or ']'")
                pos = ws.match(text, pos + 1).end()
            first = False
            try:
                obj, end = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise ContractError(f"{p}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
            line += text.count("\n", last, pos)
            last = pos
            yield line, obj, None
            pos = end
    for lineno, raw in iter_jsonl(p):
        try:
            yield lineno, json.loads(raw), None
        except json.JSONDecodeError as e:
            yield lineno, raw, describe_error(e)


def slugify(name: str) -> str:
    """ASCII id fragment for a display name (``"Beyoncé"`` -> ``"beyonce"``); non-Latin names kept."""
    s = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    s = re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()
    return s or re.sub(r"\s+", "_", name.strip())


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:10]


# --------------------------------------------------------------------------------------- cards from options


_NAME_PATTERNS = (
    re.compile(r"(?:you are|You are|play(?:ing)?|role-play as)\s+([A-Z][\w'.-]*(?: [A-Z][\w'.-]*){0,3})"),
    re.compile(r"(?:扮演|你是|你叫)\s*([\u3400-\u9fff·]{1,8}?)(?:[，,。.！!：:\s]|$)"),
)


def general_card() -> Character:
    """The placeholder card general-data dialogues name (never rendered: module docstring)."""
    return Character(
        id=GENERAL_CHARACTER_ID,
        name="Assistant",
        language="en",
        profile={"role": "general instruction data (no persona card is rendered in training)"},
    )


class _Cards:
    """Persona cards for sources whose records carry no card of their own."""

    def __init__(self, src: dict[str, Any], sink: _Sink, file: str):
        self.src, self.sink, self.file = src, sink, file
        self.card_id: str | None = None
        self.general = bool(src.get("general"))
        card = src.get("character")
        if self.general:
            if card is not None or src.get("character_id"):
                raise ContractError(
                    f"data.sources[{src.get('name', src['kind'])}]: general: true takes no character/character_id"
                )
            sink.character(general_card(), file, None)
            self.card_id = GENERAL_CHARACTER_ID
        elif card is not None:
            try:
                c = Character.model_validate(card)
            except ValidationError as e:
                raise ContractError(
                    f"data.sources[{src.get('name', src['kind'])}].character: {describe_error(e)}"
                ) from e
            sink.character(c, file, None)
            self.card_id = c.id
        elif src.get("character_id"):
            self.card_id = str(src["character_id"])

    def resolve(self, record: dict[str, Any], system: str | None) -> tuple[str, bool]:
        """``(character_id, system_consumed)`` for one record.

        Priority: the record's own ``character_id``, the source's card option, then a card built from
        the record's ``system`` text (consumed: it becomes the card, not a message).

        Raises:
            RecordError: no way to know which character the record belongs to.
        """
        if self.general:
            return GENERAL_CHARACTER_ID, False
        if isinstance(record.get("character_id"), str) and record["character_id"]:
            return record["character_id"], False
        if self.card_id:
            return self.card_id, False
        if system and system.strip():
            return self._card_from_system(system.strip()), True
        raise RecordError("no character: give a `character`/`character_id` option or a system turn")

    def _card_from_system(self, system: str) -> str:
        from troupe.checks import detect_language

        name = self.src.get("character_name")
        if not name:
            for pat in _NAME_PATTERNS:
                m = pat.search(system)
                if m:
                    name = m.group(1).strip()
                    break
        label = self.src.get("name", self.src["kind"])
        cid = (
            f"{label}-{slugify(name)}-{_short_hash(system)[:6]}" if name else f"{label}-{_short_hash(system)}"
        )
        if cid not in self.sink.result.characters:
            lang = self.src.get("language") or detect_language(system) or "en"
            c = Character(id=cid, name=name or cid, language=lang, profile={"description": system})
            self.sink.character(c, self.file, None)
        return cid


def _message(role: Any, content: Any, name: Any = None) -> Message:
    r = _ROLE_MAP.get(str(role).strip().lower()) if role is not None else None
    if r is None:
        raise RecordError(f"unsupported role {role!r}")
    if not isinstance(content, str):
        raise RecordError(f"{r} turn content must be a string, got {type(content).__name__}")
    return Message(role=r, content=content, name=name if isinstance(name, str) and name else None)


def _merge_same_role(msgs: list[Message]) -> list[Message]:
    """Merge consecutive turns of one role (several quick inputs -> one turn), joined by newlines."""
    out: list[Message] = []
    for m in msgs:
        if out and out[-1].role == m.role and m.role != "system" and out[-1].name == m.name:
            out[-1] = Message(role=m.role, content=f"{out[-1].content}\n{m.content}", name=m.name)
        else:
            out.append(m)
    return out


# --------------------------------------------------------------------------------------- importers


def _import_characters(cfile: Path, sink: _Sink) -> None:
    """Every line of a contract ``characters.jsonl`` into the sink; a bad line is a character error
    naming ``file:line``."""
    for lineno, raw in iter_jsonl(cfile):
        try:
            sink.character(Character.model_validate(json.loads(raw)), str(cfile), lineno)
        except (json.JSONDecodeError, ValidationError) as e:
            sink.character_error(str(cfile), lineno, describe_error(e), raw)


def _import_troupe(src: dict[str, Any], sink: _Sink) -> None:
    root = Path(src["path"])
    cfile, dfile = root / "characters.jsonl", root / "dialogues.jsonl"
    _import_characters(cfile, sink)
    for lineno, raw in iter_jsonl(dfile):
        sink.seen()
        try:
            d = Dialogue.model_validate(json.loads(raw))
        except (json.JSONDecodeError, ValidationError) as e:
            sink.error(str(dfile), lineno, describe_error(e), raw)
            continue
        sink.dialogue(d, str(dfile), lineno, raw)


def _chat_records(
    src: dict[str, Any], sink: _Sink, to_messages: Callable[[dict], tuple[list[Message], str | None]]
):
    """Shared loop of sharegpt / alpaca / memotrace: one JSON record -> one dialogue."""
    path = Path(src["path"])
    cards = _Cards(src, sink, str(path))
    label = src.get("name", src["kind"])
    for lineno, rec, err in iter_json_records(path):
        sink.seen()
        if err:
            sink.error(str(path), lineno, err, rec)
            continue
        try:
            if not isinstance(rec, dict):
                raise RecordError(f"record must be a JSON object, got {type(rec).__name__}")
            msgs, system = to_messages(rec)
            cid, consumed = cards.resolve(rec, system)
            if system and not consumed:
                msgs = [Message(role="system", content=system), *msgs]
            rid = rec.get("id")
            did = f"{label}-{rid}" if rid not in (None, "") else f"{label}-{path.stem}-{lineno}"
            d = Dialogue(id=did, character_id=cid, messages=msgs, source=label)
            if cards.general:
                d.meta["general"] = True
        except (RecordError, ValidationError) as e:
            sink.error(str(path), lineno, describe_error(e), rec)
            continue
        sink.dialogue(d, str(path), lineno, rec)


def _sharegpt_messages(rec: dict) -> tuple[list[Message], str | None]:
    system = rec.get("system") if isinstance(rec.get("system"), str) else None
    if isinstance(rec.get("conversations"), list):
        turns = [
            (t.get("from"), t.get("value"), t.get("name")) if isinstance(t, dict) else (None, t, None)
            for t in rec["conversations"]
        ]
    elif isinstance(rec.get("messages"), list):
        turns = [
            (t.get("role"), t.get("content"), t.get("name")) if isinstance(t, dict) else (None, t, None)
            for t in rec["messages"]
        ]
    else:
        raise RecordError("record has neither `conversations` nor `messages` list")
    msgs = [_message(r, c, n) for r, c, n in turns]
    if msgs and msgs[0].role == "system":
        system = "\n\n".join(x for x in (system, msgs[0].content) if x)
        msgs = msgs[1:]
    return msgs, system


def _alpaca_messages(rec: dict) -> tuple[list[Message], str | None]:
    instr, inp, out = rec.get("instruction"), rec.get("input", ""), rec.get("output")
    if not isinstance(instr, str) or not isinstance(out, str) or not isinstance(inp, str | None):
        raise RecordError("alpaca record needs string `instruction` and `output` (and optional `input`)")
    msgs: list[Message] = []
    hist = rec.get("history") or []
    if not isinstance(hist, list):
        raise RecordError("`history` must be a list of [query, answer] pairs")
    for pair in hist:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RecordError("`history` must be a list of [query, answer] pairs")
        msgs += [_message("user", pair[0]), _message("assistant", pair[1])]
    query = f"{instr}\n{inp}" if inp else instr
    msgs += [Message(role="user", content=query), Message(role="assistant", content=out)]
    system = rec.get("system") if isinstance(rec.get("system"), str) else None
    return msgs, system


def _memotrace_messages(rec: dict) -> tuple[list[Message], str | None]:
    convs = rec.get("conversations", rec.get("messages"))
    if not isinstance(convs, list):
        raise RecordError("MemoTrace record needs a `conversations` list of {role, content}")
    msgs = [
        _message(t.get("role"), t.get("content")) if isinstance(t, dict) else _message(None, t) for t in convs
    ]
    system = None
    if msgs and msgs[0].role == "system":
        system, msgs = msgs[0].content, msgs[1:]
    return _merge_same_role(msgs), system


def _import_sharegpt(src: dict[str, Any], sink: _Sink) -> None:
    _chat_records(src, sink, _sharegpt_messages)


def _import_alpaca(src: dict[str, Any], sink: _Sink) -> None:
    _chat_records(src, sink, _alpaca_messages)


def _import_memotrace(src: dict[str, Any], sink: _Sink) -> None:
    if not src.get("character") and not src.get("character_id"):
        raise ContractError(
            f"data.sources memotrace {src['path']}: needs a `character` card or `character_id`"
        )
    _chat_records(src, sink, _memotrace_messages)


_SPEAKER = re.compile(r"^\s*([^：:\n]{1,20}?)\s*[：:]\s*(.*)$", re.S)


def charactereval_turns(
    context: str, role: str, *, require_reply: bool = True
) -> tuple[list[Message], list[Message]]:
    """Script lines ``Speaker：line`` -> ``(messages, trailing_user_turns)`` for character ``role``.

    The role's lines are assistant turns; every other speaker's line is a user turn with the speaker in
    ``name``; consecutive lines of one side are merged (a user turn merging several speakers has no
    ``name`` and keeps ``Speaker: line`` prefixes). Lines before the role's first reply that are the
    role's own become a leading ``system`` scene message; user turns after the role's last line are
    returned separately (the benchmark's prompt for the next reply). Stage directions are kept.

    ``require_reply=False`` (the CharacterEval suite, :mod:`troupe.dialogue.charactereval`, which only
    needs the prompt for the role's next line) accepts contexts where the role never speaks, or only
    before anyone else does: ``messages`` then holds no assistant turn (possibly nothing).

    Raises:
        RecordError: (``require_reply`` only) the role never speaks in the context, or only before
            anyone else does.
    """
    lines: list[tuple[str | None, str]] = []
    for raw in context.split("\n"):
        if not raw.strip():
            continue
        m = _SPEAKER.match(raw)
        if m and m.group(1).strip():
            lines.append((m.group(1).strip(), m.group(2).strip()))
        elif lines:  # continuation / narration line: belongs to the previous speaker's turn
            lines[-1] = (lines[-1][0], f"{lines[-1][1]}\n{raw.strip()}")
        else:
            lines.append((None, raw.strip()))
    if require_reply and not any(s == role for s, _ in lines):
        raise RecordError(f"role {role!r} has no line in the context")
    groups: list[tuple[str, list[tuple[str | None, str]]]] = []
    for spk, text in lines:
        side = "assistant" if spk == role else "user"
        if groups and groups[-1][0] == side:
            groups[-1][1].append((spk, text))
        else:
            groups.append((side, [(spk, text)]))
    msgs: list[Message] = []
    for side, items in groups:
        if side == "assistant":
            msgs.append(Message(role="assistant", content="\n".join(t for _, t in items)))
        elif len({s for s, _ in items}) == 1 and items[0][0] is not None:
            msgs.append(Message(role="user", content="\n".join(t for _, t in items), name=items[0][0]))
        else:
            msgs.append(Message(role="user", content="\n".join(f"{s}: {t}" if s else t for s, t in items)))
    if msgs and msgs[0].role == "assistant":
        opener = "\n".join(f"{role}：{t}" for _, t in groups[0][1])
        msgs[0] = Message(role="system", content=opener)
    trailing: list[Message] = []
    while msgs and msgs[-1].role == "user":
        trailing.insert(0, msgs.pop())
    if require_reply and not any(m.role == "assistant" for m in msgs):
        raise RecordError(f"role {role!r} speaks only before the first user line (no reply in the context)")
    return msgs, trailing


def charactereval_scene_id(label: str, novel: Any, context: str) -> str:
    """Source-dialogue id of a CharacterEval record: ``"{label}-scene-{hash}"`` of novel + first script line.

    CharacterEval cuts one script scene at several points and for several roles (4,564 records, 2,706
    of them strict prefixes of another record of the same role); every cut of a scene starts with the
    scene's first line, so records with the same id are cuts of one scene and the split keeps them
    together (:func:`troupe.data.split.dialogue_groups`). Whitespace is collapsed before hashing.
    """
    first = next((ln for ln in context.split("\n") if ln.strip()), "")
    return f"{label}-scene-{_short_hash(str(novel or '') + chr(0) + ' '.join(first.split()))}"


def charactereval_character(role: str, profile: Any, novel: Any = "") -> Character:
    """The persona card of CharacterEval role ``role``: id ``ce-<slug>``, zh, the Baidu-Baike profile
    (``character_profiles.json[role]``; not a dict = empty) as string fields, plus ``作品`` = ``novel``
    when the profile has none."""
    fields = {str(k): str(v) for k, v in profile.items()} if isinstance(profile, dict) else {}
    if novel:
        fields.setdefault("作品", str(novel))
    return Character(id=f"ce-{slugify(role)}", name=role, language="zh", profile=fields)


def _import_charactereval(src: dict[str, Any], sink: _Sink) -> None:
    root = Path(src["path"])
    pfile, dfile = root / "character_profiles.json", root / "test_data.jsonl"
    try:
        profiles = json.loads(read_text(pfile))
    except json.JSONDecodeError as e:
        raise ContractError(f"{pfile}:{e.lineno}: malformed JSON: {e.msg}") from e
    label = src.get("name", "charactereval")
    made: set[str] = set()
    for lineno, rec, err in iter_json_records(dfile):
        sink.seen()
        if err:
            sink.error(str(dfile), lineno, err, rec)
            continue
        try:
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("role", "context")):
                raise RecordError("record needs string `role` and `context`")
            role = rec["role"].strip()
            cid = f"ce-{slugify(role)}"
            if cid not in made:
                card = charactereval_character(role, profiles.get(role), rec.get("novel_name"))
                sink.character(card, str(pfile), None)
                made.add(cid)
            msgs, trailing = charactereval_turns(rec["context"], role)
            meta: dict[str, Any] = {
                "novel": rec.get("novel_name", ""),
                "charactereval_id": rec.get("id"),
                "source_dialogue": charactereval_scene_id(label, rec.get("novel_name", ""), rec["context"]),
            }
            if trailing:
                meta["trailing_user_turns"] = [m.model_dump(exclude_none=True) for m in trailing]
            d = Dialogue(
                id=f"{label}-{rec.get('id', lineno)}",
                character_id=cid,
                messages=msgs,
                source=label,
                meta=meta,
            )
        except (RecordError, ValidationError) as e:
            sink.error(str(dfile), lineno, describe_error(e), rec)
            continue
        sink.dialogue(d, str(dfile), lineno, rec)


_C100_PROMPT = re.compile(
    r"^\s*Imagine you are (?P<name>.+?), you need to role-play as he/she, and your basic information is as "
    r"follows:\s*(?P<info>.*?)\s*Now you need to answer the question \"(?P<q>.*)\", and as the person you need "
    r"to role-play, your answer is:\s*$",
    re.S,
)


def _import_character100(src: dict[str, Any], sink: _Sink) -> None:
    root = Path(src["path"])
    label = src.get("name", "character100")
    parts = src.get("parts", ["train", "dev", "qr_test"])
    cards: dict[str, Character] = {}

    def card(name: str, info: str, file: str, line: int | None) -> str:
        cid = f"c100-{slugify(name)}"
        if cid not in cards:
            cards[cid] = Character(id=cid, name=name, language="en", profile={"summary": info})
            sink.character(cards[cid], file, line)
        return cid

    def add(cid: str, info: str, q: str, a: str, did: str, file: str, line: int, raw: Any, part: str) -> None:
        msgs = [Message(role="user", content=q.strip()), Message(role="assistant", content=a.strip())]
        if info and info != cards[cid].profile.get("summary"):
            msgs.insert(0, Message(role="system", content=f"Basic information: {info}"))
        sink.dialogue(
            Dialogue(id=did, character_id=cid, messages=msgs, source=label, meta={"part": part}),
            file,
            line,
            raw,
        )

    qr_files = sorted((root / "QR_test").glob("*.txt")) if "qr_test" in parts else []
    if "qr_test" in parts and not qr_files:
        raise ContractError(f"{root / 'QR_test'}: no NAME.txt files found")
    # QR_test first: its first paragraph per person (the article lede) is the best card summary.
    for f in qr_files:
        name = f.stem.replace("_", " ")
        for lineno, raw in enumerate(read_text(f).splitlines(), start=1):
            if not raw.strip():
                continue
            sink.seen()
            cols = raw.split("\t")
            if len(cols) != 3 or not all(c.strip() for c in cols):
                sink.error(str(f), lineno, f"expected 3 non-empty tab-separated fields, got {len(cols)}", raw)
                continue
            info, q, a = (c.strip() for c in cols)
            cid = card(name, info, str(f), lineno)
            add(cid, info, q, a, f"{label}-qr-{slugify(name)}-{lineno}", str(f), lineno, raw, "qr_test")
    for part in ("train", "dev"):
        if part not in parts:
            continue
        f = root / f"{part}.json"
        for lineno, rec, err in iter_json_records(f):
            sink.seen()
            if err:
                sink.error(str(f), lineno, err, rec)
                continue
            m = _C100_PROMPT.match(rec.get("input", "")) if isinstance(rec, dict) else None
            if m is None or not isinstance(rec.get("output"), str):
                sink.error(
                    str(f),
                    lineno,
                    "not a Character100 'Imagine you are X ...' prompt with string output",
                    rec,
                )
                continue
            cid = card(m.group("name").strip(), m.group("info").strip(), str(f), lineno)
            add(
                cid,
                m.group("info").strip(),
                m.group("q"),
                rec["output"],
                f"{label}-{part}-{lineno}",
                str(f),
                lineno,
                rec,
                part,
            )


def _import_synthetic(src: dict[str, Any], sink: _Sink) -> None:
    """Dialogue-engine conversations -> dialogues with ``source="synthetic"`` and the provenance in
    ``meta["synthetic"]`` (models, prompt version, scenario id, seed, variables, probes, how it ended).

    The leading scene note stays a leading ``system`` message (what the character agent saw after its
    card). A failed or unreadable record is an import error naming ``file:line``.
    """
    from troupe.dialogue.contract import Conversation

    root = Path(src["path"])
    cfile, dfile = root / "characters.jsonl", root / "conversations.jsonl"
    _import_characters(cfile, sink)
    label = src.get("name", "synthetic")
    for lineno, raw in iter_jsonl(dfile):
        sink.seen()
        try:
            c = Conversation.model_validate(json.loads(raw))
        except (json.JSONDecodeError, ValidationError) as e:
            sink.error(str(dfile), lineno, describe_error(e), raw)
            continue
        if c.status != "finished":
            sink.error(
                str(dfile), lineno, f"conversation {c.id} did not finish: {c.reason}", raw, record_id=c.id
            )
            continue
        prov = c.provenance
        meta = {
            "synthetic": {
                "conversation_id": c.id,
                "scenario_id": c.scenario.id,
                "seed": c.scenario.seed,
                "label": c.label,
                "prompt_version": prov.get("prompt_version", ""),
                "agents": prov.get("agents", {}),
                "character_model": prov.get("character_model", ""),
                "variables": c.scenario.variables,
                "probes": [p.model_dump() for p in c.scenario.probes],
                "ended_by": c.ended_by,
            }
        }
        try:
            d = Dialogue(id=f"{label}-{c.id}", character_id=c.character_id, messages=c.messages,
                         source="synthetic", meta=meta)  # fmt: skip
        except ValidationError as e:
            sink.error(str(dfile), lineno, describe_error(e), raw, record_id=c.id)
            continue
        sink.dialogue(d, str(dfile), lineno, raw)


def synthetic_source(params: dict[str, Any]) -> dict[str, Any] | None:
    """The source ``troupe data import`` adds to the selected set when ``synthesis.enabled``:
    ``{kind: synthetic, path: paths.synthetic}`` (None when disabled, or when the set already lists a
    synthetic source of that path)."""
    if not (params.get("synthesis") or {}).get("enabled"):
        return None
    path = str((params.get("paths") or {}).get("synthetic", "work/synthetic"))
    data = params.get("data") or {}
    listed = (data.get("source_sets") or {}).get(data.get("source_set", "sample")) or []
    if any(s.get("kind") == "synthetic" and Path(s.get("path", "")) == Path(path) for s in listed):
        return None
    return {"kind": "synthetic", "path": path}


_IMPORTERS: dict[str, Callable[[dict[str, Any], _Sink], None]] = {
    "troupe": _import_troupe,
    "sharegpt": _import_sharegpt,
    "alpaca": _import_alpaca,
    "charactereval": _import_charactereval,
    "character100": _import_character100,
    "memotrace": _import_memotrace,
    "synthetic": _import_synthetic,
}


def selected_sources(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The source list ``data.source_sets[data.source_set]`` (a mutable reference into ``params``).

    Raises:
        ConfigError: unknown or empty source set (names the params keys to fix).
    """
    from troupe.config import ConfigError

    data = params.get("data") or {}
    name = data.get("source_set", "sample")
    sets = data.get("source_sets") or {}
    if name not in sets:
        raise ConfigError(
            f"data.source_set={name!r}: not one of data.source_sets ({', '.join(sets) or 'none'})"
        )
    if not sets[name]:
        raise ConfigError(f"data.source_sets.{name} is empty: nothing to import")
    return sets[name]


def import_sources(
    sources: list[dict[str, Any]], base_dir: str | Path = ".", log: Callable[[str], None] | None = None
) -> ImportResult:
    """Import every ``data.sources`` entry into one :class:`ImportResult`.

    Args:
        sources: list of ``{kind, path, ...options}`` (see the module docstring).
        base_dir: relative ``path`` values are resolved against it (the repository root).
        log: optional callback receiving one progress line per source.

    Raises:
        ContractError: unknown kind, missing ``path``, a missing or non-UTF-8 file, an unparsable JSON
            array, or an invalid inline card.
    """
    result = ImportResult()
    owners: list[SourceReport] = []
    for i, s in enumerate(sources):
        if not isinstance(s, dict) or s.get("kind") not in _IMPORTERS or not s.get("path"):
            raise ContractError(f"data.sources[{i}]: need kind in {', '.join(KINDS)} and a path, got {s!r}")
        if s.get("general") and s["kind"] not in ("sharegpt", "alpaca"):
            raise ContractError(f"data.sources[{i}]: general: true is for sharegpt / alpaca, not {s['kind']}")
        src = dict(s)
        p = Path(src["path"])
        src["path"] = str(p if p.is_absolute() else Path(base_dir) / p)
        rep = SourceReport(kind=src["kind"], path=str(s["path"]), name=str(src.get("name", src["kind"])))
        t0 = time.perf_counter()
        _IMPORTERS[src["kind"]](src, _Sink(result, rep, owners))
        rep.seconds = round(time.perf_counter() - t0, 3)
        result.sources.append(rep)
        if log:
            log(
                f"[import] {rep.kind} {rep.path}: {rep.imported}/{rep.seen} dialogues, {rep.errors} errors, "
                f"{rep.characters_imported} characters ({rep.seconds:.1f}s)"
            )
    # dialogues whose character card was never imported are quarantined, charged to their source
    kept: list[Dialogue] = []
    for d, rep in zip(result.dialogues, owners, strict=True):
        if d.character_id in result.characters:
            kept.append(d)
            continue
        rep.imported -= 1
        rep.errors += 1
        origin = d.meta.get("origin", {})
        result.errors.append(
            QuarantineRecord(
                file=origin.get("file", rep.path),
                line=origin.get("line"),
                stage="import",
                reason=f"unknown character id {d.character_id!r}",
                record_id=d.id,
                raw=d.model_dump(mode="json", exclude_none=True),
            )
        )
    result.dialogues = kept
    return result


def write_import(result: ImportResult, out_dir: str | Path) -> dict[str, Any]:
    """Write ``characters.jsonl``, ``dialogues.jsonl``, ``import_errors.jsonl``, ``import_report.json``.

    Returns:
        The report dict written to ``import_report.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "characters.jsonl", result.characters.values())
    write_jsonl(out / "dialogues.jsonl", result.dialogues)
    write_jsonl(out / "import_errors.jsonl", result.errors)
    report = result.report()
    (out / "import_report.json").write_text(
        json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    return report
