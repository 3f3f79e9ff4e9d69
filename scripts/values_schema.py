"""Generate ``values.schema.json`` for every chart under ``charts/`` from its ``values.yaml``.

Helm validates the merged values against a chart's ``values.schema.json`` on ``install``,
``upgrade``, ``template`` and ``lint``, so a values file with a misspelt key (``app.canaryWeigth``)
fails instead of being ignored. The schema is derived, never hand-edited:

- types come from the defaults (string, integer, number, boolean, array, object);
- every object lists its keys and sets ``additionalProperties: false``, except the free-form maps
  in :data:`FREE_FORM` (Kubernetes objects passed through ``toYaml``: any key allowed) and the
  named maps in :data:`KEYED_MAPS` (any key, each value shaped like the existing entries);
- descriptions come from the helm-docs ``# --`` comment above each key.

Usage (from the repository root)::

    python scripts/values_schema.py            # rewrite charts/*/values.schema.json
    python scripts/values_schema.py --check    # exit 1 and name the charts whose schema is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHARTS = ROOT / "charts"
COMMAND = "python scripts/values_schema.py"

#: Keys whose value is passed to Kubernetes/Ray as is: any keys (or items) allowed.
FREE_FORM = frozenset(
    {
        "nodeSelector",
        "resources",
        "tolerations",
        "affinity",
        "rayStartParams",
        "annotations",
        "podAnnotations",
        "labels",
        "podLabels",
        "podSecurityContext",
        "containerSecurityContext",
        "securityContext",
        "extraEnv",
        "env",
        "extraArgs",
        "global",
    }
)
#: Maps whose keys are names chosen by the user (e.g. accelerator profiles): any key, each value
#: validated against the union of the shapes of the default entries.
KEYED_MAPS = frozenset({"accelerators"})
#: Kubernetes quantities: a string ("16", 128Gi) or a plain number.
QUANTITIES = frozenset({"cpu", "memory", "shmSize"})

_SCALAR_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"))


def _type_of(value: Any) -> str | None:
    for py, js in _SCALAR_TYPES:
        if isinstance(value, py):
            return js
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return None  # null: any type


def descriptions(text: str) -> dict[tuple[str, ...], str]:
    """``# -- text`` comments (helm-docs style, continued by ``#`` lines) keyed by the path of the key below."""
    lines = text.splitlines()
    out: dict[tuple[str, ...], str] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key, value in node.value:
            kpath = (*path, str(key.value))
            block: list[str] = []
            i = key.start_mark.line - 1
            while i >= 0 and lines[i].strip().startswith("#"):
                block.insert(0, lines[i].strip())
                i -= 1
            starts = [j for j, c in enumerate(block) if c.startswith("# --")]
            if starts:
                words = [c.removeprefix("# --").removeprefix("#").strip() for c in block[starts[0] :]]
                out[kpath] = " ".join(w for w in words if w)
            walk(value, kpath)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Union of two object schemas (for the entries of a keyed map)."""
    if (
        a.get("type") != "object"
        or b.get("type") != "object"
        or "properties" not in a
        or "properties" not in b
    ):
        return a
    props = dict(a["properties"])
    for k, v in b["properties"].items():
        props[k] = _merge(props[k], v) if k in props else v
    return {**a, "properties": props}


def schema_of(value: Any, path: tuple[str, ...], docs: dict[tuple[str, ...], str]) -> dict[str, Any]:
    """JSON schema of one value at ``path`` (a tuple of keys from the top)."""
    name = path[-1] if path else ""
    s: dict[str, Any] = {}
    if path in docs:
        s["description"] = docs[path]
    t = _type_of(value)
    if name in QUANTITIES and t in ("string", "integer", "number"):
        s["type"] = ["string", "number"]
    elif t is not None:
        s["type"] = t
    if name in FREE_FORM:
        return s
    if t == "object" and name in KEYED_MAPS and value:
        entry: dict[str, Any] = {}
        for k, v in value.items():
            e = schema_of(v, (*path, k), docs)
            entry = _merge(entry, e) if entry else e
        entry.pop("description", None)
        s["additionalProperties"] = entry
    elif t == "object" and value:
        s["properties"] = {k: schema_of(v, (*path, str(k)), docs) for k, v in value.items()}
        s["additionalProperties"] = False
    elif t == "array" and value:
        kinds = {_type_of(v) for v in value}
        if len(kinds) == 1 and next(iter(kinds)) in ("string", "integer", "number", "boolean"):
            s["items"] = {"type": kinds.pop()}
    return s


def chart_schema(chart_dir: Path) -> dict[str, Any]:
    """The values.schema.json of ``chart_dir`` as derived from its values.yaml."""
    text = (chart_dir / "values.yaml").read_text(encoding="utf-8")
    values = yaml.safe_load(text) or {}
    body = schema_of(values, (), descriptions(text))
    body.setdefault("properties", {})["global"] = {
        "description": "Helm global values (set by a parent chart).",
        "type": "object",
    }
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": f"{chart_dir.name} values",
        "description": f"Generated from values.yaml by `{COMMAND}`; do not edit.",
        **body,
    }


def render(schema: dict[str, Any]) -> str:
    """File text of a schema (stable: the drift test compares it byte for byte)."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def charts(root: Path = CHARTS) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/values.yaml"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if a schema is stale")
    ap.add_argument("--charts", type=Path, default=CHARTS, help="directory holding the charts")
    args = ap.parse_args(argv)
    stale = []
    for chart in charts(args.charts):
        target = chart / "values.schema.json"
        text = render(chart_schema(chart))
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        stale.append(target)
        if not args.check:
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target}")
    if args.check and stale:
        print(f"stale: {', '.join(map(str, stale))}; run `{COMMAND}`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
