"""Evaluation of base, SFT and DPO models on held-out dialogues and held-out characters.

For every assistant turn of a held-out dialogue (context = the reference history, teacher forcing),
or a seeded sample of ``eval.max_replies_per_split`` of them, each model generates a reply greedily
through :class:`troupe.generation.PrefixGenerator` (each character's persona card prefilled once).
Every reply gets per-item scores (``samples.jsonl``), every metric an :class:`troupe.stats.Estimate`
with its n and a 95 % interval (``metrics.json``, :mod:`troupe.eval_contract`):

Rates (share of replies; Wilson interval; ``↓`` = lower is better):

* ``language_consistency``  reply identified as the character's language; a reply whose language
                            py3langid cannot identify counts as inconsistent (a zh character
                            answering "Sure thing buddy" does not pass)
* ``tag_rate``              reply carries markup tags (``<emotion>``, ``<img>``); the policy states the
                            expected rate, so an untagged model cannot pass on markup validity
* ``markup_validity``       markup parses (:mod:`troupe.markup`), over finished replies that carry tags
* ``truncated`` ↓           cut by ``eval.max_new_tokens`` (no end-of-turn token)
* ``empty_reply`` ↓         no text once markup is removed
* ``assistant_leakage`` ↓   contains a blacklisted assistant phrase
* ``name_prefix`` ↓         starts with "Name:"
* ``stage_direction`` ↓     narrates actions ``*...*`` / ``（...）``
* ``length_ok``             within the length rule (50 zh chars / 50 en words; 80 with image)
* ``self_repetition`` ↓     near-duplicates (char-trigram Jaccard >= 0.6) an earlier reply of the dialogue
* ``in_reply_repetition`` ↓ loops inside itself (:func:`troupe.checks.repeats_itself`, seq-rep-4)
* ``echo_user`` ↓           parrots the user's last line (same trigram rule)
* ``rule_breaks`` ↓         breaks at least one rule of :func:`troupe.checks.check_reply` (language,
                            markup, assistant phrase, name prefix, stage direction, length, echo,
                            empty): the rate DPO pairs target (their rejected side is picked by the
                            same check) and self-play's ``rule_breaks``

Means (cluster bootstrap over dialogues) and corpus statistics:

* ``rouge_l``               ROUGE-L F1 vs the reference (Lin 2004; ``rouge-score``, characters for zh)
* ``bleu``                  corpus BLEU vs the reference (``sacrebleu``; ``zh`` tokenizer for Chinese);
                            jackknife over dialogues
* ``distinct_2``            distinct bigrams / all bigrams over all replies (Li et al. 2016, arXiv:1510.03055);
                            jackknife over dialogues (a bootstrap biases it down)
* ``loss`` ↓ / ``perplexity`` ↓ mean NLL / exp(NLL) per reference character token (teacher forced)
* ``judge_*``               optional rubric judge (``eval.judge``, endpoint ``agents.judge``;
                            :mod:`troupe.dialogue.judge`): ``judge_<dimension>`` 1-10 means on
                            human-likeness, purposefulness, consistency, engagement (DOMAIN.md;
                            bootstrap over dialogues, n = parsed scores), ``judge_rule_<id>`` ↓ and
                            ``judge_narration`` ↓ rates, ``judge_unparseable`` ↓ / ``judge_failed`` ↓
                            (answers that did not parse / calls that failed: visible, never zeros)

The base model is evaluated once per base model and eval set by its own stage (``troupe evaluate
--base-only`` -> ``paths.eval_base``) and reused while its eval-set hash and settings match.
``eval.models`` may name ``champion``: the registry's current champion version, scored on the same
items so the gate can compare paired.

Outputs in ``paths.eval``: ``metrics.json``, ``eval_set.json``, ``samples.jsonl`` (see
:mod:`troupe.eval_contract`), ``per_character.csv`` (one row per model, split, character, metric
with n and interval), ``report.html`` with plots, ``plots/*.png``.
"""

from __future__ import annotations

import base64
import csv
import functools
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import click

