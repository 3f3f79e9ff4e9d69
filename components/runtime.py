"""What every KFP component does around its one ``troupe`` step: params file, artifact paths, pointers.

Imported inside the component functions (the Troupe image ships this package), never at pipeline
compile time, so it stays free of kfp imports.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

#: File written into a (small) artifact directory when the real data lives on shared storage (an S3
#: URI every pod can reach): it holds that location. Downstream components follow it.
POINTER = "TROUPE_LOCATION"


def resolve(artifact_path: str) -> str:
    """The location a step should read for an input artifact: the pointer target (a URI) or the path itself."""
    p = Path(artifact_path) / POINTER
    return p.read_text(encoding="utf-8").strip() if p.is_file() else artifact_path


def run_step(argv: list[str], params_yaml: str, paths: dict[str, str] | None = None) -> None:
    """Run ``troupe <argv> --params <tmp> --set paths.<k>=<v> ...`` in-process.

    Args:
        argv: subcommand words, e.g. ``["data", "validate"]``.
        params_yaml: the whole params file as YAML text (the pipeline's ``params_yaml`` after overrides).
        paths: ``paths.*`` entries to override, e.g. ``{"imported": in_ds.path}``.

    Raises:
        SystemExit: the step failed (``troupe.cli.main`` exits non-zero); KFP marks the task failed.
    """
    from troupe.cli import main

    with tempfile.TemporaryDirectory(prefix="troupe-params-") as d:
        pfile = Path(d) / "params.yaml"
        pfile.write_text(params_yaml, encoding="utf-8")
        sets = [x for k, v in (paths or {}).items() for x in ("--set", f"paths.{k}={v}")]
        main([*argv, "--params", str(pfile), *sets])


def merge_overrides(params_yaml: str, overrides: dict[str, Any]) -> str:
    """Apply dotted-key overrides whose value is not "unset" (None, "" or a negative number).

    Returns the new params YAML text, validated by the params model (:func:`troupe.params.resolve`,
    defaults filled in): a bad pipeline argument fails the first task, naming the key. Used by the
    pipeline's first task so every later task reads one resolved params document.
    """
    from troupe.params import resolve as resolve_params

    params = yaml.safe_load(params_yaml) or {}
    if not isinstance(params, dict):
        raise ValueError("params_yaml: top level must be a mapping")
    for key, value in overrides.items():
        if (
            value is None
            or value == ""
            or (isinstance(value, int | float) and not isinstance(value, bool) and value < 0)
        ):
            continue
        node = params
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value) if isinstance(value, str) else value
    params = resolve_params(params, source="params_yaml (pipeline arguments)")
    return yaml.safe_dump(params, sort_keys=False, allow_unicode=True)


def fetch_data(params_yaml: str, repo: str, rev: str, remote: str, dest: str) -> str:
    """Fetch each path of the selected source set (``data.source_sets[data.source_set]``) from a DVC repository at ``rev`` into ``dest``.

    Empty ``repo`` returns ``params_yaml`` unchanged (sources are read from the working directory, as
    in ``dvc repro``). Otherwise every source path is fetched with ``dvc get``'s API
    (``dvc.repo.Repo.get``, from ``remote`` when given) and rewritten to its fetched copy.

    Returns:
        params YAML text with the rewritten source paths.
    """
    if not repo:
        return params_yaml
    from dvc.repo import Repo

    params = yaml.safe_load(params_yaml)
    from troupe.data.importers import selected_sources

    for i, src in enumerate(selected_sources(params)):
        out = Path(dest) / f"source{i}" / Path(src["path"]).name
        out.parent.mkdir(parents=True, exist_ok=True)
        Repo.get(repo, src["path"], out=str(out), rev=rev or None, remote=remote or None)
        src["path"] = str(out)
    return yaml.safe_dump(params, sort_keys=False, allow_unicode=True)


def rayjob_release(run_id: str) -> str:
    """Helm-style release name of a pipeline run's training RayJobs (``<release>-sft``, ``-dpo``).

    One name per run, the same on every retry of the task: a retried task adopts its RayJob and a
    resubmitted RayJob resumes from the run's checkpoints. DNS-1123, at most 50 characters.
    """
    import re

    slug = re.sub(r"[^a-z0-9-]+", "-", str(run_id).lower()).strip("-") or "run"
    return f"troupe-{slug}"[:50].rstrip("-")


def publish_inputs(paths: dict[str, str], root: str) -> dict[str, str]:
    """Inputs every Ray pod can read: local artifact dirs uploaded under ``root`` (a URI); URIs kept.

    A KFP artifact path (``/minio/...``, ``/gcs/...``) exists only in the task's pod; the RayJob's
    driver and workers run in other pods, so each local input is copied to ``<root>/<key>`` first.
    """
    from troupe import storage

    return {
        k: v if storage.is_remote(v) else storage.upload(v, storage.join(root, k)) for k, v in paths.items()
    }


def train_step(
    step: str,
    params_yaml: str,
    paths: dict[str, str],
    out_key: str,
    out_path: str,
    kubernetes: bool,
    storage_root: str,
    run_id: str,
    namespace: str = "default",
    chart_env: str = "prod",
    chart_sets: list[str] | None = None,
) -> str:
    """Run ``troupe train <step>`` in-process, or on Kubernetes as a KubeRay RayJob through ``troupe rayjob submit``.

    On the RayJob path (created in ``namespace``, chart values ``values-<chart_env>.yaml`` plus
    ``chart_sets``) every location the job touches is a URI under ``<storage_root>/troupe-<run_id>``
    (:func:`rayjob_release`): the
    inputs (uploaded by :func:`publish_inputs`), the output model and the checkpoints; the KFP
    artifact gets only a :data:`POINTER` file holding the output URI. ``run_id`` (the KFP run id) is
    the run's identity (``TROUPE_PIPELINE_RUN``, ``run.id``): a retried task or RayJob resumes.

    Returns:
        the location (path or URI) that holds the step's output.
    """
    if not kubernetes:
        run_step(["train", step], params_yaml, {**paths, out_key: out_path})
        return out_path
    import os

    from troupe import storage

    if not storage.is_remote(storage_root):
        raise ValueError(
            f"storage_root={storage_root!r}: RayJob pods need a URI every pod can reach (s3://...)"
        )
    os.environ["TROUPE_PIPELINE_RUN"] = run_id
    root = storage.join(storage_root, rayjob_release(run_id))
    target = storage.join(root, out_key)
    sets = [f"checkpoints.s3Uri={storage.join(root, 'checkpoints')}", f"run.id={run_id}", *(chart_sets or [])]
    argv = ["rayjob", "submit", "--step", step, "--namespace", namespace, "--release", rayjob_release(run_id)]
    argv += ["--env", chart_env] + [x for s in sets for x in ("--chart-set", s)]
    run_step(argv, params_yaml, {**publish_inputs(paths, storage.join(root, "inputs")), out_key: target})
    Path(out_path).mkdir(parents=True, exist_ok=True)
    (Path(out_path) / POINTER).write_text(target, encoding="utf-8")
    return target


def train_step_artifacts(
    step: str,
    params_yaml: str,
    inputs: dict[str, Any],
    model: Any,
    kubernetes: bool,
    storage_root: str,
    run_id: str,
    namespace: str = "default",
    chart_env: str = "prod",
    chart_sets: list[str] | None = None,
) -> str:
    """:func:`train_step` for a train component: input artifacts in, ``<step>_model`` artifact out.

    Resolves each input artifact (``paths.<key>`` -> :func:`resolve`), writes the output to ``model``
    (a KFP ``Output[Model]``) and records where it went in ``model.metadata["location"]``.

    Returns:
        the location that holds the step's output.
    """
    paths = {k: resolve(a.path) for k, a in inputs.items()}
    where = train_step(
        step, params_yaml, paths, f"{step}_model", model.path, kubernetes, storage_root, run_id,
        namespace, chart_env, chart_sets,
    )  # fmt: skip
    model.metadata["location"] = where
    return where


def numeric_items(d: Any, prefix: str = "") -> dict[str, float]:
    """Flatten nested dicts to ``a.b -> float`` for every int/float leaf (bools excluded)."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(numeric_items(v, f"{prefix}{k}."))
    elif isinstance(d, int | float) and not isinstance(d, bool):
        out[prefix[:-1]] = float(d)
    return out


def gate_passed(decision: dict[str, Any]) -> bool:
    """Read a gate ``decision.json``: ``status`` ``pass`` (Troupe's three-way gate: pass | fail |
    insufficient), else ``passed``/``approved``/``promote`` true, or ``decision`` in
    promote|pass|passed|approve|approved."""
    if isinstance(decision.get("status"), str):
        return decision["status"] == "pass"
    for key in ("passed", "approved", "promote"):
        if isinstance(decision.get(key), bool):
            return decision[key]
    return str(decision.get("decision", "")).lower() in {"promote", "pass", "passed", "approve", "approved"}
