"""The whole pipeline through `dvc repro` in a temporary git repo, on the tiny random model.

Real parts: DVC + git, Great Expectations, Ray Train (2 workers, DeepSpeed ZeRO-3 on CPU/gloo) for
SFT and DPO, a real `mlflow server` process as the tracking server, Ray Serve for the test
environment, and the `openai` client over HTTP. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import REPO, free_port
from safetensors.torch import load_file

# small enough for CI: a few optimizer steps, a handful of pairs, 4 replies from 2 dialogues per eval split
OVERRIDES = {
    ("model", "base"): "tiny-random",
    ("sft", "max_steps"): 3,
    ("dpo", "max_steps"): 2,
    ("pairs", "max_pairs"): 6,
    ("pairs", "max_new_tokens"): 12,
    ("eval", "max_new_tokens"): 12,
    ("split", "max_eval_dialogues"): 2,
    ("eval", "max_replies_per_split"): 4,
    ("eval", "models"): ["base", "sft", "dpo"],
}


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for rel in files.splitlines():
        if rel.startswith((".dvc/", "tests/", "charts/", "infra/", "docker/", "docs/")):
            continue
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1500) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory, mlflow_server):
    """A git + DVC repo holding Troupe's pipeline files, after one successful `dvc repro`."""
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    repo.mkdir()
    _copy_repo(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for (sec, key), v in OVERRIDES.items():
        params[sec][key] = v
    port = free_port()
    params["serve"]["port"] = port
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    # the tiny random model cannot pass quality thresholds and evaluates few replies: the gate still
    # reads the same estimates, with bounds every measured rate meets and no minimum n
    (repo / "configs" / "gate_policy.yaml").write_text(
        yaml.safe_dump(
            {
                "candidate": "dpo",
                "confidence": 0.95,
                "min_n": 1,
                "absolute": {
                    "heldout_characters.truncated": {"max": 1.0},
                    "heldout_dialogues.empty_reply": {"max": 1.0},
                },
                "no_regression": {"margin": 1.0, "metrics": {"heldout_characters.truncated": "lower"}},
            }
        )
    )
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=mlflow_server,
        HF_HUB_OFFLINE="1",
        DS_ACCELERATOR="cpu",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        RAY_SERVE_HTTP_PORT=str(port),
    )
    env.pop("RAY_ADDRESS", None)
    # `troupe deploy` joins the machine's running Ray cluster if any; start from none so the app
    # below is this test's own (on a CI machine nothing is running)
    import ray

    if ray.is_initialized():  # `ray stop` kills the raylet a driver in this process is attached to, and
        ray.shutdown()  # Ray then exits the driver: the whole pytest process would die
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "t@t"],
        ["git", "config", "user.name", "t"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "init"],
    ):
        _run(cmd, repo, env)
    log = _run([sys.executable, "-m", "dvc", "repro"], repo, env, timeout=2400)
    yield repo, env, log, port, params
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_repro_produces_every_stage_output(pipeline_repo):
    repo, _, log, _, _ = pipeline_repo
    w = repo / "work"
    rep = json.loads((w / "validated" / "report.json").read_text())
    assert rep["in"] == rep["accepted"] + rep["quarantined"] and rep["accepted"] > 0
    assert (w / "validated" / "data_docs" / "index.html").is_file()
    train_chars = {json.loads(line)["character_id"] for line in (w / "splits" / "train.jsonl").open()}
    held_chars = {
        json.loads(line)["character_id"] for line in (w / "splits" / "heldout_characters.jsonl").open()
    }
    assert held_chars and not (train_chars & held_chars)
    # SFT and DPO trained for real under Ray with ZeRO-3: weights moved, losses logged per step
    base = load_file(w / "models" / "base" / "model.safetensors")
    sft = load_file(w / "models" / "sft" / "model.safetensors")
    dpo = load_file(w / "models" / "dpo" / "model.safetensors")
    k = "model.layers.0.mlp.down_proj.weight"
    assert not (base[k] == sft[k]).all() and not (sft[k] == dpo[k]).all()
    assert len(json.loads((w / "models" / "sft" / "train_log.json").read_text())["log_history"]) == 3
    assert "[sft] step 3/3" in log and "[dpo] step 2/2" in log
    assert (w / "pairs" / "pairs.jsonl").read_text().strip()
    metrics = json.loads((w / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"base", "sft", "dpo"}
    for m in metrics.values():
        assert set(m) == {"heldout_characters", "heldout_dialogues"}
        assert {"language_consistency", "markup_validity", "distinct_2", "rouge_l", "loss"} <= set(
            m["heldout_dialogues"]
        )
    assert "LLM judge: not measured" in (w / "eval" / "report.html").read_text()
    assert json.loads((w / "registry" / "decision.json").read_text())["passed"] is True


def test_mlflow_run_tree_and_registered_version(pipeline_repo, mlflow_server):
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("troupe")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if r.data.tags.get("troupe.role") == "pipeline"]
    assert len(parents) == 1
    children = {
        r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
    }
    assert {"sft", "dpo", "evaluate", "register"} <= children
    mv = client.get_model_version_by_alias("troupe-roleplay", "challenger")
    assert mv.tags["troupe.gate"] == "passed"
    sft_run = next(r for r in runs if r.info.run_name == "sft")
    assert [m.step for m in client.get_metric_history(sft_run.info.run_id, "loss")] == [1, 2, 3]


def test_deployed_test_environment_answers_openai_client(pipeline_repo):
    from openai import OpenAI

    repo, _, _, port, _ = pipeline_repo
    smoke = json.loads((repo / "work" / "deploy" / "smoke.json").read_text())
    assert smoke
    char = json.loads((repo / "work" / "splits" / "characters.jsonl").open().readline())["id"]
    c = OpenAI(base_url=f"http://127.0.0.1:{port}/test/v1", api_key="none", timeout=120)
    r = c.chat.completions.create(model=char, messages=[{"role": "user", "content": "hello"}], max_tokens=8)
    assert r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    import httpx

    rp = httpx.post(
        f"http://127.0.0.1:{port}/test/v1/roleplay",
        timeout=120,
        json={"character_id": char, "conversation_id": "c1", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert rp.status_code == 200 and {"text", "emotion", "images", "messages"} <= set(rp.json())


def test_second_repro_reruns_only_what_changed(pipeline_repo):
    repo, env, _, _, params = pipeline_repo
    status = _run([sys.executable, "-m", "dvc", "status"], repo, env)
    assert "changed" not in status or "deploy" in status  # deploy's smoke output is uncached and always fresh
    params["eval"]["max_new_tokens"] = 10
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    status = _run([sys.executable, "-m", "dvc", "status"], repo, env)
    assert "evaluate:" in status
    for stage in ("import:", "validate:", "sft:", "dpo:", "pairs:"):
        assert stage not in status, status
