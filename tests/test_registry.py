"""Registry + gate against a real `mlflow server` process (SQLite backend, served artifacts)."""

from __future__ import annotations

import json
import shutil

import mlflow
import pytest

from serving import contract
from tests.serve_fixtures import CHARACTERS, characters_file
from troupe.config import ConfigError
from troupe.registry import characters_file as version_characters
from troupe.registry import gate, promote, register, resolve_model_dir

GOOD = {
    "heldout_characters": {
        "language_consistency": 0.9,
        "markup_validity": 1.0,
        "assistant_leakage": 0.0,
        "empty_reply": 0.0,
    },
    "heldout_dialogues": {"language_consistency": 0.9, "assistant_leakage": 0.0},
}


def _params(tmp_path, tiny_model_dir, metrics, name):
    (tmp_path / "eval").mkdir(exist_ok=True)
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"dpo": metrics}))
    dpo = tmp_path / "dpo"
    if not dpo.exists():
        shutil.copytree(tiny_model_dir, dpo)
    (tmp_path / "splits").mkdir(exist_ok=True)
    characters_file(tmp_path / "splits")
    return {
        "paths": {
            "eval": str(tmp_path / "eval"),
            "dpo_model": str(dpo),
            "registry": str(tmp_path / "reg"),
            "splits": str(tmp_path / "splits"),
        },
        "registry": {
            "model_name": name,
            "experiment": "troupe-test",
            "gate_policy": "configs/gate_policy.yaml",
        },
    }


def test_gate_absolute_and_regression():
    import yaml

    policy = yaml.safe_load(open("configs/gate_policy.yaml"))
    ok, reasons = gate(GOOD, policy, None)
    assert ok and any("no champion" in r for r in reasons)
    bad = json.loads(json.dumps(GOOD))
    bad["heldout_characters"]["assistant_leakage"] = 0.5
    ok, reasons = gate(bad, policy, None)
    assert not ok and any(r.startswith("FAIL heldout_characters.assistant_leakage") for r in reasons)
    worse = json.loads(json.dumps(GOOD))
    worse["heldout_characters"]["language_consistency"] = 0.7  # passes absolute 0.6, regresses vs 0.9
    ok, reasons = gate(worse, policy, GOOD)
    assert not ok and any("vs champion" in r and r.startswith("FAIL") for r in reasons)
    missing = {"heldout_characters": {}}
    assert gate(missing, policy, None)[0] is False


def test_register_gate_promote_resolve(mlflow_server, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("TROUPE_PIPELINE_RUN", "test-run-1")
    name = "troupe-test-model"
    d1 = register(_params(tmp_path, tiny_model_dir, GOOD, name))
    assert d1["passed"] and d1["alias"] == "challenger"
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias(name, "challenger").version == d1["version"]
    mv = client.get_model_version(name, d1["version"])
    assert mv.tags["troupe.gate"] == "passed"
    # run tree: the register run is a child of the pipeline's parent run
    run = client.get_run(d1["run_id"])
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["troupe.role"] == "pipeline"
    assert "PASSED" in (tmp_path / "reg" / "gate.md").read_text()
    # the characters travel with the version: only that file is downloaded, the run's copy may go
    (tmp_path / "splits" / "characters.jsonl").unlink()
    chars = version_characters(f"models:/{name}/{d1['version']}", mlflow_server, cache_dir=tmp_path / "c")
    assert [json.loads(x)["id"] for x in chars.read_text().splitlines()] == [c["id"] for c in CHARACTERS]
    assert not (tmp_path / "c" / name / d1["version"] / "weights").exists()
    assert mv.tags[contract.CHARACTERS_URI_TAG].endswith("/characters.jsonl")
    characters_file(tmp_path / "splits")

    assert promote(name) == d1["version"]
    assert client.get_model_version_by_alias(name, "champion").version == d1["version"]

    worse = json.loads(json.dumps(GOOD))
    worse["heldout_dialogues"]["language_consistency"] = 0.7
    d2 = register(_params(tmp_path, tiny_model_dir, worse, name))
    assert not d2["passed"] and d2["champion_version"] == d1["version"]
    assert client.get_model_version_by_alias(name, "challenger").version == d1["version"]  # not moved
    assert client.get_model_version(name, d2["version"]).tags["troupe.gate"] == "failed"

    local = resolve_model_dir(f"models:/{name}@champion", mlflow_server, cache_dir=tmp_path / "cache")
    assert (local / "config.json").is_file() and (local / "model.safetensors").is_file()
    marker = local / "cached-marker"
    marker.write_text("x")  # a second resolve must reuse the cache, not download again over it
    assert resolve_model_dir(f"models:/{name}@champion", mlflow_server, cache_dir=tmp_path / "cache") == local
    assert marker.is_file()
    with pytest.raises(ConfigError, match="nope"):
        resolve_model_dir(f"models:/{name}@nope", mlflow_server, cache_dir=tmp_path / "cache")


def test_register_without_characters_names_the_setting(tmp_path, tiny_model_dir):
    params = _params(tmp_path, tiny_model_dir, GOOD, "troupe-nochars")
    (tmp_path / "splits" / "characters.jsonl").unlink()
    with pytest.raises(ConfigError, match="paths.splits/characters.jsonl"):
        register(params)


def test_register_without_metrics_names_the_file(tmp_path):
    params = {
        "paths": {"eval": str(tmp_path / "eval"), "dpo_model": str(tmp_path), "registry": str(tmp_path)},
        "registry": {"gate_policy": "configs/gate_policy.yaml"},
    }
    with pytest.raises(ConfigError, match="metrics.json: not found"):
        register(params)
