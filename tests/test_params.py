"""Typed params (troupe.params) and the charts' values.schema.json (scripts/values_schema.py).

params.yaml: unknown keys and wrong types fail with the file, the dotted key and the nearest valid
key; the CLI exits 2 with that message; defaults are filled in; dvc.yaml's params keys exist.
Charts: each values.schema.json is what the generator derives from values.yaml, and the Helm engine
(helm-python-sdk) rejects a values file with an unknown key through it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import BaseModel

from troupe.config import ConfigError, load_params
from troupe.params import Params, check_dvc, params_cli, parse, resolve

ROOT = Path(__file__).resolve().parents[1]
CHARTS = ROOT / "charts"
TROUPE = str(Path(sys.executable).parent / "troupe")


def _write(tmp_path: Path, doc: dict[str, Any], name: str = "params.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _error(path: str | Path, overrides: list[str] = ()) -> str:
    with pytest.raises(ConfigError) as e:
        load_params(path, overrides)
    return str(e.value)


# ------------------------------------------------------------------------------------------ the model


def test_repo_params_validate_and_keep_their_values() -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = load_params(ROOT / "params.yaml")

    def subset(a: Any, b: Any, at: str) -> None:
        if isinstance(a, dict):
            for k, v in a.items():
                assert k in b, at + k
                subset(v, b[k], f"{at}{k}.")
        else:
            assert a == b, at

    subset(raw, p, "")


def test_defaults_filled_for_every_section(tmp_path: Path) -> None:
    p = load_params(_write(tmp_path, {"sft": {"max_steps": 3}}))
    assert set(p) == set(Params.model_fields)
    assert p["sft"]["max_steps"] == 3
    # optional keys the code reads with .get(..., default) come out with the model's one default
    assert p["train"]["max_failures"] == 1
    assert p["sft"]["lr_scheduler_type"] == "cosine"
    assert p["dpo"]["lr_scheduler_type"] == "cosine"
    assert p["data"]["source_sets"] == {"sample": [{"kind": "troupe", "path": "data/sample"}]}
    assert "nodes" not in p["train"]  # unset optional keys are left out, not written as null
    assert load_params(_write(tmp_path, {}, "empty.yaml")) == resolve({})


def test_every_field_has_a_description() -> None:
    missing = []

    def walk(model: type[BaseModel], at: str) -> None:
        for name, f in model.model_fields.items():
            if not f.description:
                missing.append(at + name)
            for t in (f.annotation, *getattr(f.annotation, "__args__", ())):
                for inner in (t, *getattr(t, "__args__", ())):
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        walk(inner, f"{at}{name}.")

    walk(Params, "")
    assert missing == []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("sft.max_step=3", "unknown key sft.max_step (did you mean sft.max_steps?)"),
        ("sfft.max_steps=3", "unknown key sfft (did you mean sft?)"),
        ("train.max_failure=2", "unknown key train.max_failure (did you mean train.max_failures?)"),
        ("agents.judge.modle=x", "unknown key agents.judge.modle (did you mean agents.judge.model?)"),
        ("dpo.warmup_ratio=0.1", "unknown key dpo.warmup_ratio"),  # DPO reads no warmup: not silently ignored
        ("sft.max_steps=abc", 'sft.max_steps="abc": Input should be a valid integer'),
        ("sft.max_steps=2.5", "sft.max_steps=2.5: Input should be a valid integer"),
        ("train.accelerator=tpu", "Input should be 'cpu', 'nvidia' or 'ascend'"),
        ("train.zero_stage=4", "train.zero_stage=4: Input should be 0, 1, 2 or 3"),
        ("split.heldout_dialogue_share=1.5", "split.heldout_dialogue_share=1.5: Input should be less than 1"),
        ("eval.models=[base, sfft]", 'eval.models[1]="sfft"'),
        ("data.source_set=rea", "data.source_set='rea' is not a key of data.source_sets (sample, real)"),
        (
            "data.source_sets.real=[{kind: troupe, path: x, nme: y}]",
            "data.source_sets.real[0].nme (did you mean",
        ),
    ],
)
def test_bad_override_names_key_and_nearest_valid_one(override: str, expected: str) -> None:
    msg = _error(ROOT / "params.yaml", [override])
    assert expected in msg
    if not override.startswith("data.source_set="):
        assert f"params.yaml (--set {override})" in msg  # names the file and the override


def test_unknown_key_in_the_file_names_the_file(tmp_path: Path) -> None:
    f = _write(tmp_path, {"sft": {"max_step": 3}, "trian": {}})
    msg = _error(f)
    assert f"{f}: unknown key sft.max_step (did you mean sft.max_steps?)" in msg
    assert f"{f}: unknown key trian (did you mean train?)" in msg
    assert "--set" not in msg


def test_kfp_style_overrides_validate() -> None:
    """What the KFP components pass: artifact paths and the pipeline's resolve_params overrides."""
    sets = [
        "paths.validated=/tmp/outputs/validated/data",
        "paths.base_model=s3://bucket/models/base",
        "model.base=tiny-random",
        "train.accelerator=nvidia",
        "train.nodes=2",
        "train.devices_per_node=8",
        "train.num_workers=16",
        "train.offload=optimizer",
        "sft.learning_rate=1e-4",  # YAML 1.1 reads this as a string; the model makes it a float
        "dpo.beta=0.2",
        "registry.gate_policy=configs/gate_policy.yaml",
    ]
    p = load_params(ROOT / "params.yaml", sets)
    assert p["paths"]["validated"] == "/tmp/outputs/validated/data"
    assert p["train"]["num_workers"] == 16 and p["train"]["offload"] == "optimizer"
    assert p["sft"]["learning_rate"] == pytest.approx(1e-4)
    assert parse(p).train.devices_per_node == 8


