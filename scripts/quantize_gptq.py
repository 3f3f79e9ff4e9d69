"""GPTQ one-shot quantisation with llm-compressor; runs in ``.venv-quantize`` only.

Called by :func:`troupe.quantize.quantize` as ``.venv-quantize/bin/python scripts/quantize_gptq.py
SPEC.json``: llm-compressor pins transformers below the platform's, so it lives in its own venv and
this file imports nothing from Troupe. SPEC is a JSON object:

* ``model``: parent checkpoint directory (HF, float weights);
* ``out``: output directory (compressed-tensors checkpoint + tokenizer);
* ``calibration``: JSONL, one ``{"input_ids": [...]}`` per sample (already rendered and tokenised by
  Troupe with the persona cards, exactly as training encodes a dialogue);
* ``scheme``: llm-compressor preset (``W8A8``, ``W8A16``, ``W4A16``); ``max_seq_len``: tokens kept per
  sample; ``dampening``: GPTQ's ``dampening_frac`` (fraction of the Hessian's mean diagonal added to
  it); ``ignore``: module names left in full precision (``lm_head``).

GPTQ: Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323. Progress and warnings go to stderr as llm-compressor writes them.
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str) -> None:
    """Quantise ``spec["model"]`` into ``spec["out"]`` (see the module docstring for SPEC's fields)."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(open(spec_path, encoding="utf-8").read())
    rows = [json.loads(x) for x in open(spec["calibration"], encoding="utf-8") if x.strip()]
    max_len = int(spec["max_seq_len"])
    ids = [r["input_ids"][:max_len] for r in rows]
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]})
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    recipe = GPTQModifier(
        targets="Linear",
        scheme=spec["scheme"],
        ignore=list(spec.get("ignore", ["lm_head"])),
        dampening_frac=float(spec["dampening"]),
    )
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        max_seq_length=max_len,
        num_calibration_samples=len(ids),
        shuffle_calibration_samples=False,
        pipeline="basic" if spec.get("pipeline") == "basic" else "independent",
    )
    model.save_pretrained(spec["out"], save_compressed=True)
    tok.save_pretrained(spec["out"])
    print(
        json.dumps({"seconds": round(time.time() - t0, 2), "samples": len(ids)}),
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: quantize_gptq.py SPEC.json")
    main(sys.argv[1])
