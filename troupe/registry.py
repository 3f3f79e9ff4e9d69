"""MLflow model registry: register the candidate, gate it, move aliases.

* ``troupe registry register`` creates a registered model version of the candidate
  (``paths.dpo_model`` by default) in a child run ``register``: a model given by URI
  (``s3://bucket/run/dpo``, written by training) is registered from that URI as it is (no second
  copy); a local directory (``dvc repro``) is logged as the run's ``model`` artifacts first. The
  characters the model was trained and evaluated with (``paths.splits/characters.jsonl``) travel
  with the version: logged as the run's ``characters.jsonl`` artifact and named by the version tags
  ``troupe.characters_uri`` / ``troupe.characters_sha256`` (:mod:`serving.contract`). The gate
  policy (absolute thresholds + no regression vs the ``champion`` alias) decides; on a pass alias
  ``challenger`` is set. Decision and reasons are version tags and ``paths.registry`` files
  (``decision.json``, ``gate.md``).
* ``troupe registry promote`` moves ``champion`` (default: to the current ``challenger``).
* :func:`resolve_model_dir` turns ``models:/name@alias`` / ``models:/name/<n>`` (or a local dir) into
  a local checkpoint dir, downloading from the version's source (``s3://`` or MLflow artifacts);
  :func:`characters_file` downloads only a version's characters.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import operator
import os
import shutil
from pathlib import Path
from typing import Any

import click
import yaml

from serving import contract
from troupe.cli import step_options
from troupe.config import ConfigError, path_of, repo_path, section

CHALLENGER, CHAMPION = "challenger", "champion"
_MODEL_KEY = {"base": "base_model", "sft": "sft_model", "dpo": "dpo_model"}


def load_policy(path: str | Path) -> dict[str, Any]:
    """Read a gate policy YAML (see configs/gate_policy.yaml); ConfigError naming the file/field."""
    p = repo_path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: gate policy not found (registry.gate_policy)")
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


def _location(params: dict[str, Any], key: str) -> str:
    """``paths.<key>`` as given: a local path or a URI such as ``s3://bucket/run/dpo``."""
    paths = section(params, "paths")
    if not paths.get(key):
        raise ConfigError(f"params: missing paths.{key}")
    return str(paths[key])


