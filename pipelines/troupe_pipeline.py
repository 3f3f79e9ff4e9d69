"""The Troupe KFP pipeline: the dvc.yaml stages as Kubeflow tasks, reading like the diagram.

    resolve params -> data import -> validate -> split ----------+
                      model prepare -----------------------------+-> train sft -> train pairs -> train dpo
                                                     evaluate <- (base, sft, dpo) -> registry register
                                                                                   -> [gate passed] deploy

:func:`build_pipeline` returns the pipeline function; with ``kube`` set it attaches the Kubernetes
platform config (kfp-kubernetes: secrets as env, PVC, node selectors and tolerations for the heavy
steps). Without it the same pipeline runs under ``kfp.local`` (no cluster).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from kfp import dsl

from components import steps

PIPELINE_NAME = "troupe"
DEFAULT_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


@dataclass
class KubeSettings:
    """Kubernetes placement and secrets (compile-time; each knob documented).

    Attributes:
        s3_secret: Secret with AWS keys for DVC remote / MLflow artifacts (empty = IRSA, no secret).
        s3_secret_env: Secret key -> environment variable.
        mlflow_secret: Secret with the MLflow tracking URI (and credentials).
        mlflow_secret_env: Secret key -> environment variable.
        pvc: PersistentVolumeClaim shared with RayJob pods (checkpoints, models); empty = none.
        pvc_mount: where the PVC is mounted in task pods; RayJob outputs go under ``<pvc_mount>/runs``.
        node_selector: label -> value for the steps that need accelerator nodes (in-process fallback).
        tolerations: taints tolerated by those steps, e.g. ``nvidia.com/gpu`` / ``huawei.com/Ascend910``.
        cpu_node_selector: label -> value for the light steps (data, registry, deploy).
        rayjob_namespace: namespace of the training RayJobs (``troupe rayjob submit --namespace``);
            the task pods' service account needs RBAC to create RayJobs and ConfigMaps there.
    """

    s3_secret: str = "troupe-s3"
    s3_secret_env: dict[str, str] = field(
        default_factory=lambda: {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        }
    )
    mlflow_secret: str = "troupe-mlflow"
    mlflow_secret_env: dict[str, str] = field(
        default_factory=lambda: {
            "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN",
        }
    )
    pvc: str = "troupe-shared"
    pvc_mount: str = "/mnt/troupe"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    cpu_node_selector: dict[str, str] = field(default_factory=dict)
    rayjob_namespace: str = "default"


def _place(task: dsl.PipelineTask, kube: KubeSettings, heavy: bool) -> dsl.PipelineTask:
    """Attach secrets, PVC, node selector and tolerations to ``task``."""
    from kfp import kubernetes

    if kube.s3_secret:
        kubernetes.use_secret_as_env(task, kube.s3_secret, kube.s3_secret_env, optional=True)
    if kube.mlflow_secret:
        kubernetes.use_secret_as_env(task, kube.mlflow_secret, kube.mlflow_secret_env, optional=True)
    if kube.pvc:
        kubernetes.mount_pvc(task, kube.pvc, kube.pvc_mount)
    for k, v in (kube.node_selector if heavy else kube.cpu_node_selector).items():
        kubernetes.add_node_selector(task, k, v)
    if heavy:
        for t in kube.tolerations:
            kubernetes.add_toleration(task, **t)
    return task


def build_pipeline(kube: KubeSettings | None = None, params_path: str | Path = DEFAULT_PARAMS):
    """Return the ``@dsl.pipeline`` function.

    Args:
        kube: Kubernetes settings; None = no platform config (local runner, or a cluster with defaults).
        params_path: params.yaml whose content (as one-line JSON) becomes the ``params_yaml`` default.

    Raises:
        FileNotFoundError: ``params_path`` does not exist.
    """
    # One line of JSON (valid YAML): KFP copies defaults into the IR's header comment, where a multi-line
    # string would break the YAML (the Kubeflow UI then refuses the upload).
    params_default = json.dumps(
        yaml.safe_load(Path(params_path).read_text(encoding="utf-8")), ensure_ascii=False
    )
    on_k8s = kube is not None
    shared_root = f"{kube.pvc_mount}/runs" if kube else "/tmp/troupe-runs"
    rayjob_ns = kube.rayjob_namespace if kube else "default"

    def place(task: dsl.PipelineTask, heavy: bool = False) -> dsl.PipelineTask:
        task.set_caching_options(False)
        return _place(task, kube, heavy) if kube else task

    @dsl.pipeline(
        name=PIPELINE_NAME, description="Role-play model: data -> SFT -> DPO -> eval -> gate -> deploy"
    )
    def troupe_pipeline(
        params_yaml: str = params_default,
        data_repo: str = "",
        data_rev: str = "",
        dvc_remote: str = "",
        base_model: str = "",
        accelerator: str = "",
        nodes: int = -1,
        devices_per_node: int = -1,
        zero_stage: int = -1,
        offload: str = "",
        sft_max_steps: int = -1,
        sft_learning_rate: float = -1.0,
        sft_per_device_batch_size: int = -1,
        dpo_max_steps: int = -1,
        dpo_learning_rate: float = -1.0,
        dpo_beta: float = -1.0,
        gate_policy: str = "",
        deploy_env: str = "test",
    ):
        """Empty strings and negative numbers keep the value from ``params_yaml``."""
        cfg = place(
            steps.resolve_params(
                params_yaml=params_yaml,
                base_model=base_model,
                accelerator=accelerator,
                nodes=nodes,
                devices_per_node=devices_per_node,
                zero_stage=zero_stage,
                offload=offload,
                sft_max_steps=sft_max_steps,
                sft_learning_rate=sft_learning_rate,
                sft_per_device_batch_size=sft_per_device_batch_size,
                dpo_max_steps=dpo_max_steps,
                dpo_learning_rate=dpo_learning_rate,
                dpo_beta=dpo_beta,
                gate_policy=gate_policy,
            ).set_display_name("resolve params")
        )
        p = cfg.output
        imp = place(
            steps.data_import(params_yaml=p, data_repo=data_repo, data_rev=data_rev, dvc_remote=dvc_remote)
        ).set_display_name("data import")
        val = place(steps.data_validate(params_yaml=p, imported=imp.outputs["imported"])).set_display_name(
            "data validate"
        )
        spl = place(steps.data_split(params_yaml=p, validated=val.outputs["validated"])).set_display_name(
            "data split"
        )
        base = place(steps.model_prepare(params_yaml=p), heavy=True).set_display_name("model prepare")
        sft = place(
            steps.train_sft(
                params_yaml=p,
                splits=spl.outputs["splits"],
                base_model=base.outputs["base_model"],
                kubernetes=on_k8s,
                shared_root=shared_root,
                rayjob_namespace=rayjob_ns,
            )
        ).set_display_name("train sft")
        pairs = place(
            steps.train_pairs(
                params_yaml=p,
                splits=spl.outputs["splits"],
                sft_model=sft.outputs["sft_model"],
                base_model=base.outputs["base_model"],
            ),
            heavy=True,
        ).set_display_name("train pairs")
        dpo = place(
            steps.train_dpo(
                params_yaml=p,
                pairs=pairs.outputs["pairs"],
                sft_model=sft.outputs["sft_model"],
                kubernetes=on_k8s,
                shared_root=shared_root,
                rayjob_namespace=rayjob_ns,
            )
        ).set_display_name("train dpo")
        ev = place(
            steps.evaluate(
                params_yaml=p,
                splits=spl.outputs["splits"],
                base_model=base.outputs["base_model"],
                sft_model=sft.outputs["sft_model"],
                dpo_model=dpo.outputs["dpo_model"],
            ),
            heavy=True,
        ).set_display_name("evaluate")
        reg = place(
            steps.registry_register(
                params_yaml=p, eval_dir=ev.outputs["eval_dir"], dpo_model=dpo.outputs["dpo_model"]
            )
        ).set_display_name("registry register")
        with dsl.If(reg.outputs["Output"] == True, name="gate passed"):  # noqa: E712 (KFP condition syntax)
            place(
                steps.deploy(
                    params_yaml=p,
                    registry=reg.outputs["registry"],
                    dpo_model=dpo.outputs["dpo_model"],
                    env=deploy_env,
                )
            ).set_display_name("deploy")

    return troupe_pipeline
