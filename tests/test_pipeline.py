"""KFP pipeline: IR structure, local-runner mechanics, submit errors, and (slow) the full local run."""

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from kfp import dsl, local
from kfp.dsl import Dataset, Input, Metrics, Output

from components.runtime import POINTER, gate_passed, merge_overrides, numeric_items, rayjob_release, resolve
from troupe.pipeline import compile_pipeline, pipeline_cli

ROOT = Path(__file__).resolve().parents[1]

#: dvc stage -> (component name in the IR, troupe argv it runs, typed outputs)
STEPS = {
    "data import": ("data-import", {"imported": "system.Dataset"}),
    "data validate": (
        "data-validate",
        {"validated": "system.Dataset", "data_docs": "system.HTML", "validation_metrics": "system.Metrics"},
    ),
    "data split": ("data-split", {"splits": "system.Dataset"}),
    "model prepare": ("model-prepare", {"base_model": "system.Model"}),
    "train sft": ("train-sft", {"sft_model": "system.Model"}),
    "train pairs": ("train-pairs", {"pairs": "system.Dataset"}),
    "train dpo": ("train-dpo", {"dpo_model": "system.Model"}),
    "evaluate": (
        "evaluate",
        {"eval_dir": "system.Artifact", "metrics": "system.Metrics", "report": "system.HTML"},
    ),
    "registry register": ("registry-register", {"registry": "system.Artifact", "gate": "system.Markdown"}),
    "deploy": ("deploy", {"deployment": "system.Artifact"}),
}


