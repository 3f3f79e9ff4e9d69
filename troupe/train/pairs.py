"""DPO preference pairs built from the model's own samples.

For each training context (a dialogue prefix ending in a user turn) the chosen reply is the
reference character reply; the rejected reply is the SFT model's own sample when it breaks an
automatic rule (:func:`troupe.checks.check_reply`), else the base model's sample (an untuned,
assistant-like reply). DOMAIN.md: sampling the model's own outputs as candidates "worked
surprisingly well"; Index-1.9B-Character uses the same recipe. Pairs whose rejected text equals the
chosen one are dropped and counted.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from troupe.checks import check_reply, last_user_text
from troupe.config import section
from troupe.contract import Dialogue, Message, PreferencePair, load_characters, read_jsonl, write_jsonl


def contexts(
    dialogues: list[Dialogue], max_pairs: int, seed: int
) -> list[tuple[Dialogue, list[Message], str]]:
    """(dialogue, context messages ending in a user turn, reference assistant reply) triples.

    One context per assistant turn, sampled without replacement up to ``max_pairs`` (seeded).
    """
    out = []
    for d in dialogues:
        for i, m in enumerate(d.messages):
            if m.role == "assistant" and i > 0 and d.messages[i - 1].role == "user":
                out.append((d, d.messages[:i], m.content))
    random.Random(seed).shuffle(out)
    return out[:max_pairs] if max_pairs else out


def build_pairs(params: dict[str, Any]) -> str:
    """Write ``paths.pairs/pairs.jsonl`` + ``pairs_report.json``; returns ``paths.pairs``.

    Reads ``paths.splits`` (train.jsonl, characters.jsonl), ``paths.sft_model`` and ``paths.base_model``;
    each a local path or a URI (:mod:`troupe.storage`).
    """
    from troupe import storage

    paths = section(params, "paths")
    with storage.output_dir(paths["pairs"]) as out:
        _build_pairs(params, out)
    return str(paths["pairs"])


def _build_pairs(params: dict[str, Any], out: Path) -> None:
    from troupe import storage
    from troupe.generation import generate
    from troupe.modeling import load_model
    from troupe.train.encoding import prompt_text

    cfg = section(params, "pairs")
    paths = section(params, "paths")
    splits = storage.local_copy(paths["splits"], what="paths.splits")
    chars = load_characters(splits / "characters.jsonl")
    ctx = contexts(
        read_jsonl(splits / "train.jsonl", Dialogue),
        int(cfg.get("max_pairs", 32)),
        int(params.get("sft", {}).get("seed", 17)),
    )
    gen_kw = dict(
        max_new_tokens=int(cfg.get("max_new_tokens", 48)), temperature=float(cfg.get("temperature", 0.9))
    )
    sft_model, tok = load_model(storage.local_copy(paths["sft_model"], what="paths.sft_model"))
    prompts = [prompt_text(tok, msgs, chars[d.character_id]) for d, msgs, _ in ctx]
    sft_samples = generate(sft_model, tok, prompts, desc="pairs/sft", **gen_kw)
    del sft_model
    checks = [
        check_reply(
            s,
            character_name=chars[d.character_id].name,
            language=chars[d.character_id].language,
            user_text=last_user_text(msgs),
        )
        for (d, msgs, _), s in zip(ctx, sft_samples, strict=True)
    ]
    need_base = [i for i, c in enumerate(checks) if not c.violations]
    base_samples: dict[int, str] = {}
    if need_base:
        base_model, btok = load_model(storage.local_copy(paths["base_model"], what="paths.base_model"))
        gens = generate(
            base_model, btok, [prompts[i] for i in need_base], desc="pairs/base", seed=1, **gen_kw
        )
        base_samples = dict(zip(need_base, gens, strict=True))
    pairs, dropped, by_source = [], 0, {"sft_violation": 0, "base": 0}
    for i, ((d, msgs, ref), c) in enumerate(zip(ctx, checks, strict=True)):
        if c.violations:
            rejected, src = sft_samples[i], "sft_violation"
        else:
            rejected, src = base_samples[i], "base"
        if rejected.strip() == ref.strip() or not rejected.strip():
            dropped += 1
            continue
        by_source[src] += 1
        pairs.append(
            PreferencePair(
                id=f"{d.id}#{len(msgs)}",
                character_id=d.character_id,
                messages=msgs,
                chosen=ref,
                rejected=rejected,
                meta={"rejected_source": src, "violations": c.violations},
            )
        )
    write_jsonl(out / "pairs.jsonl", pairs)
    report = {
        "contexts": len(ctx),
        "pairs": len(pairs),
        "dropped_identical_or_empty": dropped,
        "rejected_source": by_source,
    }
    (out / "pairs_report.json").write_text(json.dumps(report, indent=2))
    print(f"[pairs] {report}", flush=True)


def load_pairs(pairs_dir: Path) -> list[PreferencePair]:
    """Read ``pairs.jsonl`` from a pairs directory."""
    return read_jsonl(pairs_dir / "pairs.jsonl", PreferencePair)
