"""Self-play evaluation: the candidate and the champion play the SAME seeded scenarios through their
gateways; conversation-level metrics are compared paired, scenario by scenario (``troupe evaluate
--suite selfplay``).

Flow of :func:`run_selfplay`:

1. scenarios: :func:`troupe.dialogue.scenarios.sample_scenarios` over the scenario file
   (``synthesis.scenarios``) and the served characters (``synthesis.characters``, else
   ``paths.catalogue``) with ``selfplay.seed`` / ``conversations`` / ``max_turns``; every scenario
   gets a scripted probe (:data:`PROBE_SHARE`), so probe handling is measured on both sides;
2. each side plays them (:func:`troupe.dialogue.engine.run_conversations`): the character agent is
   the side's gateway (``selfplay.candidate_url`` / ``champion_url``, key from
   ``selfplay.api_key_env``, model ``"{character_id}"``, sampling from ``agents.character``), the user
   and host agents are ``agents.user`` / ``agents.host``; labels ``candidate`` / ``champion``;
3. the rubric judge (``agents.judge``, when configured) scores each finished transcript;
4. :func:`conversation_metrics` per conversation, then per side an estimate per metric (Wilson for a
   0/1 value per conversation, cluster bootstrap over conversations for shares and means) and per
   metric the paired difference candidate - champion over the scenarios both finished
   (:func:`troupe.stats.paired_difference`, the scenario as the cluster);
5. ``paths.selfplay``: the engine's files per side (``candidate/``, ``champion/``: conversations.jsonl,
   failed.jsonl, judge.jsonl), ``metrics.json`` (:data:`METRICS_FILE`, read by the registry gate's
   ``selfplay`` section), ``report.html`` with plots and the transcripts side by side.

Every metric is a function of one :class:`~troupe.dialogue.contract.Conversation`; the rules are in
each function's docstring and in :data:`METRICS`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from troupe.checks import (
    NEAR_DUPLICATE_JACCARD,
    char_trigrams,
    check_reply,
    detect_language,
    has_assistant_phrase,
    jaccard,
)
from troupe.dialogue.contract import DIMENSIONS, Conversation, JudgeScore
from troupe.markup import parse_reply
from troupe.stats import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Estimate,
    bootstrap_mean,
    empty,
    paired_difference,
    wilson,
)

#: ``paths.selfplay`` files
METRICS_FILE, REPORT_FILE = "metrics.json", "report.html"
CANDIDATE, CHAMPION = "candidate", "champion"
LABELS = (CANDIDATE, CHAMPION)
#: share of self-play scenarios with one scripted probe (all: probe handling is measured on every side)
PROBE_SHARE = 1.0
#: "broke a rule early" = within the first this many character replies
EARLY_REPLIES = 3

#: metric -> (direction: "lower" | "higher" is better | "" for descriptive, kind: "rate" for a 0/1 value
#: per conversation (Wilson) | "mean" (cluster bootstrap over conversations), description)
METRICS: dict[str, tuple[str, str, str]] = {
    "rule_breaks": ("lower", "mean", "share of the character's replies breaking an automatic rule (check_reply)"),
    "early_rule_break": (
        "lower", "rate", f"broke an automatic rule within the first {EARLY_REPLIES} replies (shorter clean "
        "conversations are censored: left out)",
    ),
    "replies_before_break": (
        "higher", "mean", "clean replies before the first rule break, censored at the conversation's length "
        "(a restricted mean: a lower bound of the uncensored mean)",
    ),
    "repetition": ("lower", "mean", "share of replies (from the 2nd) near-duplicating an earlier reply"),
    "repeated_questions": ("lower", "mean", "share of asking replies that repeat an earlier question"),
    "language_drift": ("lower", "mean", "share of identifiable replies not in the character's language"),
    "question_rate": ("higher", "mean", "share of replies that ask something (rule 4a)"),
    "photo_probe_image": ("higher", "rate", "after a photo probe the reply carries an <img> (rule 9)"),
    "goodbye_probe_kept_going": (
        "higher", "rate", "after a goodbye probe the reply neither says goodbye nor ends it (rule 4b)",
    ),
    "are_you_ai_probe_in_character": (
        "higher", "rate", "after an are-you-an-AI probe the reply has no assistant phrase (rule 1)",
    ),
    "language_switch_probe_kept_language": (
        "higher", "rate", "after a language-switch probe the reply stays in the character's language (rule 7)",
    ),
    "replies": ("", "mean", "character replies per conversation"),
    **{f"judge.{d}": ("higher", "mean", f"judge's whole-transcript {en} (1-10)") for d, (_, en) in DIMENSIONS.items()},
}  # fmt: skip

#: probe kind -> the metric that measures its handling (beyond_knowledge needs a judge: none here)
PROBE_METRICS = {
    "photo": "photo_probe_image",
    "goodbye": "goodbye_probe_kept_going",
    "are_you_ai": "are_you_ai_probe_in_character",
    "language_switch": "language_switch_probe_kept_language",
}

#: farewells that end a conversation (rule 4b); English ones as whole words, case-insensitive
FAREWELLS_ZH = ("再见", "拜拜", "回头见", "下次再聊", "下次聊", "改天聊", "先不聊了", "不聊了")
_FAREWELL_EN = re.compile(
    r"\b(good ?bye|bye(?:-| )?bye|bye|see you|see ya|talk (?:to you )?later|farewell)\b", re.I
)
_QUESTION = re.compile(r"[^?？!！。.,，;；\n]*[?？]")


# ------------------------------------------------------------------------------- one conversation


def replies(conv: Conversation) -> list[tuple[int, str]]:
    """The character's replies as ``(message index, raw content)``, in order."""
    return [(i, m.content) for i, m in enumerate(conv.messages) if m.role == "assistant"]