def test_training_chart_params_content_validates() -> None:
    """The params.yaml the training chart puts in its ConfigMap goes through the same model."""
    for f in sorted((CHARTS / "troupe-training").glob("values*.yaml")):
        content = ((yaml.safe_load(f.read_text()) or {}).get("params") or {}).get("content")
        if content:
            resolve(yaml.safe_load(content) or {}, source=f"{f.name}: params.content")


# ------------------------------------------------------------------------------------------ CLI


def test_cli_exits_2_with_the_message(tmp_path: Path) -> None:
    r = subprocess.run(
        [TROUPE, "model", "prepare", "--set", "sft.max_step=3", "--set", f"paths.base_model={tmp_path}/m"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2, r.stderr
    assert (
        "params.yaml (--set sft.max_step=3): unknown key sft.max_step (did you mean sft.max_steps?)"
        in r.stderr
    )
    assert not (tmp_path / "m").exists()  # nothing ran


def test_cli_exit_2_also_without_the_console_script(tmp_path: Path) -> None:
    """Click's standalone mode (CliRunner, `python -m`) reports a params error as a usage error too."""
    r = CliRunner().invoke(
        params_cli, ["show", "--params", str(ROOT / "params.yaml"), "--set", "sft.max_steps=abc"]
    )
    assert r.exit_code == 2
    assert 'sft.max_steps="abc"' in r.output


def test_params_show_and_schema() -> None:
    r = CliRunner().invoke(
        params_cli, ["show", "--params", str(ROOT / "params.yaml"), "--set", "paths.validated=/tmp/x"]
    )
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.output)["paths"]["validated"] == "/tmp/x"
    r = CliRunner().invoke(params_cli, ["schema"])
    schema = json.loads(r.output)
    assert set(schema["properties"]) == set(Params.model_fields)
    assert schema["$defs"]["SFT"]["additionalProperties"] is False
    assert schema["$defs"]["Train"]["properties"]["max_failures"]["default"] == 1


# ------------------------------------------------------------------------------------------ dvc.yaml


def test_dvc_yaml_params_exist_in_the_model() -> None:
    assert check_dvc(ROOT / "dvc.yaml") == []


def test_dvc_yaml_unknown_params_key_is_reported(tmp_path: Path) -> None:
    stages = {"stages": {"sft": {"cmd": "troupe train sft", "params": [
        "sft.max_step", "data.cutoff_len", {"params.yaml": ["trian"]}, {"other.yaml": ["anything"]}]}}}  # fmt: skip
    dvc = _write(tmp_path, stages, "dvc.yaml")
    problems = check_dvc(dvc)
    assert problems == [
        f"{dvc}: stage sft: params sft.max_step: not a params key (did you mean sft.max_steps?)",
        f"{dvc}: stage sft: params trian: not a params key (did you mean train?)",
    ]
    r = subprocess.run(
        [TROUPE, "params", "check", "--params", str(ROOT / "params.yaml"), "--dvc", str(dvc)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "did you mean sft.max_steps?" in r.stderr


# ------------------------------------------------------------------------------------------ charts


def _generator():
    spec = importlib.util.spec_from_file_location("values_schema", ROOT / "scripts" / "values_schema.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CHART_NAMES = sorted(p.parent.name for p in CHARTS.glob("*/values.yaml"))


@pytest.fixture(scope="module")
def helm():
    return pytest.importorskip("helm_python", reason="pip install helm-python-sdk (dev extra)")


@pytest.mark.parametrize("chart", CHART_NAMES)
def test_committed_schema_is_generated_from_values(chart: str) -> None:
    gen = _generator()
    committed = CHARTS / chart / "values.schema.json"
    assert committed.is_file(), f"missing {committed}: run `{gen.COMMAND}`"
    assert committed.read_text() == gen.render(gen.chart_schema(CHARTS / chart)), (
        f"{committed} is stale (values.yaml changed): run `{gen.COMMAND}`"
    )


def _install_values(chart: str, env: str) -> dict[str, Any]:
    vals = yaml.safe_load((CHARTS / chart / f"values-{env}.yaml").read_text()) or {}
    vals.setdefault("aws", {})["roleArn"] = "arn:aws:iam::123456789012:role/troupe"
    return vals


def _first_closed_object(schema: dict[str, Any], at: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Path of the first nested object whose keys are closed (additionalProperties false)."""
    for k, s in schema.get("properties", {}).items():
        if s.get("additionalProperties") is False:
            return (*at, k)
    raise AssertionError("no closed object")


def _nest(path: tuple[str, ...], leaf: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = leaf
    for k in reversed(path):
        out = {k: out}
    return out


@pytest.mark.parametrize("chart", CHART_NAMES)
@pytest.mark.parametrize("env", ["test", "prod"])
def test_environment_values_pass_the_schema(helm, chart: str, env: str) -> None:
    vals = _install_values(chart, env)
    helm.Chart.load(CHARTS / chart).validate_schema(vals)
    report = helm.lint(CHARTS / chart, vals, namespace=f"troupe-{env}")
    assert report["errors"] == [], report


def test_serving_typo_fails_render_and_lint_naming_the_key(helm) -> None:
    from helm_python.errors import HelmValuesError

    bad = {**_install_values("troupe-serving", "prod"), "app": {"canaryWeigth": 5}}
    with pytest.raises(HelmValuesError, match="canaryWeigth"):
        helm.Chart.load(CHARTS / "troupe-serving").render(bad, name="troupe", namespace="troupe-prod")
    report = helm.lint(CHARTS / "troupe-serving", bad, namespace="troupe-prod")
    assert any("'/app'" in e and "canaryWeigth" in e for e in report["errors"]), report


@pytest.mark.parametrize("chart", CHART_NAMES)
def test_unknown_keys_and_wrong_types_fail_lint(helm, chart: str) -> None:
    schema = json.loads((CHARTS / chart / "values.schema.json").read_text())
    nested = _first_closed_object(schema)
    int_key = next(k for k, s in schema["properties"].items() if s.get("type") in ("integer", "object")
                   and (s.get("type") == "integer" or any(v.get("type") == "integer" for v in s.get("properties", {}).values())))  # fmt: skip
    int_path = (int_key,) if schema["properties"][int_key]["type"] == "integer" else (
        int_key, next(k for k, v in schema["properties"][int_key]["properties"].items() if v.get("type") == "integer"))  # fmt: skip
    cases = {
        "topLevelTypo": {"topLevelTypo": 1},
        "nestedTypo": _nest(nested, {"nestedTypo": 1}),
        "want integer": _nest(int_path[:-1], {int_path[-1]: "two"}),
    }
    for needle, extra in cases.items():
        vals = copy.deepcopy(_install_values(chart, "test"))
        vals = _merge(vals, extra)
        report = helm.lint(CHARTS / chart, vals)
        assert any(needle in e for e in report["errors"]), (needle, report)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_keyed_and_free_form_maps(helm) -> None:
    from helm_python.errors import HelmValuesError

    chart = helm.Chart.load(CHARTS / "troupe-training")
    # free-form Kubernetes objects take any key; a new accelerator profile is allowed
    chart.validate_schema({
        "head": {"nodeSelector": {"example.com/any": "x"}, "tolerations": [{"key": "k", "operator": "Exists"}]},
        "podSecurityContext": {"supplementalGroups": [5]},
        "accelerators": {"amd": {"imageSuffix": "rocm", "resourceName": "amd.com/gpu", "perWorker": 8}},
    })  # fmt: skip
    # ...but a profile's own keys are checked
    with pytest.raises(HelmValuesError, match="perWorkr"):
        chart.validate_schema({"accelerators": {"nvidia": {"perWorkr": 8}}})


def test_generator_detects_drift_and_reads_descriptions(tmp_path: Path) -> None:
    gen = _generator()
    charts = tmp_path / "charts"
    shutil.copytree(CHARTS / "troupe-mlflow", charts / "troupe-mlflow")
    assert gen.main(["--check", "--charts", str(charts)]) == 0
    values = charts / "troupe-mlflow" / "values.yaml"
    values.write_text(values.read_text() + "\n# -- Extra knob for the test.\n# continued here.\nnewKnob: 3\n")
    assert gen.main(["--check", "--charts", str(charts)]) == 1
    assert gen.main(["--charts", str(charts)]) == 0
    schema = json.loads((charts / "troupe-mlflow" / "values.schema.json").read_text())
    assert schema["properties"]["newKnob"] == {
        "description": "Extra knob for the test. continued here.",
        "type": "integer",
    }
    assert gen.main(["--check", "--charts", str(charts)]) == 0