@pytest.fixture(scope="module")
def ir(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = compile_pipeline(tmp_path_factory.mktemp("ir") / "troupe_pipeline.yaml", kubernetes=True)
    return {"path": out, "docs": list(yaml.safe_load_all(out.read_text()))}


def test_ir_has_every_step_with_typed_artifacts(ir: dict) -> None:
    spec = ir["docs"][0]
    comps = spec["components"]
    for stage, (name, outputs) in STEPS.items():
        comp = comps[f"comp-{name}"]
        got = {k: v["artifactType"]["schemaTitle"] for k, v in comp["outputDefinitions"]["artifacts"].items()}
        assert got == outputs, stage
        # each executor runs the same troupe step in-process on the Troupe image
        exe = spec["deploymentSpec"]["executors"][f"exec-{name}"]["container"]
        assert exe["image"].startswith("ghcr.io/troupe-ml/troupe:")
        assert "run_step" in exe["command"][-1] or "train_step" in exe["command"][-1]
    tasks = spec["root"]["dag"]["tasks"]
    assert {t["taskInfo"]["name"] for t in tasks.values()} >= {"resolve params", "registry register"}
    deploy_dag = comps["comp-condition-1"]["dag"]["tasks"]
    assert "deploy" in deploy_dag
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in ("params_yaml", "data_rev", "dvc_remote", "base_model", "accelerator", "nodes", "zero_stage"):
        assert name in params
    assert yaml.safe_load(params["params_yaml"]["defaultValue"])["paths"]["splits"]


def test_ir_loads_back_with_kfp_sdk(ir: dict) -> None:
    from kfp import components

    comp = components.load_component_from_file(str(ir["path"]))
    assert comp.name == "troupe"
    assert {"params_yaml", "base_model", "sft_learning_rate", "dpo_beta", "gate_policy"} <= set(
        comp.component_spec.inputs
    )


def test_kubernetes_platform_config_only_when_asked(ir: dict, tmp_path: Path) -> None:
    k8s = ir["docs"][1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    sft = k8s["exec-train-sft"]
    assert "pvcMount" not in sft  # no volume shared with Ray pods: inputs/outputs are URIs
    assert {s["secretName"] for s in sft["secretAsEnv"]} == {"troupe-s3", "troupe-mlflow"}
    plain = compile_pipeline(tmp_path / "p.yaml", kubernetes=False)
    assert len(list(yaml.safe_load_all(plain.read_text()))) == 1


def test_kube_settings_file(tmp_path: Path) -> None:
    f = tmp_path / "kube.yaml"
    f.write_text(
        "node_selector: {node.kubernetes.io/instance-type: p5.48xlarge}\n"
        "tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]\n"
    )
    out = compile_pipeline(tmp_path / "p.yaml", kube_file=str(f))
    exe = list(yaml.safe_load_all(out.read_text()))[1]["platforms"]["kubernetes"]["deploymentSpec"][
        "executors"
    ]
    assert exe["exec-evaluate"]["nodeSelector"]["labels"] == {
        "node.kubernetes.io/instance-type": "p5.48xlarge"
    }
    assert exe["exec-evaluate"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeSelector" not in exe["exec-data-import"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_field: 1\n")
    r = CliRunner().invoke(
        pipeline_cli, ["compile", "-o", str(tmp_path / "x.yaml"), "--kube-config", str(bad)]
    )
    assert r.exit_code == 2 and "Kubernetes settings" in r.output


def test_runtime_helpers(tmp_path: Path) -> None:
    p = yaml.safe_load(
        merge_overrides(
            "model: {base: smollm2-135m}\nsft: {learning_rate: 5.0e-5, max_steps: 6}\ntrain: {offload: false}\n",
            {
                "model.base": "Qwen/Qwen2.5-32B-Instruct",
                "sft.learning_rate": 1e-5,
                "sft.max_steps": -1,
                "train.offload": "",
                "train.nodes": 2,
            },
        )
    )
    assert p["model"]["base"] == "Qwen/Qwen2.5-32B-Instruct"
    assert p["sft"]["learning_rate"] == 1e-5 and p["sft"]["max_steps"] == 6
    assert p["train"]["offload"] is False and p["train"]["nodes"] == 2
    assert p["train"]["num_workers"] == 2  # validated: defaults filled in
    with pytest.raises(Exception, match=r"sft\.max_step.*did you mean sft\.max_steps"):
        merge_overrides("sft: {max_steps: 6}\n", {"sft.max_step": 3})
    assert gate_passed({"passed": True}) and gate_passed({"decision": "promote"}) and not gate_passed({})
    assert numeric_items({"a": {"b": 1, "c": "x", "d": True}, "e": 2.5}) == {"a.b": 1.0, "e": 2.5}
    (tmp_path / POINTER).write_text("s3://troupe-prod-artifacts/runs/troupe-1/sft_model\n")
    assert resolve(str(tmp_path)) == "s3://troupe-prod-artifacts/runs/troupe-1/sft_model"
    assert rayjob_release("8F2A_c1d0-UUID") == "troupe-8f2a-c1d0-uuid"


# --- local runner mechanics with trivial components (no troupe steps needed) -------------------------


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def _write(text: str, out: Output[Dataset]):
    from pathlib import Path

    Path(out.path).mkdir(parents=True)
    (Path(out.path) / "x.txt").write_text(text)


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def _count(ds: Input[Dataset], m: Output[Metrics]) -> int:
    from pathlib import Path

    n = len((Path(ds.path) / "x.txt").read_text())
    m.log_metric("chars", n)
    return n


@dsl.pipeline(name="mechanics")
def _mechanics(text: str = "hello") -> int:
    return _count(ds=_write(text=text).outputs["out"]).outputs["Output"]


def test_local_runner_mechanics(tmp_path: Path) -> None:
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    assert _mechanics(text="troupe!").output == 7


def test_resolve_params_component_runs_locally(tmp_path: Path) -> None:
    from components import steps

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    task = steps.resolve_params(
        params_yaml=(ROOT / "params.yaml").read_text(),
        base_model="tiny-random",
        accelerator="",
        nodes=1,
        devices_per_node=2,
        zero_stage=-1,
        offload="",
        sft_max_steps=2,
        sft_learning_rate=-1.0,
        sft_per_device_batch_size=-1,
        dpo_max_steps=-1,
        dpo_learning_rate=-1.0,
        dpo_beta=0.2,
        gate_policy="",
    )
    p = yaml.safe_load(task.output)
    assert p["model"]["base"] == "tiny-random" and p["train"]["num_workers"] == 2
    assert p["sft"]["max_steps"] == 2 and p["dpo"]["beta"] == 0.2 and p["train"]["accelerator"] == "cpu"


# --- submit -------------------------------------------------------------------------------------------


def test_submit_unreachable_host_is_clear(tmp_path: Path) -> None:
    pkg = compile_pipeline(tmp_path / "p.yaml", kubernetes=False)
    r = CliRunner().invoke(
        pipeline_cli, ["submit", "--host", "http://127.0.0.1:9", "--package", str(pkg), "--arg", "nodes=2"]
    )
    assert r.exit_code == 2, r.output
    assert "unreachable" in r.output and "--host" in r.output and "KFP_HOST" in r.output


def test_submit_without_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFP_HOST", raising=False)
    r = CliRunner().invoke(pipeline_cli, ["submit", "--package", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "--host" in r.output and "KFP_HOST" in r.output


# --- the whole pipeline, locally, on the tiny model ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_run_local_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step through kfp.local on the tiny random model (needs all step implementations)."""
    from troupe.pipeline import run_local

    monkeypatch.chdir(ROOT)  # params.yaml paths (data/sample, configs/...) are relative to the repo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_local(
        {
            "base_model": "tiny-random",
            "sft_max_steps": 1,
            "dpo_max_steps": 1,
            "nodes": 1,
            "devices_per_node": 1,
        },
        pipeline_root=str(tmp_path / "kfp"),
    )
    metrics = list((tmp_path / "kfp").rglob("metrics.json"))
    assert metrics, "evaluate wrote no metrics.json"
    assert list((tmp_path / "kfp").rglob("decision.json"))