def _text(reply: str) -> str:
    return parse_reply(reply).text


def first_rule_break(conv: Conversation, character_name: str = "") -> tuple[int | None, int]:
    """``(replies before the first rule break, replies)``: the first is None when no reply breaks a rule.

    A reply breaks a rule when :func:`troupe.checks.check_reply` reports any violation (language,
    markup grammar, assistant phrase, "Name:" prefix, stage direction, length of rule 7/10, echo of the
    user's line, empty reply) with the conversation's language and the user line before it.
    ``character_name`` defaults to the character id.
    """
    name = character_name or conv.character_id
    out = replies(conv)
    for k, (i, reply) in enumerate(out):
        user = next((m.content for m in reversed(conv.messages[:i]) if m.role == "user"), None)
        if check_reply(
            reply, character_name=name, language=conv.scenario.language, user_text=user
        ).violations:
            return k, len(out)
    return None, len(out)


def rule_breaks(conv: Conversation, character_name: str = "") -> float | None:
    """Share of the character's replies with a :func:`troupe.checks.check_reply` violation; None
    without replies."""
    name = character_name or conv.character_id
    out = replies(conv)
    if not out:
        return None
    bad = 0
    for i, reply in out:
        user = next((m.content for m in reversed(conv.messages[:i]) if m.role == "user"), None)
        bad += bool(
            check_reply(
                reply, character_name=name, language=conv.scenario.language, user_text=user
            ).violations
        )
    return bad / len(out)


def repetition(conv: Conversation) -> float | None:
    """Share of replies, from the second on, that near-duplicate an earlier reply of the same
    conversation: char-trigram Jaccard of the markup-free texts >= :data:`troupe.checks.NEAR_DUPLICATE_JACCARD`
    (the seeds' repetition loops in long dialogues). None with fewer than two replies."""
    grams = [char_trigrams(_text(r)) for _, r in replies(conv)]
    if len(grams) < 2:
        return None
    dup = sum(
        any(jaccard(g, h) >= NEAR_DUPLICATE_JACCARD for h in grams[:k]) for k, g in enumerate(grams) if k
    )
    return dup / (len(grams) - 1)


def questions(reply: str) -> list[str]:
    """The questions of a reply: its clauses (split at sentence ends, commas, semicolons) ending in
    ``?`` or ``？``, markup removed, stripped."""
    return [q.strip() for q in _QUESTION.findall(_text(reply)) if q.strip(" ?？")]


def _same_question(a: str, b: str) -> bool:
    na, nb = (re.sub(r"[\s?？,，.。!！~～]", "", x).lower() for x in (a, b))
    return na == nb or jaccard(char_trigrams(na), char_trigrams(nb)) >= NEAR_DUPLICATE_JACCARD


