"""LoRA through PEFT on the Ray Train + DeepSpeed ZeRO-3 path (2 CPU workers, gloo), merge, the
adapter in the registry, and the CPU refusal of QLoRA.

The Ray runs have a process of their own (spawned, its own Ray driver), as in
tests/test_training.py: driver-side Ray state shared with other test modules made the Train
controller disappear in the full suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tests.test_training import _examples
from troupe.config import ConfigError
from troupe.train import lora

R, ALPHA = 4, 8.0


def _dpo_examples() -> list[dict]:
    sys_msg = {"role": "system", "content": "You are Ann, a baker. Stay in character."}
    return [
        {
            "prompt": [sys_msg, {"role": "user", "content": f"What do you bake on day {i}?"}],
            "chosen": [{"role": "assistant", "content": f"Rye bread on day {i}!<emotion>happy</emotion>"}],
            "rejected": [{"role": "assistant", "content": "As an AI language model, I cannot bake."}],
        }
        for i in range(4)
    ]


def _train_in_fresh_process(model_dir: str, tmp: str) -> None:
    """LoRA SFT from the tiny model, then LoRA DPO from the merged SFT model, on one local Ray cluster."""
    import os

    import ray
    from transformers import AutoTokenizer

    from troupe.train.distributed import run_on_ray, train_loop

    os.environ["TROUPE_SCRATCH"] = str(Path(tmp) / "scratch")  # the local cluster inherits it
    tok = AutoTokenizer.from_pretrained(model_dir)
    train = {
        "accelerator": "cpu",
        "num_workers": 2,
        "zero_stage": 3,
        "max_failures": 0,
        "method": "lora",
        "lora_r": R,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "lora_target_modules": "all-linear",
    }
    common = dict(train=train, cutoff_len=256, base_model_setting="paths.base_model")
    sft = dict(
        method="sft",
        hp={"max_steps": 3, "per_device_batch_size": 2, "learning_rate": 1e-2, "packing": True},
        base_model=model_dir,
        out=str(Path(tmp) / "sft"),
        run_name="lora-sft",
        examples=_examples(tok),
        **common,
    )
    dpo = dict(
        method="dpo",
        hp={"max_steps": 1, "per_device_batch_size": 1, "learning_rate": 1e-2, "beta": 0.1},
        base_model=str(Path(tmp) / "sft"),
        out=str(Path(tmp) / "dpo"),
        run_name="lora-dpo",
        examples=_dpo_examples(),
        **common,
    )
    try:
        for cfg in (sft, dpo):
            run_on_ray(train_loop, cfg, train, name=cfg["run_name"], storage_uri=str(Path(tmp) / "ray"))
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def lora_runs(tiny_model_dir, tmp_path_factory) -> Path:
    """Output root of the two Ray runs: ``sft/`` (LoRA SFT) and ``dpo/`` (LoRA DPO on the merged SFT)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    tmp = tmp_path_factory.mktemp("lora")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_train_in_fresh_process, str(tiny_model_dir), str(tmp)).result(timeout=900)
    return tmp


def _state(d: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {
        k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(str(d)).state_dict().items()
    }


def test_lora_sft_on_zero3_trains_only_the_adapter_and_writes_adapter_and_merged_model(
    lora_runs, tiny_model_dir
):
    from safetensors.torch import load_file

    out = lora_runs / "sft"
    ad = out / lora.ADAPTER_DIR
    assert (ad / "adapter_config.json").is_file() and (ad / "adapter_model.safetensors").is_file()
    note = json.loads((ad / lora.ADAPTER_NOTE).read_text())
    assert note["base_model"] == str(tiny_model_dir) and note["method"] == "lora" and note["r"] == R
    assert json.loads((ad / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_model_dir
    )
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "train_log.json").read_text())["global_step"] == 3

    weights = load_file(str(ad / "adapter_model.safetensors"))
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights), sorted(weights)[:5]
    # 2 layers x 7 projections (q, k, v, o, gate, up, down) x (A, B): every linear but the output layer
    assert len(weights) == 2 * 7 * 2
    bs = {k: v for k, v in weights.items() if "lora_B" in k}
    assert all(v.abs().max() > 0 for v in bs.values())  # B starts at zero: the adapter trained

    # the base is frozen: the merged model is the base plus (alpha/r) B@A on the adapted matrices
    # and the base itself everywhere else (embeddings, norms)
    base, merged = _state(tiny_model_dir), _state(out)
    assert base.keys() == merged.keys()
    adapted = 0
    for k, w in base.items():
        mod = k.removesuffix(".weight")
        a_key = next((x for x in weights if x.endswith(f"{mod}.lora_A.weight")), None)
        if a_key is None:
            assert torch.equal(merged[k], w), k
            continue
        b = weights[a_key.replace("lora_A", "lora_B")].float()
        delta = (ALPHA / R) * b @ weights[a_key].float()
        torch.testing.assert_close(merged[k] - w, delta, atol=1e-5, rtol=1e-4)
        adapted += 1
    assert adapted == 2 * 7


