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
    from troupe.data.importers import import_sources, selected_sources, write_import

    sources = selected_sources(params)
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
