"""MLflow model registry: register the candidate, gate it, move aliases.

* ``troupe registry register`` logs the candidate model (``paths.dpo_model`` by default) as artifacts
  of a child run ``register``, creates a registered model version with its evaluation metrics,
  applies the gate policy (absolute thresholds + no regression vs the ``champion`` alias) and, on a
  pass, sets alias ``challenger``. Decision and reasons are version tags and ``paths.registry``
  files (``decision.json``, ``gate.md``).
* ``troupe registry promote`` moves ``champion`` (default: to the current ``challenger``).
* :func:`resolve_model_dir` turns ``models:/name@alias`` (or a local dir) into a local checkpoint dir.
"""

from __future__ import annotations

import json
import operator
from pathlib import Path
from typing import Any

import click
import yaml

from troupe.cli import step_options
from troupe.config import ConfigError, path_of, section

CHALLENGER, CHAMPION = "challenger", "champion"
_MODEL_KEY = {"base": "base_model", "sft": "sft_model", "dpo": "dpo_model"}


def load_policy(path: str | Path) -> dict[str, Any]:
    """Read a gate policy YAML (see configs/gate_policy.yaml); ConfigError naming the file/field."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: gate policy not found (registry.gate_policy)")
    pol = yaml.safe_load(p.read_text()) or {}
    for key, rule in (pol.get("absolute") or {}).items():
        if not isinstance(rule, dict) or not set(rule) <= {"min", "max"} or not rule:
            raise ConfigError(f"{p}: absolute.{key}: expected {{min: x}} and/or {{max: y}}")
    return pol


def _get(metrics: dict[str, Any], dotted: str) -> float | None:
    node: Any = metrics
    for k in dotted.split("."):
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return float(node)


def gate(
    candidate: dict[str, Any], policy: dict[str, Any], champion: dict[str, Any] | None
) -> tuple[bool, list[str]]:
    """Apply ``policy`` to ``candidate`` metrics (``{split: {metric: v}}``).

    Returns:
        (passed, reasons): one reason line per check, prefixed ``PASS`` or ``FAIL``. A metric missing
        from the candidate fails its check. Regression direction uses
        :data:`troupe.evaluate.LOWER_IS_BETTER`.
    """
    from troupe.evaluate import LOWER_IS_BETTER

    reasons, ok = [], True
    for key, rule in (policy.get("absolute") or {}).items():
        v = _get(candidate, key)
        for bound, op, sym in (("min", operator.ge, ">="), ("max", operator.le, "<=")):
            if bound not in rule:
                continue
            good = v is not None and op(v, float(rule[bound]))
            ok &= good
            reasons.append(
                f"{'PASS' if good else 'FAIL'} {key} = {v if v is None else round(v, 4)} {sym} {rule[bound]}"
            )
    nr = policy.get("no_regression") or {}
    if champion is None:
        reasons.append("PASS no champion yet: regression check skipped")
    else:
        slack = float(nr.get("max_regression", 0.0))
        for key in nr.get("metrics", []):
            v, c = _get(candidate, key), _get(champion, key)
            if c is None:
                reasons.append(f"PASS {key}: champion has no value")
                continue
            lower = key.split(".")[-1] in LOWER_IS_BETTER
            good = v is not None and (v <= c + slack if lower else v >= c - slack)
            ok &= good
            reasons.append(f"{'PASS' if good else 'FAIL'} {key} = {v} vs champion {c} (slack {slack})")
    return ok, reasons


def _client():
    import mlflow

    from troupe.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def _champion_metrics(client, name: str) -> tuple[str | None, dict[str, Any] | None]:
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    raw = mv.tags.get("troupe.metrics")
    return mv.version, json.loads(raw) if raw else None


def register(params: dict[str, Any]) -> dict[str, Any]:
    """Log, register and gate the candidate model; returns the decision dict (also written to disk).

    Raises:
        ConfigError: missing metrics.json / candidate model / policy.
    """
    import mlflow

    from troupe.tracking import step_run

    reg = section(params, "registry")
    policy = load_policy(reg.get("gate_policy", "configs/gate_policy.yaml"))
    cand_name = policy.get("candidate", "dpo")
    metrics_file = path_of(params, "eval") / "metrics.json"
    if not metrics_file.is_file():
        raise ConfigError(f"{metrics_file}: not found (run `troupe evaluate` first)")
    all_metrics = json.loads(metrics_file.read_text())
    if cand_name not in all_metrics:
        raise ConfigError(f"{metrics_file}: no metrics for candidate {cand_name!r} (gate policy `candidate`)")
    model_dir = path_of(params, _MODEL_KEY[cand_name])
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: candidate model directory not found")
    out = path_of(params, "registry")
    out.mkdir(parents=True, exist_ok=True)
    name = reg.get("model_name", "troupe-roleplay")
    client = _client()
    champ_version, champ_metrics = _champion_metrics(client, name)
    passed, reasons = gate(all_metrics[cand_name], policy, champ_metrics)
    with step_run(params, "register", ("registry",)) as run:
        mlflow.log_artifacts(str(model_dir), artifact_path="model")
        mlflow.log_dict(all_metrics, "metrics.json")
        if not _exists(client, name):
            client.create_registered_model(name, description="Troupe role-play character model")
        mv = client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/model",
            run_id=run.info.run_id,
            tags={"troupe.candidate": cand_name, "troupe.metrics": json.dumps(all_metrics[cand_name])[:5000]},
        )
        decision = {
            "model_name": name,
            "version": mv.version,
            "candidate": cand_name,
            "passed": passed,
            "reasons": reasons,
            "champion_version": champ_version,
            "run_id": run.info.run_id,
            "alias": CHALLENGER if passed else None,
        }
        client.set_model_version_tag(name, mv.version, "troupe.gate", "passed" if passed else "failed")
        client.set_model_version_tag(name, mv.version, "troupe.gate_reasons", "\n".join(reasons)[:5000])
        mlflow.set_tags({"troupe.gate": "passed" if passed else "failed", "troupe.model_version": mv.version})
        if passed:
            client.set_registered_model_alias(name, CHALLENGER, mv.version)
        md = [
            f"# Gate decision: {'PASSED' if passed else 'FAILED'}",
            "",
            f"Model `{name}` version {mv.version} ({cand_name}); champion: {champ_version or 'none'}.",
            "",
        ]
        md += [f"- {r}" for r in reasons]
        md += ["", f"Alias `{CHALLENGER}` set." if passed else "No alias set."]
        (out / "gate.md").write_text("\n".join(md) + "\n")
        (out / "decision.json").write_text(json.dumps(decision, indent=2))
        mlflow.log_artifact(str(out / "gate.md"))
    click.echo("\n".join(md))
    return decision


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def promote(name: str, version: str | None = None, alias: str = CHAMPION) -> str:
    """Point ``alias`` (default ``champion``) at ``version`` (default: the ``challenger`` version).

    Raises:
        ConfigError: no version given and no ``challenger`` alias exists, or unknown version.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        if version is None:
            version = client.get_model_version_by_alias(name, CHALLENGER).version
        client.get_model_version(name, version)
    except MlflowException as e:
        raise ConfigError(f"model {name!r}: cannot promote ({e.message}); pass --version") from e
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "troupe.promoted_to", alias)
    return str(version)