def test_merged_logits_equal_the_peft_models_and_cli_merge_reproduces_them(
    lora_runs, tiny_model_dir, tmp_path
):
    from click.testing import CliRunner
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from troupe.modeling import model_cli

    out = lora_runs / "sft"
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("Rye bread on day 3, want a slice?", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, str(out / lora.ADAPTER_DIR)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        lp, lm = peft_model(ids).logits, merged(ids).logits
    torch.testing.assert_close(lm, lp, atol=1e-4, rtol=1e-4)
    assert (lm - base_logits).abs().max() > 1e-3  # the adapter changed the model

    # `troupe model merge` on the step's adapter (base from its note) gives the same checkpoint
    res = CliRunner().invoke(
        model_cli, ["merge", "--adapter", str(out), "--out", str(tmp_path / "m")], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).eval()
    assert AutoTokenizer.from_pretrained(str(tmp_path / "m")).chat_template == tok.chat_template
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, lm, atol=1e-5, rtol=1e-5)


def test_lora_dpo_runs_on_the_merged_sft_model(lora_runs):
    out = lora_runs / "dpo"
    log = json.loads((out / "train_log.json").read_text())
    assert log["global_step"] == 1 and log["log_history"]
    note = json.loads((out / lora.ADAPTER_DIR / lora.ADAPTER_NOTE).read_text())
    assert note["base_model"] == str(lora_runs / "sft") and note["step"] == "dpo"
    assert (out / "model.safetensors").is_file()


def test_qlora_without_a_gpu_is_a_config_error_naming_the_setting():
    with pytest.raises(ConfigError, match=r"train\.method=qlora needs a CUDA GPU.*train\.accelerator=cpu"):
        lora.check_method({"method": "qlora", "accelerator": "cpu"})
    # the driver stops before any storage, MLflow or Ray work (the base model does not even exist)
    from troupe.train.distributed import run_training_step

    with pytest.raises(ConfigError, match="train.method=qlora"):
        run_training_step(
            {"train": {"method": "qlora", "accelerator": "ascend"}}, "sft", [], "/nonexistent", "/x", {}
        )
    if not torch.cuda.is_available():  # inside a worker of an nvidia run on a machine without CUDA
        with pytest.raises(ConfigError, match="no CUDA device"):
            lora.load_kwargs({"method": "qlora", "accelerator": "nvidia"})
    with pytest.raises(ConfigError, match="train.method='dora'"):
        lora.method({"method": "dora"})
    assert lora.load_kwargs({"method": "lora"}) == {} and lora.trainer_kwargs({"method": "full"}) == {}


# --- troupe plan: LoRA / QLoRA in the memory model ------------------------------------------------


def _small_arch():
    from troupe.plan import Arch

    # the tiny test model's shape (troupe.modeling.TINY_CONFIG) with a 1000-token vocabulary
    return Arch(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1000, tied_embeddings=True)


def test_plan_lora_matches_a_hand_computation():
    """Hand computation, h=64, kv width 2*16=32, i=128, L=2, r=8, Nd=2, ZeRO-3, fp32 grads:
    adapters per layer r*[(64+64) q + (64+32) k + (64+32) v + (64+64) o + 3*(64+128) MLP] = 8*1024
    = 8192, x2 layers = 16384. N = 1000*64 (tied) + 2*(12288 attn + 24576 MLP + 128 norms) + 64
    = 138048. Per device: parameters (2N frozen + 2*16384) / 2 = 154432; gradients (2 + 2 fp32 at
    stage 3) * 16384 / 2 = 32768; Adam 12 * 16384 / 2 = 98304; gathered 2 B x the 64000-param
    embedding = 128000. Full training: 138048, 276096, 828288, 256000."""
    from troupe.plan import PlanInput, make_plan

    base = dict(arch=_small_arch(), nodes=1, devices_per_node=2, zero_stage=3, lora_r=8)
    lo = make_plan(PlanInput(**base, train_method="lora"))
    assert lo.trainable_params == 16384 and lo.n_params == 138048
    assert (lo.params_bytes, lo.grads_bytes, lo.optimizer_bytes, lo.gathered_bytes) == (
        154432,
        32768,
        98304,
        128000,
    )
    full = make_plan(PlanInput(**base))
    assert (full.params_bytes, full.grads_bytes, full.optimizer_bytes, full.gathered_bytes) == (
        138048,
        276096,
        828288,
        256000,
    )
    # QLoRA: the 2*(8192 + 4096 + 24576) = 73728 linear weights at 4.127 bits (QLoRA §3: 4 + 8/64 +
    # 32/(64*256)) = 38034 bytes, the other 64320 params in bf16: (38034 + 128640 + 32768) / 2
    assert make_plan(PlanInput(**base, train_method="qlora")).params_bytes == 99721
    # FLOPs per token: 4N + 6*N_lora (no weight gradients for the frozen base) vs 6N
    assert lo.flops_per_step / lo.tokens_per_step == 4 * 138048 + 6 * 16384
    assert full.flops_per_step / full.tokens_per_step == 6 * 138048


