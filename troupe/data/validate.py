"""Validation: a Great Expectations suite over a per-dialogue feature table decides what is accepted.

Flow (:func:`validate_dir`): read contract data -> scrub PII -> :func:`build_features` (one row per
dialogue: role order, empty turns, token length of the rendered dialogue, reply language, markup
grammar, PII, exact / near duplicates, stage directions) -> GX suite ``troupe_rows`` (one expectation
per rule, ``result_format=COMPLETE`` so every failing row index comes back) -> per-character rank of
the survivors -> GX suite ``troupe_cap`` (``data.max_dialogues_per_character``) -> accepted /
quarantined files, ``report.json``, ``features.csv`` and GX Data Docs (``data_docs/index.html``).

Language: a character's language is inferred from its replies (:func:`language_vote`: the most common
language among its assistant turns whose language :func:`troupe.checks.detect_language` identifies),
the persona card's ``language`` only as a fallback (no identified reply) and tie-breaker; the accepted
``characters.jsonl`` carries the inferred language and ``report.json`` says where each came from
(``character_languages``). A card written in English for a character who speaks Chinese therefore no
longer quarantines every dialogue of that character as ``wrong_language``.

Per-reply rules (:func:`reply_violations`: non-empty, markup parses, language, stage directions,
personal data) are the ones the suite applies per dialogue; DPO pair building checks chosen replies with
the same function.

General instruction data (:func:`troupe.contract.is_general`, a source with ``general: true``) is no
character: the rules about a character's replies (language share, reply markup, stage directions,
which Markdown ``*emphasis*`` would trip, and ``data.max_dialogues_per_character``) do not apply to it;
role order, empty turns, length (rendered without a card, :func:`troupe.contract.general_chat`),
personal data and duplicates do. ``split.general_max_share`` bounds its share of training instead.

The quarantine decision is read from the GX validation results (each expectation's ``meta.reason``
names its reason code); the Python code only computes features. Counts are conserved:
``in == accepted + quarantined``.

Near duplicates: Jaccard similarity of character 5-gram shingle sets of the normalised dialogue text,
within one character (the same lines under another persona card are a different training example).
Candidates come from MinHash LSH (64 hashes, 8 bands x 8 rows; Broder 1997, Leskovec et al. "Mining
of Massive Datasets" ch. 3); each candidate pair is then checked with the exact Jaccard, so a pair is
flagged only when its true similarity is >= ``data.near_duplicate_threshold``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from troupe.checks import detect_language, has_stage_direction, strip_stage_directions
from troupe.config import ConfigError, path_of, section
from troupe.contract import (
    Character,
    ContractError,
    Dialogue,
    Message,
    QuarantineRecord,
    general_chat,
    is_general,
    load_characters,
    read_jsonl,
    to_chat,
    write_jsonl,
)
from troupe.markup import parse_reply
from troupe.persona import render_system_prompt

# --------------------------------------------------------------------------------------- PII

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
#: Chinese resident id: 6-digit area, birth date YYYYMMDD, 3-digit sequence, check char.
_CN_ID = re.compile(
    r"(?<![0-9A-Za-z])\d{6}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])"
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_CN_MOBILE = re.compile(r"(?<!\d)(?:\+?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
_PHONE = re.compile(
    r"(?<![\w-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-])"
    r"|(?<!\d)0\d{2,3}-\d{7,8}(?!\d)"
)


#: cheap pre-screen: only texts with an ``@`` or a run of >= 7 digits (separators allowed) are scanned
_PII_SCREEN = re.compile(r"@|\d(?:[ ().+-]{0,2}\d){6}")


def _luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def scrub_pii(text: str) -> tuple[str, int]:
    """Replace personal data in ``text``; returns ``(scrubbed_text, number_of_replacements)``.

    Emails -> ``[EMAIL]``; Chinese resident ids (18 chars with a birth date) and credit-card-like
    numbers (13-19 digits passing the Luhn check) -> ``[ID]``; Chinese mobiles (``1[3-9]`` + 9 digits,
    optional +86) and grouped phone numbers (``+1 415-555-0134``, ``(020) 555-0188``, ``010-12345678``)
    -> ``[PHONE]``. Sticker text such as ``[委屈]`` is untouched.
    """
    n = 0

    def sub(pat: re.Pattern, token: str, s: str, check=None) -> str:
        nonlocal n

        def rep(m: re.Match) -> str:
            nonlocal n
            if check is not None and not check(m.group(0)):
                return m.group(0)
            n += 1
            return token

        return pat.sub(rep, s)

    if not _PII_SCREEN.search(text):
        return text, 0
    text = sub(_EMAIL, "[EMAIL]", text)
    text = sub(_CN_ID, "[ID]", text)
    text = sub(_CARD, "[ID]", text, check=lambda s: _luhn_ok(re.sub(r"\D", "", s)))
    text = sub(_CN_MOBILE, "[PHONE]", text)
    text = sub(_PHONE, "[PHONE]", text)
    return text, n


# --------------------------------------------------------------------------------------- duplicates

_SHINGLE = 5
_NUM_PERM, _BANDS = 64, 8
_ROWS = _NUM_PERM // _BANDS
_rng = np.random.default_rng(20240601)
_PERM_A = _rng.integers(1, 2**63, size=(_NUM_PERM, 1), dtype=np.uint64) | np.uint64(1)
_PERM_B = _rng.integers(0, 2**63, size=(_NUM_PERM, 1), dtype=np.uint64)
_POW = [np.uint64(pow(1_000_003, k, 2**64)) for k in range(_SHINGLE)]
_SPACE = re.compile(r"\s+")


def normalize_text(messages: list[Message]) -> str:
    """Dialogue text for duplicate checks: role-tagged user/assistant turns, NFKC, lower-case, collapsed
    spaces. A leading system (scene) message is left out: two different conversations in one scene are
    not duplicates."""
    s = "\n".join(f"{m.role[0]}:{m.content}" for m in messages if m.role != "system")
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", s).lower()).strip()


def shingles(text: str) -> np.ndarray:
    """Sorted unique uint64 hashes of the character 5-grams of ``text`` (one hash if shorter)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = len(cp) - _SHINGLE + 1
    if n <= 0:
        return np.array(
            [int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest())], dtype=np.uint64
        )
    h = cp[:n] * _POW[0]
    for k in range(1, _SHINGLE):
        h = h + cp[k : k + n] * _POW[k]
    return np.unique(h)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique hash arrays."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def find_duplicates(
    groups: list[str], texts: list[str], threshold: float
) -> tuple[list[str | None], list[str | None]]:
    """Exact and near duplicates, each later record pointing at the first earlier one it repeats.

    Args:
        groups: group key per record (the character id); records are compared within a group only.
        texts: normalised text per record (see :func:`normalize_text`).
        threshold: Jaccard similarity at or above which a pair counts as a near duplicate.

    Returns:
        ``(exact_of, near_of)``: per record the index (as a string) of the earlier record it
        duplicates exactly / nearly, or None. A record is never both.
    """
    n = len(texts)
    exact_of: list[str | None] = [None] * n
    near_of: list[str | None] = [None] * n
    first: dict[tuple[str, str], int] = {}
    buckets: dict[tuple[str, int, bytes], list[int]] = defaultdict(list)
    sh: dict[int, np.ndarray] = {}
    for i, (g, t) in enumerate(zip(groups, texts, strict=True)):
        key = (g, hashlib.blake2b(t.encode("utf-8"), digest_size=16).hexdigest())
        if key in first:
            exact_of[i] = str(first[key])
            continue
        first[key] = i
        s = shingles(t)
        sh[i] = s
        sig = ((_PERM_A * s[None, :] + _PERM_B) >> np.uint64(32)).min(axis=1)
        cands: set[int] = set()
        keys = [(g, b, sig[b * _ROWS : (b + 1) * _ROWS].tobytes()) for b in range(_BANDS)]
        for k in keys:
            cands.update(buckets.get(k, ()))
        for j in sorted(cands):
            if near_of[j] is None and jaccard(s, sh[j]) >= threshold:
                near_of[i] = str(j)
                break
        for k in keys:
            buckets[k].append(i)
    return exact_of, near_of


