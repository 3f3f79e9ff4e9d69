"""Evaluation of base, SFT and DPO models on held-out dialogues and held-out characters.

For every assistant turn of a held-out dialogue (context = the reference history, teacher forcing)
each model generates a reply greedily; replies are scored with the automatic role-play rules of
:mod:`troupe.checks` and against the reference:

* ``language_consistency``  share of replies in the character's configured language
* ``markup_validity``       share of finished replies whose markup parses (:mod:`troupe.markup`); a
                            reply cut by ``eval.max_new_tokens`` is not judged on markup
* ``truncated``             share of replies cut by the generation budget (lower is better)
* ``assistant_leakage``     share containing a blacklisted assistant phrase (lower is better)
* ``name_prefix``           share starting with "Name:" (lower is better)
* ``stage_direction``       share narrating actions ``*...*`` / ``（...）`` (lower is better)
* ``empty_reply``           share of replies with no text (lower is better)
* ``length_ok``             share within the length rule (50 zh chars / 50 en words; 80 with image)
* ``self_repetition``       share of replies near-duplicating (char-trigram Jaccard >= 0.6) an earlier
                            reply of the same dialogue (lower is better)
* ``echo_user``             share of replies parroting the user's last line (same trigram rule; lower
                            is better)
* ``distinct_2``            distinct bigrams / all bigrams over all replies (Li et al. 2016, arXiv:1510.03055)
* ``rouge_l``               ROUGE-L F1 vs the reference (Lin 2004; ``rouge-score``, characters for zh)
* ``bleu``                  corpus BLEU vs the reference (``sacrebleu``; ``zh`` tokenizer for Chinese)
* ``loss`` / ``perplexity`` mean NLL / exp(NLL) on the character's reference tokens (teacher forced)
* ``judge_*``               optional LLM judge, 1-10 on human-likeness, purposefulness, consistency,
                            engagement (DOMAIN.md), through any OpenAI-compatible endpoint

Outputs in ``paths.eval``: ``metrics.json`` (nested model -> split -> metric; for ``dvc metrics``),
``per_character.csv``, ``samples.jsonl``, ``report.html`` with plots, ``plots/*.png``.
"""

from __future__ import annotations

import base64
import csv
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import click

from troupe.checks import NEAR_DUPLICATE_JACCARD, char_trigrams, check_reply, jaccard, last_user_text
from troupe.cli import step_options
from troupe.config import ConfigError, section
from troupe.contract import Character, Dialogue, load_characters, read_jsonl
from troupe.markup import strip_markup

SPLITS = ("heldout_characters", "heldout_dialogues")
MODEL_PATH_KEYS = {"base": "base_model", "sft": "sft_model", "dpo": "dpo_model"}
#: metrics where lower is better (used by the report and the gate)
LOWER_IS_BETTER = frozenset(
    {
        "truncated",
        "empty_reply",
        "assistant_leakage",
        "name_prefix",
        "stage_direction",
        "self_repetition",
        "echo_user",
        "loss",
        "perplexity",
    }
)
JUDGE_DIMENSIONS = ("human_likeness", "purposefulness", "consistency", "engagement")


def _units(text: str, language: str) -> list[str]:
    """Characters for zh (no spaces), lower-cased words otherwise: the unit for distinct-n and ROUGE-L."""
    return [c for c in text if not c.isspace()] if language == "zh" else text.lower().split()


def distinct_n(texts: list[list[str]], n: int = 2) -> float:
    """Distinct-n: unique n-grams / total n-grams over all texts (0.0 when there are none)."""
    grams = [tuple(t[i : i + n]) for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def eval_contexts(dialogues: list[Dialogue], limit: int) -> list[tuple[Dialogue, int]]:
    """(dialogue, index of an assistant turn preceded by a user turn), dialogues in order, capped."""
    out = []
    for d in dialogues[:limit] if limit else dialogues:
        out.extend((d, i) for i, m in enumerate(d.messages) if m.role == "assistant" and i > 0)
    return out


def character_nll(model, tokenizer, dialogues: list[Dialogue], chars: dict[str, Character], cutoff_len: int):
    """(summed NLL in nats, token count) over assistant tokens of ``dialogues`` (teacher forcing)."""
    import torch

    from troupe.train.encoding import encode_dialogue

    total, count = 0.0, 0
    for d in dialogues:
        e = encode_dialogue(tokenizer, d, chars[d.character_id], cutoff_len)
        if not e.n_loss_tokens:
            continue
        ids = torch.tensor([e.input_ids])
        labels = torch.tensor(
            [[t if m else -100 for t, m in zip(e.input_ids, e.assistant_masks, strict=True)]]
        )
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1].float()
        lab = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(nll)
        count += int((lab != -100).sum())
    return total, count


