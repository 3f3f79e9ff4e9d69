"""Full-parameter DPO with TRL's ``DPOTrainer`` on Ray Train + DeepSpeed ZeRO.

Loss: DPO (Rafailov et al. 2023, arXiv:2305.18290) with ``dpo.beta``; the reference model is the
SFT model itself (TRL builds it when ``ref_model`` is None, ZeRO-3 aware). Pairs come from
``troupe train pairs`` in TRL's conversational preference format: ``prompt`` = persona card +
context messages, ``chosen`` / ``rejected`` = one assistant message each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from troupe.config import ConfigError, path_of, section
from troupe.contract import load_characters


def build_dpo_examples(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Conversational preference examples from ``paths.pairs/pairs.jsonl``."""
    from troupe.train.encoding import chat_messages
    from troupe.train.pairs import load_pairs

    chars = load_characters(path_of(params, "splits") / "characters.jsonl")
    return [
        {
            "prompt": chat_messages(p.messages, chars[p.character_id]),
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in load_pairs(path_of(params, "pairs"))
    ]


def make_trainer_args(cfg: dict[str, Any], common: dict[str, Any]):
    """(``trl.DPOConfig``, ``trl.DPOTrainer``) for the ``dpo`` params section ``cfg["hp"]``."""
    from trl import DPOConfig, DPOTrainer

    hp = cfg["hp"]
    args = DPOConfig(
        output_dir=cfg["scratch"],
        max_steps=int(hp["max_steps"]),
        per_device_train_batch_size=int(hp["per_device_batch_size"]),
        gradient_accumulation_steps=int(hp.get("gradient_accumulation_steps", 1)),
        learning_rate=float(hp["learning_rate"]),
        lr_scheduler_type=hp.get("lr_scheduler_type", "cosine"),
        beta=float(hp.get("beta", 0.1)),
        # reference log-probs computed once before training: no reference model in memory while the
        # policy trains (peak memory per worker roughly halves; measured ~9 GB -> see docs/benchmarks.md)
        precompute_ref_log_probs=bool(hp.get("precompute_ref_log_probs", True)),
        max_length=int(cfg["cutoff_len"]),
        seed=int(hp.get("seed", 17)),
        **common,
    )
    return args, DPOTrainer


def train_dpo(params: dict[str, Any]) -> Path:
    """Run DPO from ``paths.sft_model`` on ``paths.pairs``; writes ``paths.dpo_model`` and returns it.

    Raises:
        ConfigError: no preference pair to train on.
    """
    from troupe.train.distributed import run_training_step

    section(params, "dpo")
    examples = build_dpo_examples(params)
    if not examples:
        raise ConfigError(f"{path_of(params, 'pairs') / 'pairs.jsonl'}: no preference pairs")
    print(f"[dpo] {len(examples)} pairs, policy/reference {path_of(params, 'sft_model')}", flush=True)
    return run_training_step(
        params,
        "dpo",
        examples,
        path_of(params, "sft_model"),
        path_of(params, "dpo_model").resolve(),
        {"pairs": len(examples)},
    )
