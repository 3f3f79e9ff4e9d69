"""Benchmark: import + validate all of CharacterEval and Character100 (``../shared/data``).

Prints dialogues/s for import and for validation (features: PII, language id, markup, duplicates and
chat-template token counts; then the two GX checkpoint runs and the Data Docs build). One-time
process costs (importing great_expectations, loading the tokenizer / language-id model) are printed
separately. Target: >= 1,000 dialogues/s validation on 2 cores.

Usage::

    python benchmarks/bench_validate.py [--data ../shared/data] [--tokenizer DIR] [--cutoff-len 8192] [--profile]

Without ``--tokenizer`` it uses ``paths.base_model`` from params.yaml when present, else builds the
tiny test model (same SmolLM2 tokenizer) in a temporary directory.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT / ".." / "shared" / "data"))
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument(
        "--cutoff-len", type=int, default=8192, help="their training cutoff (params default is 512)"
    )
    ap.add_argument("--profile", action="store_true", help="print the top of a cProfile of validation")
    args = ap.parse_args()

    from troupe.data.importers import import_sources
    from troupe.data.validate import Rules, load_tokenizer, validate_records

    data = Path(args.data)
    t0 = time.perf_counter()
    res = import_sources(
        [
            {"kind": "charactereval", "path": str(data / "charactereval")},
            {"kind": "character100", "path": str(data / "character100")},
        ],
        log=print,
    )
    t_import = time.perf_counter() - t0
    seen = sum(s.seen for s in res.sources)
    print(
        f"import: {seen} records ({len(res.dialogues)} dialogues, {len(res.errors)} errors) in {t_import:.2f}s "
        f"= {seen / t_import:,.0f} records/s"
    )

    tok_dir = args.tokenizer
    if tok_dir is None:
        import yaml

        base = ROOT / yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]["base_model"]
        if (base / "tokenizer.json").is_file():
            tok_dir = str(base)
        else:
            from troupe.modeling import prepare_base

            tok_dir = str(prepare_base("tiny-random", tempfile.mkdtemp(prefix="bench_tok_")))
    t0 = time.perf_counter()
    tok = load_tokenizer(tok_dir)
    import great_expectations  # noqa: F401  (one-time import cost, reported apart)

    from troupe.checks import detect_language

    detect_language("warm up the language-id model")
    t_once = time.perf_counter() - t0
    print(f"one-time: tokenizer + great_expectations import + langid model = {t_once:.2f}s")

    with tempfile.TemporaryDirectory() as docs:
        prof = cProfile.Profile() if args.profile else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        out = validate_records(
            res.dialogues,
            res.characters,
            tok,
            Rules(cutoff_len=args.cutoff_len),
            docs_dir=Path(docs) / "data_docs",
        )
        if prof:
            prof.disable()
        t_val = time.perf_counter() - t0
    n = len(res.dialogues)
    tm = out.report["timings"]
    print(
        f"validate: {n} dialogues in {t_val:.2f}s = {n / t_val:,.0f} dialogues/s "
        f"(features {tm['features_s']:.2f}s = {n / tm['features_s']:,.0f}/s; GX runs + Data Docs {tm['gx_s']:.2f}s)"
    )
    print(
        f"  accepted {out.report['accepted']}, quarantined {out.report['quarantined']}, "
        f"by_reason {out.report['by_reason']}, flags {out.report['flags']}"
    )
    print(
        f"import + validate end to end: {n / (t_import + t_val):,.0f} dialogues/s "
        f"({n / (t_import + t_val + t_once):,.0f}/s counting one-time costs); load average {os.getloadavg()[0]:.1f}"
    )
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