from troupe import stats
from troupe.checks import (
    NEAR_DUPLICATE_JACCARD,
    char_trigrams,
    check_reply,
    jaccard,
    last_user_text,
    repeats_itself,
)
from troupe.cli import step_options
from troupe.config import ConfigError, section
from troupe.contract import Character, Dialogue, load_characters, read_jsonl
from troupe.dialogue import judge as rubric
from troupe.eval_contract import CHAMPION_MODEL, EvalResult, eval_set_hash
from troupe.markup import has_markup, strip_markup
from troupe.stats import Estimate

SPLITS = ("heldout_characters", "heldout_dialogues")
MODEL_PATH_KEYS = {
    "base": "base_model",
    "sft": "sft_model",
    "dpo": "dpo_model",
    "quantized": "quantized_model",  # troupe model quantize (compressed-tensors; troupe.quantize)
}
#: per-reply rates (0/1 per item, None where the rule does not apply), summarised with Wilson intervals
RATE_METRICS = (
    "language_consistency",
    "tag_rate",
    "markup_validity",
    "truncated",
    "empty_reply",
    "assistant_leakage",
    "name_prefix",
    "stage_direction",
    "length_ok",
    "self_repetition",
    "in_reply_repetition",
    "echo_user",
    "rule_breaks",
)
#: metrics where lower is better (used by the report, the gate and the rollout)
LOWER_IS_BETTER = (
    frozenset(
        {
            "truncated",
            "empty_reply",
            "assistant_leakage",
            "name_prefix",
            "stage_direction",
            "self_repetition",
            "in_reply_repetition",
            "echo_user",
            "rule_breaks",
            "loss",
            "perplexity",
        }
    )
    | rubric.LOWER_IS_BETTER
)
#: bootstrap replicates for corpus statistics (BLEU, distinct-2), which are recomputed per replicate
CORPUS_RESAMPLES = 500


def _units(text: str, language: str) -> list[str]:
    """Characters for zh (no spaces), lower-cased words otherwise: the unit for distinct-n and ROUGE-L."""
    return [c for c in text if not c.isspace()] if language == "zh" else text.lower().split()


