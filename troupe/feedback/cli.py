"""``troupe feedback queue | label | export | status``, and the queue builders they use.

Items pair two models' replies to the same context:

* evaluation samples (``paths.eval/samples.jsonl``, :mod:`troupe.eval_contract`): the same item
  ``(split, dialogue_id, turn)`` (:func:`troupe.eval_contract.item_key`) replied to by both models;
* self-play conversations (:class:`troupe.dialogue.contract.Conversation`): the two transcripts of
  one scenario (their ``label`` names the model), up to the first character reply that differs,
  provided the messages before it are the same.

Counts (``queue``): ``candidates == added + already_queued + identical + unpaired (+ diverged)``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import click

from troupe.cli import step_options
from troupe.config import ConfigError, section
from troupe.contract import Character, Message, load_characters, read_text
from troupe.eval_contract import item_key
from troupe.feedback.store import NewItem, Store


def _pick_models(found: set[str], models: tuple[str, ...], where: str) -> tuple[str, str]:
    if models:
        if len(models) != 2:
            raise ConfigError(f"--models: name exactly two models, got {list(models)}")
        missing = [m for m in models if m not in found]
        if missing:
            raise ConfigError(f"--models: {missing} not in {where} (found {sorted(found)})")
        return models[0], models[1]
    if len(found) != 2:
        raise ConfigError(f"{where}: {len(found)} models {sorted(found)}; name two with --models A,B")
    a, b = sorted(found)
    return a, b


def _card(chars: dict[str, Character], cid: str, where: str) -> Character:
    if cid not in chars:
        raise ConfigError(f"{where}: character {cid!r} has no persona card in the characters file")
    return chars[cid]


def items_from_samples(
    samples: list[dict[str, Any]], chars: dict[str, Character], models: tuple[str, ...] = (), where: str = ""
) -> tuple[list[NewItem], dict[str, int]]:
    """Items from evaluation samples (module docstring); returns ``(items, counts)`` with counts
    ``candidates`` (item keys), ``items``, ``identical`` (both replies equal), ``unpaired`` (one model
    only).

    Raises:
        ConfigError: models not given and not exactly two in the file; a character without a card.
    """
    by_key: dict[tuple, dict[str, dict[str, Any]]] = defaultdict(dict)
    for s in samples:
        by_key[item_key(s)][str(s["model"])] = s
    ma, mb = _pick_models({m for v in by_key.values() for m in v}, models, where)
    items: list[NewItem] = []
    counts = {"candidates": len(by_key), "items": 0, "identical": 0, "unpaired": 0}
    for key, per_model in sorted(by_key.items()):
        if ma not in per_model or mb not in per_model:
            counts["unpaired"] += 1
            continue
        sa, sb = per_model[ma], per_model[mb]
        if str(sa["reply"]).strip() == str(sb["reply"]).strip():
            counts["identical"] += 1
            continue
        ch = _card(chars, str(sa["character_id"]), f"{where} item {key}")
        items.append(
            NewItem(
                character_id=ch.id,
                character_name=ch.name,
                language=ch.language,
                context=[Message.model_validate(m) for m in sa["context"]],
                reply_a=str(sa["reply"]),
                reply_b=str(sb["reply"]),
                model_a=ma,
                model_b=mb,
                source="eval",
                source_ref="/".join(map(str, key)),
            )
        )
        counts["items"] += 1
    return items, counts


def items_from_conversations(
    convs: list[dict[str, Any]], chars: dict[str, Character], models: tuple[str, ...] = (), where: str = ""
) -> tuple[list[NewItem], dict[str, int]]:
    """Items from self-play conversations (module docstring); counts ``candidates`` (scenarios),
    ``items``, ``identical`` (no character reply differs), ``unpaired`` (one label only),
    ``diverged`` (the contexts differ before the first differing reply)."""
    from troupe.dialogue.contract import Conversation

    by_scn: dict[str, dict[str, Conversation]] = defaultdict(dict)
    for raw in convs:
        c = Conversation.model_validate(raw)
        if c.status == "finished":
            by_scn[c.scenario.id][c.label] = c
    ma, mb = _pick_models({m for v in by_scn.values() for m in v}, models, where)
    items: list[NewItem] = []
    counts = {"candidates": len(by_scn), "items": 0, "identical": 0, "unpaired": 0, "diverged": 0}
    for sid, per in sorted(by_scn.items()):
        if ma not in per or mb not in per:
            counts["unpaired"] += 1
            continue
        xa, xb = per[ma].messages, per[mb].messages
        at = next(
            (
                i
                for i in range(min(len(xa), len(xb)))
                if xa[i].role == "assistant" and xa[i].content.strip() != xb[i].content.strip()
            ),
            None,
        )
        if at is None:
            counts["identical"] += 1
            continue
        if [m.model_dump() for m in xa[:at]] != [m.model_dump() for m in xb[:at]] or xb[
            at
        ].role != "assistant":
            counts["diverged"] += 1
            continue
        ch = _card(chars, per[ma].character_id, f"{where} scenario {sid}")
        items.append(
            NewItem(
                character_id=ch.id,
                character_name=ch.name,
                language=ch.language,
                context=list(xa[:at]),
                reply_a=xa[at].content,
                reply_b=xb[at].content,
                model_a=ma,
                model_b=mb,
                source="selfplay",
                source_ref=f"{sid}#{at}",
            )
        )
        counts["items"] += 1
    return items, counts


def open_store(params: dict[str, Any]) -> Store:
    """The store of ``params.feedback`` (``db_url``, ``seed``)."""
    fb = section(params, "feedback")
    return Store(str(fb["db_url"]), int(fb.get("seed", 0)))


@click.group("feedback")
def feedback() -> None:
    """Human side-by-side preferences: queue comparison items, label them in a browser, export DPO
    pairs, judge-calibration labels and agreement."""


@feedback.command("queue")
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="eval samples.jsonl (troupe evaluate) or self-play conversations.jsonl",
)
@click.option("--models", default="", help="the two models (eval) / labels (self-play) to compare, A,B")
@click.option("--characters", default="", help="characters.jsonl (default: paths.splits/characters.jsonl)")
@step_options
def queue_cmd(params: dict, source: str, models: str, characters: str) -> None:
    """Queue comparison items built from two models' replies to the same contexts."""  # fmt: skip
    chars_file = characters or str(Path(section(params, "paths")["splits"]) / "characters.jsonl")
    chars = load_characters(chars_file)
    rows = [json.loads(line) for line in read_text(source).splitlines() if line.strip()]
    pick = tuple(m.strip() for m in models.split(",") if m.strip())
    build = items_from_conversations if rows and "scenario" in rows[0] else items_from_samples
    items, counts = build(rows, chars, pick, source)
    added, existing = open_store(params).add_items(items)
    counts.update(added=added, already_queued=existing)
    click.echo(json.dumps(counts))