def resolve_model_dir(uri: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local checkpoint directory for ``uri``.

    Args:
        uri: a local directory, or ``models:/<name>@<alias>`` / ``models:/<name>/<version>``.
        tracking_uri: MLflow tracking URI (default: env / local SQLite, see :mod:`troupe.tracking`).
        cache_dir: where downloaded artifacts go (default ``~/.cache/troupe/models/<name>/<version>``).

    Raises:
        ConfigError: unknown alias/version, or a non-existent local path.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        p = Path(uri)
        if not p.is_dir():
            raise ConfigError(f"{uri}: model directory not found")
        return p
    from troupe.tracking import tracking_uri as default_uri

    mlflow.set_tracking_uri(tracking_uri or default_uri())
    client = mlflow.MlflowClient()
    ref = uri[len("models:/") :]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except MlflowException as e:
        raise ConfigError(f"{uri}: {e.message}") from e
    dst = Path(cache_dir or Path.home() / ".cache" / "troupe" / "models") / name / str(mv.version)

    def checkpoint() -> Path | None:
        # the artifact directory is named "model", so a download lands in <dst>/model
        return next((d for d in (dst / "model", dst) if (d / "config.json").is_file()), None)

    if (cached := checkpoint()) is not None:
        return cached  # no second download
    dst.mkdir(parents=True, exist_ok=True)
    mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst))
    if (local := checkpoint()) is None:
        raise ConfigError(f"{uri}: downloaded artifacts hold no config.json under {dst}")
    return local


@click.group("registry")
def registry_cli() -> None:
    """MLflow registry: register + gate, promote."""


@registry_cli.command("register")
@step_options
def register_cmd(params: dict) -> None:
    """Log + register the candidate, apply the gate policy, set alias challenger on pass."""
    register(params)


@registry_cli.command("promote")
@click.option("--name", default=None, help="registered model name (default: registry.model_name)")
@click.option("--version", default=None, help="version to promote (default: the challenger)")
@click.option("--alias", default=CHAMPION, show_default=True)
@step_options
def promote_cmd(params: dict, name: str | None, version: str | None, alias: str) -> None:
    """Move an alias (default champion) to a version (default: the current challenger)."""
    name = name or params.get("registry", {}).get("model_name", "troupe-roleplay")
    v = promote(name, version, alias)
    click.echo(f"{name}: alias {alias} -> version {v}")