# --------------------------------------------------------------------------------------- features


def role_order_ok(messages: list[Message]) -> bool:
    """Optional leading system turn, then user/assistant alternating from user, ending with assistant."""
    roles = [m.role for m in messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    if not roles or len(roles) % 2:
        return False
    return all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))


class TokenCounter:
    """Token counts of chat-template-rendered conversations, fast and exact.

    The conversation is rendered with the tokenizer's chat template (compiled once; checked against
    ``apply_chat_template`` on the first conversations). The text is then cut at the tokenizer's added
    (special) tokens, which a fast tokenizer never merges across, and around the persona-card text
    shared by many dialogues; each distinct piece is encoded once (batched) and cached. The first
    ``self_check`` conversations are also counted directly; if any piece-sum differs (a tokenizer whose
    pre-tokenizer merges across these cuts), every later count is taken directly on the whole text.
    """

    def __init__(self, tokenizer: Any, self_check: int = 16):
        self.tok = tokenizer
        specials = sorted({str(t) for t in tokenizer.get_added_vocab()}, key=len, reverse=True)
        self.specials = set(specials)
        self.split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self.cache: dict[str, int] = {}
        self.exact_pieces = True
        self._checks_left = self_check
        self._render = self._compiled_renderer()

    def _compiled_renderer(self) -> Any:
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            tmpl = _compile_jinja_template(self.tok.chat_template)
            kw = dict(self.tok.special_tokens_map)
            return lambda conv: tmpl.render(messages=conv, add_generation_prompt=False, **kw)
        except Exception:  # noqa: BLE001 - private API moved: use the public (slower) path
            return None

    def render(self, convs: list[list[dict[str, str]]]) -> list[str]:
        """Chat-template text of each conversation (no generation prompt)."""
        if self._render is not None:
            texts = [self._render(c) for c in convs]
            ref = self.tok.apply_chat_template(convs[:2], tokenize=False)
            if texts[:2] == list(ref):
                return texts
            self._render = None
        return list(self.tok.apply_chat_template(convs, tokenize=False))

    def _pieces(self, text: str, shared: str | None) -> list[str]:
        parts = [text]
        if shared:
            k = text.find(shared)
            if k > 0:
                parts = [text[:k], shared, text[k + len(shared) :]]
        if self.split is None:
            return [p for p in parts if p]
        return [q for p in parts for q in self.split.split(p) if q]

    def _encode_lengths(self, texts: list[str]) -> list[int]:
        backend = getattr(self.tok, "backend_tokenizer", None)
        fast = getattr(backend, "encode_batch_fast", None)  # no offsets: ~2x faster (tokenizers >= 0.20)
        if fast is not None:
            return [len(e.ids) for e in fast(texts, add_special_tokens=False)]
        return [len(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def count(
        self,
        convs: list[list[dict[str, str]]],
        shared: list[str | None] | None = None,
        batch_size: int = 1024,
    ) -> list[int]:
        """Token count per conversation; ``shared[i]`` is text of conversation ``i`` worth caching (its card)."""
        out: list[int] = []
        for start in range(0, len(convs), batch_size):
            batch = convs[start : start + batch_size]
            texts = self.render(batch)
            if not self.exact_pieces:
                out.extend(len(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"])
                continue
            sh = shared[start : start + batch_size] if shared else [None] * len(batch)
            pieces = [self._pieces(t, s) for t, s in zip(texts, sh, strict=True)]
            missing = list({p for ps in pieces for p in ps if p not in self.specials and p not in self.cache})
            if missing:
                self.cache.update(zip(missing, self._encode_lengths(missing), strict=True))
            counts = [sum(1 if p in self.specials else self.cache[p] for p in ps) for ps in pieces]
            if self._checks_left > 0:
                k = min(self._checks_left, len(texts))
                self._checks_left -= k
                direct = [len(x) for x in self.tok(texts[:k], add_special_tokens=False)["input_ids"]]
                if direct != counts[:k]:
                    self.exact_pieces = False
                    counts = [len(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]
            out.extend(counts)
        return out


def token_lengths(
    tokenizer: Any, conversations: list[list[dict[str, str]]], shared: list[str | None] | None = None
) -> list[int]:
    """Token count of each conversation rendered with the tokenizer's chat template (see :class:`TokenCounter`).

    Equals ``len(tokenizer(apply_chat_template(conv, tokenize=False), add_special_tokens=False).input_ids)``.
    """
    return TokenCounter(tokenizer).count(conversations, shared)


def load_tokenizer(path: str | Path) -> Any:
    """The fast tokenizer of the base model checkpoint at ``path`` (``paths.base_model``).

    Raises:
        ConfigError: the directory does not exist (run ``troupe model prepare`` first).
    """
    p = Path(path)
    if not (p / "tokenizer_config.json").is_file() and not (p / "tokenizer.json").is_file():
        raise ConfigError(f"{p}: no tokenizer in paths.base_model; run `troupe model prepare` first")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p))


@dataclass
class Features:
    """The feature table (one row per dialogue, row order = input order) and the dialogues as accepted.

    ``dialogues`` are PII-scrubbed (``data.pii=scrub``) and stage-direction-stripped
    (``data.stage_directions=strip``); ``for_quarantine`` are the same dialogues before stripping (still
    scrubbed, so no personal data reaches the quarantine file, and no reply text is lost).
    ``characters`` are the cards with their inferred ``language`` (:func:`language_vote`), ``languages``
    says per character where it came from.
    """

    table: pd.DataFrame
    dialogues: list[Dialogue]
    for_quarantine: list[Dialogue]
    characters: dict[str, Character] = field(default_factory=dict)
    languages: dict[str, CharacterLanguage] = field(default_factory=dict)


#: ``data.stage_directions``: count them, reject the dialogue, or strip them from the replies
STAGE_DIRECTION_MODES = ("flag", "reject", "strip")


def _rewrite_turns(d: Dialogue, rewrite: Any, apply: bool = True) -> tuple[Dialogue, int]:
    """``(dialogue, matches)`` after ``rewrite(message) -> (new content, matches)`` on every turn.

    With ``apply`` false only the matches are counted (``data.pii=reject``); the dialogue is copied only
    when something changed.
    """
    total, new = 0, []
    for m in d.messages:
        text, k = rewrite(m)
        total += k
        new.append(m.model_copy(update={"content": text}) if k and apply else m)
    return (d.model_copy(update={"messages": new}) if total and apply else d), total


@dataclass
class ReplyFeatures:
    """Rule features of one reply (:func:`reply_features`).

    Attributes:
        text: the reply text without markup (what language and stage directions are judged on).
        markup_errors: :func:`troupe.markup.parse_reply` errors (empty = valid markup).
        language: ISO 639-1 code by :func:`troupe.checks.detect_language`, None = not identified.
        stage_direction: the text narrates actions (rule 8, :func:`troupe.checks.has_stage_direction`).
        pii: personal-data matches :func:`scrub_pii` would replace.
    """

    text: str
    markup_errors: list[str]
    language: str | None
    stage_direction: bool
    pii: int


def reply_features(content: str) -> ReplyFeatures:
    """The per-reply features every data rule reads; one implementation for validation and DPO pairs."""
    parsed = parse_reply(content)
    return ReplyFeatures(
        text=parsed.text,
        markup_errors=list(parsed.errors),
        language=detect_language(parsed.text),
        stage_direction=has_stage_direction(parsed.text),
        pii=scrub_pii(content)[1],
    )


def reply_violations(content: str, language: str, *, stage_directions: str = "reject") -> list[str]:
    """The rules accepted data holds every reply to, as a list of broken ones (empty = passes).

    ``empty reply``; ``markup: <first error>``; ``language <got> != <language>`` (only an identified
    language can be wrong: an unidentified one is not counted against a reply here, as in the suite's
    ``lang_share``); ``stage direction`` when ``stage_directions == "reject"`` (``flag`` / ``strip``
    accept the reply: strip mode has removed them before this point); ``personal data`` (n matches).

    Args:
        content: the raw reply (markup allowed).
        language: the character's language (ISO 639-1).
        stage_directions: ``data.stage_directions`` mode (flag | reject | strip).

    Raises:
        ConfigError: an unknown ``stage_directions`` mode.
    """
    check_stage_direction_mode(stage_directions)
    f = reply_features(content)
    v: list[str] = []
    if not content.strip() or not f.text.strip():
        v.append("empty reply")
    if f.markup_errors:
        v.append(f"markup: {f.markup_errors[0]}")
    if f.language is not None and f.language != language:
        v.append(f"language {f.language} != {language}")
    if f.stage_direction and stage_directions == "reject":
        v.append("stage direction")
    if f.pii:
        v.append(f"personal data ({f.pii} match(es))")
    return v


@dataclass
class CharacterLanguage:
    """A character's language and where it came from (:func:`language_vote`).

    Attributes:
        language: the language replies are checked against (ISO 639-1).
        source: ``replies`` (majority of identified replies) or ``card`` (no reply identified).
        card: the persona card's own ``language``.
        votes: identified language -> assistant turns, most common first.
        replies: assistant turns seen; ``identified``: those with an identified language.
    """

    language: str
    source: str
    card: str
    votes: dict[str, int]
    replies: int
    identified: int


def language_vote(card_language: str, detected: list[str | None]) -> CharacterLanguage:
    """A character's language from the detected languages of its replies (None = not identified).

    The most common identified language wins; a tie goes to the card's language when it is among the
    tied, else to the alphabetically first; with no identified reply the card's language is kept
    (``source="card"``).

    Args:
        card_language: the persona card's ``language``.
        detected: one entry per assistant turn of the character, from :func:`troupe.checks.detect_language`.
    """
    votes = Counter(x for x in detected if x is not None)
    n = sum(votes.values())
    if not n:
        return CharacterLanguage(card_language, "card", card_language, {}, len(detected), 0)
    top = max(votes.values())
    tied = sorted(lang for lang, k in votes.items() if k == top)
    lang = card_language if card_language in tied else tied[0]
    return CharacterLanguage(lang, "replies", card_language, dict(votes.most_common()), len(detected), n)


def check_stage_direction_mode(mode: str) -> None:
    """ConfigError unless ``data.stage_directions`` is one of :data:`STAGE_DIRECTION_MODES`."""
    if mode not in STAGE_DIRECTION_MODES:
        raise ConfigError(
            f"data.stage_directions must be one of {', '.join(STAGE_DIRECTION_MODES)}, got {mode!r}"
        )


def build_features(
    dialogues: list[Dialogue],
    characters: dict[str, Character],
    tokenizer: Any,
    *,
    pii: str = "scrub",
    near_duplicate_threshold: float = 0.9,
    stage_directions: str = "flag",
) -> Features:
    """Per-dialogue feature table for the GX suite; scrubs PII in place of the returned copies.

    Columns: ``dialogue_id``, ``character_id``, ``source``, ``origin_file``, ``origin_line`` (-1 when
    unknown), ``character_known``, ``role_order_ok``, ``n_turns``, ``n_assistant``, ``empty_turns``,
    ``n_tokens`` (rendered dialogue incl. persona card; 0 for unknown characters), ``character_language``
    (inferred from the character's replies, :func:`language_vote`) and ``language_source`` (replies |
    card), ``lang_share`` (share of assistant turns whose detected language is the character's inferred
    one; undetectable turns count as right),
    ``wrong_language`` (first offending detected language, "" if none), ``markup_errors`` (assistant
    turns with invalid markup), ``markup_error`` (first error text), ``stage_directions`` (assistant turns
    narrating actions, after stripping), ``stage_directions_stripped`` (spans removed when
    ``stage_directions="strip"``), ``pii_found`` (replacements made, or found when ``pii="reject"``),
    ``pii_remaining`` (left after scrubbing; 0 when scrubbed), ``exact_duplicate`` / ``near_duplicate``
    (bool), ``duplicate_of`` (id of the earlier dialogue, "" if none).

    Args:
        pii: ``scrub`` (replace and keep) or ``reject`` (keep text; the suite rejects ``pii_found > 0``).
        stage_directions: ``flag`` (count only), ``reject`` (the suite rejects ``stage_directions > 0``)
            or ``strip`` (remove them from the character's replies and keep the dialogue; a reply left
            empty is then rejected as an empty turn).

    Raises:
        ConfigError: ``pii`` not in scrub | reject, ``stage_directions`` not in flag | reject | strip.
    """
    if pii not in ("scrub", "reject"):
        raise ConfigError(f"data.pii must be scrub or reject, got {pii!r}")
    check_stage_direction_mode(stage_directions)
    out_dialogues: list[Dialogue] = []
    before_strip: list[Dialogue] = []
    turn_feats: list[list[ReplyFeatures]] = []
    counts: list[tuple[int, int]] = []  # (pii_found, stripped) per dialogue
    detected: dict[str, list[str | None]] = defaultdict(list)
    for d in dialogues:
        pii_found = stripped = 0
        if any(_PII_SCREEN.search(m.content) for m in d.messages):
            d, pii_found = _rewrite_turns(d, lambda m: scrub_pii(m.content), apply=pii == "scrub")
        before_strip.append(d)
        if stage_directions == "strip" and not is_general(d):
            d, stripped = _rewrite_turns(
                d, lambda m: strip_stage_directions(m.content) if m.role == "assistant" else (m.content, 0)
            )
        out_dialogues.append(d)
        counts.append((pii_found, stripped))
        feats = [reply_features(m.content) for m in d.messages if m.role == "assistant"]
        turn_feats.append(feats)
        if not is_general(d):
            detected[d.character_id].extend(f.language for f in feats)
    languages = {cid: language_vote(c.language, detected.get(cid, [])) for cid, c in characters.items()}
    cards = {cid: c.model_copy(update={"language": languages[cid].language}) for cid, c in characters.items()}
    prompts = {cid: render_system_prompt(c) for cid, c in cards.items()}
    rows: list[dict[str, Any]] = []
    convs: list[list[dict[str, str]]] = []
    conv_cards: list[str | None] = []
    conv_rows: list[int] = []
    for i, (d, feats, (pii_found, stripped)) in enumerate(
        zip(out_dialogues, turn_feats, counts, strict=True)
    ):
        msgs = d.messages
        char = cards.get(d.character_id)
        lang = char.language if char else ""
        right, wrong_lang, markup_bad, markup_err, stage = 0, "", 0, "", 0
        general = is_general(d)  # no character: the per-reply character rules do not apply
        for f in [] if general else feats:
            if f.markup_errors:
                markup_bad += 1
                markup_err = markup_err or f.markup_errors[0]
            if f.language is None or f.language == lang:
                right += 1
            elif not wrong_lang:
                wrong_lang = f.language
            if f.stage_direction:
                stage += 1
        origin = d.meta.get("origin") or {}
        rows.append(
            {
                "dialogue_id": d.id,
                "character_id": d.character_id,
                "source": d.source,
                "origin_file": str(origin.get("file", "")),
                "origin_line": int(origin["line"]) if isinstance(origin.get("line"), int) else -1,
                "character_known": char is not None,
                "character_language": lang,
                "language_source": languages[d.character_id].source if char else "",
                "role_order_ok": role_order_ok(msgs),
                "n_turns": len(msgs),
                "n_assistant": len(feats),
                "empty_turns": sum(1 for m in msgs if not m.content.strip()),
                "n_tokens": 0,
                "lang_share": right / len(feats) if feats and not general else 1.0,
                "wrong_language": wrong_lang,
                "markup_errors": markup_bad,
                "markup_error": markup_err,
                "stage_directions": stage,
                "stage_directions_stripped": stripped,
                "pii_found": pii_found,
                "pii_remaining": pii_found if pii == "reject" else 0,
            }
        )
        if char is not None:
            convs.append(general_chat(msgs) if general else to_chat(msgs, prompts[d.character_id]))
            conv_cards.append(None if general else prompts[d.character_id])
            conv_rows.append(i)
    for i, n in zip(conv_rows, token_lengths(tokenizer, convs, conv_cards), strict=True):
        rows[i]["n_tokens"] = n
    exact_of, near_of = find_duplicates(
        [r["character_id"] for r in rows],
        [normalize_text(d.messages) for d in out_dialogues],
        near_duplicate_threshold,
    )
    for r, e, nr in zip(rows, exact_of, near_of, strict=True):
        r["exact_duplicate"] = e is not None
        r["near_duplicate"] = nr is not None
        ref = e if e is not None else nr
        r["duplicate_of"] = rows[int(ref)]["dialogue_id"] if ref is not None else ""
    cols = [
        "dialogue_id",
        "character_id",
        "source",
        "origin_file",
        "origin_line",
        "character_known",
        "character_language",
        "language_source",
        "role_order_ok",
        "n_turns",
        "n_assistant",
        "empty_turns",
        "n_tokens",
        "lang_share",
        "wrong_language",
        "markup_errors",
        "markup_error",
        "stage_directions",
        "stage_directions_stripped",
        "pii_found",
        "pii_remaining",
        "exact_duplicate",
        "near_duplicate",
        "duplicate_of",
    ]
    table = pd.DataFrame(rows, columns=cols)
    return Features(
        table=table,
        dialogues=out_dialogues,
        for_quarantine=before_strip,
        characters=cards,
        languages=languages,
    )


# --------------------------------------------------------------------------------------- GX suites


@dataclass
class Rules:
    """The thresholds the suite enforces (from ``params.data``)."""

    cutoff_len: int = 512
    language_min_share: float = 0.8
    pii: str = "scrub"
    max_dialogues_per_character: int = 200
    near_duplicate_threshold: float = 0.9
    stage_directions: str = "flag"

    @classmethod
    def from_params(cls, data: dict[str, Any]) -> Rules:
        """Read the rules from ``params['data']`` (missing keys keep their defaults)."""
        r = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        check_stage_direction_mode(r.stage_directions)
        return r


#: reason code -> how to explain it from a feature row
_EXPLAIN = {
    "unknown_character": lambda r, R: f"unknown character id {r.character_id!r}",
    "role_order": lambda r, R: (
        "role order: need optional system, then user/assistant alternating, ending with assistant"
    ),
    "empty_turn": lambda r, R: f"{r.empty_turns} empty turn(s)",
    "too_long": lambda r, R: f"{r.n_tokens} tokens > cutoff_len {R.cutoff_len}",
    "wrong_language": lambda r, R: (
        f"language: {r.lang_share:.0%} of replies in the character's language (< {R.language_min_share:.0%}), "
        f"e.g. {r.wrong_language}"
    ),
    "markup": lambda r, R: f"markup: {r.markup_error}",
    "pii": lambda r, R: f"personal data: {r.pii_remaining} match(es) (data.pii=reject)",
    "exact_duplicate": lambda r, R: f"exact duplicate of {r.duplicate_of}",
    "near_duplicate": lambda r, R: (
        f"near duplicate of {r.duplicate_of} (Jaccard >= {R.near_duplicate_threshold})"
    ),
    "stage_direction": lambda r, R: f"stage directions in {r.stage_directions} reply(ies)",
    "character_cap": lambda r, R: f"over per-character cap {R.max_dialogues_per_character}",
    "missing_id": lambda r, R: "missing dialogue or character id",
}


def _row_suite(gx: Any, gxe: Any, rules: Rules) -> Any:
    suite = gx.ExpectationSuite(
        name="troupe_rows", meta={"notes": "one expectation per data rule; meta.reason = code"}
    )

    def add(exp: Any, reason: str, notes: str) -> None:
        exp.meta = {"reason": reason}
        exp.notes = notes
        suite.add_expectation(exp)

    add(gxe.ExpectColumnValuesToNotBeNull(column="dialogue_id"), "missing_id", "every row has a dialogue id")
    add(
        gxe.ExpectColumnValuesToBeInSet(column="character_known", value_set=[True]),
        "unknown_character",
        "the dialogue's character_id names a persona card",
    )
    add(
        gxe.ExpectColumnValuesToBeInSet(column="role_order_ok", value_set=[True]),
        "role_order",
        "optional system, then user/assistant alternating, ending with assistant",
    )
    add(
        gxe.ExpectColumnValuesToBeBetween(column="empty_turns", min_value=0, max_value=0),
        "empty_turn",
        "no turn is empty or whitespace",
    )
    add(
        gxe.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=0, max_value=rules.cutoff_len),
        "too_long",
        f"rendered dialogue (persona card + turns, chat template) fits cutoff_len={rules.cutoff_len}",
    )
    add(
        gxe.ExpectColumnValuesToBeBetween(
            column="lang_share", min_value=rules.language_min_share, max_value=1.0
        ),
        "wrong_language",
        f">= {rules.language_min_share:.0%} of replies in the character's language",
    )
    add(
        gxe.ExpectColumnValuesToBeBetween(column="markup_errors", min_value=0, max_value=0),
        "markup",
        "every reply parses with troupe.markup.parse_reply",
    )
    add(
        gxe.ExpectColumnValuesToBeBetween(column="pii_remaining", min_value=0, max_value=0),
        "pii",
        f"no personal data left (data.pii={rules.pii})",
    )
    add(
        gxe.ExpectColumnValuesToBeInSet(column="exact_duplicate", value_set=[False]),
        "exact_duplicate",
        "no exact repeat of an earlier dialogue of the same character",
    )
    add(
        gxe.ExpectColumnValuesToBeInSet(column="near_duplicate", value_set=[False]),
        "near_duplicate",
        f"no near duplicate (Jaccard >= {rules.near_duplicate_threshold}) of an earlier dialogue",
    )
    if rules.stage_directions == "reject":
        add(
            gxe.ExpectColumnValuesToBeBetween(column="stage_directions", min_value=0, max_value=0),
            "stage_direction",
            "no reply narrates actions (rule 8)",
        )
    return suite


def _cap_suite(gx: Any, gxe: Any, rules: Rules) -> Any:
    suite = gx.ExpectationSuite(name="troupe_character_cap")
    exp = gxe.ExpectColumnValuesToBeBetween(
        column="cap_rank", min_value=0, max_value=rules.max_dialogues_per_character
    )
    exp.meta = {"reason": "character_cap"}
    exp.notes = (
        f"at most {rules.max_dialogues_per_character} accepted dialogues per character (cap_rank: 1-based "
        "position among the character's otherwise-accepted dialogues, 0 for rejected rows)"
    )
    suite.add_expectation(exp)
    return suite


class _GX:
    """An ephemeral GX context with a pandas data source and a local Data Docs site."""

    def __init__(self, docs_dir: Path | None):
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx, self.gxe = gx, gxe
        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.docs = docs_dir is not None
        if docs_dir is not None:
            self.ctx.add_data_docs_site(
                site_name="troupe",
                site_config={
                    "class_name": "SiteBuilder",
                    "store_backend": {
                        "class_name": "TupleFilesystemStoreBackend",
                        "base_directory": str(Path(docs_dir).resolve()),  # GX needs an absolute path
                    },
                    "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                },
            )
        asset = self.ctx.data_sources.add_pandas("troupe").add_dataframe_asset("dialogue_features")
        self.batch = asset.add_batch_definition_whole_dataframe("all_dialogues")

    def run(self, suite: Any, df: pd.DataFrame) -> dict[str, list[int]]:
        """Run ``suite`` on ``df`` through a Checkpoint; returns ``{reason: failing row positions}``."""
        suite = self.ctx.suites.add(suite)
        vd = self.ctx.validation_definitions.add(
            self.gx.ValidationDefinition(name=f"{suite.name}_validation", data=self.batch, suite=suite)
        )
        cp = self.ctx.checkpoints.add(
            self.gx.Checkpoint(
                name=f"{suite.name}_checkpoint",
                validation_definitions=[vd],
                result_format={"result_format": "COMPLETE"},
            )
        )
        # only the columns the suite reads: GX metrics then touch a small numeric frame
        cols = sorted({e.column for e in suite.expectations if getattr(e, "column", None)})
        res = cp.run(batch_parameters={"dataframe": df[cols]})
        failing: dict[str, list[int]] = {}
        for vr in res.run_results.values():
            for r in vr.results:
                reason = (r.expectation_config.meta or {}).get("reason", r.expectation_config.type)
                if r.exception_info and r.exception_info.get("raised_exception"):
                    raise RuntimeError(f"GX expectation {reason} failed to run: {r.exception_info}")
                if not r.success:
                    failing[reason] = [int(i) for i in r.result.get("unexpected_index_list") or []]
        return failing

    def build_docs(self) -> None:
        """Render every stored validation result and the suites into the Data Docs site (once)."""
        if self.docs:
            self.ctx.build_data_docs()


# --------------------------------------------------------------------------------------- the step


@dataclass
class ValidationResult:
    """Accepted dialogues, quarantine records, the report dict, the feature table and the cards with
    their inferred languages."""

    accepted: list[Dialogue]
    quarantined: list[QuarantineRecord]
    report: dict[str, Any]
    features: pd.DataFrame
    characters: dict[str, Character] = field(default_factory=dict)


def validate_records(
    dialogues: list[Dialogue],
    characters: dict[str, Character],
    tokenizer: Any,
    rules: Rules,
    docs_dir: str | Path | None = None,
) -> ValidationResult:
    """Validate dialogues with the GX suites and split them into accepted / quarantined.

    Args:
        dialogues: contract dialogues (input order decides which duplicate copy is kept and which
            dialogues fall over the per-character cap).
        characters: persona cards by id.
        tokenizer: HF tokenizer of the base model (chat template + fast tokenizer).
        rules: thresholds (see :class:`Rules`).
        docs_dir: where to build GX Data Docs (None = no docs).

    Returns:
        :class:`ValidationResult`; ``report`` holds ``in``, ``accepted``, ``quarantined`` (``in ==
        accepted + quarantined``), ``by_reason`` (records per reason code; a record may have several),
        ``per_character`` and ``flags`` (stage directions, scrubbed PII), ``character_languages`` (per
        character: ``language``, ``source`` replies | card, ``card``, ``votes``, ``replies``,
        ``identified``), ``language_source`` (characters per source), ``language_differs_from_card``
        (ids), plus ``timings`` in seconds; ``characters`` holds the cards with the inferred language.
    """
    t0 = time.perf_counter()
    feats = build_features(
        dialogues,
        characters,
        tokenizer,
        pii=rules.pii,
        near_duplicate_threshold=rules.near_duplicate_threshold,
        stage_directions=rules.stage_directions,
    )
    df = feats.table
    t1 = time.perf_counter()
    gxr = _GX(Path(docs_dir) if docs_dir is not None else None)
    reasons: dict[int, list[str]] = defaultdict(list)
    for reason, idx in gxr.run(_row_suite(gxr.gx, gxr.gxe, rules), df).items():
        for i in idx:
            reasons[i].append(reason)
    # per-character rank among the dialogues that passed every other rule (0 for rejected ones)
    ok = np.ones(len(df), dtype=bool)
    ok[list(reasons)] = False
    # general data has no per-character cap
    ok &= np.array([not is_general(d) for d in feats.dialogues], dtype=bool)
    rank = df["character_id"].where(ok).groupby(df["character_id"].where(ok)).cumcount() + 1
    df["cap_rank"] = np.where(ok, rank.reindex(df.index, fill_value=0), 0).astype(int)
    for reason, idx in gxr.run(_cap_suite(gxr.gx, gxr.gxe, rules), df).items():
        for i in idx:
            reasons[i].append(reason)
    gxr.build_docs()
    t2 = time.perf_counter()
    df["reasons"] = ["|".join(reasons.get(i, [])) for i in range(len(df))]
    df["accepted"] = df["reasons"] == ""
    accepted: list[Dialogue] = []
    quarantined: list[QuarantineRecord] = []
    for i, (d, row) in enumerate(zip(feats.dialogues, df.itertuples(index=False), strict=True)):
        rs = reasons.get(i)
        if not rs:
            accepted.append(d)
            continue
        d = feats.for_quarantine[i]
        quarantined.append(
            QuarantineRecord(
                file=row.origin_file or "<unknown>",
                line=row.origin_line if row.origin_line >= 0 else None,
                stage="validate",
                reason="; ".join(f"{r}: {_EXPLAIN[r](row, rules)}" if r in _EXPLAIN else r for r in rs),
                record_id=d.id,
                raw=d.model_dump(mode="json", exclude_none=True),
            )
        )
    by_reason = Counter(r for rs in reasons.values() for r in rs)
    per_char: dict[str, dict[str, int]] = {}
    for cid, acc in zip(df["character_id"], df["accepted"], strict=True):
        pc = per_char.setdefault(cid, {"in": 0, "accepted": 0, "quarantined": 0})
        pc["in"] += 1
        pc["accepted" if acc else "quarantined"] += 1
    n = len(df)
    report = {
        "in": n,
        "accepted": len(accepted),
        "quarantined": len(quarantined),
        "rejected_share": round(len(quarantined) / n, 4) if n else 0.0,
        "by_reason": dict(by_reason.most_common()),
        "flags": {
            "stage_directions": int((df["stage_directions"] > 0).sum()) if n else 0,
            "stage_directions_stripped_dialogues": int((df["stage_directions_stripped"] > 0).sum())
            if n
            else 0,
            "stage_directions_stripped_spans": int(df["stage_directions_stripped"].sum()) if n else 0,
            "pii_scrubbed_dialogues": int((df["pii_found"] > 0).sum()) if n and rules.pii == "scrub" else 0,
            "pii_scrubbed_matches": int(df["pii_found"].sum()) if n and rules.pii == "scrub" else 0,
        },
        "per_character": per_char,
        "character_languages": {cid: asdict(v) for cid, v in sorted(feats.languages.items())},
        "language_source": dict(Counter(v.source for v in feats.languages.values())),
        "language_differs_from_card": sorted(c for c, v in feats.languages.items() if v.language != v.card),
        "rules": rules.__dict__,
        "timings": {"features_s": round(t1 - t0, 3), "gx_s": round(t2 - t1, 3)},
    }
    return ValidationResult(
        accepted=accepted, quarantined=quarantined, report=report, features=df, characters=feats.characters
    )


def validate_dir(params: dict[str, Any], tokenizer: Any | None = None) -> ValidationResult:
    """The ``troupe data validate`` step: ``paths.imported`` -> ``paths.validated``.

    Reads ``characters.jsonl`` / ``dialogues.jsonl`` (+ ``import_errors.jsonl`` and
    ``import_report.json`` when present, carried into the report), loads the tokenizer from
    ``paths.base_model`` unless one is given, and writes ``dialogues.jsonl`` (accepted),
    ``characters.jsonl`` (every card, ``language`` as inferred from its replies), ``quarantine.jsonl``, ``features.csv``, ``report.json`` and ``data_docs/``.

    Raises:
        ContractError: missing / non-UTF-8 / malformed input files.
        ConfigError: missing params or tokenizer.
    """
    data = section(params, "data")
    rules = Rules.from_params(data)
    src, out = path_of(params, "imported"), path_of(params, "validated")
    characters = load_characters(src / "characters.jsonl")
    read_errors: list[QuarantineRecord] = []
    dialogues = read_jsonl(src / "dialogues.jsonl", Dialogue, quarantine=read_errors.append)
    if tokenizer is None:
        tokenizer = load_tokenizer(path_of(params, "base_model"))
    out.mkdir(parents=True, exist_ok=True)
    docs = out / "data_docs"
    if docs.exists():
        import shutil

        shutil.rmtree(docs)
    res = validate_records(dialogues, characters, tokenizer, rules, docs_dir=docs)
    # lines of dialogues.jsonl that are not contract records count as quarantined inputs too
    if read_errors:
        for q in read_errors:
            q.stage = "validate"
        res.quarantined = read_errors + res.quarantined
        res.report["in"] += len(read_errors)
        res.report["quarantined"] += len(read_errors)
        res.report["by_reason"]["unreadable"] = len(read_errors)
        res.report["rejected_share"] = round(res.report["quarantined"] / res.report["in"], 4)
    ierr = src / "import_errors.jsonl"
    import_errors = read_jsonl(ierr, QuarantineRecord) if ierr.is_file() else []
    res.report["import_errors"] = {
        "count": len(import_errors),
        "file": str(ierr),
        "by_reason": dict(Counter(_reason_code(q.reason) for q in import_errors).most_common(10)),
    }
    irep = src / "import_report.json"
    if irep.is_file():
        try:
            res.report["import"] = json.loads(irep.read_text(encoding="utf-8")).get("totals", {})
        except json.JSONDecodeError as e:
            raise ContractError(f"{irep}: malformed JSON: {e.msg}") from e
    res.report["max_rejected_share"] = float(data.get("max_rejected_share", 1.0))
    res.report["data_docs"] = str(docs / "index.html")
    write_jsonl(out / "dialogues.jsonl", res.accepted)
    write_jsonl(out / "characters.jsonl", res.characters.values())
    write_jsonl(out / "quarantine.jsonl", res.quarantined)
    res.features.to_csv(out / "features.csv", index=False)
    (out / "report.json").write_text(json.dumps(res.report, ensure_ascii=False, indent=2), encoding="utf-8")
    return res


def _reason_code(reason: str) -> str:
    """Short grouping key for an import error reason (text before the first quote or colon)."""
    return re.split(r"['\"(:]", reason, maxsplit=1)[0].strip() or reason[:40]
