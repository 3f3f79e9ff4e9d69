"""The CharacterEval protocol suite: ``troupe evaluate --suite charactereval`` -> ``paths.charactereval``.

Tu et al. 2024, "CharacterEval: A Chinese Benchmark for Role-Playing Conversational Agent Evaluation"
(arXiv:2401.01275); data and scripts from github.com/morecry/CharacterEval (``get_response.py``,
``transform_format.py``, ``run_char_rm.py``, ``compute_score.py``). The steps, and where Troupe differs:

1. Items (``test_data.jsonl``, a JSON *array* despite its name): a script context (``Speaker：line``
   lines, stage directions in ``（）``) and the ``role`` whose next line the model writes. A seeded
   sample of ``charactereval.max_items`` (0 = all) of the items that ``id2metric.jsonl`` lists.
2. Generation with the local model ``charactereval.model`` (``paths.<model>_model``), greedy, at most
   ``charactereval.max_new_tokens``, through :class:`troupe.generation.PrefixGenerator` as the held-out
   evaluation does. The prompt is the one Troupe trains and serves with: the role's Baidu-Baike profile
   as its persona card (:func:`troupe.data.importers.charactereval_character`, rendered by
   :func:`troupe.persona.render_system_prompt`) and the context as chat turns
   (:func:`troupe.data.importers.charactereval_turns`; the role's lines are assistant turns). The
   official ``get_response.py`` instead puts the profile and "请你根据上述信息扮演{role}" in a first user
   turn and prefixes every line with its speaker.
3. The reply is the generation's first line (``transform_format.py``: ``model_output.split("\\n")[0]``,
   "prevent continuous generation").
4. Sparse metrics (``transform_format.py``): each item is scored only on the metrics ``id2metric.jsonl``
   lists for its id, 1-5 each. Items with no entry are counted (the official script would stop with a
   ``KeyError``); malformed records and entries are reported with file:line.
5. Scoring: the official scorer is CharacterRM (BaichuanCharRM, a reward model fine-tuned on the
   benchmark's human labels; ``run_char_rm.py``: ``score * 4 + 1``). Here the configured LLM judge
   (``agents.judge``, :class:`troupe.dialogue.client.AgentClient`) reads a Chinese rubric with the
   profile, the context, the reply and the definitions of only that item's metrics, and answers an
   integer 1-5 per metric as JSON. **The figures are not comparable with the CharacterRM leaderboard**
   (another scorer, and another prompt in step 2); compare models with each other under one judge.
   An answer that does not parse is asked again (``parse_retries``), then recorded as ``unparseable``;
   an endpoint failure as ``failed``: their metrics are missing values, never 0.
6. Aggregation (``compute_score.py``: the mean per metric over the scored items), plus each
   dimension's and the overall mean of its metric means (the paper's per-dimension average), each an
   :class:`troupe.stats.Estimate` with n (scored item-metric pairs) and a 95 % percentile bootstrap
   interval over *scenes* (the cuts of one script scene share their opening lines and are not
   independent: :func:`troupe.data.importers.charactereval_scene_id`).

The paper's 13 metrics in four dimensions: conversational ability (Fluency, Coherency, Consistency),
character consistency (Knowledge-Exposure, -Accuracy, -Hallucination, Persona-Behavior, -Utterance),
role-playing attractiveness (Human-likeness, Communication skills, Expression diversity, Empathy) and
personality back-testing (MBTI). ``id2metric.jsonl`` names 12 of them (:data:`METRICS`, its spelling);
personality back-testing needs its own MBTI protocol and is not measured here.

Outputs in ``paths.charactereval``: ``replies.jsonl`` (item id, role, context, raw generation, first
line), ``scores.jsonl`` (one :class:`troupe.dialogue.contract.JudgeScore` per item: ``dimensions`` =
this item's metrics, 1-5, None when not scored; ``raw`` = the judge's last answer or the endpoint's
failure), ``coverage.json``, ``metrics.json`` (estimates, coverage, judge, settings), ``report.html``
and ``plots/charactereval.png``; a table is printed at the end and everything is logged to MLflow.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from troupe import stats
from troupe.config import ConfigError, section
from troupe.contract import Character, ContractError, read_text, write_jsonl
from troupe.data.importers import (
    charactereval_character,
    charactereval_scene_id,
    charactereval_turns,
    iter_json_records,
)
from troupe.dialogue.client import AgentClient, EndpointFailed, Unparseable, agent_clients
from troupe.dialogue.contract import JudgeScore
from troupe.dialogue.judge import parse_json_answer
from troupe.stats import Estimate

#: Version of the judge prompt below; recorded in every score (bump when the prompt text changes).
CE_PROMPT_VERSION = "charactereval-judge-0.1"
SCALE = (1, 5)
#: Metric name as spelled in ``id2metric.jsonl`` -> (its zh name there, the judge's definition).
#: Definitions paraphrase the paper's (Tu et al. 2024, sec. 3.2).
METRICS: dict[str, tuple[str, str]] = {
    "Fluency": ("对话流利度", "回复语句通顺、语法正确、易于理解。"),
    "Coherence": ("对话连贯性", "回复紧扣上下文，与对方刚说的话题相关、衔接自然。"),
    "Consistency": ("对话一致性", "回复与角色在对话中先前的说法和立场一致，不自相矛盾。"),
    "Exposure": ("知识曝光度", "回复中展现了与角色相关的知识（经历、人物关系、作品情节等），信息量充足。"),
    "Accuracy": ("知识准确率", "回复中涉及的角色知识与角色资料和原作一致、准确无误。"),
    "Hallucination": (
        "知识幻觉性",
        "回复没有出现角色不应知道的知识（如超出其时代、世界观或经历的内容）；越少幻觉分越高。",
    ),
    "Behavior": ("行为一致性", "回复中括号内的动作、神态、语气等行为描写符合角色的性格和习惯。"),
    "Utterance": ("言语一致性", "回复的用词、语气、口头禅等说话方式符合角色。"),
    "Humanlikeness": ("类人程度", "回复像真人在说话，而不像机器或AI助手。"),
    "Communication_skills": ("交流技巧", "回复体现出情商与沟通技巧，能恰当地回应和引导对方。"),
    "Diversity": ("表现多样性", "回复的表达丰富多样、生动形象，而不是单调、模板化。"),
    "Empathy": ("共情度", "回复能理解并回应对方的情绪和感受，表达关心或支持。"),
}
#: The paper's dimensions (key -> zh name, metrics), id2metric's spelling; personality is not measured.
CE_DIMENSIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "conversational_ability": ("对话能力", ("Fluency", "Coherence", "Consistency")),
    "character_consistency": (
        "角色一致性",
        ("Exposure", "Accuracy", "Hallucination", "Behavior", "Utterance"),
    ),
    "roleplay_attractiveness": (
        "角色扮演吸引力",
        ("Humanlikeness", "Communication_skills", "Diversity", "Empathy"),
    ),
}
DIMENSION_OF = {m: d for d, (_, ms) in CE_DIMENSIONS.items() for m in ms}
MODEL_PATH_KEYS = {"base": "base_model", "sft": "sft_model", "dpo": "dpo_model"}
#: judge calls in flight at once by default (params ``charactereval.concurrency``)
JUDGE_CONCURRENCY = 8
NOT_COMPARABLE = (
    "These figures are NOT comparable with the CharacterEval / CharacterRM leaderboard: the official "
    "scorer is the CharacterRM reward model and the official generation prompt differs; this run was "
    "scored by the LLM judge named above with Troupe's persona-card prompt. Compare models only with "
    "each other under the same judge."
)


# ------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Item:
    """One CharacterEval test item: ``id`` (str of the record's id), the ``role`` to play, its
    ``novel``, the script ``context``, the ``metrics`` id2metric lists for it (empty: none) and the
    ``line`` of ``test_data.jsonl`` where its record starts."""

    id: str
    role: str
    novel: str
    context: str
    metrics: tuple[str, ...]
    line: int

    @property
    def scene(self) -> str:
        """The scene this item is cut from (the bootstrap's cluster)."""
        return charactereval_scene_id("charactereval", self.novel, self.context)


@dataclass
class Benchmark:
    """The loaded benchmark: well-formed ``items`` (file order), ``profiles`` (role -> Baidu-Baike
    profile), ``records`` read from ``test_data.jsonl`` (= items + malformed records) and
    ``problems``: ``{"file", "line", "reason"}`` per malformed record or id2metric entry."""

    items: list[Item]
    profiles: dict[str, Any]
    records: int = 0
    problems: list[dict[str, Any]] = field(default_factory=list)

    @property
    def scoreable(self) -> list[Item]:
        """Items with at least one id2metric metric."""
        return [i for i in self.items if i.metrics]

    @property
    def without_metrics(self) -> list[Item]:
        """Items id2metric has no (valid) entry for: counted, not generated, not scored."""
        return [i for i in self.items if not i.metrics]


def _json_file(path: Path) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise ContractError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from e


def load_id2metric(path: Path) -> tuple[dict[str, tuple[str, ...]], list[dict[str, Any]]]:
    """``id2metric.jsonl``: item id -> metric names (the :data:`METRICS` spelling), and problems.

    The published file is one JSON object (``{"6208": [["Accuracy", "知识准确率"], ...], ...}``); JSON
    Lines of such objects are accepted too. An entry that is not a list of ``[name, zh_name]`` pairs,
    or names an unknown metric, is a problem (``{"file", "line", "reason"}``); its known metrics are
    kept. A malformed JSON Lines line is a problem; a malformed single object is a ContractError.

    Raises:
        ContractError: missing or non-UTF-8 file; a pretty-printed object that does not parse
            (file:line).
    """
    text = read_text(path)
    chunks: list[tuple[int, Any]] = []
    problems: list[dict[str, Any]] = []
    try:
        whole = json.loads(text)
        chunks.append((1, whole))
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and text.lstrip().split("\n", 1)[0].strip() == "{":
            raise ContractError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from e
        for n, raw in enumerate(text.splitlines(), 1):
            if raw.strip():
                try:
                    chunks.append((n, json.loads(raw)))
                except json.JSONDecodeError as le:
                    problems.append({"file": str(path), "line": n, "reason": f"malformed JSON: {le.msg}"})
    out: dict[str, tuple[str, ...]] = {}
    for line0, obj in chunks:
        if not isinstance(obj, dict):
            problems.append({"file": str(path), "line": line0, "reason": "not an object {id: metrics}"})
            continue
        for key, entry in obj.items():
            at = text.find(f'"{key}"')
            line = text.count("\n", 0, at) + 1 if len(chunks) == 1 and at >= 0 else line0
            names: list[str] = []
            pairs = entry if isinstance(entry, list) and entry else [entry]
            for pair in pairs:
                name = pair[0] if isinstance(pair, list | tuple) and pair else pair
                if isinstance(name, str) and name in METRICS:
                    names.append(name)
                else:
                    why = f"unknown metric {name!r}" if isinstance(name, str) else f"malformed entry {pair!r}"
                    problems.append(
                        {"file": str(path), "line": line, "reason": f"id {key}: {why} (expected [name, zh] "
                         f"pairs with name in {sorted(METRICS)})"}
                    )  # fmt: skip
            if names:
                out[str(key)] = tuple(dict.fromkeys(names))
    return out, problems


def load_benchmark(root: str | Path) -> Benchmark:
    """Read a CharacterEval directory (``test_data.jsonl``, ``character_profiles.json``, ``id2metric.jsonl``).

    A record needs an ``id`` (int or str, unique), a non-empty string ``role`` and a string
    ``context``; others are problems with their file:line. Roles without a profile still get a card
    (name and ``作品`` only).

    Raises:
        ContractError: a missing or non-UTF-8 file, a profiles file that is not a JSON object, a JSON
            array that does not parse (file:line).
    """
    root = Path(root)
    pfile, dfile, mfile = (
        root / n for n in ("character_profiles.json", "test_data.jsonl", "id2metric.jsonl")
    )
    profiles = _json_file(pfile)
    if not isinstance(profiles, dict):
        raise ContractError(f"{pfile}: expected a JSON object {{role: profile}}")
    id2metric, problems = load_id2metric(mfile)
    items: list[Item] = []
    seen: set[str] = set()
    records = 0
    for line, rec, err in iter_json_records(dfile):
        records += 1
        reason = err
        if reason is None:
            ok = (
                isinstance(rec, dict)
                and isinstance(rec.get("id"), int | str)
                and not isinstance(rec.get("id"), bool)
            )
            if not ok or not isinstance(rec.get("role"), str) or not rec["role"].strip():
                reason = "record needs an `id` (int or str) and a non-empty string `role`"
            elif not isinstance(rec.get("context"), str):
                reason = "record needs a string `context`"
            elif str(rec["id"]) in seen:
                reason = f"duplicate id {rec['id']}"
        if reason is not None:
            problems.append({"file": str(dfile), "line": line, "reason": reason})
            continue
        iid = str(rec["id"])
        seen.add(iid)
        items.append(
            Item(iid, rec["role"].strip(), str(rec.get("novel_name") or ""), rec["context"],
                 id2metric.get(iid, ()), line)
        )  # fmt: skip
    return Benchmark(items, profiles, records, problems)


def sample_items(items: Sequence[Item], max_items: int, seed: int) -> list[Item]:
    """All ``items`` when ``max_items`` is 0 or not smaller; else a seeded sample of ``max_items``
    (``random.Random(seed).sample``), kept in file order."""
    if not max_items or max_items >= len(items):
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), max_items))
    return [x for k, x in enumerate(items) if k in keep]