def register(params: dict[str, Any]) -> dict[str, Any]:
    """Register and gate the candidate model with its characters; returns the decision dict (also
    written to ``paths.registry``).

    Raises:
        ConfigError: missing metrics.json / candidate model / characters / policy (storage errors
            name the location and the reason before anything is registered).
    """
    import mlflow

    from troupe import storage
    from troupe.tracking import step_run

    reg = section(params, "registry")
    policy = load_policy(reg.get("gate_policy", "configs/gate_policy.yaml"))
    cand_name = policy.get("candidate", "dpo")
    metrics_loc = storage.join(_location(params, "eval"), "metrics.json")
    if not storage.exists(metrics_loc):
        raise ConfigError(f"{metrics_loc}: not found (run `troupe evaluate` first)")
    all_metrics = json.loads(storage.read_text(metrics_loc))
    if cand_name not in all_metrics:
        raise ConfigError(f"{metrics_loc}: no metrics for candidate {cand_name!r} (gate policy `candidate`)")
    model_loc = _location(params, _MODEL_KEY[cand_name])
    storage.check_readable(model_loc, f"paths.{_MODEL_KEY[cand_name]} (candidate model)", kind="dir")
    if not storage.exists(storage.join(model_loc, "config.json")):
        raise ConfigError(f"{model_loc}: no config.json (not a model checkpoint directory)")
    chars_loc = storage.join(_location(params, "splits"), contract.CHARACTERS_FILE)
    storage.check_readable(chars_loc, "paths.splits/characters.jsonl (characters of the model)", kind="file")
    chars_text = storage.read_text(chars_loc)
    chars_sha = hashlib.sha256(chars_text.encode("utf-8")).hexdigest()
    out = path_of(params, "registry")
    out.mkdir(parents=True, exist_ok=True)
    name = reg.get("model_name", "troupe-roleplay")
    client = _client()
    champ_version, champ_metrics = _champion_metrics(client, name)
    passed, reasons = gate(all_metrics[cand_name], policy, champ_metrics)
    with step_run(params, "register", ("registry",)) as run:
        if storage.is_remote(model_loc):
            source = model_loc.rstrip("/")  # MLflow registers the model from its URI; no copy
        else:
            mlflow.log_artifacts(str(model_loc), artifact_path="model")
            source = f"{run.info.artifact_uri}/model"
        mlflow.log_text(chars_text, contract.CHARACTERS_FILE)
        mlflow.log_dict(all_metrics, "metrics.json")
        if not _exists(client, name):
            client.create_registered_model(name, description="Troupe role-play character model")
        mv = client.create_model_version(
            name,
            source=source,
            run_id=run.info.run_id,
            tags={
                "troupe.candidate": cand_name,
                "troupe.metrics": json.dumps(all_metrics[cand_name])[:5000],
                contract.CHARACTERS_URI_TAG: f"{run.info.artifact_uri}/{contract.CHARACTERS_FILE}",
                contract.CHARACTERS_SHA256_TAG: chars_sha,
            },
        )
        decision = {
            "model_name": name,
            "version": mv.version,
            "model_uri": contract.model_version_uri(name, mv.version),
            "source": source,
            "characters_sha256": chars_sha,
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
            f"Model `{name}` version {mv.version} ({cand_name}) from `{source}`; champion: {champ_version or 'none'}.",
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


def model_version(uri: str, tracking_uri: str | None = None):
    """The MLflow ``ModelVersion`` named by ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.

    Raises:
        ConfigError: not a ``models:/`` URI, or an unknown alias/version (MLflow's message).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from troupe.tracking import tracking_uri as default_uri

    if not uri.startswith("models:/"):
        raise ConfigError(f"{uri}: not a models:/<name>/<version> or models:/<name>@<alias> URI")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri or default_uri())
    ref = uri[len("models:/") :]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, version = ref.rsplit("/", 1)
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise ConfigError(f"{uri}: {e.message}") from e


def model_source(uri: str, tracking_uri: str | None = None) -> str:
    """Where a model's weights are: the version's source URI for ``models:/``, else ``uri`` itself."""
    return str(model_version(uri, tracking_uri).source) if uri.startswith("models:/") else uri


def _cache_root(cache_dir: str | Path | None) -> Path:
    """Download root: ``cache_dir``, else ``$TROUPE_SCRATCH/models`` (this node's scratch), else
    ``~/.cache/troupe/models``."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("TROUPE_SCRATCH"):
        return Path(os.environ["TROUPE_SCRATCH"]) / "models"
    return Path.home() / ".cache" / "troupe" / "models"


def characters_file(uri: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The characters stored with a registered version, downloaded alone (not the weights).

    Args:
        uri: ``models:/<name>/<version>`` or ``models:/<name>@<alias>``.
        tracking_uri: MLflow tracking URI.
        cache_dir: download root (default ``~/.cache/troupe/models``); a file whose SHA-256 matches
            the version's tag is reused.

    Raises:
        ConfigError: the version carries no characters (registered before characters travelled with
            versions: register it again) or they cannot be downloaded.
    """
    import mlflow

    mv = model_version(uri, tracking_uri)
    src = mv.tags.get(contract.CHARACTERS_URI_TAG)
    if not src:
        raise ConfigError(
            f"{uri} (version {mv.version}): no {contract.CHARACTERS_URI_TAG} tag; the version carries no "
            "characters (register it with `troupe registry register`, or set 'characters' in the serving config)"
        )
    dst = _cache_root(cache_dir) / mv.name / str(mv.version) / "characters"
    local = dst / contract.CHARACTERS_FILE
    sha = mv.tags.get(contract.CHARACTERS_SHA256_TAG)
    if local.is_file() and sha and hashlib.sha256(local.read_bytes()).hexdigest() == sha:
        return local
    dst.mkdir(parents=True, exist_ok=True)
    from troupe.tracking import tracking_uri as default_uri

    mlflow.set_tracking_uri(tracking_uri or default_uri())
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=src, dst_path=str(dst)))
    except Exception as e:
        raise ConfigError(f"{uri}: characters {src} cannot be downloaded: {e}") from e
    if sha and hashlib.sha256(got.read_bytes()).hexdigest() != sha:
        raise ConfigError(f"{uri}: characters {src} do not match {contract.CHARACTERS_SHA256_TAG}={sha}")
    return got


def resolve_model_dir(uri: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local checkpoint directory for ``uri``.

    Args:
        uri: a local directory, or ``models:/<name>@<alias>`` / ``models:/<name>/<version>``; the
            version's source (``s3://...`` or MLflow run artifacts) is downloaded once.
        tracking_uri: MLflow tracking URI (default: env / local SQLite, see :mod:`troupe.tracking`).
        cache_dir: where downloaded artifacts go (default ``~/.cache/troupe/models/<name>/<version>``).

    Raises:
        ConfigError: unknown alias/version, or a non-existent local path.
    """
    import mlflow

    if not uri.startswith("models:/"):
        p = Path(uri)
        if not p.is_dir():
            raise ConfigError(f"{uri}: model directory not found")
        return p
    from troupe.tracking import tracking_uri as default_uri

    mv = model_version(uri, tracking_uri)
    dst = _cache_root(cache_dir) / mv.name / str(mv.version) / "weights"
    marker = dst / ".troupe-source"  # what the cached copy was downloaded from

    def checkpoint() -> Path | None:
        # a download lands in <dst>/<last part of the source> (e.g. <dst>/model or <dst>/dpo)
        cands = [dst, *sorted(d for d in dst.iterdir() if d.is_dir())]
        return next((d for d in cands if (d / "config.json").is_file()), None)

    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / ".lock", "w") as lock:  # replicas of one version on one node download once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == str(mv.source) and (cached := checkpoint()) is not None:
            return cached  # no second download
        shutil.rmtree(dst, ignore_errors=True)  # a stale copy (another registry's version of that number)
        dst.mkdir(parents=True)
        mlflow.set_tracking_uri(tracking_uri or default_uri())
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=str(mv.source), dst_path=str(dst))
        except Exception as e:
            raise ConfigError(f"{uri}: model source {mv.source} cannot be downloaded: {e}") from e
        if (local := checkpoint()) is None:
            raise ConfigError(f"{uri}: downloaded artifacts of {mv.source} hold no config.json under {dst}")
        marker.write_text(str(mv.source))
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
