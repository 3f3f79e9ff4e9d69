"""Batched text generation with a local HF checkpoint (CPU or one device), for pair building and eval."""

from __future__ import annotations

import time
from collections.abc import Sequence

#: U+FFFD, what a byte-level BPE decode yields for a UTF-8 sequence the token budget cut in half
REPLACEMENT_CHAR = "\ufffd"


def decode_reply(tokenizer, token_ids) -> str:
    """Decode generated token ids (1-D) to reply text, special tokens dropped, whitespace stripped.

    A reply cut by ``max_new_tokens`` can end inside a multi-byte character (byte-level BPE spreads one
    Chinese character over several tokens); that partial character decodes to U+FFFD and is dropped.
    U+FFFD elsewhere in the text is kept.
    """
    return tokenizer.decode(token_ids, skip_special_tokens=True).rstrip().rstrip(REPLACEMENT_CHAR).strip()


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    batch_size: int = 8,
    seed: int = 0,
    desc: str = "generate",
    finished: list[bool] | None = None,
) -> list[str]:
    """Continue each prompt (already chat-templated text) and return the decoded new text.

    Args:
        prompts: N prompt strings ending with the assistant header.
        temperature: 0 = greedy; > 0 samples (top_p 0.95).
        batch_size: prompts per forward batch (left padding).

        finished: if given, one flag per prompt is appended: True when the reply ended with the
            end-of-turn token within ``max_new_tokens`` (False = cut by the budget).

    Returns:
        N replies, special tokens stripped. Prints progress (done/N, tokens/s, ETA) per batch.
    """
    import torch

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    out: list[str] = []
    t0 = time.time()
    new_tokens = 0
    for i in range(0, len(prompts), batch_size):
        batch = list(prompts[i : i + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=0.95)
        else:
            kw.update(do_sample=False)
        with torch.no_grad():
            gen = model.generate(**enc, **kw)
        new = gen[:, enc["input_ids"].shape[1] :]
        new_tokens += int((new != tokenizer.pad_token_id).sum())
        if finished is not None:
            finished.extend(bool((row == tokenizer.eos_token_id).any()) for row in new)
        out.extend(decode_reply(tokenizer, row) for row in new)
        el = time.time() - t0
        done = len(out)
        eta = el / done * (len(prompts) - done)
        print(
            f"[{desc}] {done}/{len(prompts)} replies, {new_tokens / max(el, 1e-9):.0f} tok/s, ETA {eta:.0f}s",
            flush=True,
        )
    return out