def score_replies(samples: list[dict[str, Any]], chars: dict[str, Character]) -> dict[str, float]:
    """Aggregate metrics for a list of sample dicts (keys character_id, dialogue_id, reply, reference and
    optionally ``finished``: False when generation hit the token budget)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not samples:
        return {}
    n = len(samples)
    agg: dict[str, float] = defaultdict(float)
    seen: dict[str, list[set[str]]] = defaultdict(list)
    units, rouge = [], 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    hyps: dict[str, list[str]] = defaultdict(list)
    refs: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        c = chars[s["character_id"]]
        chk = check_reply(
            s["reply"],
            character_name=c.name,
            language=c.language,
            user_text=last_user_text(s.get("context", [])),
        )
        agg["language_consistency"] += chk.language_ok
        done = s.get("finished", True)
        agg["truncated"] += not done
        agg["_finished"] += done
        agg["markup_validity"] += done and chk.markup_valid
        agg["assistant_leakage"] += chk.assistant_phrase is not None
        agg["name_prefix"] += chk.name_prefix
        agg["stage_direction"] += chk.stage_direction
        agg["length_ok"] += chk.length_ok
        agg["echo_user"] += chk.echo_user
        text, ref = strip_markup(s["reply"]), strip_markup(s["reference"])
        agg["empty_reply"] += not text.strip()
        tri = char_trigrams(text)
        agg["self_repetition"] += any(
            jaccard(tri, t) >= NEAR_DUPLICATE_JACCARD for t in seen[s["dialogue_id"]]
        )
        seen[s["dialogue_id"]].append(tri)
        u, ru = _units(text, c.language), _units(ref, c.language)
        units.append(u)
        # rouge-score tokenizes English itself; pre-split units joined by spaces work for both languages
        rouge += scorer.score(" ".join(ru), " ".join(u))["rougeL"].fmeasure if u and ru else 0.0
        hyps[c.language].append(text)
        refs[c.language].append(ref)
    finished = agg.pop("_finished")
    out = {k: v / n for k, v in agg.items()}
    out["markup_validity"] = agg["markup_validity"] / finished if finished else 0.0
    out["distinct_2"] = distinct_n(units, 2)
    out["rouge_l"] = rouge / n
    bleu_num = 0.0
    for lang, h in hyps.items():
        b = sacrebleu.corpus_bleu(h, [refs[lang]], tokenize="zh" if lang == "zh" else "13a").score
        bleu_num += b * len(h)
    out["bleu"] = bleu_num / n
    out["replies"] = float(n)
    return out


def judge_scores(
    samples: list[dict[str, Any]], chars: dict[str, Character], judge: dict[str, Any]
) -> dict[str, float]:
    """Mean 1-10 LLM-judge scores per dimension through an OpenAI-compatible endpoint.

    Raises:
        ConfigError: the endpoint's API key env var is unset, or the judge's answer is not JSON.
    """
    from openai import OpenAI

    key = os.environ.get(judge.get("api_key_env", "TROUPE_JUDGE_API_KEY"), "")
    if not key:
        raise ConfigError(
            f"eval.judge.endpoint is set but env {judge.get('api_key_env')} (its API key) is empty"
        )
    client = OpenAI(base_url=judge["endpoint"], api_key=key, timeout=60)
    sums: dict[str, float] = defaultdict(float)
    for s in samples:
        c = chars[s["character_id"]]
        prompt = (
            f"You judge a role-play reply. Character: {c.name} ({c.language}). Profile: {json.dumps(c.profile, ensure_ascii=False)}\n"
            f"Context: {json.dumps(s['context'], ensure_ascii=False)}\nReply: {s['reply']}\n"
            "Score 1-10 each: human_likeness, purposefulness, consistency, engagement. Answer JSON only."
        )
        r = client.chat.completions.create(
            model=judge["model"], messages=[{"role": "user", "content": prompt}], temperature=0
        )
        try:
            scores = json.loads(r.choices[0].message.content)
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError(
                f"judge {judge['endpoint']}: answer is not JSON: {r.choices[0].message.content!r}"
            ) from e
        for dim in JUDGE_DIMENSIONS:
            sums[dim] += float(scores.get(dim, 0))
    return {f"judge_{d}": sums[d] / max(len(samples), 1) for d in JUDGE_DIMENSIONS}


def evaluate_model(
    model_dir: Path,
    split_dialogues: dict[str, list[Dialogue]],
    chars: dict[str, Character],
    cfg: dict[str, Any],
    cutoff_len: int,
    name: str,
):
    """Generate and score one model on each split. Returns (metrics[split], samples, per_char rows)."""
    from troupe.generation import generate
    from troupe.modeling import load_model
    from troupe.train.encoding import prompt_text

    model, tok = load_model(model_dir)
    metrics, samples, per_char = {}, [], []
    for split, dialogues in split_dialogues.items():
        ctx = eval_contexts(dialogues, 0)
        prompts = [prompt_text(tok, d.messages[:i], chars[d.character_id]) for d, i in ctx]
        done: list[bool] = []
        replies = generate(
            model,
            tok,
            prompts,
            max_new_tokens=int(cfg.get("max_new_tokens", 48)),
            desc=f"eval/{name}/{split}",
            finished=done,
        )
        ss = [
            {
                "model": name,
                "split": split,
                "character_id": d.character_id,
                "dialogue_id": d.id,
                "turn": i,
                "context": [m.model_dump(exclude_none=True) for m in d.messages[:i]],
                "reply": r,
                "reference": d.messages[i].content,
                "finished": f,
            }
            for (d, i), r, f in zip(ctx, replies, done, strict=True)
        ]
        m = score_replies(ss, chars)
        nll, count = character_nll(model, tok, dialogues, chars, cutoff_len)
        if count:
            m["loss"] = nll / count
            m["perplexity"] = math.exp(min(nll / count, 50))
        judge = cfg.get("judge") or {}
        if judge.get("endpoint"):
            m.update(judge_scores(ss, chars, judge))
        metrics[split] = m
        samples.extend(ss)
        by_char: dict[str, list] = defaultdict(list)
        for s in ss:
            by_char[s["character_id"]].append(s)
        for cid, group in sorted(by_char.items()):
            row = {"model": name, "split": split, "character_id": cid, **score_replies(group, chars)}
            per_char.append(row)
    return metrics, samples, per_char


def _plots(metrics: dict[str, dict[str, dict[str, float]]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    models = list(metrics)
    names = sorted({k for m in metrics.values() for s in m.values() for k in s if k != "replies"})
    paths = []
    for split in SPLITS:
        fig, axes = plt.subplots(1, len(names), figsize=(2.2 * len(names), 3.2), squeeze=False)
        for ax, metric in zip(axes[0], names, strict=True):
            vals = [metrics[m].get(split, {}).get(metric, float("nan")) for m in models]
            ax.bar(models, vals, color=["#999999", "#4C72B0", "#DD8452"][: len(models)])
            ax.set_title(metric + (" (↓)" if metric in LOWER_IS_BETTER else ""), fontsize=8)
            ax.tick_params(labelsize=7)
        fig.suptitle(f"{split}: base vs SFT vs DPO")
        fig.tight_layout()
        p = out_dir / f"{split}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def write_report(
    metrics: dict, samples: list[dict], plots: list[Path], out: Path, judge_measured: bool
) -> Path:
    """Self-contained HTML report: metric tables per split, embedded plots, sample replies."""
    import html

    rows = []
    for split in SPLITS:
        names = sorted({k for m in metrics.values() for k in m.get(split, {})})
        head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
        body = "".join(
            f"<tr><td>{html.escape(n)}{' ↓' if n in LOWER_IS_BETTER else ''}</td>"
            + "".join(f"<td>{metrics[m].get(split, {}).get(n, float('nan')):.3f}</td>" for m in metrics)
            + "</tr>"
            for n in names
        )
        rows.append(f"<h2>{split}</h2><table><tr><th>metric</th>{head}</tr>{body}</table>")
    imgs = "".join(
        f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}" style="max-width:100%">'
        for p in plots
    )
    ex = "".join(
        f"<tr><td>{html.escape(s['model'])}</td><td>{html.escape(s['split'])}</td><td>{html.escape(s['character_id'])}</td>"
        f"<td>{html.escape(s['context'][-1]['content'] if s['context'] else '')}</td><td>{html.escape(s['reply'])}</td>"
        f"<td>{html.escape(s['reference'])}</td></tr>"
        for s in samples[:60]
    )
    judge = "" if judge_measured else "<p><b>LLM judge: not measured</b> (eval.judge.endpoint is empty).</p>"
    doc = (
        "<html><head><meta charset='utf-8'><title>Troupe evaluation</title><style>body{font-family:sans-serif}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style></head>"
        f"<body><h1>Troupe evaluation</h1>{judge}{''.join(rows)}<h2>Plots</h2>{imgs}"
        f"<h2>Sample replies</h2><table><tr><th>model</th><th>split</th><th>character</th><th>user</th><th>reply</th>"
        f"<th>reference</th></tr>{ex}</table></body></html>"
    )
    path = out / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path


def evaluate(params: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every model of ``eval.models`` on both held-out splits; write ``paths.eval``; log to MLflow.

    Returns the nested metrics dict ``{model: {split: {metric: value}}}``. ``paths.splits``, the model
    paths and ``paths.eval`` may be local paths or URIs (:mod:`troupe.storage`): inputs are downloaded,
    outputs published when the step succeeds.

    Raises:
        ConfigError: unknown model name in ``eval.models`` or missing model directory.
    """
    from troupe import storage

    cfg = section(params, "eval")
    paths = section(params, "paths")
    with storage.output_dir(paths["eval"]) as out:
        return _evaluate(params, cfg, storage.local_copy(paths["splits"], what="paths.splits"), out)