def distinct_n(texts: list[list[str]], n: int = 2) -> float:
    """Distinct-n: unique n-grams / total n-grams over all texts (0.0 when there are none)."""
    grams = [tuple(t[i : i + n]) for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def eval_items(dialogues: list[Dialogue], max_items: int = 0, seed: int = 0) -> list[tuple[Dialogue, int]]:
    """Evaluation items: ``(dialogue, index of an assistant turn preceded by at least one message)``.

    Args:
        dialogues: one held-out split.
        max_items: 0 = every such turn; else a seeded sample of that many (kept in dialogue order).
        seed: sampling seed.
    """
    out = [(d, i) for d in dialogues for i, m in enumerate(d.messages) if m.role == "assistant" and i > 0]
    if max_items and len(out) > max_items:
        keep = set(random.Random(seed).sample(range(len(out)), max_items))
        out = [x for k, x in enumerate(out) if k in keep]
    return out


def split_eval_set(items: list[tuple[Dialogue, int]]) -> dict[str, Any]:
    """``{"sha256", "dialogues", "items"}`` of one split's items (:func:`troupe.eval_contract.eval_set_hash`)."""
    rows = [
        (d.id, i, [m.model_dump(exclude_none=True) for m in d.messages[:i]], d.messages[i].content)
        for d, i in items
    ]
    return {"sha256": eval_set_hash(rows), "dialogues": len({d.id for d, _ in items}), "items": len(items)}


def character_nll(model, tokenizer, dialogues: list[Dialogue], chars: dict[str, Character], cutoff_len: int):
    """Per dialogue ``{dialogue_id: (summed NLL in nats, token count)}`` over its assistant tokens
    (teacher forcing); dialogues with no loss tokens within ``cutoff_len`` are left out."""
    import torch

    from troupe.train.encoding import encode_dialogue

    out: dict[str, tuple[float, int]] = {}
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
        out[d.id] = (float(nll), int((lab != -100).sum()))
    return out


def nll_estimates(per_dialogue: dict[str, tuple[float, int]], confidence: float) -> dict[str, Estimate]:
    """``loss`` (mean NLL per token, a ratio estimator) and ``perplexity`` = exp(loss), each with a
    cluster-bootstrap interval over dialogues; ``n`` = reference tokens."""
    if not per_dialogue:
        return {}

    def ratio(items: list[tuple[float, int]]) -> float:
        return sum(a for a, _ in items) / max(sum(b for _, b in items), 1)

    est = stats.cluster_bootstrap(
        {k: [v] for k, v in per_dialogue.items()}, ratio, confidence, CORPUS_RESAMPLES
    )
    tokens = sum(c for _, c in per_dialogue.values())
    loss = Estimate(est.value, tokens, est.lo, est.hi, confidence, est.method, clusters=est.clusters)
    ppl = Estimate(
        *(math.exp(min(x, 50)) if not math.isnan(x) else x for x in (est.value,)), tokens,
        *(math.exp(min(x, 50)) if not math.isnan(x) else x for x in (est.lo, est.hi)), confidence, est.method,
        clusters=est.clusters,
    )  # fmt: skip
    return {"loss": loss, "perplexity": ppl}


@functools.cache
def _rouge_scorer():
    """One ROUGE-L scorer per process (building it per reply was repeated work on the scoring path)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def reply_scores(sample: dict[str, Any], character: Character) -> dict[str, float | None]:
    """Per-item scores of one sample (keys of :data:`RATE_METRICS` except ``self_repetition``, plus
    ``rouge_l``): 1/0 for rates, None where a rule does not apply (markup validity of an untagged or
    cut reply).

    Args:
        sample: ``reply``, ``reference``, ``context`` (chat dicts) and ``finished`` (False = cut by
            the token budget; default True).
    """
    reply = sample["reply"]
    chk = check_reply(
        reply,
        character_name=character.name,
        language=character.language,
        user_text=last_user_text(sample.get("context", [])),
    )
    done = bool(sample.get("finished", True))
    tagged = has_markup(reply)
    text, ref = strip_markup(reply), strip_markup(sample["reference"])
    u, ru = _units(text, character.language), _units(ref, character.language)
    rouge = 0.0
    if u and ru:  # rouge-score tokenizes English itself; pre-split units joined by spaces work for both
        rouge = _rouge_scorer().score(" ".join(ru), " ".join(u))["rougeL"].fmeasure
    return {
        "language_consistency": float(chk.language == character.language),
        "tag_rate": float(tagged),
        "markup_validity": float(chk.markup_valid) if done and tagged else None,
        "truncated": float(not done),
        "empty_reply": float(not text.strip()),
        "assistant_leakage": float(chk.assistant_phrase is not None),
        "name_prefix": float(chk.name_prefix),
        "stage_direction": float(chk.stage_direction),
        "length_ok": float(chk.length_ok),
        "in_reply_repetition": float(repeats_itself(text, character.language)),
        "echo_user": float(chk.echo_user),
        "rule_breaks": float(bool(chk.violations)),
        "rouge_l": rouge,
    }


def score_samples(samples: list[dict[str, Any]], chars: dict[str, Character]) -> None:
    """Set ``sample["scores"]`` on every sample (in place), ``self_repetition`` included: a reply
    near-duplicating an earlier reply (lower turn) of the same model and dialogue."""
    seen: dict[tuple[str, str], list[set[str]]] = defaultdict(list)
    order = sorted(range(len(samples)), key=lambda k: (samples[k].get("turn", 0), k))
    for k in order:
        s = samples[k]
        sc = reply_scores(s, chars[s["character_id"]])
        tri = char_trigrams(strip_markup(s["reply"]))
        key = (s.get("model", ""), s["dialogue_id"])
        sc["self_repetition"] = float(any(jaccard(tri, t) >= NEAR_DUPLICATE_JACCARD for t in seen[key]))
        seen[key].append(tri)
        s["scores"] = {**(s.get("scores") or {}), **sc}


def _corpus_bleu(items: list[tuple[str, str, str]]) -> float:
    import sacrebleu

    by_lang: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for lang, hyp, ref in items:
        by_lang[lang][0].append(hyp)
        by_lang[lang][1].append(ref)
    total = sum(
        sacrebleu.corpus_bleu(h, [r], tokenize="zh" if lang == "zh" else "13a").score * len(h)
        for lang, (h, r) in by_lang.items()
    )
    return total / max(len(items), 1)


def score_replies(
    samples: list[dict[str, Any]],
    chars: dict[str, Character],
    confidence: float = stats.DEFAULT_CONFIDENCE,
    corpus: bool = True,
) -> dict[str, Estimate]:
    """Every metric of ``samples`` (one model, one split or character) as an estimate with n and interval.

    Samples without ``scores`` are scored first (:func:`score_samples`). Rates: Wilson over the
    replies a rule applies to. ``rouge_l``: mean, cluster bootstrap over dialogues (the ``judge_*``
    per-item values are summarised by :func:`troupe.dialogue.judge.summarise`, see :func:`evaluate_model`).
    ``bleu`` and ``distinct_2`` (``corpus=True``): corpus statistics recomputed per bootstrap replicate.
    Returns ``{}`` for no samples.
    """
    if not samples:
        return {}
    if any("scores" not in s for s in samples):
        score_samples(samples, chars)
    out: dict[str, Estimate] = {}
    for m in RATE_METRICS:
        out[m] = stats.rate(
            [None if s["scores"].get(m) is None else bool(s["scores"][m]) for s in samples], confidence
        )
    by_dialogue: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in samples:
        by_dialogue[s["dialogue_id"]].append(s)
    for m in ("rouge_l",):
        vals = {
            d: [s["scores"][m] for s in ss if s["scores"].get(m) is not None] for d, ss in by_dialogue.items()
        }
        out[m] = stats.bootstrap_mean(vals, confidence)
    if corpus:
        items = {
            d: [
                (
                    chars[s["character_id"]].language,
                    strip_markup(s["reply"]),
                    strip_markup(s["reference"]),
                )
                for s in ss
            ]
            for d, ss in by_dialogue.items()
        }
        # corpus statistics: jackknife over dialogues (a bootstrap replicate repeats dialogues, which
        # biases distinct-n down; stats.cluster_jackknife)
        out["bleu"] = stats.cluster_jackknife(items, _corpus_bleu, confidence, (0.0, 100.0))
        out["distinct_2"] = stats.cluster_jackknife(
            items, lambda xs: distinct_n([_units(h, lang) for lang, h, _ in xs], 2), confidence, (0.0, 1.0)
        )
    return out


def judge_samples(
    samples: list[dict[str, Any]], chars: dict[str, Character], agent: dict[str, Any]
) -> list[rubric.JudgeScore]:
    """Score every sample's reply with the rubric judge (:mod:`troupe.dialogue.judge`) at ``agent``
    (the resolved ``params.agents.judge``), in place: ``scores`` gets the per-item values of
    :func:`troupe.dialogue.judge.item_values` (None where the judge gave none or its answer did not
    parse), ``judge`` the score's status, attempts and raw answer. A bad answer or a failed call is
    recorded, never raised.

    Returns:
        The :class:`~troupe.dialogue.contract.JudgeScore` per sample, in ``samples`` order (item id
        ``<split>/<dialogue_id>/<turn>``).
    """
    from troupe.dialogue.client import AgentClient

    client = AgentClient.from_params(agent, "judge")
    items = [
        rubric.JudgeItem(
            f"{s['split']}/{s['dialogue_id']}/{s['turn']}", chars[s["character_id"]], s["context"],
            s["reply"], model=s.get("model", ""), turn=s["turn"],
        )
        for s in samples
    ]  # fmt: skip
    scores = rubric.score_many(client, items)
    for s, sc in zip(samples, scores, strict=True):
        s.setdefault("scores", {}).update(rubric.item_values(sc))
        s["judge"] = {
            "status": sc.status,
            "attempts": sc.attempts,
            "raw": sc.raw,
            "judge_model": sc.judge_model,
        }
    u = client.usage
    print(
        f"[evaluate] judge {client.model}: {u.calls} calls, {u.prompt_tokens}+{u.completion_tokens} tokens, "
        f"${u.cost_usd:.4f}",
        flush=True,
    )
    return scores


def _judged_dialogue(score: rubric.JudgeScore) -> str:
    """Cluster of a judge score of :func:`judge_samples`: ``<split>/<dialogue_id>`` of its item id."""
    return score.item_id.rsplit("/", 1)[0]


def judge_agent(params: dict[str, Any]) -> dict[str, Any] | None:
    """``params.agents.judge`` when ``eval.judge`` is on, else None (not measured).

    Raises:
        ConfigError: ``eval.judge`` is true but ``agents.judge.base_url`` or ``model`` is empty.
    """
    if not (params.get("eval") or {}).get("judge"):
        return None
    agent = dict((params.get("agents") or {}).get("judge") or {})
    if not agent.get("base_url") or not agent.get("model"):
        raise ConfigError(
            "eval.judge is true but agents.judge.base_url / agents.judge.model is empty: point it at an "
            'OpenAI-compatible endpoint (README "Judge") or set eval.judge=false'
        )
    return agent


def eval_request(dialogue: Dialogue, turn: int, character: Character, max_new_tokens: int):
    """The :class:`troupe.generation.GenRequest` of one item: card + reference history up to ``turn``,
    cached per character."""
    from troupe.generation import GenRequest
    from troupe.train.encoding import chat_messages

    return GenRequest(chat_messages(dialogue.messages[:turn], character), max_new_tokens, 0.0, character.id)


def evaluate_model(
    model_dir: Path,
    split_items: dict[str, list[tuple[Dialogue, int]]],
    chars: dict[str, Character],
    cfg: dict[str, Any],
    cutoff_len: int,
    name: str,
    judge: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, Estimate]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Generate and score one model on each split's items; with ``judge`` (the resolved
    ``params.agents.judge``, :func:`judge_agent`) the rubric judge scores every reply too and the
    split and per-character metrics get :func:`troupe.dialogue.judge.summarise` (clustered by dialogue).

    Returns:
        ``(metrics[split][metric], samples, per-character rows)``; each row is one model, split,
        character and metric with ``value, n, lo, hi``.
    """
    from troupe.generation import PrefixGenerator
    from troupe.modeling import load_model

    model, tok = load_model(model_dir)
    gen = PrefixGenerator(model, tok, prefix_cache_bytes=int(cfg.get("prefix_cache_mb", 256)) << 20)
    confidence = float(cfg.get("confidence", stats.DEFAULT_CONFIDENCE))
    max_new = int(cfg.get("max_new_tokens", 48))
    metrics, samples, per_char = {}, [], []
    for split, items in split_items.items():
        reqs = [eval_request(d, i, chars[d.character_id], max_new) for d, i in items]
        results = gen.generate(reqs, batch_size=int(cfg.get("batch_size", 8)), desc=f"eval/{name}/{split}")
        ss = [
            {
                "model": name,
                "split": split,
                "character_id": d.character_id,
                "dialogue_id": d.id,
                "turn": i,
                "context": [m.model_dump(exclude_none=True) for m in d.messages[:i]],
                "reply": r.text,
                "reference": d.messages[i].content,
                "finished": r.finished,
            }
            for (d, i), r in zip(items, results, strict=True)
        ]
        score_samples(ss, chars)
        judged = judge_samples(ss, chars, judge) if judge else []
        m = score_replies(ss, chars, confidence)
        if judged:
            m.update(rubric.summarise(judged, confidence, _judged_dialogue))
        dialogues = list({d.id: d for d, _ in items}.values())
        m.update(nll_estimates(character_nll(model, tok, dialogues, chars, cutoff_len), confidence))
        metrics[split] = m
        samples.extend(ss)
        by_char: dict[str, list] = defaultdict(list)
        for s in ss:
            by_char[s["character_id"]].append(s)
        for cid, group in sorted(by_char.items()):
            mc = score_replies(group, chars, confidence, corpus=False)
            if judged:
                mine = [sc for sc in judged if sc.character_id == cid]
                mc.update(rubric.summarise(mine, confidence, _judged_dialogue))
            for metric, e in mc.items():
                per_char.append(
                    {"model": name, "split": split, "character_id": cid, "metric": metric,
                     "value": e.value, "n": e.n, "lo": e.lo, "hi": e.hi}
                )  # fmt: skip
    return metrics, samples, per_char


def _plots(metrics: dict[str, dict[str, dict[str, Estimate]]], out_dir: Path) -> list[Path]:
    """One figure per split: a bar per model and metric with its interval as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    models = list(metrics)
    names = sorted({k for m in metrics.values() for sp in m.values() for k in sp if k != "perplexity"})
    colors = ["#999999", "#4C72B0", "#DD8452", "#55A868"]
    paths = []
    for split in SPLITS:
        cols = 6
        rows = max(1, math.ceil(len(names) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
        for ax in axes.flat[len(names) :]:
            ax.axis("off")
        for ax, metric in zip(axes.flat, names, strict=False):
            ests = [metrics[m].get(split, {}).get(metric, stats.empty()) for m in models]
            vals = [e.value for e in ests]
            err = [
                [0 if math.isnan(e.lo) else max(e.value - e.lo, 0) for e in ests],
                [0 if math.isnan(e.hi) else max(e.hi - e.value, 0) for e in ests],
            ]
            ax.bar(models, vals, yerr=err, capsize=3, color=colors[: len(models)])
            n = max((e.n for e in ests), default=0)
            ax.set_title(f"{metric}{' (↓)' if metric in LOWER_IS_BETTER else ''} n={n}", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.suptitle(f"{split}: {' vs '.join(models)} (95% intervals)")
        fig.tight_layout()
        path = out_dir / f"{split}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _cell(e: Estimate | None) -> str:
    if e is None or not e.n:
        return "n/a"
    ci = "" if math.isnan(e.lo) else f" [{e.lo:.3f}, {e.hi:.3f}]"
    return f"{e.value:.3f}{ci} n={e.n}"


def write_report(
    metrics: dict[str, dict[str, dict[str, Estimate]]],
    samples: list[dict],
    plots: list[Path],
    out: Path,
    judge_measured: bool,
    eval_set: dict[str, Any] | None = None,
) -> Path:
    """Self-contained HTML report: per split a table of value [95 % interval] n per model and metric,
    the eval set's identity, embedded plots, sample replies."""
    import html

    rows = []
    for split in SPLITS:
        names = sorted({k for m in metrics.values() for k in m.get(split, {})})
        head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
        body = "".join(
            f"<tr><td>{html.escape(n)}{' ↓' if n in LOWER_IS_BETTER else ''}</td>"
            + "".join(f"<td>{html.escape(_cell(metrics[m].get(split, {}).get(n)))}</td>" for m in metrics)
            + "</tr>"
            for n in names
        )
        es = (eval_set or {}).get(split) or {}
        ident = (
            f"<p>{es.get('items', '?')} items from {es.get('dialogues', '?')} dialogues; eval set sha256 "
            f"<code>{html.escape(str(es.get('sha256', ''))[:16])}</code></p>"
        )
        rows.append(f"<h2>{split}</h2>{ident}<table><tr><th>metric</th>{head}</tr>{body}</table>")
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
    judge = "" if judge_measured else "<p><b>LLM judge: not measured</b> (eval.judge is false).</p>"
    doc = (
        "<html><head><meta charset='utf-8'><title>Troupe evaluation</title><style>body{font-family:sans-serif}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style></head>"
        f"<body><h1>Troupe evaluation</h1><p>Cells: value [95 % interval] n (Wilson for rates, bootstrap "
        f"over dialogues for means).</p>{judge}{''.join(rows)}<h2>Plots</h2>{imgs}"
        f"<h2>Sample replies</h2><table><tr><th>model</th><th>split</th><th>character</th><th>user</th><th>reply</th>"
        f"<th>reference</th></tr>{ex}</table></body></html>"
    )
    path = out / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path


def evaluate(params: dict[str, Any], base_only: bool = False) -> dict[str, dict[str, dict[str, Estimate]]]:
    """Evaluate every model of ``eval.models`` on both held-out splits; write ``paths.eval``; log to MLflow.

    Args:
        params: pipeline params. ``paths.splits``, the model paths, ``paths.eval`` and
            ``paths.eval_base`` may be local paths or URIs (:mod:`troupe.storage`): inputs are
            downloaded, outputs published when the step succeeds.
        base_only: evaluate only the base model into ``paths.eval_base`` (the cached base stage).

    Returns:
        ``{model: {split: {metric: Estimate}}}``.

    Raises:
        ConfigError: unknown model name in ``eval.models``, missing model directory, or ``champion``
            asked for while the registry has none.
    """
    from troupe import storage

    cfg = section(params, "eval")
    paths = section(params, "paths")
    target = paths.get("eval_base") if base_only else paths["eval"]
    if not target:
        raise ConfigError("params: paths.eval_base is empty (troupe evaluate --base-only writes there)")
    splits_dir = storage.local_copy(paths["splits"], what="paths.splits")
    with storage.output_dir(str(target)) as out:
        return _evaluate(params, cfg, splits_dir, out, base_only)


def _settings(cfg: dict[str, Any], cutoff: int) -> dict[str, Any]:
    """What makes two evaluations of one model comparable besides the items."""
    return {
        "max_new_tokens": int(cfg.get("max_new_tokens", 48)),
        "max_replies_per_split": int(cfg.get("max_replies_per_split", 0)),
        "seed": int(cfg.get("seed", 0)),
        "cutoff_len": cutoff,
        "confidence": float(cfg.get("confidence", stats.DEFAULT_CONFIDENCE)),
    }


def _reusable_base(params: dict[str, Any], eval_set: dict[str, Any]) -> EvalResult | None:
    """The base stage's result (``paths.eval_base``) if it scored these items with these settings."""
    from troupe import storage

    loc = (params.get("paths") or {}).get("eval_base")
    if not loc or not storage.exists(f"{str(loc).rstrip('/')}/metrics.json"):
        return None
    prior = EvalResult.read(storage.local_copy(str(loc), what="paths.eval_base"))
    same = (
        all((prior.eval_set.get(s) or {}).get("sha256") == eval_set[s]["sha256"] for s in SPLITS)
        and prior.eval_set.get("settings") == eval_set["settings"]
    )
    if not same or "base" not in prior.metrics:
        print(
            f"[evaluate] {loc}: base was scored on other items or settings; evaluating base again", flush=True
        )
        return None
    print(f"[evaluate] base: reusing {loc} (same eval set and settings)", flush=True)
    return prior


def _champion_dir(params: dict[str, Any]) -> tuple[Path, str]:
    """Local checkpoint and version number of the registry's ``champion`` alias."""
    from troupe.registry import model_version, resolve_model_dir
    from troupe.tracking import tracking_uri

    name = section(params, "registry")["model_name"]
    uri = f"models:/{name}@champion"
    try:
        mv = model_version(uri, tracking_uri())
    except Exception as e:  # MlflowException / ConfigError: no such alias
        raise ConfigError(f"eval.models has 'champion' but {uri} does not resolve: {e}") from e
    return resolve_model_dir(f"models:/{name}/{mv.version}", tracking_uri()), str(mv.version)


def _evaluate(params: dict[str, Any], cfg: dict[str, Any], splits_dir: Path, out: Path, base_only: bool):
    import mlflow

    from troupe import storage
    from troupe.tracking import flatten, step_run

    chars = load_characters(splits_dir / "characters.jsonl")
    cap, seed = int(cfg.get("max_replies_per_split", 0)), int(cfg.get("seed", 0))
    split_items = {s: eval_items(read_jsonl(splits_dir / f"{s}.jsonl", Dialogue), cap, seed) for s in SPLITS}
    cutoff = int(section(params, "data")["cutoff_len"])
    eval_set: dict[str, Any] = {s: split_eval_set(items) for s, items in split_items.items()}
    eval_set["settings"] = _settings(cfg, cutoff)
    names = ["base"] if base_only else list(cfg.get("models", ["base", "sft", "dpo"]))
    judge = judge_agent(params)
    metrics: dict[str, dict[str, dict[str, Estimate]]] = {}
    samples: list[dict[str, Any]] = []
    per_char: list[dict[str, Any]] = []
    with step_run(params, "evaluate_base" if base_only else "evaluate", ("eval",)):
        for name in names:
            if name not in MODEL_PATH_KEYS and name != CHAMPION_MODEL:
                raise ConfigError(
                    f"eval.models: unknown model {name!r}; expected {sorted([*MODEL_PATH_KEYS, CHAMPION_MODEL])}"
                )
            if name == "base" and not base_only and (prior := _reusable_base(params, eval_set)) is not None:
                metrics["base"] = prior.metrics["base"]
                samples += [s for s in prior.samples if s["model"] == "base"]
                continue
            if name == CHAMPION_MODEL:
                d, version = _champion_dir(params)
                eval_set["champion_version"] = version
            else:
                key = MODEL_PATH_KEYS[name]
                loc = str(params["paths"][key])
                if not storage.exists(loc):
                    raise ConfigError(
                        f"{loc}: model directory for eval.models={name} not found (paths.{key}; run its stage first)"
                    )
                d = storage.local_copy(loc, what=f"paths.{key}")
            m, s, pc = evaluate_model(d, split_items, chars, cfg, cutoff, name, judge)
            metrics[name], samples, per_char = m, samples + s, per_char + pc
        files = EvalResult(metrics, eval_set, samples).write(out)
        with (out / "per_character.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(
                f, fieldnames=["model", "split", "character_id", "metric", "value", "n", "lo", "hi"]
            )
            w.writeheader()
            w.writerows(per_char)
        plots = _plots(metrics, out / "plots")
        judge_measured = judge is not None
        report = write_report(metrics, samples, plots, out, judge_measured, eval_set)
        flat = {}
        for model, splits in metrics.items():
            for split, ms in splits.items():
                for k, e in ms.items():
                    for field, v in (("", e.value), (".lo", e.lo), (".hi", e.hi), (".n", float(e.n))):
                        if not math.isnan(v):
                            flat[f"{model}.{split}.{k}{field}"] = v
        mlflow.log_metrics(flat)
        mlflow.log_params(
            {k: v for k, v in flatten({"eval_set": {s: eval_set[s]["sha256"] for s in SPLITS}}).items()}
        )
        mlflow.set_tag("judge", "measured" if judge_measured else "not measured")
        for path in [report, *files, out / "per_character.csv", *plots]:
            mlflow.log_artifact(str(path))
    _print_table(metrics)
    return metrics


def _print_table(metrics: dict[str, dict[str, dict[str, Estimate]]]) -> None:
    from rich.console import Console
    from rich.table import Table

    for split in SPLITS:
        t = Table(title=f"evaluation: {split} (value [95% interval] n)")
        t.add_column("metric")
        for m in metrics:
            t.add_column(m, justify="right")
        for n in sorted({k for m in metrics.values() for k in m.get(split, {})}):
            t.add_row(
                n + (" ↓" if n in LOWER_IS_BETTER else ""),
                *[_cell(metrics[m].get(split, {}).get(n)) for m in metrics],
            )
        Console(width=200).print(t)


#: ``troupe evaluate --suite``: heldout (this module) | charactereval | selfplay -> ``module:function(params)``.
SUITES = {
    "heldout": None,
    "charactereval": "troupe.dialogue.charactereval:run_suite",
    "selfplay": "troupe.dialogue.selfplay:run_selfplay",
}


@click.command("evaluate")
@click.option(
    "--base-only", is_flag=True, help="Evaluate only the base model into paths.eval_base (cached stage)."
)
@click.option(
    "--suite",
    type=click.Choice(list(SUITES)),
    default="heldout",
    show_default=True,
    help="heldout: held-out dialogues and characters -> paths.eval; charactereval: the CharacterEval "
    "protocol -> paths.charactereval; selfplay: candidate vs champion gateways -> paths.selfplay.",
)
@step_options
def evaluate_cmd(params: dict, base_only: bool, suite: str) -> None:
    """Evaluate models: held-out dialogues and characters (default), the CharacterEval protocol, or
    self-play of the candidate against the champion (metrics with intervals, report)."""
    if SUITES[suite] is None:
        evaluate(params, base_only=base_only)
        return
    import importlib

    mod, attr = SUITES[suite].split(":")
    getattr(importlib.import_module(mod), attr)(params)
