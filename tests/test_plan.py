"""Scale plan: model-state figures equal DeepSpeed's own estimators; CLI fit / no-fit behaviour."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from troupe.plan import MODELS, PlanInput, activation_bytes, make_plan, plan_cmd, resolve_model

REL = 1e-6  # DeepSpeed truncates to int bytes

CASES = [
    ("qwen2.5-32b", 2, 8),
    ("qwen2.5-32b", 1, 8),
    ("qwen2.5-7b", 1, 8),
    ("qwen2.5-7b", 4, 8),
    ("smollm2-135m", 1, 2),
]


def _states(plan) -> float:
    return plan.params_bytes + plan.grads_bytes + plan.optimizer_bytes + plan.gathered_bytes


@pytest.mark.parametrize(("model", "nodes", "dpn"), CASES)
@pytest.mark.parametrize("offload", ["none", "optimizer", "param+optimizer"])
def test_zero3_matches_deepspeed(model: str, nodes: int, dpn: int, offload: str) -> None:
    arch = MODELS[model]
    plan = make_plan(PlanInput(arch=arch, nodes=nodes, devices_per_node=dpn, zero_stage=3, offload=offload))
    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
        total_params=arch.total_params(),
        largest_layer_params=arch.largest_module_params(),
        num_gpus_per_node=dpn,
        num_nodes=nodes,
        cpu_offload=offload != "none",
        cpu_offload_params=offload == "param+optimizer",
        zero_init=True,
        additional_buffer_factor=1.5,
    )
    assert _states(plan) == pytest.approx(gpu, rel=REL)
    assert plan.gathered_bytes == largest
    if offload != "none":
        assert plan.host_bytes_per_node == pytest.approx(cpu, rel=REL)


@pytest.mark.parametrize(("model", "nodes", "dpn"), CASES)
@pytest.mark.parametrize("offload", ["none", "optimizer"])
def test_zero2_matches_deepspeed(model: str, nodes: int, dpn: int, offload: str) -> None:
    arch = MODELS[model]
    plan = make_plan(PlanInput(arch=arch, nodes=nodes, devices_per_node=dpn, zero_stage=2, offload=offload))
    _cpu, gpu = estimate_zero2_model_states_mem_needs(
        total_params=arch.total_params(),
        num_gpus_per_node=dpn,
        num_nodes=nodes,
        cpu_offload=offload != "none",
    )
    assert _states(plan) == pytest.approx(gpu, rel=REL)


def test_zero_paper_bytes_per_param() -> None:
    """Without DeepSpeed's fp32 grad copy: ZeRO paper Fig. 1 (Psi=7.5B, Nd=64): 120 / 31.4 / 16.6 / 1.9 GB."""
    arch = MODELS["qwen2.5-7b"]
    n = 7_500_000_000
    want = {0: 120e9, 1: 31.4e9, 2: 16.6e9, 3: 1.9e9}
    for stage, gb in want.items():
        plan = make_plan(
            PlanInput(arch=arch, params=n, nodes=8, devices_per_node=8, zero_stage=stage, fp32_grads=False)
        )
        states = plan.params_bytes + plan.grads_bytes + plan.optimizer_bytes
        assert states == pytest.approx(gb, rel=0.02), stage


def test_param_counts_match_published_sizes() -> None:
    assert MODELS["qwen2.5-32b"].total_params() == pytest.approx(32.76e9, rel=0.01)
    assert MODELS["qwen2.5-7b"].total_params() == pytest.approx(7.62e9, rel=0.01)
    assert MODELS["smollm2-135m"].total_params() == pytest.approx(134.5e6, rel=0.01)
    assert resolve_model("Qwen/Qwen2.5-32B-Instruct") is MODELS["qwen2.5-32b"]
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model("llama-9000")


def test_activations_korthikanti_gpt_form() -> None:
    """GeLU MLP with i=4h and no FlashAttention gives the paper's sbh(34 + 5as/h) per layer."""
    from troupe.plan import Arch

    a = Arch(layers=2, hidden=1024, heads=16, kv_heads=16, intermediate=4096, vocab=1, gated_mlp=False)
    s, b, h = 2048, 2, 1024
    per_layer = s * b * h * (34 + 5 * 16 * s / h)
    output = 5 * s * b * h + 4 * s * b * 1
    assert activation_bytes(a, s, b, checkpointing=False, flash_attention=False) == per_layer * 2 + output
    ckpt = activation_bytes(a, s, b, checkpointing=True, flash_attention=False)
    assert ckpt == 2 * s * b * h * 2 + per_layer + output


def test_step_time_six_n_tokens() -> None:
    plan = make_plan(PlanInput(arch=MODELS["qwen2.5-32b"], nodes=2, devices_per_node=8, mfu=0.5))
    n, tokens = plan.n_params, 4096 * 16
    assert plan.step_seconds == pytest.approx(6 * n * tokens / (16 * 989e12 * 0.5))
    assert plan.tokens_per_second == pytest.approx(tokens / plan.step_seconds)


