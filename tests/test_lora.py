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

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(str(d)).state_dict().items()}


def test_lora_sft_on_zero3_trains_only_the_adapter_and_writes_adapter_and_merged_model(
    lora_runs, tiny_model_dir
):
    from safetensors.torch import load_file

    out = lora_runs / "sft"
    ad = out / lora.ADAPTER_DIR
    assert (ad / "adapter_config.json").is_file() and (ad / "adapter_model.safetensors").is_file()
    note = json.loads((ad / lora.ADAPTER_NOTE).read_text())
    assert note["base_model"] == str(tiny_model_dir) and note["method"] == "lora" and note["r"] == R
    assert json.loads((ad / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
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


def test_merged_logits_equal_the_peft_models_and_cli_merge_reproduces_them(lora_runs, tiny_model_dir, tmp_path):
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
