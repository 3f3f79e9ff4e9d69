"""Automatic role-play checks on one reply: the cheap signals of DOMAIN.md.

One implementation used by validation (data features), evaluation (metrics), DPO pair building
(is a sampled reply rule-breaking?) and serving (live reply-quality signals per variant).

Language id: py3langid (Lui & Baldwin 2012, langid.py), restricted to the reply text without markup.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from troupe.markup import parse_reply

#: Phrases no real person in character says (DOMAIN.md blacklist; zh + en). Case-insensitive.
ASSISTANT_PHRASES: tuple[str, ...] = (
    "as an ai",
    "as a language model",
    "as an assistant",
    "i am an ai",
    "i'm an ai",
    "i am a language model",
    "i'm just an ai",
    "i cannot assist",
    "i can't assist with",
    "how can i assist you",
    "how can i help you today",
    "作为一个ai",
    "作为一个人工智能",
    "作为ai",
    "作为人工智能",
    "我是一个ai",
    "我是一个人工智能",
    "我是人工智能",
    "作为一个语言模型",
    "作为语言模型",
    "我无法提供",
    "有什么可以帮您",
    "有什么可以帮你的",
    "因人而异",
)

#: stage directions: ``*...*``, full-width ``（...）`` and ``【...】`` anywhere; ASCII ``(...)`` only where it
#: stands on its own (start of a line or after sentence-ending punctuation) and holds no digit - an
#: English parenthetical attached to a word ("Vienna (present-day Austria)", "(2001)") is not narration.
#: Measured on Character100's English replies: the unrestricted ``(...)`` flagged 603 such parentheticals.
_STAGE = re.compile(
    r"\*[^*\n]{1,80}\*|（[^）\n]{1,80}）|【[^】\n]{1,80}】"
    r"|(?:^|(?<=[.!?。！？…]))[ \t]*\([^)\n\d]{1,80}\)",
    re.M,
)
_CJK = re.compile(r"[\u3400-\u9fff]")
_WORD = re.compile(r"[A-Za-z']+")
_LANGID_MIN_CHARS = 4
#: py3langid's normalised probability below which a non-CJK guess is "can't tell" (short English replies
#: such as "Indiana." or "On April 14, 1865." come out as af/bcl/pcm with low confidence).
LANGID_MIN_CONFIDENCE = 0.9
_IDENTIFIER = None


def _identifier():
    global _IDENTIFIER
    if _IDENTIFIER is None:
        from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

        _IDENTIFIER = LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)
    return _IDENTIFIER


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of ``text`` by py3langid, or None when it can't tell: fewer than 4 letters, or
    py3langid's normalised probability below :data:`LANGID_MIN_CONFIDENCE`.

    Any CJK ideograph-dominant text is reported as ``zh`` (py3langid confuses short zh with ja).
    """
    letters = [ch for ch in text if ch.isalpha()]
    if len(letters) < _LANGID_MIN_CHARS:
        return None
    cjk = sum(1 for ch in letters if _CJK.match(ch))
    if cjk / len(letters) > 0.5:
        return "zh"
    lang, prob = _identifier().classify(text)
    return lang if prob >= LANGID_MIN_CONFIDENCE else None


def reply_length(text: str, language: str) -> int:
    """Length in the unit of rule 7: CJK characters for zh, words otherwise."""
    if language == "zh":
        return sum(1 for ch in text if not ch.isspace())
    return len(_WORD.findall(text))


def has_assistant_phrase(text: str) -> str | None:
    """The first blacklisted assistant phrase found in ``text`` (case-insensitive), else None."""
    low = text.lower()
    for p in ASSISTANT_PHRASES:
        if p in low:
            return p
    return None


def has_name_prefix(text: str, name: str) -> bool:
    """True if the reply starts with ``"Name:"`` / ``"Name："`` (rule 1)."""
    t = text.lstrip()
    return any(t.startswith(f"{name}{sep}") for sep in (":", "：", " :"))


def has_stage_direction(text: str) -> bool:
    """True if the reply narrates actions: ``*...*``, ``（...）``, ``【...】``, a free-standing ``(...)`` (rule 8)."""
    return bool(_STAGE.search(text))


def strip_stage_directions(text: str) -> tuple[str, int]:
    """``(text without stage directions, how many were removed)`` (rule 8 ``strip`` mode).

    Removes the spans :func:`has_stage_direction` finds and collapses the spaces left behind; markup
    tags stay. ``text`` comes back unchanged when there is nothing to remove.
    """
    out, n = _STAGE.subn("", text)
    if not n:
        return text, 0
    return re.sub(r"[ \t]{2,}", " ", out).strip(), n


#: char-trigram Jaccard at or above which two texts count as near-duplicates (self-repetition across a
#: dialogue's replies, a reply echoing the user's line)
NEAR_DUPLICATE_JACCARD = 0.6