def test_cli_fits_32b_on_2x8_h100() -> None:
    r = CliRunner().invoke(plan_cmd, ["--model", "qwen2.5-32b", "--nodes", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["fits"] is True and out["world_size"] == 16
    assert out["per_device_gib"]["total"] < out["per_device_gib"]["usable"]


def test_cli_table_and_ascend() -> None:
    r = CliRunner().invoke(plan_cmd, ["--model", "qwen2.5-32b", "--nodes", "2", "--accelerator", "ascend"])
    assert r.exit_code == 0, r.output
    assert "910B" in r.output and "optimizer states" in r.output


def test_cli_does_not_fit_names_changes() -> None:
    r = CliRunner().invoke(plan_cmd, ["--model", "qwen2.5-32b", "--nodes", "1", "--zero-stage", "2"])
    assert r.exit_code == 3
    assert "does not fit" in r.output
    assert "--offload optimizer" in r.output or "--nodes" in r.output


def test_cli_unknown_accelerator_and_bad_offload() -> None:
    r = CliRunner().invoke(plan_cmd, ["--model", "qwen2.5-7b", "--accelerator", "tpu"])
    assert r.exit_code == 2 and "unknown accelerator 'tpu'" in r.output
    r = CliRunner().invoke(
        plan_cmd, ["--model", "qwen2.5-7b", "--zero-stage", "2", "--offload", "param+optimizer"]
    )
    assert r.exit_code == 2 and "zero-stage 3" in r.output


def test_cli_params_billion_needs_shape() -> None:
    r = CliRunner().invoke(plan_cmd, ["--params-billion", "7"])
    assert r.exit_code == 2 and "--layers" in r.output
    r = CliRunner().invoke(
        plan_cmd, ["--params-billion", "7", "--layers", "32", "--hidden", "4096", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["params"] == 7_000_000_000


def _fill_auto(cfg: dict, hidden: int, micro: int, accum: int, world: int) -> dict:
    """Fill "auto" the way HF Trainer's ``HfTrainerDeepSpeedConfig`` does (hidden-size buckets, batch sizes)."""
    fills = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": 1.0,
        "enabled": True,
        "lr": 1e-5,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.0,
    }

    def walk(node):
        if isinstance(node, dict):
            return {k: (fills[k] if v == "auto" else walk(v)) for k, v in node.items()}
        return node

    return walk(cfg)


@pytest.mark.parametrize("offload", ["none", "optimizer", "param+optimizer"])
@pytest.mark.parametrize("accelerator", ["nvidia", "ascend"])
def test_generated_deepspeed_config_is_what_runs_and_deepspeed_accepts_it(
    offload: str, accelerator: str, tmp_path
) -> None:
    """One generator: `troupe plan --deepspeed-config` writes what training uses; DeepSpeed parses it
    (autos filled as HF does), overlap_comm on the device, offload pinned with DeepSpeed's own Adam."""
    from click.testing import CliRunner
    from deepspeed.runtime.config import DeepSpeedConfig

    from troupe.train.distributed import deepspeed_config

    out = tmp_path / "ds.json"
    r = CliRunner().invoke(plan_cmd, ["--model", "qwen2.5-32b", "--nodes", "2", "--devices-per-node", "8",
                                      "--offload", offload, "--accelerator", accelerator, "--json",
                                      "--deepspeed-config", str(out)])  # fmt: skip
    raw = json.loads(out.read_text())
    train = {"zero_stage": 3, "accelerator": accelerator,
             "offload": {"none": False, "optimizer": "optimizer", "param+optimizer": "all"}[offload]}  # fmt: skip
    assert raw == deepspeed_config(train)  # the plan prints what the run builds
    ds = DeepSpeedConfig(_fill_auto(raw, MODELS["qwen2.5-32b"].hidden, micro=1, accum=8, world=1))
    assert ds.zero_optimization_stage == 3 and ds.bfloat16_config.enabled
    zero = raw["zero_optimization"]
    assert zero["overlap_comm"] is True
    assert (
        "zero_force_ds_cpu_optimizer" not in raw
    )  # DeepSpeed's guard against torch Adam on offload stays on
    if offload != "none":
        assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
        assert raw["optimizer"]["type"] == "AdamW"  # DeepSpeed builds DeepSpeedCPUAdam for offloaded states
    assert r.exit_code in (0, 3), (
        r.output
    )  # 3 = does not fit (the table says why); the config is written anyway


def test_gradient_checkpointing_auto_follows_the_plan(tmp_path) -> None:
    """`auto` turns recompute on where the plan needs it (32B at 8k on 16 H100s) and off where it fits."""
    from troupe.train.distributed import gradient_checkpointing

    big = {"num_hidden_layers": 64, "hidden_size": 5120, "num_attention_heads": 40, "num_key_value_heads": 8,
           "intermediate_size": 27648, "vocab_size": 152064, "model_type": "qwen2"}  # fmt: skip
    small = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
             "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}  # fmt: skip
    for name, conf in (("big", big), ("small", small)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(conf))

    def cfg(name, setting, seq=8192, acc="nvidia"):
        return {"base_model_dir": str(tmp_path / name), "cutoff_len": seq, "method": "sft",
                "hp": {"per_device_batch_size": 1},
                "train": {"gradient_checkpointing": setting, "accelerator": acc, "num_workers": 16,
                          "zero_stage": 3}}  # fmt: skip

    assert gradient_checkpointing(cfg("big", "auto")) is True
    assert gradient_checkpointing(cfg("small", "auto", seq=1024)) is False
    assert gradient_checkpointing(cfg("big", "auto", acc="cpu")) is False
    assert gradient_checkpointing(cfg("small", True)) is True
