"""``troupe data import|validate|split``: thin front doors over :mod:`troupe.data` (one function each)."""

from __future__ import annotations

from typing import Any

import click

from troupe.cli import step_options
from troupe.config import path_of


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        t.add_row(*(str(x) for x in r))
    Console(stderr=False).print(t)


@click.group("data")
def data() -> None:
    """Data steps: import outside formats, validate with Great Expectations, split."""


@data.command("import")
@step_options
def import_cmd(params: dict) -> None:
    """Import the sources of data.source_sets[data.source_set] into paths.imported (contract JSONL + import_errors.jsonl + import_report.json)."""
    from troupe.data.importers import import_sources, selected_sources, synthetic_source, write_import

    sources = selected_sources(params)
    if (syn := synthetic_source(params)) is not None:  # synthesis.enabled: its output joins the import
        sources = [*sources, syn]
    result = import_sources(sources, ".", log=lambda m: click.echo(m, err=True))
    out = path_of(params, "imported")
    report = write_import(result, out)
    _table(
        f"import -> {out}",
        ["source", "seen", "imported", "errors", "characters"],
        [
            [f"{s['kind']}:{s['path']}", s["seen"], s["imported"], s["errors"], s["characters_imported"]]
            for s in report["sources"]
        ],
    )
    if result.errors:
        click.echo(
            f"{len(result.errors)} record(s) not imported: see {out / 'import_errors.jsonl'}", err=True
        )


@data.command("synthesize")
@step_options
def synthesize_cmd(params: dict) -> None:
    """Play synthesis.conversations scenarios with agents.user/character/host into paths.synthetic (a synthetic import source); writes empty files when synthesis.enabled is false."""
    from troupe.dialogue.synthesize import synthesize

    s = synthesize(params)
    out = path_of(params, "synthetic")
    if s["status"] == "disabled":
        click.echo(f"synthesis disabled (synthesis.enabled=false): empty {out}", err=True)
        return
    rows = [[k, s[k]] for k in ("scenarios", "finished", "failed", "skipped", "retried_failed")]
    rows += [[f"ended by {k}", v] for k, v in s["ended_by"].items()]
    rows += [["host unparseable", s["host"]["unparseable"]], ["tokens", s["tokens"]],
             ["cost (USD)", f"{s['cost_usd']:.4f}"]]  # fmt: skip
    _table(f"synthesize -> {out}", ["", "conversations"], rows)
    if s["failed"]:
        click.echo(
            f"{s['failed']} conversation(s) failed (re-run to retry): see {out / 'failed.jsonl'}", err=True
        )


@data.command("validate")
@step_options
def validate_cmd(params: dict) -> None:
    """Validate paths.imported with the GX suite into paths.validated; non-zero exit above data.max_rejected_share."""
    from troupe.data.validate import validate_dir

    res = validate_dir(params)
    rep = res.report
    rows = [["in", rep["in"]], ["accepted", rep["accepted"]], ["quarantined", rep["quarantined"]]]
    rows += [[f"  {k}", v] for k, v in rep["by_reason"].items()]
    rows += [[f"flag: {k}", v] for k, v in rep["flags"].items()]
    rows += [["import errors (not in 'in')", rep["import_errors"]["count"]]]
    out = path_of(params, "validated")
    _table(f"validate -> {out}", ["", "dialogues"], rows)
    click.echo(f"Data Docs: {rep['data_docs']}", err=True)
    share, limit = rep["rejected_share"], rep["max_rejected_share"]
    if share > limit:
        raise click.ClickException(
            f"{rep['quarantined']}/{rep['in']} dialogues quarantined ({share:.1%}) > data.max_rejected_share "
            f"{limit:.0%}; reasons: {rep['by_reason']}; see {out / 'quarantine.jsonl'}"
        )


@data.command("split")
@step_options
def split_cmd(params: dict) -> None:
    """Split paths.validated into train / heldout_dialogues / heldout_characters under paths.splits."""
    from troupe.data.split import split_dir

    res = split_dir(params)
    rep = res.report
    _table(
        f"split -> {path_of(params, 'splits')}",
        ["split", "dialogues", "before caps", "characters"],
        [[s, n, rep["before_caps"][s], len(rep["per_character"][s])] for s, n in rep["counts"].items()],
    )
    click.echo(
        "held-out characters: "
        + ", ".join(f"{c['name']} ({c['language']})" for c in rep["heldout_characters"]),
        err=True,
    )
