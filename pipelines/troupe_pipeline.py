"""The Troupe KFP pipeline: the dvc.yaml stages as Kubeflow tasks, reading like the diagram.

    resolve params -> data synthesize -> data import -> validate -> split ----------+
                      model prepare -----------------------------+-> train sft -> train pairs -> train dpo
                                                     evaluate <- (base, sft, dpo) -> registry register
                                                                                   -> [gate passed] deploy

:func:`build_pipeline` returns the pipeline function; with ``kube`` set it attaches the Kubernetes
platform config (kfp-kubernetes: secrets as env, node selectors and tolerations for the heavy
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
        storage_root: URI every pod can reach (IRSA) under which a run's RayJob inputs, outputs and
            checkpoints live: ``<storage_root>/troupe-<KFP run id>/...`` (terraform output
            ``checkpoints_bucket``). No volume is shared between task pods and Ray pods.
        node_selector: label -> value for the steps that need accelerator nodes (in-process fallback).
        tolerations: taints tolerated by those steps, e.g. ``nvidia.com/gpu`` / ``huawei.com/Ascend910``.
        cpu_node_selector: label -> value for the light steps (data, registry, deploy).
        rayjob_namespace: namespace of the training RayJobs (``troupe rayjob submit --namespace``);
            the training chart's ``pipelineRunner`` RBAC lets the pipeline's ServiceAccount create,
            follow and delete RayJobs and ConfigMaps there.
        rayjob_env: training chart values file ``values-<rayjob_env>.yaml`` the RayJobs use.
        rayjob_values: more chart values as ``key=value`` (``--chart-set``), e.g.
            ``aws.roleArn=arn:aws:iam::<account>:role/troupe-prod-training``.
        rayservice: the serving chart's RayService (release name) the deploy step patches, in
            ``rayjob_namespace``; the serving chart's RBAC lets the pipeline get and patch it.
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
            # the MLflow chart's basic auth (on in prod)
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
        }
    )
    storage_root: str = "s3://troupe-prod-checkpoints/runs"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    cpu_node_selector: dict[str, str] = field(default_factory=dict)
    rayjob_namespace: str = "default"
    rayjob_env: str = "prod"
    rayjob_values: list[str] = field(default_factory=list)
    rayservice: str = "troupe-serving"


def _place(task: dsl.PipelineTask, kube: KubeSettings, heavy: bool) -> dsl.PipelineTask:
    """Attach secrets, node selector and tolerations to ``task``."""
    from kfp import kubernetes

    if kube.s3_secret:
        kubernetes.use_secret_as_env(task, kube.s3_secret, kube.s3_secret_env, optional=True)
    if kube.mlflow_secret:
        kubernetes.use_secret_as_env(task, kube.mlflow_secret, kube.mlflow_secret_env, optional=True)
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
        synthesize: bool = False,
    ):
        """Empty strings and negative numbers keep the value from ``params_yaml``; ``synthesize`` turns
        ``synthesis.enabled`` on (off keeps ``params_yaml``'s value, false by default)."""
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
                synthesize=synthesize,
            ).set_display_name("resolve params")
        )
        p = cfg.output

        def step(component, name: str, heavy: bool = False, **inputs) -> dsl.PipelineTask:
            """``component(params_yaml=p, **inputs)``, placed and named ``name``."""
            return place(component(params_yaml=p, **inputs), heavy=heavy).set_display_name(name)

        def train(component, name: str, **inputs) -> dsl.PipelineTask:
            """A train step that may go to a KubeRay RayJob (in-process off Kubernetes)."""
            return step(
                component,
                name,
                kubernetes=on_k8s,
                storage_root=kube.storage_root if kube else "",
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                rayjob_namespace=rayjob_ns,
                rayjob_env=kube.rayjob_env if kube else "prod",
                rayjob_values=list(kube.rayjob_values) if kube else [],
                **inputs,
            )

        # synthesised dialogues join the import when synthesis.enabled (else an empty source, no agent called)
        syn = step(steps.data_synthesize, "data synthesize")
        imp = step(
            steps.data_import,
            "data import",
            data_repo=data_repo,
            data_rev=data_rev,
            dvc_remote=dvc_remote,
            synthetic=syn.outputs["synthetic"],
        )
        base = step(steps.model_prepare, "model prepare", heavy=True)
        base_model = base.outputs["base_model"]
        # validation counts tokens with the base model's tokenizer (data.cutoff_len)
        val = step(
            steps.data_validate, "data validate", imported=imp.outputs["imported"], base_model=base_model
        )
        spl = step(steps.data_split, "data split", validated=val.outputs["validated"])
        splits = spl.outputs["splits"]
        sft = train(steps.train_sft, "train sft", splits=splits, base_model=base_model)
        sft_model = sft.outputs["sft_model"]
        # train pairs and evaluate both read the splits and the base and SFT models
        on_models = {"splits": splits, "base_model": base_model, "sft_model": sft_model}
        pairs = step(steps.train_pairs, "train pairs", heavy=True, **on_models)
        dpo = train(
            steps.train_dpo, "train dpo", splits=splits, pairs=pairs.outputs["pairs"], sft_model=sft_model
        )
        dpo_model = dpo.outputs["dpo_model"]
        ev = step(steps.evaluate, "evaluate", heavy=True, dpo_model=dpo_model, **on_models)
        reg = step(
            steps.registry_register,
            "registry register",
            eval_dir=ev.outputs["eval_dir"],
            dpo_model=dpo_model,
            splits=splits,
        )
        with dsl.If(reg.outputs["Output"] == True, name="gate passed"):  # noqa: E712 (KFP condition syntax)
            step(
                steps.deploy,
                "deploy",
                registry=reg.outputs["registry"],
                dpo_model=dpo_model,
                env=deploy_env,
                # on Kubernetes: patch the serving chart's RayService (pinned version), no Ray in the pod
                kubernetes=on_k8s,
                rayservice=kube.rayservice if kube else "troupe-serving",
                rayservice_namespace=kube.rayjob_namespace if kube else "",
            )

    return troupe_pipeline
