"""Full-parameter DPO with TRL's ``DPOTrainer`` on Ray Train + DeepSpeed ZeRO.

Loss: DPO (Rafailov et al. 2023, arXiv:2305.18290) with ``dpo.beta``; the reference model is the
SFT model itself (TRL builds it when ``ref_model`` is None, ZeRO-3 aware). Pairs come from
``troupe train pairs`` in TRL's conversational preference format: ``prompt`` = persona card +
context messages, ``chosen`` / ``rejected`` = one assistant message each. People's side-by-side
preferences (``troupe feedback export``) join them when ``feedback.pairs`` names their file.
"""

from __future__ import annotations

from typing import Any

from troupe.config import ConfigError, section
from troupe.contract import PreferencePair, load_characters, read_jsonl


def human_pairs(params: dict[str, Any]) -> list[PreferencePair]:
    """The human preference pairs named by ``feedback.pairs`` (``troupe feedback export``'s
    ``pairs.jsonl``, a path or URI); none when the setting is empty or absent."""
    from troupe import storage

    uri = str((params.get("feedback") or {}).get("pairs") or "")
    if not uri:
        return []
    return read_jsonl(storage.local_copy(uri, what="feedback.pairs"), PreferencePair)


def build_dpo_examples(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Conversational preference examples from ``paths.pairs/pairs.jsonl`` plus the human pairs of
    ``feedback.pairs`` (:func:`human_pairs`), generated pairs first.

    Raises:
        ConfigError: a pair's character has no persona card in ``paths.splits`` (names pair and character).
    """
    from troupe import storage
    from troupe.train.encoding import chat_messages
    from troupe.train.pairs import load_pairs

    paths = section(params, "paths")
    chars = load_characters(storage.local_copy(paths["splits"], what="paths.splits") / "characters.jsonl")
    pairs = load_pairs(storage.local_copy(paths["pairs"], what="paths.pairs")) + human_pairs(params)
    for p in pairs:
        if p.character_id not in chars:
            raise ConfigError(f"pair {p.id}: character {p.character_id!r} has no card in {paths['splits']}")
    return [
        {
            "prompt": chat_messages(p.messages, chars[p.character_id]),
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        }
        for p in pairs
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
    return args, node_local_dpo_trainer(DPOTrainer)


def node_local_dpo_trainer(base: type) -> type:
    """``base`` (TRL's ``DPOTrainer``) whose precomputed reference log-probs are cached per node.

    TRL writes the cache of precomputed reference log-probs on the global main process only and
    every rank then reads that file back, which needs a disk shared by all nodes. Here the rank that
    wrote its node's dataset copy (:data:`troupe.train.distributed.NODE_WRITER`) writes it into the
    node's own dataset directory (all ranks hold the gathered log-probs, so every node writes the
    same values); nothing is read across nodes.
    """
    import accelerate

    from troupe.train import distributed

    class NodeLocalDPOTrainer(base):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            prop = accelerate.Accelerator.is_main_process
            accelerate.Accelerator.is_main_process = property(lambda a: distributed.NODE_WRITER)
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                accelerate.Accelerator.is_main_process = prop

    NodeLocalDPOTrainer.__name__ = NodeLocalDPOTrainer.__qualname__ = f"NodeLocal{base.__name__}"
    return NodeLocalDPOTrainer


def train_dpo(params: dict[str, Any]) -> str:
    """Run DPO from ``paths.sft_model`` on ``paths.pairs``; writes ``paths.dpo_model`` and returns it.

    ``paths.*`` may be local paths or URIs (:mod:`troupe.storage`), checked before any compute.

    Raises:
        ConfigError: no preference pair to train on.
        troupe.storage.StorageError: an input that cannot be read (names the setting and why).
    """
    from troupe import storage
    from troupe.train.distributed import run_training_step

    section(params, "dpo")
    paths = section(params, "paths")
    storage.check_readable(paths["sft_model"], "paths.sft_model", kind="dir")
    examples = build_dpo_examples(params)
    if not examples:
        raise ConfigError(f"{paths['pairs']}/pairs.jsonl: no preference pairs")
    human = len(human_pairs(params))
    counts = {"pairs": len(examples), **({"human_pairs": human} if human else {})}
    print(f"[dpo] {len(examples)} pairs ({human} human), policy/reference {paths['sft_model']}", flush=True)
    return run_training_step(
        params,
        "dpo",
        examples,
        str(paths["sft_model"]),
        str(paths["dpo_model"]),
        counts,
        base_model_setting="paths.sft_model",
    )
