"""Reply markup: the one parser for ``text<emotion>..</emotion><img>..</img>`` replies.

Grammar (DOMAIN.md, version 0.1.4 onward; per-clause emotions in later versions)::

    reply   := (clause | image)*
    clause  := TEXT [ "<emotion>" EMOTION "</emotion>" ]
    image   := "<img><prompt>" TEXT "</prompt><includePerson>" ("true"|"false") "</includePerson></img>"

EMOTION is one of eight labels in Chinese or English (生气/angry, 厌恶/disgusted, 恐惧/fearful,
开心/happy, 中立/neutral, 难过/sad, 吃惊/surprised, 其他/other). Used by validation (markup grammar),
evaluation (markup validity) and serving (text/emotion/images returned to the client).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

EMOTIONS_ZH_EN: dict[str, str] = {
    "生气": "angry",
    "厌恶": "disgusted",
    "恐惧": "fearful",
    "开心": "happy",
    "中立": "neutral",
    "难过": "sad",
    "吃惊": "surprised",
    "其他": "other",
}
EMOTIONS_EN: frozenset[str] = frozenset(EMOTIONS_ZH_EN.values())

_TAG = re.compile(r"</?[A-Za-z][A-Za-z]*>")
_EMO = re.compile(r"<emotion>(.*?)</emotion>", re.S)
_IMG = re.compile(
    r"<img>\s*<prompt>(.*?)</prompt>\s*<includePerson>\s*(.*?)\s*</includePerson>\s*</img>", re.S
)
_KNOWN_TAGS = {"emotion", "img", "prompt", "includePerson"}


@dataclass
class Clause:
    """A span of reply text with the emotion tag that closes it (English label, or None)."""

    text: str
    emotion: str | None = None


@dataclass
class Image:
    """An image request for the downstream image model."""

    prompt: str
    include_person: bool


@dataclass
class ParsedReply:
    """Result of :func:`parse_reply`.

    ``text`` is the reply with all markup removed; ``errors`` lists grammar violations (empty when
    the markup is valid). ``emotion`` is the last clause's emotion (the reply-level label).
    """

    text: str
    clauses: list[Clause] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.errors

    @property
    def emotion(self) -> str | None:
        labels = [c.emotion for c in self.clauses if c.emotion]
        return labels[-1] if labels else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["emotion"] = self.emotion
        d["valid"] = self.valid
        return d


def normalize_emotion(label: str) -> str | None:
    """Map a zh or en emotion label to its English name, or None if unknown."""
    s = label.strip()
    if s in EMOTIONS_ZH_EN:
        return EMOTIONS_ZH_EN[s]
    s = s.lower()
    return s if s in EMOTIONS_EN else None


def has_markup(text: str) -> bool:
    """True if the text contains any tag-like ``<word>`` or ``</word>``."""
    return bool(_TAG.search(text))


def parse_reply(reply: str) -> ParsedReply:
    """Parse a reply into clauses, images and grammar errors.

    Never raises: malformed markup is reported in ``errors`` (unknown tag, unclosed or nested tag,
    unknown emotion, bad ``includePerson`` value, empty image prompt, stray tag text).
    """
    errors: list[str] = []
    images: list[Image] = []

    def _img(m: re.Match) -> str:
        prompt, inc = m.group(1).strip(), m.group(2).strip().lower()
        if not prompt:
            errors.append("empty <prompt> in <img>")
        if inc not in ("true", "false"):
            errors.append(f"<includePerson> must be true or false, got {m.group(2)!r}")
        images.append(Image(prompt=prompt, include_person=inc == "true"))
        return "\x00"  # image boundary (ends a clause)

    body = _IMG.sub(_img, reply)
    clauses: list[Clause] = []
    pos = 0
    for m in _EMO.finditer(body):
        text = body[pos : m.start()].replace("\x00", "")
        label = m.group(1)
        emo = normalize_emotion(label)
        if emo is None:
            errors.append(f"unknown emotion {label.strip()!r}")
        if has_markup(label):
            errors.append("nested tag inside <emotion>")
        clauses.append(Clause(text=text.strip(), emotion=emo))
        pos = m.end()
    tail = body[pos:].replace("\x00", "")
    if tail.strip():
        clauses.append(Clause(text=tail.strip(), emotion=None))
    leftover = "".join(c.text for c in clauses)
    for t in _TAG.findall(leftover):
        name = t.strip("</>")
        errors.append(f"unknown tag {t}" if name not in _KNOWN_TAGS else f"unbalanced or misplaced {t}")
    text = "".join(c.text for c in clauses)
    return ParsedReply(text=text, clauses=clauses, images=images, errors=errors)


def strip_markup(reply: str) -> str:
    """Reply text without any markup (used for language id, length rules and overlap metrics)."""
    return parse_reply(reply).text
