"""Full-parameter SFT with TRL's ``SFTTrainer`` on Ray Train + DeepSpeed ZeRO.

Data: ``paths.splits/train.jsonl`` dialogues rendered with the persona card and the tokenizer's chat
template (:mod:`troupe.train.encoding`); loss on assistant (character) tokens only through TRL's
``assistant_masks`` column; ``data.cutoff_len`` tokens max; ``sft.packing`` uses TRL's best-fit
decreasing packing, padding-free (no pad tokens in a batch).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from troupe.config import path_of, section
from troupe.contract import Dialogue, load_characters, read_jsonl


def build_sft_examples(splits_dir: Path, tokenizer, cutoff_len: int) -> list[dict[str, list[int]]]:
    """Tokenized SFT examples ``{"input_ids", "assistant_masks"}`` for ``train.jsonl``.

    Dialogues whose assistant tokens all fall beyond ``cutoff_len`` are dropped (nothing to learn).
    """
    from troupe.train.encoding import encode_dialogue

    chars = load_characters(splits_dir / "characters.jsonl")
    out = []
    for d in read_jsonl(splits_dir / "train.jsonl", Dialogue):
        e = encode_dialogue(tokenizer, d, chars[d.character_id], cutoff_len)
        if e.n_loss_tokens:
            out.append({"input_ids": e.input_ids, "assistant_masks": e.assistant_masks})
    return out


def sft_loop(cfg: dict[str, Any]) -> None:
    """Per-worker SFT loop (runs inside a Ray Train worker). ``cfg`` is built by :func:`train_sft`."""
    import ray.train
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from troupe.train.distributed import join_deepspeed, make_progress_callback, training_args_common

    rank = ray.train.get_context().get_world_rank()
    sft, train = cfg["sft"], cfg["train"]
    join_deepspeed(train)
    args = SFTConfig(
        output_dir=cfg["scratch"],
        max_steps=int(sft["max_steps"]),
        per_device_train_batch_size=int(sft["per_device_batch_size"]),
        gradient_accumulation_steps=int(sft.get("gradient_accumulation_steps", 1)),
        learning_rate=float(sft["learning_rate"]),
        warmup_steps=float(
            sft.get("warmup_ratio", 0.0)
        ),  # a float < 1 is a ratio of max_steps (transformers 5)
        lr_scheduler_type=sft.get("lr_scheduler_type", "cosine"),
        max_length=int(cfg["cutoff_len"]),
        packing=bool(sft.get("packing", True)),
        packing_strategy="bfd",
        padding_free=bool(sft.get("packing", True)),
        seed=int(sft.get("seed", 17)),
        **training_args_common(train),
    )
    # TrainingArguments with a ZeRO-3 config must exist before from_pretrained so weights load partitioned.
    tok = AutoTokenizer.from_pretrained(cfg["base_model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["base_model"])
    ds = Dataset.from_list(cfg["examples"])
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[
            make_progress_callback("sft", args.max_steps, cfg.get("mlflow_run_id"), cfg.get("tracking_uri"))
        ],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # ProgressCallback prints one line per step instead
    result = trainer.train()
    trainer.save_model(cfg["out_dir"])  # ZeRO-3: every rank takes part in gathering the weights
    if rank == 0:
        tok.save_pretrained(cfg["out_dir"])
        hist = [h for h in trainer.state.log_history if "loss" in h]
        Path(cfg["out_dir"], "train_log.json").write_text(
            json.dumps(
                {
                    "log_history": hist,
                    "train_runtime_s": result.metrics.get("train_runtime"),
                    "tokens_seen": trainer.state.num_input_tokens_seen,
                    "global_step": trainer.state.global_step,
                },
                indent=1,
            )
        )
    ray.train.report(
        {"loss": float(result.training_loss), "tokens_seen": int(trainer.state.num_input_tokens_seen)}
    )


def train_sft(params: dict[str, Any]) -> Path:
    """Run SFT as configured in ``params`` (sections sft, train, data) and return the model dir.

    Reads ``paths.splits`` and ``paths.base_model``; writes ``paths.sft_model`` (HF checkpoint +
    ``train_log.json``) and logs params/metrics/loss curve to an MLflow child run ``sft``.
    """
    from transformers import AutoTokenizer

    from troupe.tracking import step_run, tracking_uri
    from troupe.train.distributed import run_on_ray
    from troupe.train.plots import plot_loss

    sft, train, data = section(params, "sft"), section(params, "train"), section(params, "data")
    base = path_of(params, "base_model")
    out = path_of(params, "sft_model").resolve()
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(base))
    examples = build_sft_examples(path_of(params, "splits"), tok, int(data["cutoff_len"]))
    if not examples:
        from troupe.config import ConfigError

        raise ConfigError(f"{path_of(params, 'splits') / 'train.jsonl'}: no trainable dialogues")
    n_tokens = sum(sum(e["assistant_masks"]) for e in examples)
    print(f"[sft] {len(examples)} dialogues, {n_tokens} character tokens, base {base}", flush=True)
    with step_run(params, "sft", ("sft", "train", "data", "model")) as run:
        import mlflow

        mlflow.log_metrics({"train_dialogues": len(examples), "train_loss_tokens": n_tokens})
        cfg = dict(
            sft=sft,
            train=train,
            cutoff_len=int(data["cutoff_len"]),
            base_model=str(base.resolve()),
            out_dir=str(out),
            scratch=str(out.parent / ".scratch-sft"),
            examples=examples,
            mlflow_run_id=run.info.run_id,
            tracking_uri=tracking_uri(),
        )
        t0 = time.time()
        run_on_ray(
            sft_loop, cfg, train, name=f"sft-{run.info.run_id[:8]}", storage=out.parent / ".ray-results"
        )
        mlflow.log_metric("wall_s", time.time() - t0)
        log = json.loads((out / "train_log.json").read_text())
        png = plot_loss(log["log_history"], out / "loss.png", "SFT")
        mlflow.log_artifact(str(png))
        mlflow.log_artifact(str(out / "train_log.json"))
    return out
