"""``troupe characters import|list|show|validate|export|build``: thin front doors over
:mod:`troupe.characters.catalogue` (one function each).

Validation reads the serving context from params (``data.cutoff_len``; ``--params`` / ``--set`` as
every step) and counts tokens with ``--tokenizer DIR`` when given, else estimates them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from troupe.cli import step_options

_catalogue_opt = click.option(
    "--catalogue", "catalogue", required=True, metavar="URI", help="catalogue file: local path or s3:// URI"
)
_tokenizer_opt = click.option(
    "--tokenizer",
    "tokenizer_dir",
    default=None,
    metavar="DIR",
    help="count persona tokens with this model's tokenizer (default: estimate)",
)


def _rules(params: dict[str, Any], tokenizer_dir: str | None) -> dict[str, Any]:
    tok = None
    if tokenizer_dir:
        from troupe.data.validate import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
    return {"context_tokens": int(params["data"]["cutoff_len"]), "tokenizer": tok}


@click.group("characters")
def characters() -> None:
    """Character catalogue: import/export Character Card V2/V3 (PNG or JSON), list, show, validate, build."""


@characters.command("import")
@click.argument("cards", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@_catalogue_opt
@click.option("--id", "char_id", default=None, help="character id (one card only; default: from the card)")
@click.option("--replace", is_flag=True, help="replace a character already in the catalogue")
@_tokenizer_opt
@step_options
def import_cmd(
    params: dict,
    cards: tuple[str, ...],
    catalogue: str,
    char_id: str | None,
    replace: bool,
    tokenizer_dir: str | None,
) -> None:
    """Import CARDS into the catalogue (all or none; the catalogue is created when missing)."""
    from troupe.characters.catalogue import import_cards, load_catalogue

    done = import_cards(cards, catalogue, id=char_id, replace=replace, **_rules(params, tokenizer_dir))
    for c in done:
        click.echo(f"imported {c.id} ({c.name}, {c.language})")
    click.echo(f"catalogue {catalogue} version {load_catalogue(catalogue).version}")


@characters.command("list")
@_catalogue_opt
def list_cmd(catalogue: str) -> None:
    """List the catalogue's characters: id, name, language, greetings, lorebook entries."""
    from rich.console import Console
    from rich.table import Table

    from troupe.characters.catalogue import load_catalogue

    cat = load_catalogue(catalogue)
    t = Table(title=f"{cat.uri} {cat.version} ({len(cat.characters)} characters)")
    for col in ("id", "name", "language", "greetings", "lore entries"):
        t.add_column(col, justify="right" if col in ("greetings", "lore entries") else "left")
    for c in cat.characters.values():
        lore = len((c.lorebook or {}).get("entries") or [])
        t.add_row(c.id, c.name, c.language, str(len(c.greetings)), str(lore))
    Console(width=200).print(t)


@characters.command("show")
@click.argument("char_id", metavar="ID")
@_catalogue_opt
@click.option("--prompt", is_flag=True, help="also print the rendered system prompt")
def show_cmd(char_id: str, catalogue: str, prompt: bool) -> None:
    """Print character ID's record (JSON) and, with --prompt, its rendered system prompt."""
    from troupe.characters.catalogue import CatalogueError, load_catalogue
    from troupe.persona import render_system_prompt

    c = load_catalogue(catalogue).get(char_id)
    if c is None:
        raise CatalogueError(f"{catalogue}: no character {char_id!r}")
    click.echo(json.dumps(c.model_dump(mode="json"), ensure_ascii=False, indent=2))
    if prompt:
        click.echo("\n--- system prompt ---")
        click.echo(render_system_prompt(c))


@characters.command("validate")
@click.argument("cards", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("--catalogue", default=None, metavar="URI", help="validate every character of this catalogue")
@_tokenizer_opt
@step_options
def validate_cmd(
    params: dict, cards: tuple[str, ...], catalogue: str | None, tokenizer_dir: str | None
) -> None:
    """Validate card files or a catalogue; exit 1 listing each problem as `file-or-id: field: reason`."""
    from pathlib import Path

    from troupe.characters.cards import CardError, card_to_character, read_card
    from troupe.characters.catalogue import Problem, load_catalogue, validate_character

    if bool(cards) == bool(catalogue):
        raise click.UsageError("give either card files or --catalogue URI")
    rules = _rules(params, tokenizer_dir)
    problems: list[Problem] = []
    n = 0
    if catalogue:
        for c in load_catalogue(catalogue).characters.values():
            n += 1
            problems += validate_character(c, **rules)
    for path in cards:
        n += 1
        try:
            cf = read_card(path)
            c = card_to_character(cf.card, file=cf.file)
        except CardError as e:
            problems.append(Problem(Path(path).name, e.field, e.reason, "card"))
            continue
        problems += validate_character(c, where=cf.file, **rules)
    for p in problems:
        click.echo(str(p))
    if problems:
        click.echo(f"{len(problems)} problem(s) in {n} character(s)", err=True)
        sys.exit(1)  # not click's Exit: troupe.cli.main runs click non-standalone
    click.echo(f"{n} character(s) valid", err=True)


@characters.command("export")
@click.argument("char_id", metavar="ID")
@_catalogue_opt
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="card.png or card.json")
@click.option(
    "--spec",
    type=click.Choice(["v2", "v3"]),
    default=None,
    help="card spec (default: the spec the character was imported from, else v2)",
)
def export_cmd(char_id: str, catalogue: str, out: str, spec: str | None) -> None:
    """Write character ID as a Character Card (PNG with its image, or JSON)."""
    from troupe.characters.catalogue import export_character

    click.echo(f"wrote {export_character(catalogue, char_id, out, spec=spec)}")


@characters.command("build")
@click.option(
    "--from",
    "from_file",
    default="work/splits/characters.jsonl",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="the training run's characters",
)
@click.option(
    "--cards",
    "cards_dir",
    default="characters/cards",
    show_default=True,
    type=click.Path(file_okay=False),
    help="directory of committed card files",
)
@click.option(
    "--out",
    "out",
    default="work/catalogue/characters.jsonl",
    show_default=True,
    help="catalogue file or s3:// URI",
)
@_tokenizer_opt
@step_options
def build_cmd(params: dict, from_file: str, cards_dir: str, out: str, tokenizer_dir: str | None) -> None:
    """Build the catalogue from the run's characters plus the card files (all validated)."""
    from troupe.characters.catalogue import build_catalogue

    cat = build_catalogue(from_file, cards_dir, out, **_rules(params, tokenizer_dir))
    click.echo(f"catalogue {cat.uri}: {len(cat.characters)} characters, version {cat.version}")
