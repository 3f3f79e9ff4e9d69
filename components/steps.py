"""KFP v2 lightweight components: one per ``troupe`` step, calling the same CLI as ``dvc.yaml``.

Each component writes the pipeline's resolved params YAML to a temp file and runs the step
in-process (``troupe.cli.main``) with its artifact paths as ``--set paths.<key>=...`` overrides, so a
Kubeflow run and ``dvc repro`` execute the same code with the same parameters. Artifacts are typed
so the Kubeflow UI renders them: Dataset, Model, Metrics, HTML (Data Docs, eval report), Markdown
(gate decision). Helpers live in :mod:`components.runtime` (shipped in the image with ``troupe``).

The image is ``TROUPE_IMAGE`` (environment variable at compile time; default below). It must contain
``troupe`` with its dependencies and ``kfp``, so no pip install happens at run time.
"""

import os

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

TROUPE_IMAGE = os.environ.get("TROUPE_IMAGE", "ghcr.io/troupe-ml/troupe:0.1.0-cpu")


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def resolve_params(
    params_yaml: str,
    base_model: str,
    accelerator: str,
    nodes: int,
    devices_per_node: int,
    zero_stage: int,
    offload: str,
    sft_max_steps: int,
    sft_learning_rate: float,
    sft_per_device_batch_size: int,
    dpo_max_steps: int,
    dpo_learning_rate: float,
    dpo_beta: float,
    gate_policy: str,
    synthesize: bool = False,
) -> str:
    """Apply the pipeline's individual overrides ("" / negative = keep the params file's value;
    ``synthesize`` True turns ``synthesis.enabled`` on, False keeps the params file's value)."""
    from components.runtime import merge_overrides

    workers = nodes * devices_per_node if nodes > 0 and devices_per_node > 0 else -1
    return merge_overrides(
        params_yaml,
        {
            "model.base": base_model,
            "train.accelerator": accelerator,
            "train.nodes": nodes,
            "train.devices_per_node": devices_per_node,
            "train.num_workers": workers,
            "train.zero_stage": zero_stage,
            "train.offload": offload,
            "sft.max_steps": sft_max_steps,
            "sft.learning_rate": sft_learning_rate,
            "sft.per_device_batch_size": sft_per_device_batch_size,
            "dpo.max_steps": dpo_max_steps,
            "dpo.learning_rate": dpo_learning_rate,
            "dpo.beta": dpo_beta,
            "registry.gate_policy": gate_policy,
            "synthesis.enabled": True if synthesize else "",
        },
    )


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def data_synthesize(params_yaml: str, synthetic: Output[Dataset]):
    """``troupe data synthesize``: dialogue-engine conversations (agents.user/character/host) as a
    ``synthetic`` import source. With ``synthesis.enabled`` false (the pipeline's ``synthesize``
    parameter off, the default) it calls no agent and writes an empty source: the task always runs
    because a later task cannot consume an artifact made under a ``dsl.If`` (``dsl.OneOf`` artifacts
    do not run on ``kfp.local``)."""
    import json
    from pathlib import Path

    from components.runtime import run_step

    run_step(["data", "synthesize"], params_yaml, {"synthetic": synthetic.path})
    summary = json.loads((Path(synthetic.path) / "summary.json").read_text(encoding="utf-8"))
    synthetic.metadata.update(
        {k: summary[k] for k in ("status", "finished", "failed", "cost_usd") if k in summary}
    )


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def data_import(
    params_yaml: str,
    data_repo: str,
    data_rev: str,
    dvc_remote: str,
    synthetic: Input[Dataset],
    imported: Output[Dataset],
):
    """``troupe data import`` (sources fetched from ``data_repo`` at DVC revision ``data_rev`` when set;
    plus the ``synthetic`` source when ``synthesis.enabled``)."""
    import tempfile

    from components.runtime import fetch_data, resolve, run_step

    with tempfile.TemporaryDirectory(prefix="troupe-data-") as d:
        params = fetch_data(params_yaml, data_repo, data_rev, dvc_remote, d)
        run_step(
            ["data", "import"], params, {"imported": imported.path, "synthetic": resolve(synthetic.path)}
        )
    imported.metadata.update({"data_repo": data_repo, "data_rev": data_rev})


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def data_validate(
    params_yaml: str,
    imported: Input[Dataset],
    base_model: Input[Model],
    validated: Output[Dataset],
    data_docs: Output[HTML],
    validation_metrics: Output[Metrics],
):
    """``troupe data validate`` (token lengths with the base model's tokenizer); Great Expectations
    Data Docs as HTML, report.json numbers as Metrics."""
    import json
    import shutil
    from pathlib import Path

    from components.runtime import numeric_items, resolve, run_step

    run_step(
        ["data", "validate"],
        params_yaml,
        {
            "imported": resolve(imported.path),
            "base_model": resolve(base_model.path),
            "validated": validated.path,
        },
    )
    index = Path(validated.path) / "data_docs" / "index.html"
    if index.is_file():
        shutil.copyfile(index, data_docs.path)
    else:
        Path(data_docs.path).write_text("<p>no Data Docs written</p>", encoding="utf-8")
    report = Path(validated.path) / "report.json"
    if report.is_file():
        for k, v in numeric_items(json.loads(report.read_text(encoding="utf-8"))).items():
            validation_metrics.log_metric(k, v)


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def data_split(params_yaml: str, validated: Input[Dataset], splits: Output[Dataset]):
    """``troupe data split``: train / held-out dialogues / held-out characters."""
    from components.runtime import resolve, run_step

    run_step(["data", "split"], params_yaml, {"validated": resolve(validated.path), "splits": splits.path})


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def model_prepare(params_yaml: str, base_model: Output[Model]):
    """``troupe model prepare``: materialise the base model as a plain HF checkpoint directory."""
    import yaml

    from components.runtime import run_step

    run_step(["model", "prepare"], params_yaml, {"base_model": base_model.path})
    base_model.metadata["base"] = str((yaml.safe_load(params_yaml) or {}).get("model", {}).get("base", ""))


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def train_sft(
    params_yaml: str,
    splits: Input[Dataset],
    base_model: Input[Model],
    sft_model: Output[Model],
    kubernetes: bool = False,
    storage_root: str = "",
    run_id: str = "",
    rayjob_namespace: str = "default",
    rayjob_env: str = "prod",
    rayjob_values: list = [],  # noqa: B006 - KFP parameter default
):
    """``troupe train sft`` in-process, or on Kubernetes as a KubeRay RayJob (inputs/outputs under ``storage_root``)."""
    from components.runtime import train_step_artifacts

    inputs = {"splits": splits, "base_model": base_model}
    train_step_artifacts("sft", params_yaml, inputs, sft_model, kubernetes, storage_root, run_id,
                         rayjob_namespace, rayjob_env, rayjob_values)  # fmt: skip


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def train_pairs(
    params_yaml: str,
    splits: Input[Dataset],
    sft_model: Input[Model],
    base_model: Input[Model],
    pairs: Output[Dataset],
):
    """``troupe train pairs``: DPO preference pairs sampled from the SFT model (in-process)."""
    from components.runtime import resolve, run_step

    paths = {
        "splits": resolve(splits.path),
        "sft_model": resolve(sft_model.path),
        "base_model": resolve(base_model.path),
        "pairs": pairs.path,
    }
    run_step(["train", "pairs"], params_yaml, paths)


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def train_dpo(
    params_yaml: str,
    splits: Input[Dataset],
    pairs: Input[Dataset],
    sft_model: Input[Model],
    dpo_model: Output[Model],
    kubernetes: bool = False,
    storage_root: str = "",
    run_id: str = "",
    rayjob_namespace: str = "default",
    rayjob_env: str = "prod",
    rayjob_values: list = [],  # noqa: B006 - KFP parameter default
):
    """``troupe train dpo`` in-process, or on Kubernetes as a KubeRay RayJob (inputs/outputs under
    ``storage_root``); the splits carry the persona cards each pair's prompt is rendered with."""
    from components.runtime import train_step_artifacts

    inputs = {"splits": splits, "pairs": pairs, "sft_model": sft_model}
    train_step_artifacts("dpo", params_yaml, inputs, dpo_model, kubernetes, storage_root, run_id,
                         rayjob_namespace, rayjob_env, rayjob_values)  # fmt: skip


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def evaluate(
    params_yaml: str,
    splits: Input[Dataset],
    base_model: Input[Model],
    sft_model: Input[Model],
    dpo_model: Input[Model],
    eval_dir: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
):
    """``troupe evaluate``: each estimate of metrics.json as Metrics (``model.split.metric`` with
    ``.lo``, ``.hi``, ``.n``), report.html as HTML. The base model is scored in this step (no
    ``paths.eval_base`` stage result to reuse on KFP)."""
    import math
    import shutil
    from pathlib import Path

    from components.runtime import resolve, run_step
    from troupe.eval_contract import EvalResult

    run_step(
        ["evaluate"],
        params_yaml,
        {
            "splits": resolve(splits.path),
            "base_model": resolve(base_model.path),
            "sft_model": resolve(sft_model.path),
            "dpo_model": resolve(dpo_model.path),
            "eval": eval_dir.path,
            "eval_base": "",
        },
    )
    result = EvalResult.read(Path(eval_dir.path), with_samples=False)
    for model, splits in result.metrics.items():
        for split, ms in splits.items():
            for name, e in ms.items():
                for suffix, v in (("", e.value), (".lo", e.lo), (".hi", e.hi), (".n", float(e.n))):
                    if not math.isnan(v):
                        metrics.log_metric(f"{model}.{split}.{name}{suffix}", v)
    html = Path(eval_dir.path) / "report.html"
    if html.is_file():
        shutil.copyfile(html, report.path)
    else:
        Path(report.path).write_text("<p>no report.html written</p>", encoding="utf-8")


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def registry_register(
    params_yaml: str,
    eval_dir: Input[Artifact],
    dpo_model: Input[Model],
    splits: Input[Dataset],
    registry: Output[Artifact],
    gate: Output[Markdown],
) -> bool:
    """``troupe registry register``: MLflow registration + gate (the version carries the run's characters
    from ``splits``, the whole eval directory is the gate's evidence); gate.md as Markdown; returns
    whether the gate passed. "Insufficient evidence" (the CLI's exit status 3) is not a task failure:
    the task succeeds so its gate.md and metadata (``gate_status``, the decision with its verdicts)
    stay visible, and returns False (no deploy), as on a decided fail."""
    import json
    import shutil
    from pathlib import Path

    from components.runtime import gate_passed, resolve, run_step
    from troupe.registry import INSUFFICIENT_EXIT

    try:
        run_step(
            ["registry", "register"],
            params_yaml,
            {
                "eval": resolve(eval_dir.path),
                "dpo_model": resolve(dpo_model.path),
                "splits": resolve(splits.path),
                "registry": registry.path,
            },
        )
    except SystemExit as e:
        if e.code != INSUFFICIENT_EXIT:
            raise
    md = Path(registry.path) / "gate.md"
    if md.is_file():
        shutil.copyfile(md, gate.path)
    else:
        Path(gate.path).write_text("no gate.md written\n", encoding="utf-8")
    decision = json.loads((Path(registry.path) / "decision.json").read_text(encoding="utf-8"))
    registry.metadata["decision"] = decision
    registry.metadata["gate_status"] = decision.get("status", "pass" if gate_passed(decision) else "fail")
    return gate_passed(decision)


@dsl.component(base_image=TROUPE_IMAGE, install_kfp_package=False)
def deploy(
    params_yaml: str,
    registry: Input[Artifact],
    dpo_model: Input[Model],
    deployment: Output[Artifact],
    env: str = "test",
    kubernetes: bool = False,
    rayservice: str = "troupe-serving",
    rayservice_namespace: str = "",
):
    """``troupe deploy --env <env>``: serve the registered version and record the smoke request/response.

    With ``kubernetes`` the step patches RayService ``rayservice`` (the serving chart's release, in
    ``rayservice_namespace``, default this pod's namespace) to serve the version pinned by number;
    KubeRay applies it. Without it the app runs on a local Ray cluster (``dvc repro`` behaviour).
    """
    from components.runtime import resolve, run_step

    args = ["deploy", "--env", env]
    if kubernetes:
        args += ["--rayservice", rayservice]
        if rayservice_namespace:
            args += ["--namespace", rayservice_namespace]
    run_step(
        args,
        params_yaml,
        {"registry": resolve(registry.path), "dpo_model": resolve(dpo_model.path), "deploy": deployment.path},
    )