def _evaluate(params: dict[str, Any], cfg: dict[str, Any], splits_dir: Path, out: Path):
    import mlflow

    from troupe import storage
    from troupe.tracking import flatten, step_run

    chars = load_characters(splits_dir / "characters.jsonl")
    cap = int(params.get("split", {}).get("max_eval_dialogues", 0))
    split_dialogues = {}
    for s in SPLITS:
        ds = read_jsonl(splits_dir / f"{s}.jsonl", Dialogue)
        split_dialogues[s] = ds[:cap] if cap else ds
    cutoff = int(section(params, "data")["cutoff_len"])
    metrics, samples, per_char = {}, [], []
    with step_run(params, "evaluate", ("eval",)):
        for name in cfg.get("models", ["base", "sft", "dpo"]):
            if name not in MODEL_PATH_KEYS:
                raise ConfigError(f"eval.models: unknown model {name!r}; expected {sorted(MODEL_PATH_KEYS)}")
            key = MODEL_PATH_KEYS[name]
            loc = str(params["paths"][key])
            if not storage.exists(loc):
                raise ConfigError(
                    f"{loc}: model directory for eval.models={name} not found (paths.{key}; run its stage first)"
                )
            d = storage.local_copy(loc, what=f"paths.{key}")
            m, s, pc = evaluate_model(d, split_dialogues, chars, cfg, cutoff, name)
            metrics[name], samples, per_char = m, samples + s, per_char + pc
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        keys = sorted({k for r in per_char for k in r})
        with (out / "per_character.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(per_char)
        plots = _plots(metrics, out / "plots")
        judge_measured = bool((cfg.get("judge") or {}).get("endpoint"))
        report = write_report(metrics, samples, plots, out, judge_measured)
        mlflow.log_metrics(
            {k.replace("/", "."): v for k, v in flatten(metrics).items() if isinstance(v, float)}
        )
        mlflow.set_tag("judge", "measured" if judge_measured else "not measured")
        for p in [report, out / "metrics.json", out / "per_character.csv", out / "samples.jsonl", *plots]:
            mlflow.log_artifact(str(p))
    _print_table(metrics)
    return metrics


def _print_table(metrics: dict[str, dict[str, dict[str, float]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    for split in SPLITS:
        t = Table(title=f"evaluation: {split}")
        t.add_column("metric")
        for m in metrics:
            t.add_column(m, justify="right")
        for n in sorted({k for m in metrics.values() for k in m.get(split, {})}):
            t.add_row(
                n + (" ↓" if n in LOWER_IS_BETTER else ""),
                *[f"{metrics[m].get(split, {}).get(n, float('nan')):.3f}" for m in metrics],
            )
        Console().print(t)


@click.command("evaluate")
@step_options
def evaluate_cmd(params: dict) -> None:
    """Evaluate base/SFT/DPO on held-out dialogues and characters -> paths.eval (metrics, report)."""
    evaluate(params)