def test_plan_adapter_count_equals_peft_on_the_tiny_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from troupe.plan import arch_from_config

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    arch = arch_from_config(model.config.to_dict())
    for r, targets in [(8, "all-linear"), (4, ["q_proj", "v_proj"])]:
        m = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
            LoraConfig(r=r, target_modules=targets, task_type="CAUSAL_LM"),
        )
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        assert lora.adapter_params(arch, r, targets) == trainable
    assert lora.adapter_params(arch, 8) == 16384
    with pytest.raises(ValueError, match="lm_head"):
        lora.adapter_params(arch, 8, "q_proj,lm_head")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_plan_lora_needs_less_memory_than_full_and_qlora_less_than_lora(stage, method):
    from troupe.plan import MODELS, PlanInput, make_plan

    kw = dict(arch=MODELS["qwen2.5-7b"], devices_per_node=8, zero_stage=stage, method=method)
    full, lo, q = (make_plan(PlanInput(**kw, train_method=m)) for m in ("full", "lora", "qlora"))
    assert q.total_bytes < lo.total_bytes < full.total_bytes
    assert q.model_states_bytes < lo.model_states_bytes < full.model_states_bytes
    assert lo.activation_bytes == full.activation_bytes  # activations counted as for full training
    if method == "dpo":
        assert full.reference_bytes > 0 and lo.reference_bytes == 0  # adapter-disabled reference


def test_plan_cli_lora_options_and_suggestion():
    from troupe.plan import plan_cmd

    r = CliRunner().invoke(
        plan_cmd, ["--model", "qwen2.5-32b", "--train-method", "lora", "--lora-r", "16", "--json"]
    )
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    # Qwen2.5-32B, r=16, all-linear: 16*(2*5120+2*(5120+1024)+2*5120+3*(5120+27648)) * 64 layers
    assert got["trainable_params"] == 134_217_728 and got["input"]["train_method"] == "lora"
    # full 32B SFT on one 8-GPU node at ZeRO-2 does not fit; LoRA is one of the changes that fit
    r = CliRunner().invoke(plan_cmd, ["--model", "qwen2.5-32b", "--nodes", "1", "--zero-stage", "2"])
    assert r.exit_code == 3 and "--train-method lora" in r.output
    r = CliRunner().invoke(
        plan_cmd, ["--model", "qwen2.5-7b", "--accelerator", "ascend", "--train-method", "qlora"]
    )
    assert r.exit_code == 2 and "qlora needs a CUDA GPU" in r.output


# --- registry: the adapter as its own artefact ------------------------------------------------------


def test_register_logs_the_adapter_with_its_base_models_uri(
    mlflow_server, lora_runs, tiny_model_dir, tmp_path, monkeypatch
):
    import mlflow

    from tests.test_registry import GOOD_EVAL_FILES, _params
    from troupe.registry import register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("TROUPE_PIPELINE_RUN", "lora-register")
    params = _params(tmp_path, lora_runs / "sft", GOOD_EVAL_FILES, "troupe-lora-test")
    d = register(params)
    client = mlflow.MlflowClient(mlflow_server)
    mv = client.get_model_version("troupe-lora-test", d["version"])
    base = json.loads((lora_runs / "sft" / lora.ADAPTER_DIR / lora.ADAPTER_NOTE).read_text())["base_model"]
    assert mv.tags[lora.ADAPTER_BASE_TAG] == base
    assert mv.tags[lora.ADAPTER_URI_TAG] == f"{client.get_run(d['run_id']).info.artifact_uri}/adapter"
    assert client.get_run(d["run_id"]).data.tags[lora.ADAPTER_URI_TAG] == mv.tags[lora.ADAPTER_URI_TAG]
    logged = {f.path for f in client.list_artifacts(d["run_id"], "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= logged
    in_model = {f.path for f in client.list_artifacts(d["run_id"], "model")}
    assert "model/model.safetensors" in in_model and "model/adapter" not in in_model  # logged once
    # the registered adapter merges back into its base: `troupe model merge --adapter models:/...`
    got = lora.merge_adapter(f"models:/troupe-lora-test/{d['version']}", tmp_path / "merged")
    assert (got / "model.safetensors").is_file()
    # a fully trained model carries no adapter tags
    (tmp_path / "full").mkdir()
    d2 = register(_params(tmp_path / "full", tiny_model_dir, GOOD_EVAL_FILES, "troupe-lora-test"))
    assert lora.ADAPTER_URI_TAG not in client.get_model_version("troupe-lora-test", d2["version"]).tags