@feedback.command("label")
@click.option("--port", default=7860, show_default=True, type=int, help="port of the labelling page")
@click.option("--host", default="127.0.0.1", show_default=True, help="interface to listen on")
@step_options
def label_cmd(params: dict, port: int, host: str) -> None:
    """Serve the side-by-side labelling page (Gradio) until interrupted."""
    from troupe.feedback.app import build_app

    build_app(open_store(params)).launch(server_name=host, server_port=port, quiet=True)


@feedback.command("export")
@click.option("--out", default="", help="output directory (default: feedback.export_dir)")
@step_options
def export_cmd(params: dict, out: str) -> None:
    """Export labels: pairs.jsonl (DPO), quarantine.jsonl, labels.jsonl, agreement.json, report."""
    from troupe.feedback.export import export

    fb = section(params, "feedback")
    report = export(
        open_store(params),
        Path(out or fb["export_dir"]),
        int(fb["min_labels_per_item"]),
        float(params.get("eval", {}).get("confidence", 0.95)),
        seed=int(fb.get("seed", 0)),
    )
    click.echo(json.dumps(report, ensure_ascii=False))


@feedback.command("status")
@step_options
def status_cmd(params: dict) -> None:
    """Row counts of the store (items, labels, production events)."""
    store = open_store(params)
    click.echo(json.dumps({"db": store.safe_url(), **store.counts()}))
