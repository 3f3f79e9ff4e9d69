"""Evaluation generation: persona-card prefix reuse (PrefixGenerator) vs plain ``model.generate``.

    python benchmarks/bench_generate.py [--model DIR] [--prompts 64] [--max-new-tokens 48]
                                        [--batch-size 8] [--repeats 3]

Both variants get the same prompts (held-out-style items from ``data/sample``: character turns with
their reference history, a seeded sample of ``--prompts`` from the first ``--characters`` characters,
i.e. about prompts/characters turns per persona card; the default run's held-out-characters split has
~40 per card, its held-out-dialogues split ~15), greedy decoding, the same token budget and batch
size, on the same model and threads, run interleaved (plain, prefix, plain, prefix, ...):

* plain  = :func:`troupe.generation.generate`, left-padded batches of whole chat-templated prompts
  (what evaluation did before);
* prefix = :class:`troupe.generation.PrefixGenerator` with an empty cache at the start of each
  repeat, so each character's card is prefilled once per repeat (its cost is included).

Prints per repeat and as median [min, max]: new tokens/s, prompt tokens/s (unpadded prompt tokens
processed per second of wall time), and the ratio prefix/plain of the medians; and how many replies
are identical between the two (greedy, so they should all be). Without ``--model`` the embedded
SmolLM2-135M-Instruct is materialised once under ``~/.cache/troupe/bench/smollm2-135m``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def _model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    d = Path.home() / ".cache" / "troupe" / "bench" / "smollm2-135m"
    if not (d / "config.json").is_file():
        from troupe.modeling import prepare_base

        prepare_base("smollm2-135m", d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: embedded SmolLM2-135M)")
    ap.add_argument(
        "--data", default=str(REPO / "data" / "sample"), help="troupe-format dir (characters/dialogues)"
    )
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--characters", type=int, default=4, help="characters the prompts come from")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import torch

    from troupe.contract import Dialogue, load_characters, read_jsonl
    from troupe.evaluate import eval_items, eval_request
    from troupe.generation import PrefixGenerator, generate
    from troupe.modeling import load_model

    model_dir = _model_dir(a.model)
    model, tok = load_model(model_dir)
    chars = load_characters(Path(a.data) / "characters.jsonl")
    dialogues = read_jsonl(Path(a.data) / "dialogues.jsonl", Dialogue)
    keep = list(dict.fromkeys(d.character_id for d in dialogues))[: a.characters]
    items = eval_items([d for d in dialogues if d.character_id in keep], a.prompts, seed=0)
    reqs = [eval_request(d, i, chars[d.character_id], a.max_new_tokens) for d, i in items]
    prompts = [tok.apply_chat_template(r.messages, tokenize=False, add_generation_prompt=True) for r in reqs]
    prompt_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    print(
        f"model={model_dir} prompts={len(reqs)} characters={len({d.character_id for d, _ in items})} "
        f"prompt_tokens={prompt_tokens} (mean {prompt_tokens / len(reqs):.0f}) max_new_tokens={a.max_new_tokens} "
        f"batch_size={a.batch_size} threads={torch.get_num_threads()} repeats={a.repeats}",
        flush=True,
    )
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "prefix": []}
    same = 0
    for rep in range(a.repeats):
        t0 = time.perf_counter()
        plain = generate(
            model, tok, prompts, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, desc="plain"
        )
        t_plain = time.perf_counter() - t0
        gen = PrefixGenerator(model, tok)  # empty cache: each card is prefilled once in this repeat
        t0 = time.perf_counter()
        res = gen.generate(reqs, batch_size=a.batch_size)
        t_prefix = time.perf_counter() - t0
        pref_new = sum(r.completion_tokens for r in res)
        same = sum(p == r.text for p, r in zip(plain, res, strict=True))
        # greedy: both produce the same tokens (counted once, from the prefix run; see "identical")
        runs["plain"].append((pref_new / t_plain, prompt_tokens / t_plain))
        runs["prefix"].append((pref_new / t_prefix, prompt_tokens / t_prefix))
        print(
            f"repeat {rep + 1}: plain {t_plain:.1f}s {pref_new / t_plain:.1f} new tok/s | "
            f"prefix {t_prefix:.1f}s {pref_new / t_prefix:.1f} new tok/s | identical replies {same}/{len(reqs)}",
            flush=True,
        )

    def summary(xs: list[float]) -> str:
        return f"{statistics.median(xs):8.1f} [{min(xs):.1f}, {max(xs):.1f}]"

    print("\nvariant   new tok/s median [min, max]   prompt tok/s median [min, max]")
    for k, v in runs.items():
        print(f"{k:8s} {summary([x for x, _ in v])}      {summary([y for _, y in v])}")
    r_new = statistics.median(x for x, _ in runs["prefix"]) / statistics.median(x for x, _ in runs["plain"])
    r_prompt = statistics.median(y for _, y in runs["prefix"]) / statistics.median(
        y for _, y in runs["plain"]
    )
    print(
        f"ratio prefix/plain: new tok/s x{r_new:.2f}, prompt tok/s x{r_prompt:.2f}; identical replies {same}/{len(reqs)}"
    )


if __name__ == "__main__":
    main()
