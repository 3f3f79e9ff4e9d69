"""Persona-card prefix KV cache: time to first token with a cold card vs a cached card (CPU).

    python benchmarks/bench_prefix_cache.py [--model DIR] [--characters 8] [--repeats 5]

Cold = the card's KV is computed with the request (cache off); cached = the card's KV comes from the
per-character LRU cache (serving.backend.PrefixCache), only the conversation suffix is prefilled.
Without --model, the tiny random test model is built in a temp dir (SmolLM2 tokenizer).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: tiny random model)")
    ap.add_argument("--characters", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    from serving.backend import GenRequest, TransformersBackend
    from troupe.contract import Character
    from troupe.persona import render_system_prompt

    model = a.model
    if model is None:
        from troupe.modeling import prepare_base

        model = os.path.join(tempfile.mkdtemp(), "tiny")
        prepare_base("tiny-random", model)
    cached = TransformersBackend(model, prefix_cache_bytes=256 << 20)
    cold = TransformersBackend(model, prefix_cache_bytes=0)
    chars = [
        Character(
            id=f"c{i}",
            name=f"角色{i}",
            language="zh",
            profile={"身份": "江湖侠客" * 20, "经历": "走遍天下" * 30},
            style="豪爽，爱开玩笑" * 10,
            examples=[f"哈哈，来喝一杯！{j}" for j in range(8)],
        )
        for i in range(a.characters)
    ]
    reqs = [
        GenRequest(
            [
                {"role": "system", "content": render_system_prompt(c)},
                {"role": "user", "content": "今天天气怎么样？"},
            ],
            1,
            0.0,
            c.id,
        )
        for c in chars
    ]
    prompt_tokens = cached.generate([reqs[0]])[0].prompt_tokens
    for r in reqs:  # warm both (torch init) and fill the cache
        cold.first_token_ms(r)
        cached.first_token_ms(r)
    t_cold, t_hit = [], []
    for _ in range(a.repeats):
        for r in reqs:
            t_cold.append(cold.first_token_ms(r)[0])
            ms, hit = cached.first_token_ms(r)
            assert hit
            t_hit.append(ms)
    st = cached.cache.stats()
    print(f"model={model} prompt_tokens~{prompt_tokens} characters={a.characters} samples={len(t_cold)}")
    print(f"TTFT cold card   p50={statistics.median(t_cold):.1f} ms  mean={statistics.mean(t_cold):.1f} ms")
    print(f"TTFT cached card p50={statistics.median(t_hit):.1f} ms  mean={statistics.mean(t_hit):.1f} ms")
    print(
        f"speed-up p50 x{statistics.median(t_cold) / statistics.median(t_hit):.2f}; cache {st['entries']} entries "
        f"{st['bytes'] / 1e6:.1f} MB, hits={st['hits']} misses={st['misses']}"
    )


if __name__ == "__main__":
    main()
