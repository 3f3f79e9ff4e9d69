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


# -- streaming ------------------------------------------------------------------------------------
@dataclass
class MarkupEvent:
    """One event of a streamed reply: ``kind`` ``text`` (``text`` = spoken text delta), ``emotion``
    (``emotion`` = English label of a clause that just closed) or ``image`` (``image``)."""

    kind: str
    text: str = ""
    emotion: str | None = None
    image: Image | None = None


_OPENERS = ("<emotion>", "<img>")
_CLOSERS = {"<emotion>": "</emotion>", "<img>": "</img>"}


def _safe_end(raw: str) -> int:
    """Length of the longest prefix of ``raw`` holding no partial tag and no unclosed construct
    (an ``<emotion>`` or ``<img>`` whose closing tag has not arrived yet)."""
    cut = len(raw)
    lt = raw.rfind("<")
    if lt >= 0 and raw.find(">", lt) < 0:  # a tag may be starting: "<", "<emo", "</img"
        cut = lt
    for opener in _OPENERS:
        o = raw.rfind(opener, 0, cut)
        if o >= 0 and raw.find(_CLOSERS[opener], o) < 0:
            cut = min(cut, o)
    return cut


class MarkupStream:
    """Incremental reply parsing with the one parser (:func:`parse_reply`): feed raw text pieces as
    they are generated, get spoken-text deltas, emotion and image events; never half a tag.

    Each :meth:`feed` parses the longest prefix of the reply so far that ends outside any tag or
    construct (:func:`_safe_end`), and emits what that parse adds to the previous one: the spoken
    text beyond what was already sent, clauses whose emotion closed, complete images. Text that may
    still turn into markup (``"a <"``) is held back until it resolves or the stream ends.
    :meth:`finish` parses the whole reply, flushes the rest and returns the final
    :class:`ParsedReply` (the same as ``parse_reply`` of the whole reply).

    The spoken text sent is always a prefix of the final ``ParsedReply.text`` except where a later
    piece changes how earlier text parses (whitespace trimmed at a clause end then continued): such
    text is held back, never sent twice or wrongly.
    """

    def __init__(self) -> None:
        self.raw = ""
        self.sent_text = ""
        self._emotions = 0
        self._images = 0

    def _events(self, parsed: ParsedReply, final: bool) -> list[MarkupEvent]:
        out: list[MarkupEvent] = []
        if parsed.text.startswith(self.sent_text) and len(parsed.text) > len(self.sent_text):
            delta = parsed.text[len(self.sent_text) :]
            out.append(MarkupEvent("text", text=delta))
            self.sent_text = parsed.text
        # a clause's emotion is final once its closing tag is in the parsed prefix
        labels = [c.emotion for c in parsed.clauses if c.emotion]
        for label in labels[self._emotions :]:
            out.append(MarkupEvent("emotion", emotion=label))
        self._emotions = max(self._emotions, len(labels))
        for img in parsed.images[self._images :]:
            out.append(MarkupEvent("image", image=img))
        self._images = max(self._images, len(parsed.images))
        return out

    def feed(self, piece: str) -> list[MarkupEvent]:
        """Add a raw piece of the reply; returns the events it completes (possibly none)."""
        self.raw += piece
        return self._events(parse_reply(self.raw[: _safe_end(self.raw)]), final=False)

    def finish(self) -> tuple[list[MarkupEvent], ParsedReply]:
        """End of the reply: the remaining events and the parse of the whole reply."""
        parsed = parse_reply(self.raw)
        return self._events(parsed, final=True), parsed
