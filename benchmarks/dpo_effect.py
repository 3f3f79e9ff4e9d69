"""Does the DPO stage move the model? The targeted rule-break rate on held-out prompts, SFT vs DPO.

Issue 13 item 5. Runs Troupe's own steps, in order, each skipped when its output exists (re-running
resumes):

1. **pairs** (``troupe.train.pairs.build_pairs``): preference pairs from the train split; the
   rejected reply is the SFT model's own sample breaking the most rules among
   ``pairs.samples_per_prompt`` samples (base-model samples only where no SFT sample breaks one).
2. **dpo** (``troupe.train.dpo.train_dpo``): DPO from the SFT model on those pairs, through Ray Train,
   as ``troupe train dpo`` runs it.
3. **measure**: every held-out prompt (each assistant turn of ``heldout_dialogues`` and
   ``heldout_characters`` with the reference history before it, as ``troupe evaluate`` builds its
   items; ``--eval-items`` N = a seeded sample) is answered by the SFT and the DPO model, once
   greedily and ``--eval-samples`` K times sampled at ``pairs.temperature`` / top-p 0.95 with the
   same per-request seeds for both models (common random numbers). Each reply is checked by
   :func:`troupe.checks.check_reply`, the one rule implementation pair building used to pick the
   rejected side.

Figures (``effect.json``, ``effect.png``):

* *rule-break rate*: share of replies breaking at least one rule; per model, per decoding (greedy /
  sampled), Wilson interval, n = replies.
* *targeted* rule-break rate: the same restricted to the rules the rejected replies of the pairs broke
  (``pairs_report.json`` ``rejected_violations``, the rules DPO was shown).
* per rule: the rate of each rule kind.
* DPO - SFT: paired difference per item (same prompt, same seed), 95 % percentile-bootstrap interval
  over held-out dialogues (:func:`troupe.stats.paired_difference`); n = paired replies. An interval
  entirely below 0 = DPO breaks the rules less; one containing 0 = not enough evidence.
* side effects: mean reply length (words / CJK characters), truncated share, ROUGE-L against the
  reference (the same scorer as ``troupe evaluate``), each with its paired difference.

Usage (the SFT model and splits of a ``dvc repro`` run; settings as ``troupe --set``; the run of
docs/benchmarks.md "DPO effect": 128 pairs built once, DPO on their first 48)::

    python benchmarks/dpo_effect.py --out work/dpo_effect --pairs-only \\
        --set pairs.max_pairs=128 --set pairs.samples_per_prompt=4
    python benchmarks/dpo_effect.py --out work/dpo_effect48 --pairs-from work/dpo_effect/pairs \\
        --first-pairs 48 --set dpo.max_steps=12 --set dpo.per_device_batch_size=1 \\
        --set dpo.gradient_accumulation_steps=4 --set dpo.learning_rate=3e-5 \\
        --set train.num_workers=1 --set train.zero_stage=0 --eval-items 80 --eval-samples 2
    python benchmarks/dpo_effect.py --report work/dpo_effect/effect.json   # reprint a saved table
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _est(e) -> dict[str, Any]:
    return {"value": e.value, "n": e.n, "lo": e.lo, "hi": e.hi, "method": e.method}


def _fmt(e: dict[str, Any], pct: bool = True) -> str:
    if not e or not e.get("n"):
        return "n/a"
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.2f}")
    if math.isnan(e["lo"]):
        return f"{f(e['value'])} (n {e['n']})"
    return f"{f(e['value'])} [{f(e['lo'])}, {f(e['hi'])}] (n {e['n']})"


def subset_pairs(src: Path, dst: Path, first: int) -> dict[str, Any]:
    """Copy the first ``first`` pairs of ``src/pairs.jsonl`` (the builder's seeded order) to
    ``dst/pairs.jsonl`` with a recounted ``pairs_report.json`` (``subset_of`` names the source): a
    shorter DPO run on the same pairs without sampling them again."""
    from troupe.checks import violation_kind

    rows = [json.loads(x) for x in (src / "pairs.jsonl").read_text().splitlines()][:first]
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (dst / "quarantine.jsonl").write_text("")
    rep = json.loads((src / "pairs_report.json").read_text())
    rep["subset_of"] = {"file": str(src / "pairs.jsonl"), "first": first, "of": rep["pairs"]}
    rep["pairs"] = rep["prompts"] = len(rows)
    rep["rejected_source"] = dict(Counter(r["meta"]["rejected_source"] for r in rows))
    rep["rejected_violations"] = dict(
        Counter(violation_kind(v) for r in rows for v in r["meta"]["violations"]).most_common()
    )
    (dst / "pairs_report.json").write_text(json.dumps(rep, indent=2, ensure_ascii=False))
    return rep


def held_out_items(splits: Path, max_items: int, seed: int) -> list[tuple[str, Any, int]]:
    """``(split, dialogue, turn)`` of every held-out assistant turn (``troupe.evaluate.eval_items``),
    or a seeded sample of ``max_items`` of them (0 = all)."""
    import random

    from troupe.contract import Dialogue, read_jsonl
    from troupe.evaluate import SPLITS, eval_items

    items = [(s, d, i) for s in SPLITS for d, i in eval_items(read_jsonl(splits / f"{s}.jsonl", Dialogue))]
    if max_items and len(items) > max_items:
        keep = sorted(random.Random(seed).sample(range(len(items)), max_items))
        items = [items[k] for k in keep]
    return items


def generate_all(
    model_dir: Path, items, chars, passes: list[tuple[str, float, int | None]], max_new: int, name: str
) -> dict[tuple, dict[str, Any]]:
    """Replies of one model: ``{(split, dialogue id, turn, pass): {"reply", "finished"}}``.

    ``passes``: ``(pass name, temperature, seed offset)``; a sampled request's seed is
    ``offset * 1_000_003 + item index``, the same for every model (common random numbers).
    """
    from troupe.evaluate import eval_request
    from troupe.generation import PrefixGenerator
    from troupe.modeling import load_model

    model, tok = load_model(model_dir)
    gen = PrefixGenerator(model, tok)
    out = {}
    for pname, temperature, offset in passes:
        reqs = []
        for k, (_, d, i) in enumerate(items):
            r = eval_request(d, i, chars[d.character_id], max_new)
            r.temperature = temperature
            r.seed = None if offset is None else offset * 1_000_003 + k
            reqs.append(r)
        t0 = time.time()
        res = gen.generate(reqs, batch_size=8, desc=f"dpo_effect/{name}/{pname}")
        print(f"[dpo_effect] {name}/{pname}: {len(res)} replies in {time.time() - t0:.0f} s", flush=True)
        for (split, d, i), r in zip(items, res, strict=True):
            out[(split, d.id, i, pname)] = {"reply": r.text, "finished": r.finished}
    return out


def measure(params: dict[str, Any], out: Path, eval_items_n: int, eval_samples: int) -> dict[str, Any]:
    """Step 3 of the module docstring: replies of SFT and DPO, checks, estimates; writes
    ``replies.jsonl`` and returns the figures."""
    from troupe import stats
    from troupe.checks import check_reply, last_user_text, reply_length, violation_kind
    from troupe.contract import load_characters
    from troupe.evaluate import _rouge_scorer, _units
    from troupe.markup import strip_markup

    paths = params["paths"]
    splits = Path(paths["splits"])
    chars = load_characters(splits / "characters.jsonl")
    items = held_out_items(splits, eval_items_n, int(params["eval"].get("seed", 0)))
    temperature = float(params["pairs"]["temperature"])
    passes = [("greedy", 0.0, None)] + [(f"sample{j}", temperature, j + 1) for j in range(eval_samples)]
    max_new = int(params["pairs"]["max_new_tokens"])
    replies_file = out / "replies.jsonl"
    if replies_file.is_file():
        rows = [json.loads(x) for x in replies_file.read_text().splitlines()]
    else:
        rows = []
        for name, key in (("sft", "sft_model"), ("dpo", "dpo_model")):
            got = generate_all(Path(paths[key]), items, chars, passes, max_new, name)
            for (split, did, turn, pname), r in got.items():
                rows.append(
                    {"model": name, "split": split, "dialogue_id": did, "turn": turn, "pass": pname, **r}
                )
        by_id = {(s, d.id, i): (d, i) for s, d, i in items}
        scorer = _rouge_scorer()
        for row in rows:
            d, i = by_id[(row["split"], row["dialogue_id"], row["turn"])]
            c = chars[d.character_id]
            chk = check_reply(
                row["reply"], character_name=c.name, language=c.language,
                user_text=last_user_text(d.messages[:i]),
            )  # fmt: skip
            row["violations"] = chk.violations
            row["character_id"] = d.character_id
            row["length"] = reply_length(strip_markup(row["reply"]), c.language)
            u, ru = (
                _units(strip_markup(row["reply"]), c.language),
                _units(strip_markup(d.messages[i].content), c.language),
            )
            row["rouge_l"] = scorer.score(" ".join(ru), " ".join(u))["rougeL"].fmeasure if u and ru else 0.0
        replies_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    report = json.loads((Path(paths["pairs"]) / "pairs_report.json").read_text())
    targeted = sorted(report.get("rejected_violations", {}))
    kinds = sorted({violation_kind(v) for r in rows for v in r["violations"]} | set(targeted))
    features = {
        "rule_break": lambda r: float(bool(r["violations"])),
        "targeted_rule_break": lambda r: float(any(violation_kind(v) in targeted for v in r["violations"])),
        **{
            f"rule:{k}": (lambda r, k=k: float(any(violation_kind(v) == k for v in r["violations"])))
            for k in kinds
        },
        "truncated": lambda r: float(not r["finished"]),
        "length": lambda r: float(r["length"]),
        "rouge_l": lambda r: float(r["rouge_l"]),
    }
    rates = {f for f in features if f not in ("length", "rouge_l")}
    groups = {"greedy": ["greedy"], "sampled": [f"sample{j}" for j in range(eval_samples)]}
    groups["all"] = groups["greedy"] + groups["sampled"]
    figures: dict[str, Any] = {}
    for gname, gpasses in groups.items():
        if not gpasses:
            continue
        sel = [r for r in rows if r["pass"] in gpasses]
        g: dict[str, Any] = {}
        for f, fn in features.items():
            per_model = {}
            vals = {}
            for m in ("sft", "dpo"):
                mine = [r for r in sel if r["model"] == m]
                vals[m] = {(r["split"], r["dialogue_id"], r["turn"], r["pass"]): fn(r) for r in mine}
                if f in rates:
                    per_model[m] = _est(stats.wilson(int(sum(vals[m].values())), len(vals[m])))
                else:
                    clusters: dict[str, list[float]] = defaultdict(list)
                    for key, v in vals[m].items():
                        clusters[key[1]].append(v)
                    per_model[m] = _est(stats.bootstrap_mean(clusters))
            diff = stats.paired_difference(vals["dpo"], vals["sft"], cluster_of=lambda key: key[1])
            g[f] = {**per_model, "dpo_minus_sft": _est(diff)}
        figures[gname] = g
    train_log = json.loads((Path(paths["dpo_model"]) / "train_log.json").read_text())["log_history"]
    steps = [x for x in train_log if "loss" in x and "step" in x]
    return {
        "items": len(items),
        "dialogues": len({(s, d.id) for s, d, _ in items}),
        "passes": [p for p, _, _ in passes],
        "targeted_rules": targeted,
        "pairs_report": report,
        "dpo_train": {
            "steps": len(steps),
            "first": {k: steps[0].get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")}
            if steps
            else {},
            "last": {k: steps[-1].get(k) for k in ("loss", "rewards/accuracies", "rewards/margins")}
            if steps
            else {},
            "train_runtime_s": steps[-1].get("train_runtime") if steps else None,
        },
        "figures": figures,
        "rule_counts": {
            m: dict(Counter(violation_kind(v) for r in rows if r["model"] == m for v in r["violations"]))
            for m in ("sft", "dpo")
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Bar chart: per rule and overall, SFT vs DPO rate with 95 % intervals (sampled + greedy replies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = result["figures"]["all"]
    keys = ["rule_break", "targeted_rule_break"] + sorted(k for k in g if k.startswith("rule:"))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 4))
    w = 0.38
    for j, m in enumerate(("sft", "dpo")):
        v = [100 * g[k][m]["value"] for k in keys]
        lo = [100 * (g[k][m]["value"] - g[k][m]["lo"]) for k in keys]
        hi = [100 * (g[k][m]["hi"] - g[k][m]["value"]) for k in keys]
        ax.bar([x + (j - 0.5) * w for x in range(len(keys))], v, w, yerr=[lo, hi], capsize=3, label=m.upper())
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k.replace("rule:", "") for k in keys], rotation=30, ha="right")
    ax.set_ylabel("% of held-out replies (95 % Wilson)")
    n = g["rule_break"]["sft"]["n"]
    ax.set_title(f"Rule breaks, SFT vs DPO, {n} replies per model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict[str, Any]) -> None:
    """The figures as Markdown tables (what docs/benchmarks.md holds)."""
    print(f"\nheld-out items {result['items']} ({result['dialogues']} dialogues); passes {result['passes']}")
    print(f"targeted rules (broken by the rejected replies): {result['targeted_rules']}")
    rep = result["pairs_report"]
    print(f"pairs {rep['pairs']} of {rep['prompts']} prompts; rejected source {rep.get('rejected_source')}")
    print(f"dpo: {result['dpo_train']}")
    for gname, g in result["figures"].items():
        print(f"\n### {gname}\n")
        print("| figure | SFT | DPO | DPO - SFT (paired) |\n|---|---|---|---|")
        for f, e in g.items():
            pct = f not in ("length", "rouge_l")
            print(
                f"| {f} | {_fmt(e['sft'], pct)} | {_fmt(e['dpo'], pct)} | {_fmt(e['dpo_minus_sft'], pct)} |"
            )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], help="params override KEY=VALUE (repeatable)")
    ap.add_argument(
        "--out", default="work/dpo_effect", help="pairs/, dpo/, replies.jsonl, effect.json, effect.png"
    )
    ap.add_argument("--eval-items", type=int, default=0, help="held-out items (0 = every held-out turn)")
    ap.add_argument("--eval-samples", type=int, default=2, help="sampled replies per item and model")
    ap.add_argument("--report", help="reprint a saved effect.json and exit")
    ap.add_argument("--pairs-only", action="store_true", help="build the pairs and stop")
    ap.add_argument(
        "--pairs-from", help="take the pairs of an earlier --out's pairs/ instead of building them"
    )
    ap.add_argument("--first-pairs", type=int, default=0, help="with --pairs-from: only its first N pairs")
    a = ap.parse_args(argv)
    if a.report:
        print_table(json.loads(Path(a.report).read_text()))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from troupe.config import load_params
    from troupe.train.dpo import train_dpo
    from troupe.train.pairs import build_pairs

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    params = load_params(a.params, [*a.set, f"paths.pairs={out / 'pairs'}", f"paths.dpo_model={out / 'dpo'}"])
    (out / "settings.json").write_text(
        json.dumps({"set": a.set, "pairs_from": a.pairs_from, "first_pairs": a.first_pairs, "pairs": params["pairs"], "dpo": params["dpo"], "train": params["train"],
                    "eval_items": a.eval_items, "eval_samples": a.eval_samples, "paths": params["paths"]}, indent=2)
    )  # fmt: skip
    t0 = time.time()
    if a.pairs_from and not (out / "pairs" / "pairs.jsonl").is_file():
        src = Path(a.pairs_from)
        subset_pairs(src, out / "pairs", a.first_pairs or len((src / "pairs.jsonl").read_text().splitlines()))
    if not (out / "pairs" / "pairs.jsonl").is_file():
        build_pairs(params)
    t_pairs = time.time() - t0
    if a.pairs_only:
        return
    if not (out / "dpo" / "train_log.json").is_file():
        train_dpo(params)
    t_dpo = time.time() - t0 - t_pairs
    result = measure(params, out, a.eval_items, a.eval_samples)
    result["seconds"] = {"pairs": t_pairs, "dpo": t_dpo, "measure": time.time() - t0 - t_pairs - t_dpo}
    result["settings"] = json.loads((out / "settings.json").read_text())
    (out / "effect.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    plot(result, out / "effect.png")
    print_table(result)


if __name__ == "__main__":
    main()
