"""Streaming that scales: time to first token (TTFT) of concurrent streams and of rotating characters.

    python benchmarks/bench_streaming.py [--model tiny|smollm2|DIR] [--repeats 3] [--max-new 32]

(a) Four concurrent streams (four characters, cards cached): TTFT of each stream, 1st to 4th by
    arrival of their first text. ``engine`` = the replica's continuous-batching loop
    (``serving.backend.TransformersBackend`` -> ``troupe.generation.DecodeEngine``; the four join one
    batch); ``old`` = the path before it, kept here as the baseline: one stream at a time under a lock,
    each a ``model.generate`` with a streamer on top of the cached card KV. Target: 4th <= 2x 1st.
(b) Eight characters with ~1,150-token persona cards, requested in rotation: TTFT of a card served
    from the token-bounded prefix cache (``model.prefix_cache_tokens``, the default 20,480) vs cold
    (no cache: the card is prefilled with the request) vs the old byte bound (``prefix_cache_mb: 64``,
    which holds one such card in fp32 SmolLM2), and with one character for reference.
    Target: cached <= 30 % of cold.

TTFT = from the request until its first visible text (a stream's first delta) in (a), and until its
first token (a 1-token request) in (b). Each figure is the median over ``--repeats`` runs, with the
spread (min-max) across runs. Models: ``tiny`` = the random test model (fast smoke run),
``smollm2`` = SmolLM2-135M prepared under work/ (``troupe.modeling.prepare_base``; the first
``work/**/troupe_base.json`` naming it), or a checkpoint dir. ``--threads``: torch threads (default 1, what a ``num_cpus: 1`` replica runs with; with 2 threads on a
busy 2-core machine an OpenMP barrier waits for a descheduled worker and single decode steps took up
to 30x longer). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.serve_fixtures (the tiny model) when run as a script


def model_dir(name: str) -> tuple[Path, str]:
    """(checkpoint dir, label) for ``tiny``, ``smollm2`` or a directory."""
    if name == "tiny":
        from tests.serve_fixtures import tiny_model

        return tiny_model(), "tiny-random (test model)"
    if name == "smollm2":
        for meta in sorted((ROOT / "work").glob("**/troupe_base.json")):
            if (
                json.loads(meta.read_text()).get("base") == "smollm2-135m"
                and (meta.parent / "config.json").is_file()
            ):
                return meta.parent, f"SmolLM2-135M ({meta.parent.relative_to(ROOT)})"
        raise SystemExit("no prepared SmolLM2-135M under work/ (dvc repro prepare_base, or --model DIR)")
    return Path(name), name


def card_text(i: int, tok, tokens: int) -> str:
    """A persona card of about ``tokens`` tokens for character ``i`` (rendered like serving's)."""
    from troupe.contract import Character
    from troupe.persona import render_system_prompt

    filler = (
        f"Character {i} grew up in harbour town number {i}, learned to sail, to trade and to tell stories. "
    )
    n = 1
    while True:
        c = Character(
            id=f"c{i}",
            name=f"Captain {i}",
            language="en",
            profile={"history": filler * n},
            style="warm, wry, talks in short sentences",
            examples=[f"Fair winds, friend number {j}!" for j in range(4)],
        )
        text = render_system_prompt(c)
        if len(tok(text, add_special_tokens=False)["input_ids"]) >= tokens:
            return text
        n += 1


def request(i: int, cards: list[str], max_new: int, prefix_cache: bool = True):
    from troupe.generation import GenRequest

    msgs = [
        {"role": "system", "content": cards[i % len(cards)]},
        {"role": "user", "content": f"Good evening, captain. Where do we sail tomorrow, and why? ({i})"},
    ]
    return GenRequest(msgs, max_new, 0.8, f"c{i % len(cards)}", top_p=0.95, seed=i)


def stat(xs: list[float]) -> str:
    return f"{statistics.median(xs):8.1f} [{min(xs):.1f}-{max(xs):.1f}]"


# -- (a) four concurrent streams ------------------------------------------------------------------------
def old_stream_ttfts(backend, reqs, lock: threading.Lock) -> list[float]:
    """The pre-engine path: each stream runs ``model.generate`` alone under the replica lock (on the
    cached card KV); returns each stream's TTFT (ms) to its first visible text."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from troupe.generation import _decode, visible_text

    t0 = time.perf_counter()
    out = [0.0] * len(reqs)

    def one(i, r):
        ids: list[int] = []
        state = {"first": True}

        class Seen(BaseStreamer):
            def put(self, value):
                if state.pop("first", False):
                    return
                ids.extend(int(t) for t in value.reshape(-1).tolist())
                if not out[i] and visible_text(_decode(backend.tok, ids), final=False):
                    out[i] = (time.perf_counter() - t0) * 1000

            def end(self):
                if not out[i]:
                    out[i] = (time.perf_counter() - t0) * 1000

        gen = backend.gen
        with lock:
            prefix, suffix = gen.texts(r.messages)
            p_ids, kv, _ = gen.prefix(r.cache_key, prefix)
            from troupe.generation import _dynamic_cache

            past = _dynamic_cache([(k.clone(), v.clone()) for k, v in kv]) if kv is not None else None
            x = torch.tensor([p_ids + gen.ids(suffix)])
            torch.manual_seed(r.seed or 0)
            with torch.no_grad():
                backend.model.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    past_key_values=past,
                    max_new_tokens=r.max_new_tokens,
                    do_sample=True,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    pad_token_id=backend.tok.pad_token_id,
                    streamer=Seen(),
                )

    ts = [threading.Thread(target=one, args=(i, r)) for i, r in enumerate(reqs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sorted(out)


def engine_stream_ttfts(backend, reqs) -> list[float]:
    """Concurrent streams through the engine; each stream's TTFT (ms) to its first delta."""
    t0 = time.perf_counter()
    out = [0.0] * len(reqs)

    def one(i, r):
        for _d in backend.stream(r):
            if not out[i]:
                out[i] = (time.perf_counter() - t0) * 1000

    ts = [threading.Thread(target=one, args=(i, r)) for i, r in enumerate(reqs)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sorted(out)


def bench_concurrent(path: Path, repeats: int, max_new: int, card_tokens: int) -> None:
    from serving.backend import TransformersBackend

    be = TransformersBackend(path, prefix_cache_bytes=0, prefix_cache_tokens=20480, batch_wait_s=0.02)
    cards = [card_text(i, be.tok, card_tokens) for i in range(4)]
    reqs = [request(i, cards, max_new) for i in range(4)]
    for r in reqs:  # warm up torch and fill the card cache (both paths use it)
        be.generate([r])
    lock = threading.Lock()
    runs: dict[str, list[list[float]]] = {"engine": [], "old": [], "engine, 1 stream": []}
    for _ in range(repeats):
        runs["old"].append(old_stream_ttfts(be, reqs, lock))
        runs["engine"].append(engine_stream_ttfts(be, reqs))
        runs["engine, 1 stream"].append(engine_stream_ttfts(be, reqs[:1]))
    print(f"\n(a) 4 concurrent streams, cards ~{card_tokens} tokens cached, max_new_tokens={max_new}")
    print("    TTFT ms, median [min-max] over runs; streams ordered by first text")
    print(f"    {'path':18s} {'1st':>22s} {'2nd':>22s} {'3rd':>22s} {'4th':>22s}  4th/1st")
    for name, rs in runs.items():
        cols = list(zip(*rs, strict=True))
        cells = " ".join(f"{stat(list(c)):>22s}" for c in cols)
        ratio = [r[-1] / r[0] for r in rs] if len(cols) > 1 else []
        rt = f"  {statistics.median(ratio):.2f}x [{min(ratio):.2f}-{max(ratio):.2f}]" if ratio else ""
        print(f"    {name:18s} {cells}{rt}")
    st = be.engine.stats()
    print(
        f"    engine: largest batch {st['largest_batch']}, {st['steps']} decode steps, {st['prefills']} prefills"
    )


# -- (b) rotating characters ----------------------------------------------------------------------------
def bench_rotation(path: Path, repeats: int, card_tokens: int, n_chars: int = 8) -> None:
    from serving.backend import TransformersBackend
    from troupe.generation import DEFAULT_PREFIX_CACHE_TOKENS

    configs = {
        f"cached (prefix_cache_tokens={DEFAULT_PREFIX_CACHE_TOKENS})": dict(
            prefix_cache_bytes=0, prefix_cache_tokens=DEFAULT_PREFIX_CACHE_TOKENS
        ),
        "old bound (prefix_cache_mb=64)": dict(prefix_cache_bytes=64 << 20, prefix_cache_tokens=0),
        "cold (no cache)": dict(prefix_cache_bytes=0, prefix_cache_tokens=0),
    }
    backends = {name: TransformersBackend(path, **kw) for name, kw in configs.items()}
    tok = next(iter(backends.values())).tok
    cards = [card_text(i, tok, card_tokens) for i in range(n_chars)]
    res: dict[tuple[str, int], list[float]] = {}
    info = {}
    for chars in (n_chars, 1):
        reqs = [request(i, cards[:chars], 1) for i in range(n_chars)]
        for name, be in backends.items():
            for r in reqs:  # warm-up round (fills the cache as far as it holds)
                be.first_token_ms(r)
            runs = []
            for _ in range(repeats):
                runs.append(statistics.median([be.first_token_ms(r)[0] for r in reqs]))
            res[(name, chars)] = runs
            if be.cache is not None:
                info[name] = be.cache.stats()
    prompt = backends["cold (no cache)"].generate([request(0, cards, 1)])[0].prompt_tokens
    cold = {c: statistics.median(res[("cold (no cache)", c)]) for c in (n_chars, 1)}
    print(
        f"\n(b) characters in rotation, cards ~{card_tokens} tokens (prompt {prompt} tokens), 1-token requests"
    )
    print(
        "    TTFT ms: median over runs of each run's median over the rotation [min-max of runs]; ratio to cold"
    )
    print(
        f"    {'cache':40s} {f'{n_chars} characters':>24s} {'ratio':>7s} {'1 character':>24s} {'ratio':>7s}"
    )
    for name in configs:
        cells = ""
        for c in (n_chars, 1):
            xs = res[(name, c)]
            cells += f" {stat(xs):>24s} {statistics.median(xs) / cold[c]:6.0%}"
        print(f"    {name:40s}{cells}")
    for name, st in info.items():
        print(
            f"    {name}: {st['entries']} cards cached, {st['tokens']} tokens, {st['bytes'] / 2**20:.1f} MiB "
            f"({st['bytes_per_token']} B/token), evictions {st['evictions']}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | checkpoint dir")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=32, help="tokens per stream in (a)")
    ap.add_argument("--card-tokens", type=int, default=1150)
    ap.add_argument("--only", choices=("a", "b"), default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (a num_cpus: 1 replica gets 1: Ray sets OMP_NUM_THREADS from num_cpus)",
    )
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)

    path, label = model_dir(a.model)
    print(
        f"model: {label}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; repeats {a.repeats}"
    )
    if a.only in (None, "a"):
        bench_concurrent(path, a.repeats, a.max_new, a.card_tokens)
    if a.only in (None, "b"):
        bench_rotation(path, a.repeats, a.card_tokens)


if __name__ == "__main__":
    main()