def repeated_questions(conv: Conversation) -> float | None:
    """Share of the replies that ask something (:func:`questions`) in which a question repeats one
    asked in an earlier reply (normalised equal, or char-trigram Jaccard >= NEAR_DUPLICATE_JACCARD):
    the seeds' version 0.0.1 asking "do you like thinking or not?" again and again. None when no
    reply asks anything."""
    asked: list[str] = []
    asking = repeated = 0
    for _, reply in replies(conv):
        qs = questions(reply)
        if not qs:
            continue
        asking += 1
        repeated += any(_same_question(q, p) for q in qs for p in asked)
        asked += qs
    return repeated / asking if asking else None


def language_drift(conv: Conversation) -> float | None:
    """Share of the replies whose language :func:`troupe.checks.detect_language` identifies, that are
    not in the character's language (``scenario.language``). Replies too short to identify are left
    out (as :func:`troupe.checks.check_reply` does not count them against the language rule); None
    when none is identifiable."""
    langs = [detect_language(_text(r)) for _, r in replies(conv)]
    known = [lang for lang in langs if lang is not None]
    return sum(lang != conv.scenario.language for lang in known) / len(known) if known else None


def question_rate(conv: Conversation) -> float | None:
    """Share of the character's replies that ask at least one question (rule 4a: ask to keep the
    user talking); None without replies."""
    out = replies(conv)
    return sum(bool(questions(r)) for _, r in out) / len(out) if out else None


def probe_replies(conv: Conversation) -> list[tuple[str, int, str]]:
    """``(probe kind, message index of the reply, the character's reply right after the probe)`` for
    each probe that got a reply.

    A probe's user message is the one :class:`~troupe.dialogue.contract.Turn` marks with ``probe``;
    without turn records, the ``Probe.turn``-th user message (0-based) of the scenario's probes. A
    probe the conversation never reached, or that got no reply, is left out.
    """
    at: list[tuple[str, int]] = [
        (t.probe, t.index)
        for t in conv.turns
        if t.probe
        and t.role == "user"
        and 0 <= t.index < len(conv.messages)
        and conv.messages[t.index].role == "user"
    ]
    if not at:
        users = [i for i, m in enumerate(conv.messages) if m.role == "user"]
        at = [(p.kind, users[p.turn]) for p in conv.scenario.probes if p.turn < len(users)]
    out = []
    for kind, i in at:
        j = next((j for j in range(i + 1, len(conv.messages)) if conv.messages[j].role == "assistant"), None)
        if j is not None:
            out.append((kind, j, conv.messages[j].content))
    return out


def says_goodbye(reply: str) -> bool:
    """True if the reply bids farewell (:data:`FAREWELLS_ZH`, English "bye", "goodbye", "see you", ...)."""
    text = _text(reply)
    return any(f in text for f in FAREWELLS_ZH) or bool(_FAREWELL_EN.search(text))


def probe_handled(kind: str, reply: str, language: str, ended_here: bool = False) -> bool | None:
    """Whether the reply right after a ``kind`` probe handles it (None: no automatic check for it).

    * ``photo``: the reply carries an image tag (:func:`troupe.markup.parse_reply` finds an ``<img>``;
      rule 9);
    * ``goodbye``: the reply does not bid farewell (:func:`says_goodbye`) and the conversation did not
      end on it (``ended_here``: the engine recorded ``ended_by="goodbye"`` with this as the last reply;
      rule 4b: change the topic instead);
    * ``are_you_ai``: no assistant phrase (:func:`troupe.checks.has_assistant_phrase`; rule 1);
    * ``language_switch``: the reply is in ``language``, or too short to identify (as check_reply; rule 7);
    * ``beyond_knowledge``: None (only a judge can tell).
    """
    if kind == "photo":
        return bool(parse_reply(reply).images)
    if kind == "goodbye":
        return not says_goodbye(reply) and not ended_here
    if kind == "are_you_ai":
        return has_assistant_phrase(_text(reply)) is None
    if kind == "language_switch":
        lang = detect_language(_text(reply))
        return lang is None or lang == language
    return None


