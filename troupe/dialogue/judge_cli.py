"""``troupe judge calibrate | ratings``: the command-line front doors of the rubric judge
(:mod:`troupe.dialogue.judge`; the judge is ``params.agents.judge``).

* ``calibrate``: the judge scores both replies of every human side-by-side label (``labels.jsonl`` of
  ``troupe feedback export``, :class:`~troupe.dialogue.contract.HumanLabel`), then
  :func:`~troupe.dialogue.judge.calibration` says how far it agrees with people: Spearman's rho per
  dimension, choice agreement, rule agreement (and, with ``--pairwise``, the pairwise winner's
  agreement), each with n and an interval. Writes ``calibration.json``, ``calibration.md`` and the
  judge's scores (``judge_scores.jsonl``); logs an MLflow run ``judge-calibration``.
* ``ratings``: a pairwise tournament. From evaluation samples (``troupe evaluate``'s
  ``samples.jsonl``): every item ``(split, dialogue_id, turn)`` answered by two or more of the chosen
  models, every pair of them compared in both orders (:func:`~troupe.dialogue.judge.acompare`; a
  disagreement is a tie). From self-play (``paths.selfplay``: ``candidate/`` and ``champion/``
  conversations): per scenario played by both, the first character reply that differs, provided the
  messages before it are the same (the rule of ``troupe feedback queue``,
  :func:`troupe.feedback.cli.items_from_conversations`); whole transcripts are not compared, because
  two transcripts that diverged answer different user lines. Identical replies are ties without a
  judge call. Then :func:`~troupe.dialogue.judge.bradley_terry` ratings with bootstrap intervals,
  written to ``ratings.json`` / ``ratings.md`` / ``pairwise.jsonl`` and logged with
  :func:`~troupe.dialogue.judge.log_ratings`.

MLflow: ``registry.tracking_uri`` when set, else ``$MLFLOW_TRACKING_URI`` or the local SQLite store
(:func:`troupe.tracking.tracking_uri`).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import combinations
from pathlib import Path
from typing import Any

import click

from troupe import stats
from troupe.cli import step_options
from troupe.config import ConfigError, section
from troupe.contract import Character, Message, load_characters, read_jsonl, read_text
from troupe.dialogue.client import AgentClient
from troupe.dialogue.contract import JUDGE_PROMPT_VERSION, HumanLabel, JudgeScore
from troupe.dialogue.judge import DEFAULT_CONCURRENCY, PairwiseResult
from troupe.stats import Estimate

CALIBRATION_FILE, CALIBRATION_TABLE, SCORES_FILE = "calibration.json", "calibration.md", "judge_scores.jsonl"
RATINGS_FILE, RATINGS_TABLE, PAIRWISE_FILE = "ratings.json", "ratings.md", "pairwise.jsonl"
#: ratings from self-play compare these two labels (troupe.dialogue.selfplay.LABELS)
SELFPLAY_LABELS = ("candidate", "champion")


# ------------------------------------------------------------------------------------------ helpers


@contextmanager
def tracking(params: dict[str, Any]) -> Iterator[None]:
    """While inside: ``MLFLOW_TRACKING_URI`` = ``registry.tracking_uri`` when that is set (so the
    :mod:`troupe.tracking` helpers use it); the previous environment is restored on exit."""
    uri = str((params.get("registry") or {}).get("tracking_uri") or "")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if uri:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before


def judge_config(params: dict[str, Any]) -> dict[str, Any]:
    """The resolved ``params.agents.judge``.

    Raises:
        ConfigError: its ``base_url`` or ``model`` is empty.
    """
    agent = dict((params.get("agents") or {}).get("judge") or {})
    if not agent.get("base_url") or not agent.get("model"):
        raise ConfigError(
            "agents.judge.base_url / agents.judge.model is empty: point the judge at an OpenAI-compatible "
            'endpoint (README "Judge"), e.g. --set agents.judge.base_url=http://host/v1 --set agents.judge.model=NAME'
        )
    return agent


def load_cards(params: dict[str, Any], path: str = "", selfplay: bool = False) -> dict[str, Character]:
    """Persona cards ``{id: Character}``: ``path`` when given (a characters.jsonl or catalogue); else
    for self-play ``synthesis.characters`` or the catalogue (what the gateways served), otherwise
    ``paths.splits/characters.jsonl`` merged over the catalogue (whichever exist).

    Raises:
        ConfigError: ``path`` is given but missing, or no source has any character.
    """
    from troupe.characters.catalogue import catalogue_location, load_catalogue

    if path:
        if not Path(path).is_file():
            raise ConfigError(f"--characters {path}: file not found")
        return load_characters(path)
    if selfplay:
        loc = (params.get("synthesis") or {}).get("characters") or catalogue_location(params)
        chars = dict(load_catalogue(str(loc), missing_ok=True).characters)
        where = f"{loc} (synthesis.characters / paths.catalogue)"
    else:
        loc = catalogue_location(params)
        chars = dict(load_catalogue(str(loc), missing_ok=True).characters)
        splits = Path(str((params.get("paths") or {}).get("splits") or "")) / "characters.jsonl"
        if splits.is_file():
            chars.update(load_characters(splits))
        where = f"{splits} and {loc}"
    if not chars:
        raise ConfigError(f"no persona cards in {where}: pass --characters PATH")
    return chars


def _card(chars: dict[str, Character], cid: str, where: str) -> Character:
    if cid not in chars:
        raise ConfigError(f"{where}: character {cid!r} has no persona card (pass --characters PATH)")
    return chars[cid]


def note(e: Estimate) -> str:
    """What an estimate can say: ``ok``; ``too few for an interval``; ``no estimate: too few or constant
    scores`` (n > 0 but e.g. Spearman's rho of fewer than 3 pairs or of constant scores); ``not measured``
    (n = 0)."""
    if e.n == 0:
        return "not measured"
    if math.isnan(e.value):
        return "no estimate: too few or constant scores"
    return "too few for an interval" if math.isnan(e.lo) else "ok"


def _metrics_of(prefix: str, estimates: dict[str, Estimate]) -> dict[str, float]:
    out = {}
    for k, e in estimates.items():
        for suffix, v in (("", e.value), (".lo", e.lo), (".hi", e.hi), (".n", float(e.n))):
            if not math.isnan(v):
                out[f"{prefix}{k}{suffix}"] = v
    return out


def _markdown(title: str, header: Sequence[str], rows: Sequence[Sequence[str]], footer: str = "") -> str:
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + (["", footer] if footer else [])) + "\n"


def _echo_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for r in (header, *rows):
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)))


async def _bounded(coros: Sequence[Any], concurrency: int, desc: str) -> list[Any]:
    """Await ``coros`` (coroutines) with at most ``concurrency`` in flight, a tqdm bar; input order kept."""
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(coros), desc=desc, unit="cmp")

    async def one(c: Any) -> Any:
        async with sem:
            r = await c
        bar.update(1)
        return r

    try:
        return list(await asyncio.gather(*(one(c) for c in coros)))
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------- calibrate


def read_labels(path: Path) -> list[HumanLabel]:
    """HumanLabel records of a ``labels.jsonl``.

    Raises:
        ConfigError: the file is missing (names ``troupe feedback export``).
        ContractError: a line is not a HumanLabel (names the line).
    """
    if not path.is_file():
        raise ConfigError(
            f"{path}: no human labels; run `troupe feedback export` (feedback.export_dir) or pass --labels PATH"
        )
    return read_jsonl(path, HumanLabel)


def run_calibration(
    params: dict[str, Any],
    labels: Sequence[HumanLabel],
    chars: dict[str, Character],
    out: Path,
    concurrency: int = DEFAULT_CONCURRENCY,
    pairwise: bool = False,
    resamples: int = stats.DEFAULT_RESAMPLES,
    source: str = "",
) -> dict[str, Any]:
    """Score both sides of every label with ``params.agents.judge``, compute
    :func:`troupe.dialogue.judge.calibration`, write ``calibration.json`` / ``calibration.md`` /
    ``judge_scores.jsonl`` into ``out`` and log an MLflow run ``judge-calibration`` (metrics
    ``calibration.<metric>`` with ``.lo`` / ``.hi`` / ``.n``).

    Args:
        labels: the human labels (any number; 0 or a few give estimates with n and no interval).
        chars: persona cards by id; every label's ``character_id`` must be there.
        pairwise: also compare the two replies of each labelled item (both orders) and report
            ``pairwise_agreement``.
        resamples: bootstrap replicates of the Spearman intervals.

    Returns:
        The ``calibration.json`` document: ``metrics`` ``{name: Estimate dict + note}``, ``labels``,
        ``items``, ``scores`` (ok / unparseable / failed counts), ``judge``, ``prompt_version``,
        ``confidence``, ``mlflow_run_id``.

    Raises:
        ConfigError: the judge is not configured, or a label's character has no card.
    """
    from troupe.dialogue import judge as rubric

    agent = judge_config(params)
    confidence = float((params.get("eval") or {}).get("confidence", stats.DEFAULT_CONFIDENCE))
    for i, lab in enumerate(labels):
        _card(chars, lab.character_id, f"label {i} (item {lab.item_id})")
    items = rubric.label_items(labels, chars)
    first: dict[str, HumanLabel] = {}
    for lab in labels:
        first.setdefault(lab.item_id, lab)  # one comparison per labelled item

    async def main() -> tuple[list[JudgeScore], list[PairwiseResult], dict[str, Any]]:
        client = AgentClient.from_params(agent, "judge")
        try:
            coros = [rubric.ascore(client, it) for it in items]
            scores = await _bounded(coros, concurrency, "judge labels")
            pw: list[PairwiseResult] = []
            if pairwise:
                cmp = [
                    rubric.acompare(client, chars[lab.character_id], lab.context, lab.reply_a, lab.reply_b,
                                    iid, lab.model_a, lab.model_b)
                    for iid, lab in first.items()
                ]  # fmt: skip
                pw = await _bounded(cmp, concurrency, "judge pairs")
            return scores, pw, {**client.describe(), **client.usage.model_dump()}
        finally:
            await client.aclose()

    scores, pw, usage = asyncio.run(main()) if items else ([], [], {})
    est = rubric.calibration(scores, labels, confidence, pw, resamples)
    out.mkdir(parents=True, exist_ok=True)
    with (out / SCORES_FILE).open("w", encoding="utf-8") as f:
        for s in scores:
            f.write(s.model_dump_json() + "\n")
    if pw:
        with (out / PAIRWISE_FILE).open("w", encoding="utf-8") as f:
            for p in pw:
                f.write(p.model_dump_json() + "\n")
    doc: dict[str, Any] = {
        "source": source,
        "labels": len(labels),
        "items": len(first),
        "scores": {k: sum(s.status == k for s in scores) for k in ("ok", "unparseable", "failed")},
        "judge": {"base_url": agent["base_url"], "model": agent["model"], "usage": usage},
        "prompt_version": JUDGE_PROMPT_VERSION,
        "confidence": confidence,
        "metrics": {k: {**e.to_dict(), "note": note(e)} for k, e in est.items()},
    }
    header = ["metric", "agreement", f"{round(confidence * 100)}% interval", "n", "note"]
    rows = [
        [
            k,
            "-" if math.isnan(e.value) else f"{e.value:.2f}",
            "-" if math.isnan(e.lo) else f"[{e.lo:.2f}, {e.hi:.2f}]",
            str(e.n),
            note(e),
        ]
        for k, e in est.items()
    ]
    footer = (
        f"{len(labels)} labels on {len(first)} items; judge {agent['model']} (prompt {JUDGE_PROMPT_VERSION}); "
        "spearman_*: Spearman's rho judge vs human 1-10 scores (cluster bootstrap over items); "
        "*_agreement: share agreeing (Wilson). n = pairs / labels it rests on; n = 0: not measured."
    )
    (out / CALIBRATION_TABLE).write_text(
        _markdown("Judge calibration against human labels", header, rows, footer), encoding="utf-8"
    )
    with tracking(params):
        import mlflow

        from troupe.tracking import _setup

        _setup(((params.get("registry") or {}).get("experiment")) or "troupe")
        with mlflow.start_run(run_name="judge-calibration") as run:
            mlflow.set_tags({"troupe.role": "judge-calibration", "troupe.judge_prompt": JUDGE_PROMPT_VERSION})
            mlflow.log_params(
                {"judge_model": agent["model"], "labels": len(labels), "items": len(first), "source": source}
            )
            metrics = _metrics_of("calibration.", est)
            if metrics:
                mlflow.log_metrics(metrics)
            doc["mlflow_run_id"] = run.info.run_id
            (out / CALIBRATION_FILE).write_text(
                json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8"
            )
            mlflow.log_artifact(str(out / CALIBRATION_FILE))
            mlflow.log_artifact(str(out / CALIBRATION_TABLE))
    _echo_table(header, rows)
    return doc


# ------------------------------------------------------------------------------------------ ratings

#: one comparison to make: (character, context, reply_a, reply_b, item_id, model_a, model_b)
Task = tuple[Character, list[Message], str, str, str, str, str]


def _versions(samples_path: Path, samples: Sequence[dict[str, Any]]) -> dict[str, str]:
    """``{model: version}`` from the samples (``model_version`` / ``version`` on a row) or, for
    ``champion``, ``champion_version`` of the ``eval_set.json`` beside them."""
    from troupe.eval_contract import CHAMPION_MODEL, EVAL_SET_FILE

    out: dict[str, str] = {}
    for s in samples:
        v = s.get("model_version") or s.get("version")
        if v not in (None, ""):
            out.setdefault(str(s["model"]), str(v))
    es = samples_path.parent / EVAL_SET_FILE
    if CHAMPION_MODEL not in out and es.is_file():
        v = json.loads(es.read_text(encoding="utf-8")).get("champion_version")
        if v not in (None, ""):
            out[CHAMPION_MODEL] = str(v)
    return out


def tasks_from_samples(
    samples: Sequence[dict[str, Any]],
    chars: dict[str, Character],
    models: Sequence[str] = (),
    max_items: int = 0,
    seed: int = 0,
    names: dict[str, str] | None = None,
) -> tuple[list[Task], list[tuple[str, str, str]], dict[str, int]]:
    """The tournament over evaluation samples.

    Args:
        samples: ``samples.jsonl`` rows (:mod:`troupe.eval_contract`).
        models: models to rate (default: all in the samples); ``names`` maps a model to its rating label
            (e.g. ``champion`` -> ``champion/v7``).
        max_items: 0 = every item; else a seeded sample of that many items (``seed``).

    Returns:
        ``(tasks, ties, counts)``: one task per item and pair of models with different replies, a
        ``(label_a, label_b, "tie")`` per pair with identical replies (not asked), counts ``items``
        (with >= 2 of the models), ``unpaired`` (fewer), ``pairs``, ``identical``.

    Raises:
        ConfigError: a named model is not in the samples, fewer than two models, a card is missing.
    """
    from troupe.eval_contract import item_key

    names = names or {}
    by_key: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for s in samples:
        by_key[item_key(s)][str(s["model"])] = s
    found = {m for v in by_key.values() for m in v}
    chosen = list(models) or sorted(found)
    missing = [m for m in chosen if m not in found]
    if missing:
        raise ConfigError(f"--models: {missing} not in the samples (found {sorted(found)})")
    if len(chosen) < 2:
        raise ConfigError(f"ratings need two models or more; the samples have {sorted(found)}")
    keys = sorted(k for k, per in by_key.items() if sum(m in per for m in chosen) >= 2)
    counts = {"items": len(keys), "unpaired": len(by_key) - len(keys), "pairs": 0, "identical": 0}
    if max_items and len(keys) > max_items:
        keys = sorted(random.Random(seed).sample(keys, max_items))
        counts["items"] = len(keys)
    tasks: list[Task] = []
    ties: list[tuple[str, str, str]] = []
    for key in keys:
        per = by_key[key]
        present = [m for m in chosen if m in per]
        for ma, mb in combinations(present, 2):
            sa, sb = per[ma], per[mb]
            la, lb = names.get(ma, ma), names.get(mb, mb)
            counts["pairs"] += 1
            if str(sa["reply"]).strip() == str(sb["reply"]).strip():
                counts["identical"] += 1
                ties.append((la, lb, "tie"))
                continue
            ch = _card(chars, str(sa["character_id"]), f"item {key}")
            ctx = [Message.model_validate(m) for m in sa["context"]]
            tasks.append((ch, ctx, str(sa["reply"]), str(sb["reply"]), "/".join(map(str, key)), la, lb))
    return tasks, ties, counts


def tasks_from_selfplay(
    selfplay_dir: Path, chars: dict[str, Character], max_items: int = 0, seed: int = 0
) -> tuple[list[Task], list[tuple[str, str, str]], dict[str, int]]:
    """The tournament over a self-play output directory (``candidate/`` and ``champion/``
    ``conversations.jsonl``): per scenario both finished, the first character reply that differs
    after identical messages (:func:`troupe.feedback.cli.items_from_conversations`); scenarios where
    no reply differs are ties (not asked); scenarios whose contexts diverged first are left out
    (``diverged``).

    Returns:
        ``(tasks, ties, counts)`` as :func:`tasks_from_samples` (counts of ``items_from_conversations``).

    Raises:
        ConfigError: no conversations under ``selfplay_dir``, a label missing, a card missing.
    """
    from troupe.feedback.cli import items_from_conversations

    rows: list[dict[str, Any]] = []
    for label in SELFPLAY_LABELS:
        f = selfplay_dir / label / "conversations.jsonl"
        if f.is_file():
            rows += [json.loads(line) for line in read_text(str(f)).splitlines() if line.strip()]
    if not rows:
        raise ConfigError(
            f"{selfplay_dir}: no candidate/ or champion/ conversations.jsonl (the output of troupe evaluate --suite selfplay)"
        )
    items, counts = items_from_conversations(rows, chars, SELFPLAY_LABELS, str(selfplay_dir))
    if max_items and len(items) > max_items:
        items = random.Random(seed).sample(items, max_items)
    tasks: list[Task] = [
        (
            chars[it.character_id],
            list(it.context),
            it.reply_a,
            it.reply_b,
            it.source_ref,
            it.model_a,
            it.model_b,
        )
        for it in items
    ]
    ties = [(*SELFPLAY_LABELS, "tie")] * counts.get("identical", 0)
    return tasks, ties, counts


def run_ratings(
    params: dict[str, Any],
    tasks: Sequence[Task],
    ties: Sequence[tuple[str, str, str]],
    out: Path,
    table: str,
    concurrency: int = DEFAULT_CONCURRENCY,
    resamples: int = 1000,
    reference: str | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare every task in both orders with ``params.agents.judge``, fit Bradley-Terry ratings with
    bootstrap intervals, write ``ratings.json`` / ``ratings.md`` / ``pairwise.jsonl`` into ``out`` and
    log them with :func:`troupe.dialogue.judge.log_ratings` (run ``ratings-<table>``).

    Args:
        tasks: comparisons to ask the judge (:func:`tasks_from_samples` / :func:`tasks_from_selfplay`).
        ties: comparisons already known to be ties (identical replies).
        reference: rate relative to this model (its rating 0); None = ratings with mean 0.
        info: extra fields for ``ratings.json`` (source, counts, versions).

    Returns:
        The ``ratings.json`` document: ``ratings`` ``{model: Estimate dict}`` (natural-log units; Elo =
        r x 400 / ln 10), ``comparisons``, ``judged`` (ok / unparseable / failed / consistent),
        ``judge``, ``mlflow_run_id`` and ``info``'s fields. No usable comparison gives empty ratings.

    Raises:
        ConfigError: the judge is not configured; ``reference`` is not among the rated models.
    """
    from troupe.dialogue import judge as rubric

    agent = judge_config(params)
    confidence = float((params.get("eval") or {}).get("confidence", stats.DEFAULT_CONFIDENCE))

    async def main() -> tuple[list[PairwiseResult], dict[str, Any]]:
        client = AgentClient.from_params(agent, "judge")
        try:
            coros = [rubric.acompare(client, *t) for t in tasks]
            return await _bounded(coros, concurrency, f"judge [{table}]"), {
                **client.describe(),
                **client.usage.model_dump(),
            }
        finally:
            await client.aclose()

    results, usage = asyncio.run(main()) if tasks else ([], {})
    comps = [*rubric.comparisons_from(results), *ties]
    try:
        ratings = rubric.bradley_terry(comps, confidence, resamples, reference=reference) if comps else {}
    except ValueError as e:
        raise ConfigError(f"--reference: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    with (out / PAIRWISE_FILE).open("w", encoding="utf-8") as f:
        for r in results:
            f.write(r.model_dump_json() + "\n")
    ok = [r for r in results if r.status == "ok"]
    doc: dict[str, Any] = {
        "table": table,
        **(info or {}),
        "reference": reference or "mean-0",
        "units": "natural log; Elo = r * 400 / ln 10",
        "comparisons": len(comps),
        "judged": {
            "asked": len(results),
            "ok": len(ok),
            "unparseable": sum(r.status == "unparseable" for r in results),
            "failed": sum(r.status == "failed" for r in results),
            "consistent": sum(bool(r.consistent) for r in ok),
            "ties_without_asking": len(ties),
        },
        "judge": {"base_url": agent["base_url"], "model": agent["model"], "usage": usage},
        "prompt_version": JUDGE_PROMPT_VERSION,
        "ratings": {m: e.to_dict() for m, e in sorted(ratings.items(), key=lambda kv: -kv[1].value)},
    }
    tags = {"troupe.judge_prompt": JUDGE_PROMPT_VERSION}
    for m, v in ((info or {}).get("versions") or {}).items():
        tags[f"troupe.version.{m}"] = str(v)
    with tracking(params):
        doc["mlflow_run_id"] = (
            rubric.log_ratings(ratings, table, params, reference, len(comps), tags) if ratings else None
        )
    (out / RATINGS_FILE).write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    header = ["model", "rating", f"{round(confidence * 100)}% interval", "n", "elo"]
    rows = [
        [
            m,
            f"{e.value:+.2f}",
            f"[{e.lo:+.2f}, {e.hi:+.2f}]",
            str(e.n),
            f"{e.value * 400 / math.log(10):+.0f}",
        ]
        for m, e in sorted(ratings.items(), key=lambda kv: -kv[1].value)
    ]
    footer = (
        f"{len(comps)} comparisons ({len(results)} asked in both orders, {len(ok)} parsed, "
        f"{doc['judged']['consistent']} consistent; {len(ties)} identical-reply ties). Bradley-Terry, "
        f"ties = half a win; percentile bootstrap over comparisons; anchored at {doc['reference']}."
    )
    (out / RATINGS_TABLE).write_text(
        _markdown(f"Judge ratings: {table}", header, rows, footer), encoding="utf-8"
    )
    if rows:
        _echo_table(header, rows)
    else:
        click.echo("no usable comparison: no ratings")
    return doc


# ------------------------------------------------------------------------------------------ the CLI


@click.group("judge")
def judge_cli() -> None:
    """The rubric judge (agents.judge): calibrate it against human labels, rate models pairwise."""


@judge_cli.command("calibrate")
@click.option(
    "--labels", "labels_path", default="", help="labels.jsonl (default: feedback.export_dir/labels.jsonl)"
)
@click.option("--out", default="", help="output directory (default: the labels file's directory)")
@click.option("--characters", default="", help="characters.jsonl (default: paths.splits + the catalogue)")
@click.option("--concurrency", default=DEFAULT_CONCURRENCY, show_default=True, type=click.IntRange(1))
@click.option(
    "--pairwise/--no-pairwise", default=False, show_default=True, help="also compare each item pairwise"
)
@click.option("--resamples", default=stats.DEFAULT_RESAMPLES, show_default=True, type=click.IntRange(1))
@step_options
def calibrate_cmd(
    params: dict,
    labels_path: str,
    out: str,
    characters: str,
    concurrency: int,
    pairwise: bool,
    resamples: int,
) -> None:
    """Agreement of the judge with human side-by-side labels, per dimension, with n and intervals."""
    path = Path(labels_path or Path(str(section(params, "feedback")["export_dir"])) / "labels.jsonl")
    labels = read_labels(path)
    chars = load_cards(params, characters)
    doc = run_calibration(params, labels, chars, Path(out) if out else path.parent, concurrency, pairwise,
                          resamples, str(path))  # fmt: skip
    click.echo(
        f"[judge] wrote {Path(out) if out else path.parent}/{CALIBRATION_FILE} (run {doc['mlflow_run_id']})"
    )


@judge_cli.command("ratings")
@click.option("--samples", default="", help="eval samples.jsonl (or its directory) from troupe evaluate")
@click.option("--selfplay", "selfplay_dir", default="", help="self-play output directory (paths.selfplay)")
@click.option("--models", default="", help="models to rate, a,b,c (samples only; default all)")
@click.option(
    "--max-items", default=0, show_default=True, type=click.IntRange(0), help="0 = all; else a seeded sample"
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", default="", help="output directory (default: beside the input, judge_ratings/)")
@click.option("--characters", default="", help="characters.jsonl (default: paths.splits + catalogue)")
@click.option("--concurrency", default=DEFAULT_CONCURRENCY, show_default=True, type=click.IntRange(1))
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(1))
@click.option("--reference", default="", help="anchor model (rating 0); default: mean 0")
@click.option("--table", default="", help="MLflow table name (default: eval / selfplay)")
@step_options
def ratings_cmd(
    params: dict,
    samples: str,
    selfplay_dir: str,
    models: str,
    max_items: int,
    seed: int,
    out: str,
    characters: str,
    concurrency: int,
    resamples: int,
    reference: str,
    table: str,
) -> None:
    """Bradley-Terry ratings from a pairwise tournament judged in both orders (disagreement = tie)."""
    from troupe.eval_contract import SAMPLES_FILE

    if bool(samples) == bool(selfplay_dir):
        raise click.UsageError("give exactly one of --samples PATH and --selfplay DIR")
    pick = [m.strip() for m in models.split(",") if m.strip()]
    if samples:
        sp = Path(samples)
        sp = sp / SAMPLES_FILE if sp.is_dir() else sp
        if not sp.is_file():
            raise ConfigError(
                f"{sp}: samples file not found (troupe evaluate writes paths.eval/samples.jsonl)"
            )
        rows = [json.loads(line) for line in read_text(str(sp)).splitlines() if line.strip()]
        versions = _versions(sp, rows)
        names = {m: f"{m}/v{v}" for m, v in versions.items()}
        tasks, ties, counts = tasks_from_samples(
            rows, load_cards(params, characters), pick, max_items, seed, names
        )
        src, default_out, table = str(sp), sp.parent / "judge_ratings", table or "eval"
    else:
        if pick:
            raise click.UsageError("--models applies to --samples; self-play rates candidate vs champion")
        d = Path(selfplay_dir)
        tasks, ties, counts = tasks_from_selfplay(
            d, load_cards(params, characters, selfplay=True), max_items, seed
        )
        versions, src, default_out, table = {}, str(d), d / "judge_ratings", table or "selfplay"
    click.echo(f"[judge] {json.dumps(counts)}: {len(tasks)} comparisons to ask, {len(ties)} identical (ties)")
    info = {"source": src, "counts": counts, "versions": versions, "models": pick or None}
    target = Path(out) if out else default_out
    doc = run_ratings(params, tasks, ties, target, table, concurrency, resamples, reference or None, info)
    click.echo(f"[judge] wrote {target}/{RATINGS_FILE} (run {doc['mlflow_run_id']})")
