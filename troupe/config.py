"""params.yaml loading with ``--set a.b=c`` overrides: the one configuration entry point.

Every step reads the same params file that ``dvc.yaml`` tracks; KFP components pass artifact paths
as overrides (``--set paths.validated=/tmp/outputs/...``). Values given by ``--set`` are parsed as
YAML scalars (``--set sft.max_steps=3`` gives an int). The result is validated by the typed model in
:mod:`troupe.params` (unknown keys and wrong types are errors naming the key and the nearest valid
one) and returned as a plain dict with every default filled in.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the file or key."""


def load_params(
    path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """Load ``path`` (YAML mapping), apply ``key.sub=value`` overrides, validate, fill defaults.

    Returns:
        A plain dict with every section and key of :class:`troupe.params.Params` (defaults filled in).

    Raises:
        ConfigError: missing file, non-mapping YAML, an override without ``=``, or params that do not
            validate (unknown key, wrong type, value out of range; the message names the file or
            ``--set`` item, the dotted key and the nearest valid key).
    """
    from troupe.params import resolve

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: params file not found (pass --params PATH)")
    try:
        params = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if not isinstance(params, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    overridden = {ov.split("=", 1)[0].strip(): ov for ov in overrides if "=" in ov}
    return resolve(apply_overrides(params, overrides), source=str(p), overridden=overridden)


def apply_overrides(params: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``params`` with each ``a.b.c=value`` override applied (YAML-typed value).

    Generic (also used for Helm values by ``troupe rayjob --chart-set``): it does not validate; params
    are validated by :func:`load_params` (or :func:`troupe.params.resolve`) after the overrides.
    """
    out = copy.deepcopy(params)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected KEY=VALUE, e.g. sft.max_steps=3")
        key, raw = ov.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {k} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return out


REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_path(p: str | Path) -> Path:
    """A relative path as given when it exists from the working directory, else under the repository
    (or image) root: ``configs/gate_policy.yaml`` resolves the same from a Ray worker, a KFP pod or a
    checkout, whatever their working directory."""
    q = Path(p)
    return q if q.is_absolute() or q.exists() else REPO_ROOT / q


def section(params: dict[str, Any], name: str) -> dict[str, Any]:
    """``params[name]`` as a dict, or a ConfigError naming the missing section."""
    v = params.get(name)
    if not isinstance(v, dict):
        raise ConfigError(f"params: missing section {name!r}")
    return v


def path_of(params: dict[str, Any], key: str) -> Path:
    """``params['paths'][key]`` as a Path (ConfigError naming ``paths.<key>`` when absent)."""
    paths = section(params, "paths")
    if key not in paths:
        raise ConfigError(f"params: missing paths.{key}")
    return Path(paths[key])