# ----------------------------------------------------------------------------------------- generation


def item_card(item: Item, profiles: dict[str, Any]) -> Character:
    """The role's persona card (the importer's mapping of the profile; one per role)."""
    return charactereval_character(item.role, profiles.get(item.role), item.novel)


def prompt_messages(item: Item, card: Character) -> list[dict[str, str]]:
    """Chat messages asking for ``item.role``'s next line: the rendered card as system, the context's
    lines as turns (the role's own as assistant turns, everyone else's as user turns "Speaker: line")."""
    from troupe.train.encoding import chat_messages

    msgs, trailing = charactereval_turns(item.context, item.role, require_reply=False)
    return chat_messages(msgs + trailing, card)


def first_line(text: str) -> str:
    """The reply CharacterEval scores: the generation up to its first newline
    (``transform_format.py``: ``model_output.split("\\n")[0]``), surrounding whitespace removed."""
    return text.split("\n", 1)[0].strip()


def generate_replies(
    model_dir: Path,
    items: Sequence[Item],
    profiles: dict[str, Any],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    prefix_cache_mb: int = 256,
    model_name: str = "",
) -> list[dict[str, Any]]:
    """Greedy next lines of ``items`` by the checkpoint in ``model_dir`` (progress printed).

    Returns:
        One row per item, in order: ``id``, ``role``, ``novel``, ``character_id``, ``context``, ``raw``
        (the whole generation), ``reply`` (:func:`first_line`), ``finished`` (False = cut by
        ``max_new_tokens``), ``completion_tokens``, ``model``.
    """
    from troupe.generation import GenRequest, PrefixGenerator
    from troupe.modeling import load_model

    model, tok = load_model(model_dir)
    gen = PrefixGenerator(model, tok, prefix_cache_bytes=prefix_cache_mb << 20)
    cards = {it.role: item_card(it, profiles) for it in items}
    reqs = [
        GenRequest(prompt_messages(it, cards[it.role]), max_new_tokens, 0.0, cards[it.role].id)
        for it in items
    ]
    results = gen.generate(reqs, batch_size=batch_size, desc=f"charactereval/{model_name or 'model'}")
    return [
        {
            "id": it.id, "role": it.role, "novel": it.novel, "character_id": cards[it.role].id,
            "context": it.context, "raw": r.text, "reply": first_line(r.text), "finished": r.finished,
            "completion_tokens": r.completion_tokens, "model": model_name,
        }
        for it, r in zip(items, results, strict=True)
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- judge

_JUDGE_SYSTEM = "你是严谨、公正的角色扮演对话评测员，只按给定指标打分，只输出JSON。"


def judge_messages(item: Item, profile: Any, reply: str) -> list[dict[str, str]]:
    """The judge's Chinese prompt for one item: the role's profile, the context, the reply and the
    definitions of only ``item.metrics`` (:data:`METRICS`), asking for ``{"<metric>": 1-5, ...}``."""
    if isinstance(profile, dict) and profile:
        prof = "\n".join(f"- {k}：{v}" for k, v in profile.items())
    else:
        prof = f"（无资料）作品：{item.novel or '未知'}"
    rubric = "\n".join(f"- {m}（{METRICS[m][0]}）：{METRICS[m][1]}" for m in item.metrics)
    shape = "{" + ", ".join(f'"{m}": <1-5的整数>' for m in item.metrics) + "}"
    user = (
        f"请评价下面这句回复作为角色“{item.role}”在剧本中的下一句台词的质量。\n\n"
        f"【角色资料】\n{prof}\n\n【对话上下文】\n{item.context}\n\n【回复】（{item.role}的下一句）\n{reply}\n\n"
        f"【评价指标】每项给1到5的整数分，1分最差，5分最好：\n{rubric}\n\n"
        f"只输出一个JSON对象，键为上面的指标英文名，不要输出其他内容：\n{shape}"
    )
    return [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_scores(text: str, metrics: Sequence[str]) -> dict[str, int]:
    """``{metric: score}`` for exactly ``metrics`` from the judge's answer.

    Tolerant: the JSON object as :func:`troupe.dialogue.judge.parse_json_answer` reads it (code
    fences, prose, single quotes, full-width digits...); keys by the English name (any case) or the zh
    name; values as integers, integral floats or strings ("4", "4分", "4/5").

    Raises:
        ValueError: no JSON object, a metric missing, or a score that is not an integer in 1-5
            (:meth:`AgentClient.ask` asks again on it).
    """
    obj = parse_json_answer(text)
    norm = {str(k).strip().lower(): v for k, v in obj.items()}
    out: dict[str, int] = {}
    for m in metrics:
        v = norm.get(m.lower(), norm.get(METRICS[m][0]))
        if isinstance(v, str):
            digits = v.split("/")[0].strip().rstrip("分").strip()
            v = int(digits) if digits.isdigit() else v
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{m}: no integer score in the answer (got {v!r})")
        if not SCALE[0] <= v <= SCALE[1]:
            raise ValueError(f"{m}: score {v} outside {SCALE[0]}-{SCALE[1]}")
        out[m] = v
    return out


async def score_replies(
    rows: Sequence[dict[str, Any]],
    items: dict[str, Item],
    profiles: dict[str, Any],
    judge: AgentClient,
    concurrency: int = JUDGE_CONCURRENCY,
) -> list[JudgeScore]:
    """Judge every reply on its item's metrics, ``concurrency`` calls at a time (tqdm progress).

    Returns:
        One :class:`JudgeScore` per row, in order: ``ok`` with every metric 1-5; ``unparseable`` (no
        attempt parsed; ``raw`` = the last answer) or ``failed`` (``raw`` = the endpoint's error)
        with every metric None.
    """
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(max(1, concurrency))
    bar = tqdm(total=len(rows), desc="charactereval judge", unit="item")

    async def one(row: dict[str, Any]) -> JudgeScore:
        item = items[row["id"]]
        base = {"item_id": item.id, "model": row.get("model", ""), "character_id": row.get("character_id", ""),
                "judge_model": judge.model, "prompt_version": CE_PROMPT_VERSION}  # fmt: skip
        missing = dict.fromkeys(item.metrics)
        async with sem:
            try:
                msgs = judge_messages(item, profiles.get(item.role), row["reply"])
                got, reply, attempts = await judge.ask(msgs, lambda t: parse_scores(t, item.metrics))
                return JudgeScore(**base, dimensions=dict(got), attempts=attempts, raw=reply.text)
            except Unparseable as e:
                return JudgeScore(
                    **base, dimensions=missing, status="unparseable", attempts=e.attempts, raw=e.raw
                )
            except EndpointFailed as e:
                return JudgeScore(**base, dimensions=missing, status="failed", attempts=0, raw=e.reason)
            finally:
                bar.update(1)

    try:
        return list(await asyncio.gather(*(one(r) for r in rows)))
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------ summaries


def _macro_mean(pairs: list[tuple[str, int]]) -> float:
    """Mean over metrics of each metric's mean score (``pairs``: (metric, score))."""
    by: dict[str, list[int]] = defaultdict(list)
    for m, v in pairs:
        by[m].append(v)
    return sum(sum(v) / len(v) for v in by.values()) / len(by) if by else math.nan


def summarize(
    scores: Sequence[JudgeScore],
    items: dict[str, Item],
    confidence: float = stats.DEFAULT_CONFIDENCE,
    resamples: int = stats.DEFAULT_RESAMPLES,
) -> dict[str, dict[str, Estimate]]:
    """Estimates of the scored (``ok``) items: ``{"metrics": {metric: mean 1-5}, "dimensions":
    {dimension: mean of its metric means}, "overall": {"overall": mean of all metric means}}``.

    Every estimate: n = scored item-metric pairs, a percentile bootstrap interval resampling scenes
    (:attr:`Item.scene`; :func:`troupe.stats.cluster_bootstrap`). Metrics and dimensions nobody was
    scored on are absent (the report shows them as n/a).
    """
    pairs: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for s in scores:
        if s.status != "ok":
            continue
        for m, v in s.dimensions.items():
            if v is not None:
                pairs[items[s.item_id].scene].append((m, v))
    out: dict[str, dict[str, Estimate]] = {"metrics": {}, "dimensions": {}, "overall": {}}
    for m in METRICS:
        vals = {sc: [v for mm, v in ps if mm == m] for sc, ps in pairs.items()}
        if any(vals.values()):
            out["metrics"][m] = stats.bootstrap_mean(vals, confidence, resamples)
    for d, (_, ms) in CE_DIMENSIONS.items():
        cl = {sc: [p for p in ps if p[0] in ms] for sc, ps in pairs.items()}
        if any(cl.values()):
            out["dimensions"][d] = stats.cluster_bootstrap(cl, _macro_mean, confidence, resamples)
    if pairs:
        out["overall"]["overall"] = stats.cluster_bootstrap(pairs, _macro_mean, confidence, resamples)
    return out


def coverage(bench: Benchmark, sampled: Sequence[Item], scores: Sequence[JudgeScore]) -> dict[str, Any]:
    """What was read, asked and scored; the counts add up: ``records = items + malformed_records``,
    ``items = scoreable + without_id2metric``, ``sampled = scored + unparseable + failed``,
    ``metric_pairs = scored_pairs + unscored_pairs``."""
    dfile = "test_data.jsonl"
    malformed = sum(1 for p in bench.problems if Path(p["file"]).name == dfile)
    status = [s.status for s in scores]
    pairs = sum(len(i.metrics) for i in sampled)
    scored_pairs = sum(sum(v is not None for v in s.dimensions.values()) for s in scores if s.status == "ok")
    return {
        "records": bench.records, "malformed_records": malformed, "items": len(bench.items),
        "scoreable": len(bench.scoreable), "without_id2metric": len(bench.without_metrics),
        "without_id2metric_ids": [i.id for i in bench.without_metrics],
        "sampled": len(sampled), "scored": status.count("ok"), "unparseable": status.count("unparseable"),
        "failed": status.count("failed"), "metric_pairs": pairs, "scored_pairs": scored_pairs,
        "unscored_pairs": pairs - scored_pairs, "problems": bench.problems,
    }  # fmt: skip


# -------------------------------------------------------------------------------------------- report


def _cell(e: Estimate | None) -> str:
    if e is None or not e.n:
        return "n/a"
    ci = "[no interval: 1 scene]" if math.isnan(e.lo) else f"[{e.lo:.2f}, {e.hi:.2f}]"
    return f"{e.value:.2f} {ci} n={e.n}"


def _rows(summary: dict[str, dict[str, Estimate]]) -> list[tuple[str, str, str, Estimate | None]]:
    """(key, zh name, kind, estimate) in report order: overall, then each dimension and its metrics."""
    rows: list[tuple[str, str, str, Estimate | None]] = [
        ("overall", "总体", "overall", summary["overall"].get("overall"))
    ]
    for d, (zh, ms) in CE_DIMENSIONS.items():
        rows.append((d, zh, "dimension", summary["dimensions"].get(d)))
        rows += [(m, METRICS[m][0], "metric", summary["metrics"].get(m)) for m in ms]
    return rows


def plot_summary(summary: dict[str, dict[str, Estimate]], path: Path, title: str) -> Path:
    """Horizontal bars of every dimension and metric mean (1-5) with its 95 % interval and n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(summary)
    colors = {"overall": "#555555", "dimension": "#4C72B0", "metric": "#9ABBE0"}
    fig, ax = plt.subplots(figsize=(8, 0.36 * len(rows) + 1.2))
    ys = list(range(len(rows)))[::-1]
    for y, (_, _, kind, e) in zip(ys, rows, strict=True):
        if e is None or not e.n:
            ax.text(SCALE[0] + 0.05, y, "n/a", va="center", fontsize=8)
            continue
        lo, hi = (e.value, e.value) if math.isnan(e.lo) else (e.lo, e.hi)
        err = [[max(e.value - lo, 0)], [max(hi - e.value, 0)]]
        ax.barh(y, e.value - SCALE[0], left=SCALE[0], xerr=err, color=colors[kind], capsize=2)
        note = " (1 scene: no interval)" if math.isnan(e.lo) else ""
        ax.text(SCALE[1] + 0.05, y, f"{e.value:.2f} n={e.n}{note}", va="center", fontsize=7)
    ax.set_yticks(ys, [("    " if r[2] == "metric" else "") + r[0] for r in rows], fontsize=8)  # no CJK font
    ax.set_xlim(SCALE[0], SCALE[1] + 1.4)
    ax.set_xlabel("mean score (1-5), 95% bootstrap interval over scenes")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(
    out: Path,
    summary: dict[str, dict[str, Estimate]],
    cover: dict[str, Any],
    judge: dict[str, str],
    model: str,
    rows: Sequence[dict[str, Any]],
    scores: Sequence[JudgeScore],
    plot: Path,
) -> Path:
    """``report.html``: which judge scored it and the non-comparability note first, then coverage, the
    table (value [95 % interval] n), the plot, problems and sample replies with their scores."""
    esc = html.escape
    table = "".join(
        f"<tr><td style='padding-left:{18 if k == 'metric' else 4}px'>{esc(key)} {esc(zh)}</td>"
        f"<td>{esc(_cell(e))}</td></tr>"
        for key, zh, k, e in _rows(summary)
    )
    cov = "".join(
        f"<tr><td>{esc(k)}</td><td>{esc(str(v))}</td></tr>"
        for k, v in cover.items()
        if k not in ("problems", "without_id2metric_ids")
    )
    probs = "".join(
        f"<li><code>{esc(p['file'])}:{p['line']}</code> {esc(p['reason'])}</li>"
        for p in cover["problems"][:200]
    )
    by_id = {s.item_id: s for s in scores}
    ex = "".join(
        f"<tr><td>{esc(r['id'])}</td><td>{esc(r['role'])}</td><td>{esc(r['context'][-200:])}</td>"
        f"<td>{esc(r['reply'])}</td><td>{esc(by_id[r['id']].status)}: "
        f"{esc(json.dumps(by_id[r['id']].dimensions, ensure_ascii=False))}</td></tr>"
        for r in rows[:40]
        if r["id"] in by_id
    )
    img = base64.b64encode(plot.read_bytes()).decode()
    doc = (
        "<html><head><meta charset='utf-8'><title>CharacterEval (Troupe)</title><style>body{font-family:sans-serif}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}"
        ".warn{background:#fff3cd;padding:8px;border:1px solid #e0c060}</style></head><body>"
        f"<h1>CharacterEval protocol: {esc(model)}</h1>"
        f"<p><b>Judge</b>: <code>{esc(judge['base_url'])}</code>, model <code>{esc(judge['model'])}</code> "
        f"(prompt {CE_PROMPT_VERSION}); scale {SCALE[0]}-{SCALE[1]}.</p><p class='warn'>{esc(NOT_COMPARABLE)}</p>"
        "<p>Protocol: Tu et al. 2024 (arXiv:2401.01275): first line of the generation, each item scored only "
        "on its id2metric metrics; unparseable or failed judgements are missing values, never 0. "
        "Personality back-testing (MBTI) is not measured. Troupe's persona rules forbid stage directions, "
        "which the Behavior metric rewards.</p>"
        f"<h2>Scores</h2><table><tr><th>dimension / metric</th><th>mean [95% interval] n</th></tr>{table}</table>"
        f"<img src='data:image/png;base64,{img}' style='max-width:100%'>"
        f"<h2>Coverage</h2><table>{cov}</table><h2>Problems ({len(cover['problems'])})</h2><ul>{probs}</ul>"
        "<h2>Sample replies</h2><table><tr><th>id</th><th>role</th><th>context (end)</th><th>reply</th>"
        f"<th>scores</th></tr>{ex}</table></body></html>"
    )
    path = out / "report.html"
    path.write_text(doc, encoding="utf-8")
    return path


def print_table(
    summary: dict[str, dict[str, Estimate]], cover: dict[str, Any], judge: dict[str, str]
) -> None:
    """The summary as a terminal table, with the judge and the coverage counts."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(
        title=f"CharacterEval (judge {judge['model']} @ {judge['base_url']}; not leaderboard-comparable)"
    )
    t.add_column("dimension / metric")
    t.add_column("mean [95% interval] n", justify="right")
    for key, zh, kind, e in _rows(summary):
        t.add_row(f"{'  ' if kind == 'metric' else ''}{key} {zh}", escape(_cell(e)))
    con = Console(width=160)
    con.print(t)
    keys = (
        "records",
        "items",
        "without_id2metric",
        "sampled",
        "scored",
        "unparseable",
        "failed",
        "malformed_records",
    )
    con.print("coverage: " + ", ".join(f"{k}={cover[k]}" for k in keys))


# ------------------------------------------------------------------------------------------ the step


def run_suite(params: dict[str, Any]) -> dict[str, Any]:
    """``troupe evaluate --suite charactereval``: generate, judge, summarise, report (module docstring).

    Args:
        params: resolved params: ``charactereval`` (path, max_items, seed, model, max_new_tokens),
            ``agents.judge``, ``paths.<model>_model`` and ``paths.charactereval`` (local paths or URIs,
            :mod:`troupe.storage`), ``eval.batch_size`` / ``prefix_cache_mb`` / ``confidence``.

    Returns:
        The ``metrics.json`` content: ``metrics`` / ``dimensions`` / ``overall`` (estimate dicts),
        ``coverage``, ``judge``, ``model``, ``settings``.

    Raises:
        ConfigError: the judge is not configured (``agents.judge.base_url``), an unknown
            ``charactereval.model`` or its checkpoint missing.
        ContractError / StorageError: the benchmark files are missing or malformed as a whole.
    """
    import mlflow

    from troupe import storage
    from troupe.tracking import step_run

    cfg = section(params, "charactereval")
    ev = params.get("eval") or {}
    judge = agent_clients(params, ("judge",))["judge"]  # fail fast, before any compute
    name = str(cfg.get("model", "dpo"))
    if name not in MODEL_PATH_KEYS:
        raise ConfigError(
            f"charactereval.model: unknown model {name!r}; expected one of {sorted(MODEL_PATH_KEYS)}"
        )
    key = MODEL_PATH_KEYS[name]
    loc = str(section(params, "paths").get(key, ""))
    if not loc or not storage.exists(loc):
        raise ConfigError(
            f"{loc}: checkpoint for charactereval.model={name} not found (paths.{key}; run its stage)"
        )
    bench = load_benchmark(storage.local_copy(str(cfg["path"]), what="charactereval.path"))
    sampled = sample_items(bench.scoreable, int(cfg.get("max_items", 0)), int(cfg.get("seed", 0)))
    confidence = float(ev.get("confidence", stats.DEFAULT_CONFIDENCE))
    settings = {k: cfg.get(k) for k in ("max_items", "seed", "model", "max_new_tokens")}
    print(
        f"[charactereval] {len(bench.items)} items ({len(bench.without_metrics)} without id2metric, "
        f"{len(bench.problems)} problems); scoring {len(sampled)} with {name} and judge {judge.model}",
        flush=True,
    )
    with (
        storage.output_dir(str(section(params, "paths")["charactereval"])) as out,
        step_run(params, "evaluate_charactereval", ("charactereval",)),
    ):
        rows = generate_replies(
            storage.local_copy(loc, what=f"paths.{key}"), sampled, bench.profiles,
            max_new_tokens=int(cfg.get("max_new_tokens", 64)), batch_size=int(ev.get("batch_size", 8)),
            prefix_cache_mb=int(ev.get("prefix_cache_mb", 256)), model_name=name,
        )  # fmt: skip
        write_jsonl(out / "replies.jsonl", rows)

        async def judge_all() -> list[JudgeScore]:
            try:
                conc = int(cfg.get("concurrency", JUDGE_CONCURRENCY))
                return await score_replies(rows, {i.id: i for i in sampled}, bench.profiles, judge, conc)
            finally:
                await judge.aclose()

        scores = asyncio.run(judge_all())
        write_jsonl(out / "scores.jsonl", [s.model_dump() for s in scores])
        summary = summarize(scores, {i.id: i for i in sampled}, confidence)
        cover = coverage(bench, sampled, scores)
        result = {
            **{k: {m: e.to_dict() for m, e in v.items()} for k, v in summary.items()},
            "coverage": cover, "judge": judge.describe(), "judge_usage": judge.usage.model_dump(),
            "model": name, "settings": settings, "prompt_version": CE_PROMPT_VERSION,
            "comparable_with_leaderboard": False,
        }  # fmt: skip
        (out / "coverage.json").write_text(json.dumps(cover, ensure_ascii=False, indent=2), encoding="utf-8")
        (out / "metrics.json").write_text(json.dumps(result, ensure_ascii=False, indent=2), encoding="utf-8")
        plot = plot_summary(
            summary, out / "plots" / "charactereval.png", f"CharacterEval: {name}, judge {judge.model}"
        )
        report = write_report(out, summary, cover, judge.describe(), name, rows, scores, plot)
        flat = {
            f"charactereval.{m}{suffix}": v
            for part in summary.values()
            for m, e in part.items()
            for suffix, v in (("", e.value), (".lo", e.lo), (".hi", e.hi), (".n", float(e.n)))
            if not math.isnan(v)
        }
        flat.update({f"charactereval.coverage.{k}": float(v) for k, v in cover.items() if isinstance(v, int)})
        mlflow.log_metrics(flat)
        mlflow.set_tags(
            {"charactereval.judge": f"{judge.model} @ {judge.base_url}", "charactereval.model": name}
        )
        for f in ("replies.jsonl", "scores.jsonl", "coverage.json", "metrics.json", "report.html"):
            mlflow.log_artifact(str(out / f))
        mlflow.log_artifact(str(plot))
    print_table(summary, cover, judge.describe())
    target = str(section(params, "paths")["charactereval"]).rstrip("/")
    print(
        f"[charactereval] {target}/{report.name} (and metrics.json, replies.jsonl, scores.jsonl)", flush=True
    )
    return result