def char_trigrams(text: str) -> set[str]:
    """Character trigrams of ``text`` with whitespace removed (works for zh and en alike)."""
    s = "".join(text.split())
    return {s[i : i + 3] for i in range(max(len(s) - 2, 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b| (0.0 when both are empty)."""
    return len(a & b) / len(a | b) if a or b else 0.0


def last_user_text(messages: list[Any]) -> str | None:
    """Content of the last ``user`` turn of a context (contract ``Message`` objects or chat dicts)."""
    for m in reversed(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (m.role, m.content)
        if role == "user":
            return content
    return None


def echoes_user(text: str, user_text: str) -> bool:
    """True if the reply parrots the user's last line instead of answering it.

    Near-duplicate by character trigrams (Jaccard >= :data:`NEAR_DUPLICATE_JACCARD`), with stage
    directions and markup removed from both sides. Seen on CharacterEval: a model that has not learnt
    the role repeats the other speaker's line back ("想是在草里睡着了，说得是梦话？").
    """
    a, b = _STAGE.sub("", text).strip(), _STAGE.sub("", user_text).strip()
    if not a or not b:
        return False
    return jaccard(char_trigrams(a), char_trigrams(b)) >= NEAR_DUPLICATE_JACCARD


#: n-gram size and share of repeated n-grams above which a reply "loops inside itself"
REPETITION_N, REPETITION_MAX_SHARE, REPETITION_MIN_UNITS = 4, 0.5, 12


def repetition_share(text: str, language: str, n: int = REPETITION_N) -> float:
    """seq-rep-n of one reply: 1 - unique n-grams / n-grams (Welleck et al. 2020, "Neural text
    generation with unlikelihood training", ICLR, arXiv:1908.04319), over characters for zh and
    lower-cased words otherwise; 0.0 when the reply has fewer than ``n`` units."""
    units = [c for c in text if not c.isspace()] if language == "zh" else text.lower().split()
    grams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def repeats_itself(text: str, language: str) -> bool:
    """True if a reply loops inside itself: at least :data:`REPETITION_MIN_UNITS` units and a
    seq-rep-4 (:func:`repetition_share`) above :data:`REPETITION_MAX_SHARE`, e.g. "I love you. I love
    you. I love you." or a phrase generated until the token budget runs out. Short laughter
    ("哈哈哈") is below the unit floor."""
    units = sum(1 for c in text if not c.isspace()) if language == "zh" else len(text.split())
    return units >= REPETITION_MIN_UNITS and repetition_share(text, language) > REPETITION_MAX_SHARE


def violation_kind(violation: str) -> str:
    """Rule name of a violation text of :func:`check_reply` or the data validator, for counting
    (``"language en != zh"`` -> ``"language"``, ``"markup: unclosed <emotion>"`` -> ``"markup"``)."""
    for k in ("language", "markup", "personal data", "length", "assistant phrase"):
        if violation.startswith(k):
            return k
    return violation


@dataclass
class ReplyCheck:
    """Outcome of :func:`check_reply`; ``violations`` lists the rules broken (empty = clean)."""

    language: str | None
    language_ok: bool
    markup_valid: bool
    assistant_phrase: str | None
    name_prefix: bool
    stage_direction: bool
    length: int
    length_ok: bool
    echo_user: bool
    violations: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def check_reply(
    reply: str,
    *,
    character_name: str,
    language: str,
    max_length: int = 50,
    image_max_length: int = 80,
    user_text: str | None = None,
) -> ReplyCheck:
    """Run every automatic rule on one reply.

    Args:
        reply: the raw reply (markup allowed).
        character_name: the persona card's ``name`` (for the "Name:" prefix rule).
        language: the character's configured language (BCP-47 primary subtag).
        max_length: rule 7 limit (characters for zh, words otherwise); ``image_max_length`` when the
            reply carries an image tag.
        user_text: the user's last line, when known: a reply echoing it is a violation.

    Returns:
        A :class:`ReplyCheck`. Language is ``ok`` when undetectable (too short to tell).
    """
    parsed = parse_reply(reply)
    text = parsed.text
    lang = detect_language(text)
    lang_ok = lang is None or lang == language
    limit = image_max_length if parsed.images else max_length
    n = reply_length(text, language)
    phrase = has_assistant_phrase(text)
    prefix = has_name_prefix(text, character_name)
    stage = has_stage_direction(text)
    echo = user_text is not None and echoes_user(text, parse_reply(user_text).text)
    v = []
    if not lang_ok:
        v.append(f"language {lang} != {language}")
    if not parsed.valid:
        v.append("markup: " + "; ".join(parsed.errors))
    if phrase:
        v.append(f"assistant phrase {phrase!r}")
    if prefix:
        v.append("name prefix")
    if stage:
        v.append("stage direction")
    if n > limit:
        v.append(f"length {n} > {limit}")
    if echo:
        v.append("echoes the user's line")
    if not text.strip():
        v.append("empty reply")
    return ReplyCheck(
        language=lang,
        language_ok=lang_ok,
        markup_valid=parsed.valid,
        assistant_phrase=phrase,
        name_prefix=prefix,
        stage_direction=stage,
        length=n,
        length_ok=n <= limit,
        echo_user=echo,
        violations=v,
    )