def conversation_metrics(conv: Conversation, character_name: str = "") -> dict[str, float | None]:
    """Every automatic metric of :data:`METRICS` (not the judge's) for one conversation; None = not
    applicable (no replies, no such probe, ...).

    Probe metrics are the share of that kind's probes handled (:func:`probe_handled`); a scenario has
    at most one probe of a kind, so the value is 0 or 1.
    """
    first, n = first_rule_break(conv, character_name)
    if first is not None:
        early: float | None = float(first < EARLY_REPLIES)
    else:
        early = 0.0 if n >= EARLY_REPLIES else None  # censored before EARLY_REPLIES: unknown
    out: dict[str, float | None] = {
        "rule_breaks": rule_breaks(conv, character_name),
        "early_rule_break": early,
        "replies_before_break": float(first if first is not None else n) if n else None,
        "repetition": repetition(conv),
        "repeated_questions": repeated_questions(conv),
        "language_drift": language_drift(conv),
        "question_rate": question_rate(conv),
        "replies": float(n),
    }
    last_reply = max((i for i, _ in replies(conv)), default=-1)
    handled: dict[str, list[bool]] = {}
    for kind, idx, reply in probe_replies(conv):
        ended_here = conv.ended_by == "goodbye" and idx == last_reply
        ok = probe_handled(kind, reply, conv.scenario.language, ended_here)
        if ok is not None:
            handled.setdefault(PROBE_METRICS[kind], []).append(ok)
    for metric in PROBE_METRICS.values():
        got = handled.get(metric)
        out[metric] = sum(got) / len(got) if got else None
    return out


def judge_values(score: JudgeScore | None) -> dict[str, float | None]:
    """``{"judge.<dimension>": 1-10 or None}`` from a whole-transcript score (None when it failed,
    did not parse, or left a dimension out)."""
    dims = score.dimensions if score is not None and score.status == "ok" else {}
    return {f"judge.{d}": (None if dims.get(d) is None else float(dims[d])) for d in DIMENSIONS}


# ------------------------------------------------------------------------------- estimates


def estimate(
    metric: str,
    values: Mapping[str, float | None],
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Estimate:
    """One side's estimate of ``metric`` over its conversations (``values``: scenario id -> value).

    A ``rate`` metric whose values are all 0/1 is a Wilson interval over conversations; anything else
    is the mean over conversations with a percentile bootstrap (each conversation a cluster). None
    values (not applicable) are left out, so ``n`` is the number of conversations it applies to.
    """
    vals = {k: float(v) for k, v in values.items() if v is not None and not math.isnan(v)}
    if not vals:
        return empty(confidence)
    if METRICS.get(metric, ("", "mean", ""))[1] == "rate" and all(v in (0.0, 1.0) for v in vals.values()):
        return wilson(int(sum(vals.values())), len(vals), confidence)
    return bootstrap_mean({k: [v] for k, v in vals.items()}, confidence, resamples, seed)


def paired(
    candidate: Mapping[str, float | None],
    champion: Mapping[str, float | None],
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Estimate:
    """Candidate - champion, mean over the scenarios where both have a value, with a paired
    cluster-bootstrap interval (:func:`troupe.stats.paired_difference`; a scenario is its own cluster).
    ``n`` = paired scenarios."""
    c = {k: float(v) for k, v in candidate.items() if v is not None}
    b = {k: float(v) for k, v in champion.items() if v is not None}
    return paired_difference(
        c, b, cluster_of=lambda k: k, confidence=confidence, resamples=resamples, seed=seed
    )


def compare(
    per_scenario: Mapping[str, Mapping[str, Mapping[str, float | None]]],
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-side estimates and paired differences from per-scenario values.

    Args:
        per_scenario: ``{label: {scenario id: {metric: value or None}}}`` for labels :data:`LABELS`;
            only finished conversations.

    Returns:
        ``{"metrics": {label: {metric: Estimate}}, "paired": {metric: Estimate}, "values": {metric:
        {scenario id: {label: value}}}}``; the paired difference is candidate - champion.
    """
    names = [m for m in METRICS if any(m in v for side in per_scenario.values() for v in side.values())]
    metrics: dict[str, dict[str, Estimate]] = {}
    for label, side in per_scenario.items():
        metrics[label] = {
            m: estimate(m, {s: v.get(m) for s, v in side.items()}, confidence, resamples, seed) for m in names
        }
    diffs: dict[str, Estimate] = {}
    values: dict[str, dict[str, dict[str, float | None]]] = {}
    cand, champ = per_scenario.get(CANDIDATE, {}), per_scenario.get(CHAMPION, {})
    for m in names:
        a = {s: v.get(m) for s, v in cand.items()}
        b = {s: v.get(m) for s, v in champ.items()}
        diffs[m] = paired(a, b, confidence, resamples, seed)
        values[m] = {s: {CANDIDATE: a.get(s), CHAMPION: b.get(s)} for s in sorted(a.keys() | b.keys())}
    return {"metrics": metrics, "paired": diffs, "values": values}
