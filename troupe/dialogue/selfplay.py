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
from collections.abc import Mapping, Sequence
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
from troupe.config import ConfigError, path_of, section
from troupe.contract import Character
from troupe.dialogue.client import AgentClient
from troupe.dialogue.contract import DIMENSIONS, JUDGED_RULE_IDS, Conversation, JudgeScore
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
#: the character agent's model name on a Troupe gateway (the engine formats it with the character id)
GATEWAY_MODEL = "{character_id}"
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
    # the rubric judge on the whole transcript (troupe.dialogue.judge.item_values; only when configured)
    **{f"judge_{d}": ("higher", "mean", f"judge: {en} of the transcript (1-10)") for d, (_, en) in DIMENSIONS.items()},
    "judge_narration": ("lower", "rate", "judge: the character narrates instead of playing (the seeds' I->name test)"),
    **{f"judge_rule_{r}": ("lower", "rate", f"judge: rule {r} broken somewhere in the transcript") for r in JUDGED_RULE_IDS},
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
        {scenario id: {label: value}}}}``; the paired difference is candidate - champion. Metrics
        without a value on either side (a probe no scenario had, a judge field never answered) are
        left out: the gate reads a missing metric as "not measured" (insufficient evidence).
    """
    names = [
        m
        for m in METRICS
        if any(v.get(m) is not None for side in per_scenario.values() for v in side.values())
    ]
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


# ------------------------------------------------------------------------------- the run


def _characters(params: dict[str, Any]) -> dict[str, Character]:
    """The characters the gateways serve: ``synthesis.characters`` when set, else ``paths.catalogue``."""
    from troupe.characters.catalogue import catalogue_location, load_catalogue

    loc = (params.get("synthesis") or {}).get("characters") or catalogue_location(params)
    chars = load_catalogue(str(loc)).characters
    if not chars:
        raise ConfigError(f"{loc}: no characters to play (synthesis.characters / paths.catalogue)")
    return chars


def _character_agent(params: dict[str, Any], url: str, label: str) -> AgentClient:
    """The side's gateway as the character agent: model ``{character_id}`` (the engine formats it), key
    from ``selfplay.api_key_env``, sampling and timeouts from ``agents.character`` (the same for both)."""
    sp = section(params, "selfplay")
    cfg = {k: v for k, v in ((params.get("agents") or {}).get("character") or {}).items()}
    cfg.update(base_url=url, model=GATEWAY_MODEL, api_key_env=sp.get("api_key_env", "TROUPE_API_KEY"))
    return AgentClient.from_params(cfg, f"character[{label}]")


def _read_conversations(path: Path, label: str, ids: set[str]) -> dict[str, Conversation]:
    """Finished conversations of ``label`` in ``path`` for the scenario ids ``ids`` (the last per id)."""
    out: dict[str, Conversation] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                c = Conversation.model_validate_json(line)
            except ValueError:
                continue  # a line cut short by a crash: the engine plays that scenario again
            if c.label == label and c.status == "finished" and c.scenario.id in ids:
                out[c.scenario.id] = c
    return out


def _read_scores(path: Path) -> dict[str, JudgeScore]:
    """``{item_id: JudgeScore}`` of a judge.jsonl (the last line per item wins)."""
    out: dict[str, JudgeScore] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    s = JudgeScore.model_validate_json(line)
                except ValueError:
                    continue
                out[s.item_id] = s
    return out


async def _judge(
    client: AgentClient,
    convs: dict[str, Conversation],
    characters: dict[str, Character],
    path: Path,
    label: str,
    concurrency: int,
) -> dict[str, JudgeScore]:
    """Whole-transcript scores of ``convs`` (by scenario id), appended to ``path`` as they come; a
    conversation already scored ``ok`` there is not asked again."""
    from tqdm.auto import tqdm

    from troupe.dialogue.judge import JudgeItem, ascore_many

    have = _read_scores(path)
    items = [
        JudgeItem(
            c.id, characters[c.character_id], [m for m in c.messages if m.role != "system"], model=label
        )
        for c in convs.values()
        if getattr(have.get(c.id), "status", "") != "ok"
    ]
    bar = tqdm(total=len(items), desc=f"judge [{label}]", unit="conv")
    with path.open("a", encoding="utf-8") as f:

        def keep(s: JudgeScore) -> None:
            f.write(s.model_dump_json() + "\n")
            f.flush()
            bar.update(1)

        try:
            for s in await ascore_many(client, items, concurrency, on_score=keep):
                have[s.item_id] = s
        finally:
            bar.close()
    return {sid: have[c.id] for sid, c in convs.items() if c.id in have}


def run_selfplay(params: dict[str, Any]) -> dict[str, Any]:
    """Self-play of the candidate against the champion (the flow is in the module docstring).

    Args:
        params: resolved params; reads ``selfplay`` (candidate_url, champion_url, api_key_env,
            conversations, max_turns, seed, concurrency, bootstrap_resamples), ``agents`` (user, host,
            judge; character for sampling settings), ``synthesis.scenarios`` / ``synthesis.characters``,
            ``paths.catalogue``, ``paths.selfplay``, ``eval.confidence``.

    Returns:
        The ``metrics.json`` document: ``metrics`` ``{label: {metric: Estimate dict}}``, ``paired``
        ``{metric: Estimate dict}`` (candidate - champion), ``values`` (per scenario), ``directions``,
        ``sides`` ({label: url, finished, failed, judged}), the settings and ``created``.

    Raises:
        ConfigError: a gateway URL, the user / host agent or the characters are not configured.
    """
    import asyncio
    import datetime

    from troupe.dialogue.client import agent_clients
    from troupe.dialogue.engine import run_conversations
    from troupe.dialogue.scenarios import load_spec, sample_scenarios

    sp = section(params, "selfplay")
    urls = {CANDIDATE: sp.get("candidate_url") or "", CHAMPION: sp.get("champion_url") or ""}
    if not all(urls.values()):
        raise ConfigError(
            "selfplay.candidate_url and selfplay.champion_url must both be set: the OpenAI-compatible base "
            "URLs (.../v1) of the gateways serving the candidate and the champion (README 'Self-play evaluation')"
        )
    conf = float((params.get("eval") or {}).get("confidence", DEFAULT_CONFIDENCE))
    resamples = int(sp.get("bootstrap_resamples", DEFAULT_RESAMPLES))
    seed, concurrency = int(sp.get("seed", 0)), int(sp.get("concurrency", 4))
    out = path_of(params, "selfplay")
    out.mkdir(parents=True, exist_ok=True)
    characters = _characters(params)
    spec = load_spec((params.get("synthesis") or {}).get("scenarios") or "configs/scenarios.yaml")
    scenarios = sample_scenarios(
        spec, characters, int(sp.get("conversations", 16)), seed, int(sp.get("max_turns", 6)), PROBE_SHARE
    )
    ids = {s.id for s in scenarios}
    judge_cfg = (params.get("agents") or {}).get("judge") or {}
    print(
        f"[selfplay] {len(scenarios)} scenarios (seed {seed}) over {len({s.character_id for s in scenarios})} "
        f"characters: candidate {urls[CANDIDATE]} vs champion {urls[CHAMPION]}; judge "
        f"{'on' if judge_cfg.get('base_url') else 'not configured'}",
        flush=True,
    )

    async def main() -> tuple[dict[str, dict], dict[str, dict[str, Conversation]], dict[str, dict]]:
        shared = agent_clients(params, ("user", "host"))
        judge = AgentClient.from_params(judge_cfg, "judge") if judge_cfg.get("base_url") else None
        summaries, convs, scores = {}, {}, {}
        try:
            for label in LABELS:
                char = _character_agent(params, urls[label], label)
                try:
                    summaries[label] = await run_conversations(
                        scenarios, characters, {**shared, "character": char}, out / label, concurrency, label
                    )
                finally:
                    await char.aclose()
                convs[label] = _read_conversations(out / label / "conversations.jsonl", label, ids)
                scores[label] = (
                    await _judge(
                        judge, convs[label], characters, out / label / "judge.jsonl", label, concurrency
                    )
                    if judge is not None
                    else {}
                )
        finally:
            for c in [*shared.values(), *([judge] if judge else [])]:
                await c.aclose()
        return summaries, convs, scores

    summaries, convs, scores = asyncio.run(main())
    from troupe.dialogue.judge import item_values

    per_scenario = {
        label: {
            sid: {
                **conversation_metrics(c, characters[c.character_id].name),
                **(item_values(scores[label][sid]) if sid in scores[label] else {}),
            }
            for sid, c in convs[label].items()
        }
        for label in LABELS
    }
    got = compare(per_scenario, conf, resamples, seed)
    doc = {
        "suite": "selfplay",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "confidence": conf,
        "resamples": resamples,
        "scenarios": {
            "file": spec.source,
            "sha256": spec.content_hash,
            "seed": seed,
            "n": len(scenarios),
            "max_turns": int(sp.get("max_turns", 6)),
            "probe_share": PROBE_SHARE,
            "paired": len(convs[CANDIDATE].keys() & convs[CHAMPION].keys()),
        },
        "sides": {
            label: {
                "url": urls[label],
                "finished": len(convs[label]),
                "failed": summaries[label].get("failed", 0),
                "judged": sum(s.status == "ok" for s in scores[label].values()),
                "judge_unparseable": sum(s.status == "unparseable" for s in scores[label].values()),
                "judge_failed": sum(s.status == "failed" for s in scores[label].values()),
                "cost_usd": summaries[label].get("cost_usd", 0.0),
            }
            for label in LABELS
        },
        "judge": "measured" if judge_cfg.get("base_url") else "not measured",
        "directions": {m: METRICS[m][0] for m in got["paired"]},
        "metrics": {label: {m: e.to_dict() for m, e in ms.items()} for label, ms in got["metrics"].items()},
        "paired": {m: e.to_dict() for m, e in got["paired"].items()},
        "values": got["values"],
    }
    (out / METRICS_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    plots = _plots(got["metrics"], got["paired"], out)
    write_report(doc, convs, scores, characters, plots, out / REPORT_FILE)
    print_table(got["metrics"], got["paired"])
    print(f"[selfplay] wrote {out / METRICS_FILE} and {out / REPORT_FILE}", flush=True)
    return doc


# ------------------------------------------------------------------------------- outputs


def _cell(e: Estimate | None, signed: bool = False) -> str:
    if e is None or not e.n:
        return "n/a (n=0)"
    f = "{:+.3f}" if signed else "{:.3f}"
    ci = "" if math.isnan(e.lo) else f" [{f.format(e.lo)}, {f.format(e.hi)}]"
    return f"{f.format(e.value)}{ci} n={e.n}"


def _verdict(metric: str, d: Estimate) -> str:
    """``better`` / ``worse`` when the paired interval excludes 0 on that side, else ``no difference
    shown`` (``insufficient evidence`` without an interval); descriptive metrics: ``-``."""
    direction = METRICS.get(metric, ("", "", ""))[0]
    if not direction:
        return "-"
    if not d.n or math.isnan(d.lo) or math.isnan(d.hi):
        return "insufficient evidence"
    up = "better" if direction == "higher" else "worse"
    down = "worse" if direction == "higher" else "better"
    return up if d.lo > 0 else down if d.hi < 0 else "no difference shown"


def print_table(metrics: Mapping[str, Mapping[str, Estimate]], diffs: Mapping[str, Estimate]) -> None:
    """Print value [95% interval] n per side and the paired difference per metric (rich table)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title="self-play: candidate vs champion (value [95% interval] n; difference = candidate - champion)"
    )
    for col in ("metric", CANDIDATE, CHAMPION, "difference", "candidate is"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for m, d in diffs.items():
        arrow = {"lower": " ↓", "higher": " ↑"}.get(METRICS.get(m, ("",))[0], "")
        t.add_row(
            m + arrow,
            _cell(metrics[CANDIDATE].get(m)),
            _cell(metrics[CHAMPION].get(m)),
            _cell(d, True),
            _verdict(m, d),
        )
    Console(width=200).print(t)


_SCALE = ("replies", "replies_before_break", *(f"judge_{d}" for d in DIMENSIONS))


def _plots(
    metrics: Mapping[str, Mapping[str, Estimate]], diffs: Mapping[str, Estimate], out: Path
) -> list[Path]:
    """``selfplay_metrics.png`` (a bar per side and metric with its interval) and
    ``selfplay_paired.png`` (each paired difference with its interval against 0: red = worse, green =
    better, grey = the interval includes 0), shares and counts/scores in separate panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in diffs if any(metrics[label].get(m, empty()).n for label in metrics)]
    cols = 5
    rows = max(1, math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, m in zip(axes.flat, names, strict=False):
        ests = [metrics[label].get(m, empty()) for label in LABELS]
        vals = [0.0 if math.isnan(e.value) else e.value for e in ests]
        err = [
            [0 if math.isnan(e.lo) else max(e.value - e.lo, 0) for e in ests],
            [0 if math.isnan(e.hi) else max(e.hi - e.value, 0) for e in ests],
        ]
        ax.bar(LABELS, vals, yerr=err, capsize=3, color=["#DD8452", "#4C72B0"])
        arrow = {"lower": " ↓", "higher": " ↑"}.get(METRICS.get(m, ("",))[0], "")
        ax.set_title(f"{m}{arrow}\nn={'/'.join(str(e.n) for e in ests)}", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle("self-play per side (95% intervals: Wilson for rates, bootstrap over conversations)")
    fig.tight_layout()
    p1 = out / "selfplay_metrics.png"
    fig.savefig(p1, dpi=90)
    plt.close(fig)

    groups = [
        [m for m in names if m not in _SCALE and diffs[m].n],
        [m for m in names if m in _SCALE and diffs[m].n],
    ]
    groups = [g for g in groups if g] or [[]]
    fig, axes = plt.subplots(
        1, len(groups), figsize=(7.5 * len(groups), 0.35 * max(map(len, groups)) + 1.5), squeeze=False
    )
    for ax, group in zip(axes.flat, groups, strict=True):
        for y, m in enumerate(group):
            d = diffs[m]
            verdict = _verdict(m, d)
            color = {"worse": "#C44E52", "better": "#55A868"}.get(verdict, "#777777")
            lo = d.value if math.isnan(d.lo) else d.lo
            hi = d.value if math.isnan(d.hi) else d.hi
            ax.plot([lo, hi], [y, y], color=color, lw=2)
            ax.plot([d.value], [y], "o", color=color)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(group)))
        ax.set_yticklabels([f"{m} (n={diffs[m].n})" for m in group], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("candidate - champion (paired over scenarios, 95% interval)", fontsize=8)
    fig.suptitle("paired differences: red = candidate worse, green = better, grey = interval includes 0")
    fig.tight_layout()
    p2 = out / "selfplay_paired.png"
    fig.savefig(p2, dpi=90)
    plt.close(fig)
    return [p1, p2]


_PROBE_STYLE = "background:#fff3bf"


def _render_reply(text: str) -> str:
    """A reply as HTML: text escaped, emotion tags as a small label, images as a framed prompt."""
    parsed = parse_reply(text)
    body = html.escape("".join(c.text + (f" ⟨{c.emotion}⟩" if c.emotion else "") for c in parsed.clauses))
    imgs = "".join(
        f"<div style='border:1px dashed #4C72B0;padding:2px'>🖼 {html.escape(i.prompt)}"
        f"{' (with the character)' if i.include_person else ''}</div>"
        for i in parsed.images
    )
    return body + imgs


def _render_conversation(c: Conversation | None, score: JudgeScore | None, name: str) -> str:
    if c is None:
        return "<td><i>not finished (failed or not played)</i></td>"
    rows = []
    for i, m in enumerate(c.messages):
        turn = next((t for t in c.turns if t.index == i), None)
        if m.role == "system":
            rows.append(f"<div style='color:#777;font-size:12px'>{html.escape(m.content)}</div>")
        elif m.role == "user":
            probe = turn.probe if turn else None
            style = _PROBE_STYLE if probe else ""
            tag = f"<b>[probe: {probe}]</b> " if probe else ""
            rows.append(f"<div style='{style};margin:2px 0'>👤 {tag}{html.escape(m.content)}</div>")
        else:
            user = next((x.content for x in reversed(c.messages[:i]) if x.role == "user"), None)
            v = check_reply(
                m.content, character_name=name, language=c.scenario.language, user_text=user
            ).violations
            style = "border-left:3px solid #C44E52;padding-left:4px" if v else "padding-left:7px"
            why = f"<div style='color:#C44E52;font-size:11px'>{html.escape('; '.join(v))}</div>" if v else ""
            rows.append(
                f"<div style='{style};margin:2px 0;background:#f4f8ff'>🎭 {_render_reply(m.content)}{why}</div>"
            )
    head = f"<div style='font-size:12px;color:#555'>{len(replies(c))} replies, ended by {c.ended_by or '?'}</div>"
    if score is not None:
        dims = ", ".join(f"{d} {score.dimensions.get(d)}" for d in DIMENSIONS)
        broken = [r for r, b in score.rules.items() if b]
        judged = f"judge ({score.status}): {dims}" + (f"; broken: {', '.join(broken)}" if broken else "")
        head += f"<div style='font-size:12px;background:#eef'>{html.escape(judged)}</div>"
    return f"<td style='vertical-align:top;width:50%'>{head}{''.join(rows)}</td>"


def write_report(
    doc: Mapping[str, Any],
    convs: Mapping[str, Mapping[str, Conversation]],
    scores: Mapping[str, Mapping[str, JudgeScore]],
    characters: Mapping[str, Character],
    plots: Sequence[Path],
    path: Path,
) -> Path:
    """Self-contained HTML: the settings, a table per metric (each side's value [interval] n, the
    paired difference and which side it favours), the embedded plots and every scenario's two
    transcripts side by side (probe lines highlighted, rule-breaking replies marked with the rules,
    judge scores on top)."""
    metrics = {
        label: {m: Estimate.from_dict(e) for m, e in ms.items()} for label, ms in doc["metrics"].items()
    }
    diffs = {m: Estimate.from_dict(e) for m, e in doc["paired"].items()}
    rows = "".join(
        f"<tr><td title='{html.escape(METRICS.get(m, ('', '', ''))[2])}'>{html.escape(m)}"
        f"{ {'lower': ' ↓', 'higher': ' ↑'}.get(METRICS.get(m, ('',))[0], '') }</td>"
        f"<td>{_cell(metrics[CANDIDATE].get(m))}</td><td>{_cell(metrics[CHAMPION].get(m))}</td>"
        f"<td>{_cell(d, True)}</td><td>{_verdict(m, d)}</td><td>{html.escape(METRICS.get(m, ('', '', ''))[2])}</td></tr>"
        for m, d in diffs.items()
    )
    sides = "".join(
        f"<li><b>{label}</b>: {html.escape(str(s['url']))}: {s['finished']} finished, {s['failed']} failed, "
        f"{s['judged']} judged</li>"
        for label, s in doc["sides"].items()
    )
    imgs = "".join(
        f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" style="max-width:100%">'
        for p in plots
    )
    scen = []
    ids = sorted(set(convs.get(CANDIDATE, {})) | set(convs.get(CHAMPION, {})))
    for sid in ids:
        c = convs.get(CANDIDATE, {}).get(sid) or convs.get(CHAMPION, {}).get(sid)
        ch = characters.get(c.character_id)
        name = ch.name if ch else c.character_id
        probes = ", ".join(f"{p.kind} at user turn {p.turn}" for p in c.scenario.probes) or "none"
        variables = "; ".join(f"{k}: {v}" for k, v in c.scenario.variables.items())
        cells = "".join(
            _render_conversation(convs.get(label, {}).get(sid), scores.get(label, {}).get(sid), name)
            for label in LABELS
        )
        scen.append(
            f"<h3 id='{html.escape(sid)}'>{html.escape(sid)}: {html.escape(name)} ({html.escape(c.scenario.language)})</h3>"
            f"<p style='font-size:12px'>probes: {html.escape(probes)}; {html.escape(variables)}</p>"
            f"<table style='width:100%'><tr><th>{CANDIDATE}</th><th>{CHAMPION}</th></tr><tr>{cells}</tr></table>"
        )
    sc = doc["scenarios"]
    page = (
        "<html><head><meta charset='utf-8'><title>Troupe self-play</title><style>body{font-family:sans-serif}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style></head>"
        f"<body><h1>Self-play: candidate vs champion</h1><ul>{sides}</ul>"
        f"<p>{sc['n']} scenarios from <code>{html.escape(str(sc['file']))}</code> (seed {sc['seed']}, at most "
        f"{sc['max_turns']} character turns, one probe each); {sc['paired']} finished by both sides are paired. "
        f"Judge: {html.escape(doc['judge'])}. Created {html.escape(doc['created'])}.</p>"
        f"<p>Cells: value [{round(doc['confidence'] * 100)}% interval] n. Per side: Wilson over conversations for "
        "0/1 metrics, percentile bootstrap over conversations for shares and means; n = conversations the "
        "metric applies to (probe metrics: conversations with that probe). Difference: candidate - champion "
        "over the scenarios both finished, paired bootstrap (scenario = cluster). ↓ lower is better, ↑ higher.</p>"
        f"<table><tr><th>metric</th><th>{CANDIDATE}</th><th>{CHAMPION}</th><th>difference</th><th>candidate is</th>"
        f"<th>rule</th></tr>{rows}</table><h2>Plots</h2>{imgs}<h2>Transcripts</h2>"
        f"<p><span style='{_PROBE_STYLE}'>highlighted</span>: a scripted probe; red bar: a reply breaking an "
        f"automatic rule (the rules named below it).</p>{''.join(scen)}</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path
