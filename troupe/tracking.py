"""MLflow tracking: one parent run per pipeline run, one child run per step.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else a local SQLite store ``sqlite:///mlflow.db`` with
artifacts under ``./mlartifacts`` (what ``mlflow server`` / ``mlflow ui`` in the repo root shows).

A pipeline run is identified by ``TROUPE_PIPELINE_RUN`` (KFP sets it to its run id) or, for
``dvc repro``, by a hash of params.yaml without ``paths`` plus the data hash: stages of one
``dvc repro`` with the same parameters and data share one parent; changing either starts a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """The MLflow tracking URI in effect (env ``MLFLOW_TRACKING_URI`` or the local SQLite default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # absolute, so Ray workers (other working directories) write to the same database
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def _setup(experiment: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(experiment) is None:
        loc = None
        if tracking_uri().startswith("sqlite:"):
            loc = Path("mlartifacts").resolve().as_uri()
        mlflow.create_experiment(experiment, artifact_location=loc)
    mlflow.set_experiment(experiment)
    return mlflow


def data_hash(params: dict[str, Any]) -> str:
    """DVC hash of the imported data (``dvc.lock`` outs of stage ``import``), else a content hash.

    Returns ``"unknown"`` when neither is available (e.g. the step runs before import).
    """
    lock = Path("dvc.lock")
    imported = str(params.get("paths", {}).get("imported", ""))
    if lock.is_file():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("import", {}).get("outs", []):
            if out.get("path") == imported:
                return str(out.get("md5"))
    d = Path(imported)
    if d.is_dir():
        h = hashlib.md5()
        for f in sorted(d.glob("*.jsonl")):
            h.update(f.read_bytes())
        return h.hexdigest()
    return "unknown"


def pipeline_run_key(params: dict[str, Any]) -> str:
    """Key grouping the steps of one pipeline run (see module docstring)."""
    env = os.environ.get("TROUPE_PIPELINE_RUN")
    if env:
        return env
    p = {k: v for k, v in params.items() if k != "paths"}
    blob = json.dumps(p, sort_keys=True, default=str) + data_hash(params)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists JSON-encoded) for ``mlflow.log_params``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v
    return out


def parent_run_id(params: dict[str, Any]) -> str:
    """Find or create the parent run for this pipeline run; returns its run id."""
    experiment = params.get("registry", {}).get("experiment", "troupe")
    mlflow = _setup(experiment)
    key = pipeline_run_key(params)
    found = mlflow.search_runs(
        filter_string=f"tags.`troupe.pipeline_run` = '{key}' and tags.`troupe.role` = 'pipeline'",
        max_results=1,
        output_format="list",
    )
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(experiment)
    run = client.create_run(
        exp.experiment_id,
        run_name=f"pipeline-{key}",
        tags={"troupe.pipeline_run": key, "troupe.role": "pipeline", "troupe.data_hash": data_hash(params)},
    )
    for k, v in list(flatten({k: v for k, v in params.items() if k != "paths"}).items())[:100]:
        client.log_param(run.info.run_id, k, str(v)[:500])
    client.set_terminated(run.info.run_id, "RUNNING")
    return run.info.run_id


@contextmanager
def step_run(params: dict[str, Any], step: str, log_sections: tuple[str, ...] = ()) -> Iterator[Any]:
    """Context manager: a child MLflow run named ``step`` under the pipeline's parent run.

    Logs ``params[section]`` for each of ``log_sections`` and the data hash tag. Yields the active run.
    """
    pid = parent_run_id(params)
    experiment = params.get("registry", {}).get("experiment", "troupe")
    mlflow = _setup(experiment)
    with mlflow.start_run(run_name=step, parent_run_id=pid, nested=True) as run:
        mlflow.set_tags(
            {
                "troupe.step": step,
                "troupe.pipeline_run": pipeline_run_key(params),
                "troupe.data_hash": data_hash(params),
            }
        )
        flat: dict[str, Any] = {}
        for s in log_sections:
            flat.update(flatten(params.get(s, {}), s + "."))
        if flat:
            mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
        yield run
