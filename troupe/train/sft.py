"""Full-parameter SFT with TRL's ``SFTTrainer`` on Ray Train + DeepSpeed ZeRO.

Data: ``paths.splits/train.jsonl`` dialogues rendered with the persona card and the tokenizer's chat
template (:mod:`troupe.train.encoding`); loss on assistant (character) tokens only through TRL's
``assistant_masks`` column; ``data.cutoff_len`` tokens max; ``sft.packing`` uses TRL's best-fit
decreasing packing, padding-free (no pad tokens in a batch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from troupe.config import ConfigError, section
from troupe.contract import Dialogue, load_characters, read_jsonl


def build_sft_examples(
    splits_dir: Path, tokenizer, cutoff_len: int, *, mask_history: bool = False
) -> list[dict[str, list[int]]]:
    """Tokenized SFT examples ``{"input_ids", "assistant_masks"}`` for ``train.jsonl``.

    Dialogues whose assistant tokens all fall beyond ``cutoff_len`` are dropped (nothing to learn).
    ``mask_history`` (``sft.mask_history``): loss on each dialogue's last character turn only.
    General-data dialogues are rendered without a persona card (:func:`troupe.contract.general_chat`).
    """
    from troupe.train.encoding import encode_dialogue

    chars = load_characters(splits_dir / "characters.jsonl")
    out = []
    for d in read_jsonl(splits_dir / "train.jsonl", Dialogue):
        e = encode_dialogue(tokenizer, d, chars.get(d.character_id), cutoff_len, mask_history=mask_history)
        if e.n_loss_tokens:
            out.append({"input_ids": e.input_ids, "assistant_masks": e.assistant_masks})
    return out


def make_trainer_args(cfg: dict[str, Any], common: dict[str, Any]):
    """(``trl.SFTConfig``, ``trl.SFTTrainer``) for the ``sft`` params section ``cfg["hp"]``."""
    from trl import SFTConfig, SFTTrainer

    hp = cfg["hp"]
    packing = bool(hp.get("packing", True))
    args = SFTConfig(
        output_dir=cfg["scratch"],
        max_steps=int(hp["max_steps"]),
        per_device_train_batch_size=int(hp["per_device_batch_size"]),
        gradient_accumulation_steps=int(hp.get("gradient_accumulation_steps", 1)),
        learning_rate=float(hp["learning_rate"]),
        warmup_steps=float(
            hp.get("warmup_ratio", 0.0)
        ),  # a float < 1 is a ratio of max_steps (transformers 5)
        lr_scheduler_type=hp.get("lr_scheduler_type", "cosine"),
        max_length=int(cfg["cutoff_len"]),
        packing=packing,
        packing_strategy="bfd",
        padding_free=packing,
        seed=int(hp.get("seed", 17)),
        # NEFTune (Jain et al. 2023, arXiv:2310.05914): None = off in transformers
        neftune_noise_alpha=float(hp.get("neftune_noise_alpha") or 0.0) or None,
        # transformers 5 spells group_by_length as a sampling strategy (LengthGroupedSampler); with
        # packing every row is ~max_length long, so it changes nothing there
        train_sampling_strategy="group_by_length" if hp.get("group_by_length") else "random",
        **common,
    )
    return args, SFTTrainer


def train_sft(params: dict[str, Any]) -> str:
    """Run SFT as configured in ``params`` (sections sft, train, data) and return the model location.

    Reads ``paths.splits`` and ``paths.base_model``; writes ``paths.sft_model`` (HF checkpoint +
    ``train_log.json`` + loss plot) and logs params and per-step metrics to the MLflow child run
    ``sft``. Every ``paths.*`` may be a local path or a URI (``s3://...``, :mod:`troupe.storage`);
    inputs are checked before any compute starts.

    Raises:
        ConfigError: no trainable dialogue in ``train.jsonl``.
        troupe.storage.StorageError: an input that cannot be read (names the setting and why).
    """
    from transformers import AutoTokenizer

    from troupe import storage
    from troupe.train.distributed import run_training_step

    section(params, "sft")
    paths = section(params, "paths")
    base = str(paths["base_model"])
    storage.check_readable(base, "paths.base_model", kind="dir")
    splits = storage.local_copy(paths["splits"], what="paths.splits")
    tok = AutoTokenizer.from_pretrained(str(storage.local_copy(base, what="paths.base_model")))
    examples = build_sft_examples(
        splits,
        tok,
        int(section(params, "data")["cutoff_len"]),
        mask_history=bool(section(params, "sft").get("mask_history", False)),
    )
    if not examples:
        raise ConfigError(f"{paths['splits']}/train.jsonl: no trainable dialogues")
    n_tokens = sum(sum(e["assistant_masks"]) for e in examples)
    print(f"[sft] {len(examples)} dialogues, {n_tokens} character tokens, base {base}", flush=True)
    return run_training_step(
        params,
        "sft",
        examples,
        base,
        str(paths["sft_model"]),
        {"train_dialogues": len(examples), "train_loss_tokens": n_tokens},
    )
