"""The rubric judge: an LLM scores role-play replies (or whole transcripts) the way the team's people
did, compares two replies in both orders, turns comparisons into ratings and is calibrated against
human side-by-side labels.

* **Rubric** (:func:`rubric_messages`): written in the character's language (zh and en; other
  languages use the English rubric and name the language). It carries the full persona card
  (:func:`troupe.persona.render_system_prompt`), the context and the reply (or a transcript), the
  four :data:`~troupe.dialogue.contract.DIMENSIONS` with anchored descriptions at 1, 4, 7 and 10
  (grounded in the seeds' human scores: seeds/000 scored an assistant-like GPT-4o 1 on human-likeness,
  a LoRA model that kept asking the same question 1 on purposefulness and engagement, a model that
  ignored its card 0 on consistency), a yes/no per judged basic rule (True = broken) and the seeds'
  narration test. The answer is JSON with fixed keys.
* **Parsing** (:func:`parse_json_answer`, :func:`parse_rubric`): tolerant of code fences, prose
  around the JSON, single quotes, trailing commas, full-width digits, Chinese dimension names as
  keys, ``"8/10"`` / ``"8分"`` scores and yes/no/是/否 flags. A value out of range or missing is None
  (never 0). Nothing usable raises ValueError, so :meth:`AgentClient.ask` asks again
  (``agents.judge.parse_retries``); after that the score is recorded with status ``unparseable`` and
  its raw answer, an endpoint failure as ``failed``. One bad answer never aborts a run.
* **Pairwise** (:func:`compare`): both orders (A/B, then B/A); the same winner in both = that
  winner, otherwise a tie (position bias cancels out; Zheng et al. 2023, "Judging LLM-as-a-Judge with
  MT-Bench and Chatbot Arena", arXiv:2306.05685, sec. 3.3 "swap positions").
* **Ratings** (:func:`bradley_terry`): Bradley-Terry strengths by Hunter's MM algorithm (Hunter 2004,
  "MM algorithms for generalized Bradley-Terry models", Ann. Statist. 32:384, eq. 3), ties as half a
  win each, parametric-bootstrap intervals; :func:`log_ratings` logs a table to MLflow.
* **Calibration** (:func:`calibration`): Spearman's rho of judge vs human scores per dimension
  (cluster bootstrap over labelled items), choice agreement and per-rule agreement (Wilson).
* **Summaries** (:func:`summarise`): ``judge_<dimension>`` means, ``judge_rule_<id>`` /
  ``judge_narration`` rates, and ``judge_unparseable`` / ``judge_failed`` rates, each with n and an
  interval.

Async functions (``ascore_reply``, ``ascore_transcript``, ``ascore_many``, ``acompare``,
``ascore_labels``) are the core; the sync wrappers of the same name without ``a`` run them on a fresh
copy of the client (its usage is added back to the caller's client).
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import json
import math
import re
import unicodedata
from collections import defaultdict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from troupe import stats
from troupe.contract import Character, Message
from troupe.dialogue.client import AgentClient, EndpointFailed, Unparseable
from troupe.dialogue.contract import (
    BASIC_RULES,
    DIMENSION_SCALE,
    DIMENSIONS,
    JUDGE_PROMPT_VERSION,
    JUDGED_RULE_IDS,
    HumanLabel,
    JudgeScore,
)
from troupe.persona import render_system_prompt
from troupe.stats import Estimate

#: concurrent judge calls of :func:`score_many` by default (``requests_per_minute`` still applies)
DEFAULT_CONCURRENCY = 8
#: summary metrics where lower is better (the evaluation report and the gate read it)
LOWER_IS_BETTER = frozenset(
    {"judge_unparseable", "judge_failed", "judge_narration", *(f"judge_rule_{r}" for r in JUDGED_RULE_IDS)}
)
#: display names of languages the rubric does not have a translation for (the English rubric names them)
LANGUAGE_NAMES = {
    "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "fr": "French", "de": "German", "es": "Spanish",
    "pt": "Portuguese", "ru": "Russian", "it": "Italian", "th": "Thai", "vi": "Vietnamese",
    "id": "Indonesian", "tr": "Turkish", "hi": "Hindi", "en": "English", "zh": "Chinese",
}  # fmt: skip

# ---------------------------------------------------------------------------------------------------
# The rubric: anchored descriptions per dimension (score -> description), zh and en

ANCHORS: dict[str, dict[str, dict[int, str]]] = {
    "human_likeness": {
        "zh": {
            1: "像AI助手或客服：书面腔、说教、列条目，或出现“作为AI”“因人而异”之类真人不会说的话。",
            4: "偶尔像人，但措辞生硬、过分礼貌或过分完整，像在写文章。",
            7: "口语自然，有语气和情绪，只有个别地方带助手腔或模板感。",
            10: "完全像真人在聊天：简短随意、有个性有情绪，看不出是模型。",
        },
        "en": {
            1: "Sounds like an AI assistant or a help desk: formal, preachy, bullet points, or phrases no "
            'person says ("As an AI...", "it depends on the person").',
            4: "Sometimes human, but stiff, over-polite or over-complete, like a written essay.",
            7: "Natural and colloquial with tone and emotion; only a trace of assistant style or template.",
            10: "Exactly like a real person chatting: short, casual, with personality and emotion; "
            "you cannot tell it is a model.",
        },
    },
    "purposefulness": {
        "zh": {
            1: "敷衍应付或胡言乱语：答非所问、随机跳话题，或反复问同一个问题。",
            4: "能接话但很被动：只回答、不推进，话题停滞。",
            7: "有意图地推进话题：会追问或引出新内容，偶有跑题或转折突兀。",
            10: "始终围绕情节和目标推进，自然深入话题、提出好问题，对话有方向。",
        },
        "en": {
            1: "Evasive or random: ignores what was said, jumps topics, or asks the same question again and again.",
            4: "Answers but passively: responds without moving the chat forward; the topic stalls.",
            7: "Moves the topic forward on purpose: follows up or brings in something new; "
            "an occasional detour or abrupt switch.",
            10: "Always drives the story and the topic, deepens it naturally, asks good questions; "
            "the chat has direction.",
        },
    },
    "consistency": {
        "zh": {
            1: "不是这个角色：身份、经历或说话风格与角色卡矛盾，或有明显的知识错误、越界知识。",
            4: "大体是这个角色，但有事实错误、风格漂移或前后矛盾。",
            7: "身份、事实和风格基本一致，只有小瑕疵。",
            10: "完全符合角色卡：身份、事实、观点、口头禅和语气前后一致，不超出角色的知识边界。",
        },
        "en": {
            1: "Not this character: identity, history or speaking style contradict the card, or clear "
            "factual errors / knowledge the character could not have.",
            4: "Mostly this character, but with factual errors, style drift or contradictions.",
            7: "Identity, facts and style are consistent, with minor flaws.",
            10: "Fully matches the card: identity, facts, opinions, catch-phrases and tone stay consistent, "
            "within the character's knowledge boundary.",
        },
    },
    "engagement": {
        "zh": {
            1: "让人完全不想聊：重复、空洞、瞎说或冒犯。",
            4: "平淡无奇：能回，但没有兴趣继续。",
            7: "有趣、有梗或有情感，愿意继续聊。",
            10: "非常吸引人：有个性、幽默或情感共鸣，让人迫不及待想回复。",
        },
        "en": {
            1: "Makes you not want to talk at all: repetitive, empty, nonsense or offensive.",
            4: "Bland: you could answer, but have no wish to go on.",
            7: "Interesting, witty or emotional; you would keep talking.",
            10: "Captivating: personality, humour or emotional resonance; you can't wait to reply.",
        },
    },
}

_TEXT = {
    "zh": {
        "role": "你是角色扮演对话的严格评审。你要评估模型扮演角色“{name}”的表现。",
        "card": "角色卡（模型收到的系统提示词）",
        "context": "对话上下文",
        "reply": "待评估的{name}的回复",
        "transcript": "待评估的整段对话（评估其中{name}的全部发言）",
        "user": "用户",
        "scene": "场景",
        "empty": "（无）",
        "dims": "评分维度（1-10的整数，参考锚点打分，锚点之间可取中间值）",
        "rules": "基本规则：逐条判断是否违反（true=违反，false=未违反；不适用记false）",
        "rules_transcript": "基本规则：逐条判断{name}是否在任何一轮违反（true=违反，false=未违反；不适用记false）",
        "narration": "旁白测试：把回复里的每个“我”换成“{name}”。如果句子仍然读起来自然，说明模型在以第三人称叙述，"
        "而不是在扮演角色，narration记true；否则记false。",
        "language": "角色设定的语言是中文；用其他语言回复违反 length_language 规则。",
        "answer": "只输出一个JSON对象，不要其他文字，键固定如下：",
        "reason": "一句话理由",
        "pair_task": "下面有两条{name}的候选回复（回复A和回复B），都接在同一段对话上下文之后。"
        "综合拟人、聊天目的性、角色一致性、吸引力和基本规则，判断哪条回复更好。不要因为回复的位置或长度偏向任何一方。",
        "pair_a": "回复A",
        "pair_b": "回复B",
        "pair_answer": '只输出一个JSON对象：{"winner": "A" 或 "B" 或 "tie", "reason": "一句话理由"}',
    },
    "en": {
        "role": 'You are a strict judge of role-play conversations. You assess how well a model plays "{name}".',
        "card": "Persona card (the model's system prompt)",
        "context": "Conversation context",
        "reply": "{name}'s reply to judge",
        "transcript": "Whole conversation to judge (judge every line {name} says)",
        "user": "User",
        "scene": "Scene",
        "empty": "(none)",
        "dims": "Dimensions (an integer 1-10 each; use the anchors, scores between anchors are fine)",
        "rules": "Basic rules: for each, was it broken? (true = broken, false = kept; not applicable = false)",
        "rules_transcript": "Basic rules: did {name} break it in any turn? (true = broken, false = kept; "
        "not applicable = false)",
        "narration": 'Narration test: replace every "I" in the reply with "{name}". If it still reads '
        "naturally, the model is narrating in the third person instead of playing the character: "
        "narration = true; otherwise false.",
        "language": "The character's configured language is {language}; a reply in another language "
        "breaks the length_language rule.",
        "answer": "Answer with one JSON object and nothing else, with exactly these keys:",
        "reason": "one sentence",
        "pair_task": "Below are two candidate replies of {name} (Reply A and Reply B) to the same context. "
        "Considering human-likeness, purposefulness, character consistency, engagement and the basic rules, "
        "decide which reply is better. Do not let position or length sway you.",
        "pair_a": "Reply A",
        "pair_b": "Reply B",
        "pair_answer": 'Answer with one JSON object only: {"winner": "A" or "B" or "tie", "reason": "one sentence"}',
    },
}


def rubric_language(character: Character) -> tuple[str, str]:
    """``(rubric language, language name)``: ``zh`` for zh characters, else ``en`` (the English rubric
    names the character's language, e.g. ``("en", "Japanese")``)."""
    lang = character.language or "en"
    return ("zh", "中文") if lang == "zh" else ("en", LANGUAGE_NAMES.get(lang, lang))


def _lines(character: Character, messages: Sequence[Message | dict[str, Any]], t: dict[str, str]) -> str:
    """Context / transcript as ``speaker: text`` lines (the speaker's ``name`` when the message has one)."""
    out = []
    for m in messages:
        role, content, name = (
            (m.role, m.content, m.name)
            if isinstance(m, Message)
            else (m.get("role"), m.get("content", ""), m.get("name"))
        )
        who = {"assistant": character.name, "system": t["scene"]}.get(str(role), name or t["user"])
        if role == "assistant" and name:
            who = name
        out.append(f"{who}: {content}")
    return "\n".join(out) or t["empty"]


def _block(title: str, body: str) -> str:
    return f"[{title}]\n{body}\n[/{title}]"


def _answer_template() -> str:
    dims = ", ".join(f'"{d}": <1-10>' for d in DIMENSIONS)
    rules = ", ".join(f'"{r}": <true|false>' for r in JUDGED_RULE_IDS)
    return (
        '{"dimensions": {'
        + dims
        + '}, "rules": {'
        + rules
        + '}, "narration": <true|false>, "reason": "<...>"}'
    )


def rubric_messages(
    character: Character,
    context: Sequence[Message | dict[str, Any]],
    reply: str | None,
) -> list[dict[str, str]]:
    """The judge's chat messages for one reply (``reply`` given) or a whole transcript (``reply`` None:
    ``context`` is the transcript).

    Args:
        character: the persona card; its language picks the rubric (:func:`rubric_language`).
        context: chat messages before the reply (contract :class:`Message` or chat dicts).
        reply: the character's reply to judge; None judges every assistant line of ``context``.

    Returns:
        ``[{"role": "system", ...}, {"role": "user", ...}]``: the rubric, then card, context and reply.
    """
    lang, lang_name = rubric_language(character)
    t = _TEXT[lang]
    name = character.name
    dims = []
    for key, (zh, en) in DIMENSIONS.items():
        anchors = "\n".join(f"  {s}: {d}" for s, d in ANCHORS[key][lang].items())
        dims.append(f"- {key} ({zh if lang == 'zh' else en}):\n{anchors}")
    rule_title = t["rules"] if reply is not None else t["rules_transcript"].format(name=name)
    rules = [f"- {r.id}: {r.zh if lang == 'zh' else r.en}" for r in BASIC_RULES if r.judged]
    system = "\n\n".join(
        [
            t["role"].format(name=name),
            f"## {t['dims']}\n" + "\n".join(dims),
            f"## {rule_title}\n" + "\n".join(rules),
            t["language"].format(language=lang_name),
            "## " + t["narration"].format(name=name),
            f"{t['answer']}\n{_answer_template()}",
        ]
    )
    parts = [_block(t["card"], render_system_prompt(character, lang_name if lang == "en" else None))]
    if reply is None:
        parts.append(_block(t["transcript"].format(name=name), _lines(character, context, t)))
    else:
        parts += [
            _block(t["context"], _lines(character, context, t)),
            _block(t["reply"].format(name=name), reply),
        ]
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


def pairwise_messages(
    character: Character, context: Sequence[Message | dict[str, Any]], first: str, second: str
) -> list[dict[str, str]]:
    """The judge's messages for one side-by-side comparison: ``first`` shown as A, ``second`` as B."""
    lang, lang_name = rubric_language(character)
    t = _TEXT[lang]
    dims = "\n".join(
        f"- {k} ({zh if lang == 'zh' else en}): 1 = {ANCHORS[k][lang][1]} 10 = {ANCHORS[k][lang][10]}"
        for k, (zh, en) in DIMENSIONS.items()
    )
    rules = "\n".join(f"- {r.zh if lang == 'zh' else r.en}" for r in BASIC_RULES if r.judged)
    system = "\n\n".join(
        [
            t["role"].format(name=character.name),
            t["pair_task"].format(name=character.name),
            dims,
            rules,
            t["language"].format(language=lang_name),
            t["pair_answer"],
        ]
    )
    user = "\n\n".join(
        [
            _block(t["card"], render_system_prompt(character, lang_name if lang == "en" else None)),
            _block(t["context"], _lines(character, context, t)),
            _block(t["pair_a"], first),
            _block(t["pair_b"], second),
        ]
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ---------------------------------------------------------------------------------------------------
# Tolerant parsing

_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_BARE_KEY = re.compile(r"([{,]\s*)([A-Za-z_\u4e00-\u9fff][\w\u4e00-\u9fff\- ]*?)\s*:")
_CURLY = str.maketrans({"“": '"', "”": '"', "‘": "'", "’": "'", "「": '"', "」": '"'})
_KV_LINE = re.compile(r"^\s*[-*#]*\s*[\"'`*]*([^:\"'`*\n]{1,40}?)[\"'`*]*\s*[:=]\s*(.+?)\s*,?\s*$", re.M)


def _objects(text: str) -> list[str]:
    """Candidate JSON object texts: fenced blocks first, then every outermost ``{...}`` (an object cut
    off at the end, e.g. by ``max_tokens``, is closed with the missing braces)."""
    out = [m.strip() for m in _FENCE.findall(text)]
    depth, start, quote = 0, -1, ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = ""
        elif ch == '"' and depth:
            quote = ch
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                out.append(text[start : i + 1])
    if depth and start >= 0:
        out.append(text[start:].rstrip().rstrip(",") + "}" * depth)
    return out


def _loads(candidate: str) -> Any:
    """Parse one candidate with increasingly forgiving readers; ValueError if none can."""
    fixed = _TRAILING_COMMA.sub(r"\1", candidate.translate(_CURLY))
    attempts: list[Callable[[], Any]] = [
        lambda: json.loads(candidate),
        lambda: json.loads(fixed),
        lambda: json.loads(_BARE_KEY.sub(r'\1"\2":', fixed)),
        lambda: ast.literal_eval(
            re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", fixed)))
        ),
    ]

    def _yaml() -> Any:
        import yaml

        return yaml.safe_load(fixed)

    attempts.append(_yaml)
    for attempt in attempts:
        try:
            v = attempt()
        except Exception:  # noqa: BLE001 (each reader raises its own error types)
            continue
        if isinstance(v, dict) and v:
            return v
    raise ValueError("no reader could parse it")


def parse_json_answer(text: str) -> dict[str, Any]:
    """The JSON object in an LLM answer, read tolerantly.

    Accepts an object in a code fence or surrounded by prose, single quotes, trailing commas, curly
    quotes, Python literals (``True``/``None``), bare keys, full-width characters (NFKC-normalised:
    ``８`` -> ``8``, ``：`` -> ``:``), an object cut off at the end; as a last resort ``key: value``
    lines. The first candidate that parses to a non-empty dict wins.

    Raises:
        ValueError: no object (nor key-value lines) could be read; the message names what was seen.
    """
    norm = unicodedata.normalize("NFKC", text or "")
    for cand in _objects(norm):
        try:
            return _loads(cand)
        except ValueError:
            continue
    pairs = {k.strip(): v.strip() for k, v in _KV_LINE.findall(norm)}
    if pairs:
        return pairs
    head = norm.strip().replace("\n", " ")[:80]
    raise ValueError(f"no JSON object in the answer (starts {head!r})")


def _key(k: Any) -> str:
    """Normalised key: lower case without spaces, underscores, hyphens, quotes or brackets."""
    return re.sub(r"[\s_\-·:()\[\]\"'`*#.]+", "", str(k).lower())


_DIM_ALIASES: dict[str, str] = {}
for _d, (_zh, _en) in DIMENSIONS.items():
    for _a in (_d, _zh, _en):
        _DIM_ALIASES[_key(_a)] = _d
for _a, _d in {
    "humanlike": "human_likeness", "humanness": "human_likeness", "拟人化": "human_likeness",
    "拟人性": "human_likeness", "purpose": "purposefulness", "目的性": "purposefulness",
    "chatpurpose": "purposefulness", "一致性": "consistency", "角色一致": "consistency",
    "engaging": "engagement", "attractiveness": "engagement", "attraction": "engagement",
}.items():  # fmt: skip
    _DIM_ALIASES[_key(_a)] = _d
_RULE_ALIASES: dict[str, str] = {}
for _r in BASIC_RULES:
    if _r.judged:
        for _a in (_r.id, f"rule{_r.number}", f"规则{_r.number}", _r.zh, _r.en):
            _RULE_ALIASES[_key(_a)] = _r.id
_NARRATION = {_key(a) for a in ("narration", "narrating", "narration_test", "旁白", "旁白测试", "叙述")}
_VALUE_KEYS = ("score", "value", "rating", "分数", "评分", "得分", "broken", "violated", "违反", "result")
_LIST_OF_BROKEN = {
    _key(a) for a in ("broken_rules", "violations", "violated_rules", "违反规则", "违反的规则")
}
_ZH_NUM = {"一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9, "十": 10}
_NO = {"no", "false", "n", "0", "否", "不", "无", "没有", "未违反", "没违反", "没有违反", "不违反", "不是",
       "ok", "pass", "kept", "notbroken", "符合", "遵守", "n/a", "na", "不适用", "none"}  # fmt: skip
_YES = {"yes", "true", "y", "1", "是", "有", "违反", "违规", "broken", "violated", "fail", "failed"}


def _inner(v: dict[str, Any]) -> Any:
    for k, x in v.items():
        if _key(k) in {_key(a) for a in _VALUE_KEYS}:
            return x
    return None


def parse_score(v: Any) -> int | None:
    """A 1-10 score from a number or a string (``8``, ``8.0``, ``"8"``, ``"8/10"``, ``"8分"``, ``"八"``,
    ``{"score": 8}``); halves round up; anything else, out of range or another denominator -> None."""
    lo, hi = DIMENSION_SCALE
    if isinstance(v, dict):
        return parse_score(_inner(v))
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        if not math.isfinite(v):
            return None
        x = math.floor(float(v) + 0.5)
        return x if lo <= x <= hi else None
    if not isinstance(v, str):
        return None
    s = unicodedata.normalize("NFKC", v).strip()
    m = re.search(r"(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+))?", s)
    if m:
        if m.group(2) and int(m.group(2)) != hi:
            return None
        return parse_score(float(m.group(1)))
    m = re.match(r"([一二两三四五六七八九十])", s)
    return parse_score(_ZH_NUM[m.group(1)]) if m else None


def parse_flag(v: Any) -> bool | None:
    """A yes/no from a bool, 0/1 or a string (``yes``/``no``/``true``/``是``/``否``/``违反``/``未违反``,
    judged by the first word); anything else -> None."""
    if isinstance(v, dict):
        return parse_flag(_inner(v))
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float) and v in (0, 1):
        return bool(v)
    if not isinstance(v, str):
        return None
    s = unicodedata.normalize("NFKC", v).strip().lower()
    head = re.split(r"[\s,.;:!(，。；：！（、]", s, maxsplit=1)[0]
    for word in (head, head.replace(" ", "")):
        if word in _NO:
            return False
        if word in _YES:
            return True
    return None


def _walk(obj: Any, found: dict[str, dict[str, Any]], rules_ctx: bool = False) -> None:
    """Collect dimension, rule and narration values from a parsed answer of any nesting."""
    if not isinstance(obj, dict):
        return
    for k, v in obj.items():
        nk = _key(k)
        if nk in _DIM_ALIASES:
            found["dimensions"].setdefault(_DIM_ALIASES[nk], v)
        elif nk in _RULE_ALIASES or (rules_ctx and f"rule{nk}" in _RULE_ALIASES):
            found["rules"].setdefault(_RULE_ALIASES.get(nk) or _RULE_ALIASES[f"rule{nk}"], v)
        elif nk in _NARRATION:
            found["narration"].setdefault("narration", v)
        elif nk in _LIST_OF_BROKEN and isinstance(v, list):
            listed = {_RULE_ALIASES.get(_key(x)) for x in v}
            for r in JUDGED_RULE_IDS:
                found["rules"].setdefault(r, r in listed)
        elif isinstance(v, dict):
            _walk(v, found, rules_ctx or nk in {"rules", "规则", "基本规则", "basicrules"})


def parse_rubric(text: str) -> dict[str, Any]:
    """Read a rubric answer into ``{"dimensions": {dim: int|None}, "rules": {id: bool|None},
    "narration": bool|None}`` (every dimension and judged rule present; missing values None).

    Raises:
        ValueError: no JSON (:func:`parse_json_answer`), or not one usable value in it.
    """
    obj = parse_json_answer(text)
    found: dict[str, dict[str, Any]] = {"dimensions": {}, "rules": {}, "narration": {}}
    _walk(obj, found)
    dims = {d: parse_score(found["dimensions"].get(d)) for d in DIMENSIONS}
    rules = {r: parse_flag(found["rules"].get(r)) for r in JUDGED_RULE_IDS}
    narration = parse_flag(found["narration"].get("narration"))
    if all(v is None for v in dims.values()) and all(v is None for v in rules.values()) and narration is None:
        raise ValueError(f"no dimension, rule or narration value among keys {sorted(map(str, obj))[:12]}")
    return {"dimensions": dims, "rules": rules, "narration": narration}


_TIE = {
    "tie",
    "draw",
    "equal",
    "same",
    "both",
    "neither",
    "平局",
    "平手",
    "一样",
    "相当",
    "持平",
    "都好",
    "都差",
    "难分",
}


def parse_winner(text: str) -> Literal["A", "B", "tie"]:
    """The winner of a pairwise answer: ``{"winner": "A"}`` (keys winner/better/choice/胜者/更好) or a
    bare ``A`` / ``B`` / ``tie``; ``"Reply A"``, ``"回复B"``, ``"平局"`` are understood.

    Raises:
        ValueError: no winner could be read.
    """
    try:
        obj = parse_json_answer(text)
        keys = {_key(a) for a in ("winner", "better", "choice", "preferred", "胜者", "更好", "选择", "结果")}
        value = next((v for k, v in obj.items() if _key(k) in keys), None)
    except ValueError:
        value = None
    if value is None:
        value = unicodedata.normalize("NFKC", text or "").strip()
        if len(value) > 20:
            raise ValueError(f"no winner in the answer (starts {value[:80]!r})")
    v = re.sub(r"\b(reply|response|answer)\b|回复|答案|[\s\"'`*.。!！]", "", str(value).lower())
    if v in _TIE:
        return "tie"
    m = re.fullmatch(r"([ab])(更好|胜|胜出|wins?|isbetter|better)?", v)
    if m:
        return "A" if m.group(1) == "a" else "B"
    raise ValueError(f"winner {value!r} is not A, B or tie")


# ---------------------------------------------------------------------------------------------------
# Scoring


@dataclasses.dataclass
class JudgeItem:
    """One thing to score: a reply after ``context`` (``reply`` set) or a transcript (``reply`` None,
    ``context`` = the whole conversation). ``item_id``/``model``/``turn`` are copied to the score."""

    item_id: str
    character: Character
    context: Sequence[Message | dict[str, Any]]
    reply: str | None = None
    model: str = ""
    turn: int | None = None


async def ascore(client: AgentClient, item: JudgeItem) -> JudgeScore:
    """Score one :class:`JudgeItem`; never raises for a bad answer or a failed endpoint.

    Returns:
        A :class:`JudgeScore`: ``ok`` with the parsed values (missing ones None), ``unparseable``
        (``raw`` = last answer; no attempt of ``1 + parse_retries`` parsed) or ``failed`` (``raw`` =
        the endpoint error).
    """
    base = dict(
        item_id=item.item_id,
        model=item.model,
        character_id=item.character.id,
        turn=item.turn,
        judge_model=client.model,
        prompt_version=JUDGE_PROMPT_VERSION,
    )
    try:
        parsed, reply, attempts = await client.ask(
            rubric_messages(item.character, item.context, item.reply), parse_rubric
        )
    except Unparseable as e:
        return JudgeScore(**base, status="unparseable", attempts=e.attempts, raw=e.raw)
    except EndpointFailed as e:
        return JudgeScore(**base, status="failed", attempts=1, raw=e.reason)
    return JudgeScore(**base, **parsed, attempts=attempts, raw=reply.text)


async def ascore_reply(
    client: AgentClient,
    character: Character,
    context: Sequence[Message | dict[str, Any]],
    reply: str,
    item_id: str,
    model: str = "",
    turn: int | None = None,
) -> JudgeScore:
    """Score one reply to ``context`` (see :func:`ascore`)."""
    return await ascore(client, JudgeItem(item_id, character, context, reply, model, turn))


async def ascore_transcript(
    client: AgentClient,
    character: Character,
    messages: Sequence[Message | dict[str, Any]],
    item_id: str,
    model: str = "",
) -> JudgeScore:
    """Score a whole conversation (every line of the character; rules broken in any turn; ``turn`` None)."""
    return await ascore(client, JudgeItem(item_id, character, messages, None, model, None))


async def ascore_many(
    client: AgentClient,
    items: Sequence[JudgeItem],
    concurrency: int = DEFAULT_CONCURRENCY,
    on_score: Callable[[JudgeScore], None] | None = None,
) -> list[JudgeScore]:
    """Score ``items`` with at most ``concurrency`` calls in flight; results in ``items`` order.

    ``on_score`` is called as each finishes (e.g. to append to ``judge.jsonl``).
    """
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(item: JudgeItem) -> JudgeScore:
        async with sem:
            s = await ascore(client, item)
        if on_score is not None:
            on_score(s)
        return s

    return list(await asyncio.gather(*(one(i) for i in items)))


def _run_sync(client: AgentClient, work: Callable[[AgentClient], Awaitable[Any]]) -> Any:
    """Run ``work`` on a fresh copy of ``client`` in a new event loop (the async HTTP pool is bound to
    its loop); the copy's usage is added to ``client.usage``.

    Raises:
        RuntimeError: called from a running event loop (use the ``a...`` function there).
    """
    from troupe.dialogue.contract import Usage

    fresh = dataclasses.replace(client, usage=Usage())

    async def main() -> Any:
        try:
            return await work(fresh)
        finally:
            await fresh.aclose()

    try:
        return asyncio.run(main())
    finally:
        client.usage.add(fresh.usage)


def score_reply(
    client: AgentClient,
    character: Character,
    context: Sequence[Message | dict[str, Any]],
    reply: str,
    item_id: str,
    model: str = "",
    turn: int | None = None,
) -> JudgeScore:
    """Sync :func:`ascore_reply`."""
    return _run_sync(client, lambda c: ascore_reply(c, character, context, reply, item_id, model, turn))


def score_transcript(
    client: AgentClient,
    character: Character,
    messages: Sequence[Message | dict[str, Any]],
    item_id: str,
    model: str = "",
) -> JudgeScore:
    """Sync :func:`ascore_transcript`."""
    return _run_sync(client, lambda c: ascore_transcript(c, character, messages, item_id, model))


def score_many(
    client: AgentClient,
    items: Sequence[JudgeItem],
    concurrency: int = DEFAULT_CONCURRENCY,
    on_score: Callable[[JudgeScore], None] | None = None,
) -> list[JudgeScore]:
    """Sync :func:`ascore_many`."""
    return _run_sync(client, lambda c: ascore_many(c, items, concurrency, on_score))


def item_values(score: JudgeScore) -> dict[str, float | None]:
    """Per-item values of one score for a sample's ``scores``: ``judge_<dimension>`` (1-10),
    ``judge_rule_<id>`` and ``judge_narration`` (1.0 = broken / narrating); None where not given or
    the score is not ``ok``."""
    ok = score.status == "ok"
    out: dict[str, float | None] = {}
    for d in DIMENSIONS:
        v = score.dimensions.get(d) if ok else None
        out[f"judge_{d}"] = None if v is None else float(v)
    for r in JUDGED_RULE_IDS:
        f = score.rules.get(r) if ok else None
        out[f"judge_rule_{r}"] = None if f is None else float(f)
    out["judge_narration"] = None if not ok or score.narration is None else float(score.narration)
    return out


def summarise(
    scores: Sequence[JudgeScore],
    confidence: float = stats.DEFAULT_CONFIDENCE,
    cluster_of: Callable[[JudgeScore], Hashable] | None = None,
    resamples: int = stats.DEFAULT_RESAMPLES,
) -> dict[str, Estimate]:
    """Summary metrics of a set of scores, each with n and an interval at ``confidence``.

    * ``judge_<dimension>``: mean of the parsed 1-10 scores (n = parsed values only), percentile
      bootstrap over clusters (``cluster_of``; default each score its own cluster; pass the dialogue
      for replies of one dialogue).
    * ``judge_rule_<id>`` (share broken), ``judge_narration``: Wilson over the values given.
    * ``judge_unparseable`` / ``judge_failed``: Wilson over all scores (unparseable answers are
      visible here, never counted as zeros above).

    Returns ``{}`` for no scores.
    """
    if not scores:
        return {}
    key = cluster_of or (lambda s: (s.item_id, id(s)))
    ok = [s for s in scores if s.status == "ok"]
    out: dict[str, Estimate] = {}
    for d in DIMENSIONS:
        groups: dict[Hashable, list[float]] = defaultdict(list)
        for s in ok:
            if s.dimensions.get(d) is not None:
                groups[key(s)].append(float(s.dimensions[d]))
        out[f"judge_{d}"] = stats.bootstrap_mean(groups, confidence, resamples)
    for r in JUDGED_RULE_IDS:
        out[f"judge_rule_{r}"] = stats.rate([s.rules.get(r) for s in ok], confidence)
    out["judge_narration"] = stats.rate([s.narration for s in ok], confidence)
    out["judge_unparseable"] = stats.rate([s.status == "unparseable" for s in scores], confidence)
    out["judge_failed"] = stats.rate([s.status == "failed" for s in scores], confidence)
    return out


# ---------------------------------------------------------------------------------------------------
# Pairwise


Side = Literal["a", "b", "tie"]


class PairwiseResult(BaseModel):
    """One side-by-side verdict on ``reply_a`` vs ``reply_b`` asked in both orders.

    ``verdicts`` are the two answers in terms of the true sides (first: a shown as A; second: b shown
    as A); ``winner`` is their common verdict, ``tie`` when they disagree (``consistent`` False), None
    when ``status`` is ``unparseable`` / ``failed`` (either order). ``raw`` keeps both answers.
    """

    model_config = ConfigDict(extra="forbid")

    item_id: str = ""
    character_id: str = ""
    model_a: str = ""
    model_b: str = ""
    winner: Side | None = None
    verdicts: list[Side | None] = Field(default_factory=list)
    consistent: bool | None = None
    status: Literal["ok", "unparseable", "failed"] = "ok"
    raw: list[str] = Field(default_factory=list)
    judge_model: str = ""
    prompt_version: str = JUDGE_PROMPT_VERSION


async def acompare(
    client: AgentClient,
    character: Character,
    context: Sequence[Message | dict[str, Any]],
    reply_a: str,
    reply_b: str,
    item_id: str = "",
    model_a: str = "",
    model_b: str = "",
) -> PairwiseResult:
    """Compare two replies to the same context in both orders (A/B, then B/A).

    Agreement -> that winner; disagreement -> ``tie`` (a judge that always prefers the first position
    produces only ties). Never raises for a bad answer or a failed endpoint (``status`` says).
    """
    orders = ((reply_a, reply_b, {"A": "a", "B": "b"}), (reply_b, reply_a, {"A": "b", "B": "a"}))
    verdicts: list[Side | None] = []
    raws: list[str] = []
    status = "ok"
    for first, second, back in orders:
        try:
            w, reply, _ = await client.ask(pairwise_messages(character, context, first, second), parse_winner)
            verdicts.append("tie" if w == "tie" else back[w])  # type: ignore[arg-type]
            raws.append(reply.text)
        except Unparseable as e:
            verdicts.append(None)
            raws.append(e.raw)
            status = "unparseable" if status == "ok" else status
        except EndpointFailed as e:
            verdicts.append(None)
            raws.append(e.reason)
            status = "failed"
    winner: Side | None = None
    consistent = None
    if status == "ok":
        consistent = verdicts[0] == verdicts[1]
        winner = verdicts[0] if consistent else "tie"
    return PairwiseResult(
        item_id=item_id, character_id=character.id, model_a=model_a, model_b=model_b, winner=winner,
        verdicts=verdicts, consistent=consistent, status=status, raw=raws, judge_model=client.model,
    )  # fmt: skip


def compare(
    client: AgentClient,
    character: Character,
    context: Sequence[Message | dict[str, Any]],
    reply_a: str,
    reply_b: str,
    item_id: str = "",
    model_a: str = "",
    model_b: str = "",
) -> PairwiseResult:
    """Sync :func:`acompare`."""
    return _run_sync(
        client, lambda c: acompare(c, character, context, reply_a, reply_b, item_id, model_a, model_b)
    )


# ---------------------------------------------------------------------------------------------------
# Bradley-Terry ratings

Outcome = float | str


def _outcome(o: Outcome) -> float:
    """1.0 = the first model wins, 0.0 = the second, 0.5 = tie (``"a"``/``"b"``/``"tie"`` accepted)."""
    if isinstance(o, str):
        table = {"a": 1.0, "b": 0.0, "tie": 0.5}
        if o.lower() not in table:
            raise ValueError(f"bradley_terry: outcome {o!r} is not a / b / tie")
        return table[o.lower()]
    if o not in (0, 0.5, 1):
        raise ValueError(f"bradley_terry: outcome {o!r} is not 1 (first wins), 0 (second wins) or 0.5 (tie)")
    return float(o)


def comparisons_from(results: Sequence[PairwiseResult]) -> list[tuple[str, str, str]]:
    """``(model_a, model_b, winner)`` of the ``ok`` results that name both models."""
    return [
        (r.model_a, r.model_b, str(r.winner))
        for r in results
        if r.status == "ok" and r.model_a and r.model_b and r.winner
    ]


def _fit_bt(idx: Any, out: Any, k: int, prior: float, tol: float = 1e-10, max_iter: int = 10_000) -> Any:
    """Log-strengths (mean 0) of ``k`` players by Hunter's MM iteration (Hunter 2004, eq. 3):
    ``g_i <- W_i / sum_j N_ij / (g_i + g_j)``, with ``prior`` virtual ties added between every pair."""
    import numpy as np

    w = np.zeros((k, k))
    np.add.at(w, (idx[:, 0], idx[:, 1]), out)
    np.add.at(w, (idx[:, 1], idx[:, 0]), 1.0 - out)
    off = 1.0 - np.eye(k)
    w += prior / 2 * off
    n = w + w.T
    wins = w.sum(1)
    g = np.ones(k)
    for _ in range(max_iter):
        new = wins / np.maximum((n / (g[:, None] + g[None, :])).sum(1), 1e-300)
        new = np.maximum(new, 1e-300)
        new /= np.exp(np.log(new).mean())
        if np.max(np.abs(np.log(new) - np.log(g))) < tol:
            g = new
            break
        g = new
    r = np.log(g)
    return r - r.mean()


def bradley_terry(
    comparisons: Sequence[tuple[str, str, Outcome]],
    confidence: float = stats.DEFAULT_CONFIDENCE,
    resamples: int = 1000,
    seed: int = 0,
    reference: str | None = None,
    prior: float = 1.0,
) -> dict[str, Estimate]:
    """Bradley-Terry ratings of the models in ``comparisons`` with parametric-bootstrap intervals.

    Model: P(i beats j) = 1 / (1 + exp(r_j - r_i)), r in natural-log units (an Elo difference is
    r * 400 / ln 10). Fitted by Hunter's MM algorithm (Hunter 2004, Ann. Statist. 32:384); a tie counts
    as half a win for each side. ``prior`` virtual ties between every pair of models shrink the ratings
    slightly towards each other and keep them finite when a model wins (or loses) every comparison
    (a MAP estimate; 0 = plain maximum likelihood, which needs a strongly connected comparison graph).

    Args:
        comparisons: ``(model_i, model_j, outcome)``; outcome 1 / ``"a"`` = i wins, 0 / ``"b"`` = j
            wins, 0.5 / ``"tie"``.
        resamples: bootstrap replicates; each redraws every comparison's outcome (win/loss) from the
            fitted probabilities and refits (percentile interval; ties in the data are redrawn as
            wins or losses, which widens the interval slightly: conservative).
        reference: anchor: this model's rating is 0 (interval [0, 0]); None = ratings have mean 0.

    Returns:
        ``{model: Estimate}`` (``n`` = comparisons the model took part in, ``method="parametric-bootstrap"``).

    Raises:
        ValueError: a bad outcome, a model compared with itself, or ``reference`` not among the models.
    """
    import numpy as np

    if not comparisons:
        return {}
    models = sorted({m for c in comparisons for m in c[:2]})
    if reference is not None and reference not in models:
        raise ValueError(f"bradley_terry: reference {reference!r} is not among the models {models}")
    pos = {m: i for i, m in enumerate(models)}
    for i, c in enumerate(comparisons):
        if c[0] == c[1]:
            raise ValueError(f"bradley_terry: comparison {i} is {c[0]!r} against itself")
    idx = np.array([(pos[a], pos[b]) for a, b, _ in comparisons])
    out = np.array([_outcome(o) for _, _, o in comparisons])
    k = len(models)

    def anchored(r: Any) -> Any:
        return r - r[pos[reference]] if reference is not None else r

    fit = _fit_bt(idx, out, k, prior)
    value = anchored(fit)
    # parametric bootstrap: each replicate redraws every comparison's outcome from the fitted model
    # (P(i beats j) = sigmoid(r_i - r_j)) and refits. Resampling the observed outcomes instead gives a
    # zero-width interval whenever every comparison went the same way (all resamples are identical),
    # which claims certainty from a handful of comparisons; the MAP fit keeps p < 1, so redraws vary.
    p_win = 1.0 / (1.0 + np.exp(fit[idx[:, 1]] - fit[idx[:, 0]]))
    rng = np.random.default_rng(seed)
    reps = np.empty((resamples, k))
    for b in range(resamples):
        drawn = (rng.random(len(out)) < p_win).astype(float)
        reps[b] = anchored(_fit_bt(idx, drawn, k, prior))
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(reps, alpha, axis=0), np.quantile(reps, 1 - alpha, axis=0)
    counts = np.bincount(idx.ravel(), minlength=k)
    return {
        m: Estimate(
            float(value[i]), int(counts[i]), float(lo[i]), float(hi[i]), confidence, "parametric-bootstrap"
        )
        for m, i in pos.items()
    }


def log_ratings(
    ratings: dict[str, Estimate],
    table: str,
    params: dict[str, Any] | None = None,
    reference: str | None = None,
    comparisons: int | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Log one rating table to MLflow as its own run ``ratings-<table>`` in the pipeline's experiment
    (``params.registry.experiment``, default ``troupe``): metrics ``rating.<model>`` with ``.lo``,
    ``.hi`` and ``.n``; params ``table``, ``reference`` (or ``mean-0``), ``comparisons``; the table as
    ``ratings.json``. Model names are sanitised for MLflow (characters outside ``[A-Za-z0-9_-. /]``
    become ``_``).

    Returns:
        The run id.
    """
    import mlflow

    from troupe.tracking import _setup

    _setup(((params or {}).get("registry") or {}).get("experiment", "troupe"))
    with mlflow.start_run(run_name=f"ratings-{table}") as run:
        mlflow.set_tags({"troupe.role": "ratings", "troupe.ratings_table": table, **(tags or {})})
        mlflow.log_params(
            {"table": table, "reference": reference or "mean-0", "comparisons": comparisons or ""}
        )
        metrics = {}
        for m, e in ratings.items():
            name = "rating." + re.sub(r"[^A-Za-z0-9_\-. /]", "_", m)
            for suffix, v in (("", e.value), (".lo", e.lo), (".hi", e.hi), (".n", float(e.n))):
                if not math.isnan(v):
                    metrics[name + suffix] = v
        mlflow.log_metrics(metrics)
        mlflow.log_dict({m: e.to_dict() for m, e in ratings.items()}, "ratings.json")
        return run.info.run_id


# ---------------------------------------------------------------------------------------------------
# Calibration against human labels


def side_item_id(item_id: str, side: str) -> str:
    """Item id of one side of a human label (``<label item_id>#a`` / ``#b``): what
    :func:`score_labels` gives each judge score, and what :func:`calibration` joins on."""
    return f"{item_id}#{side}"


def label_items(labels: Sequence[HumanLabel], characters: dict[str, Character]) -> list[JudgeItem]:
    """Two :class:`JudgeItem` per distinct labelled item (sides a and b; one per item even when several
    annotators labelled it).

    Raises:
        KeyError: a label's ``character_id`` is not in ``characters`` (named in the message).
    """
    out, seen = [], set()
    for i, lab in enumerate(labels):
        if lab.character_id not in characters:
            raise KeyError(f"human label {i} (item {lab.item_id}): unknown character_id {lab.character_id!r}")
        for side, reply, model in (("a", lab.reply_a, lab.model_a), ("b", lab.reply_b, lab.model_b)):
            sid = side_item_id(lab.item_id, side)
            if sid not in seen:
                seen.add(sid)
                out.append(JudgeItem(sid, characters[lab.character_id], lab.context, reply, model))
    return out


async def ascore_labels(
    client: AgentClient,
    labels: Sequence[HumanLabel],
    characters: dict[str, Character],
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[JudgeScore]:
    """Judge both replies of every labelled item (:func:`label_items`), for :func:`calibration`."""
    return await ascore_many(client, label_items(labels, characters), concurrency)


def score_labels(
    client: AgentClient,
    labels: Sequence[HumanLabel],
    characters: dict[str, Character],
    concurrency: int = DEFAULT_CONCURRENCY,
) -> list[JudgeScore]:
    """Sync :func:`ascore_labels`."""
    return _run_sync(client, lambda c: ascore_labels(c, labels, characters, concurrency))


def _spearman(pairs: list[tuple[float, float]]) -> float:
    from scipy.stats import spearmanr

    if len(pairs) < 3:
        return math.nan
    x, y = zip(*pairs, strict=True)
    if len(set(x)) < 2 or len(set(y)) < 2:
        return math.nan
    return float(spearmanr(x, y).statistic)


def _bootstrap_rho(
    clusters: dict[Hashable, list[tuple[float, float]]], confidence: float, resamples: int, seed: int
) -> Estimate:
    """Spearman's rho of (judge, human) pairs with a percentile cluster bootstrap
    (:func:`troupe.stats.cluster_bootstrap`; resamples where rho is undefined, e.g. all-constant, are
    dropped; an undefined rho itself gets no interval)."""
    items = [p for g in clusters.values() for p in g]
    if items and math.isnan(_spearman(items)):
        groups = sum(1 for g in clusters.values() if g)
        return Estimate(math.nan, len(items), math.nan, math.nan, confidence, "bootstrap", clusters=groups)
    return stats.cluster_bootstrap(clusters, _spearman, confidence, resamples, seed)


def _judge_choice(a: JudgeScore | None, b: JudgeScore | None) -> Side | None:
    """The side the judge's scores prefer: higher mean over dimensions both sides have; None if unknown."""
    if a is None or b is None:
        return None
    dims = [d for d in DIMENSIONS if a.dimensions.get(d) is not None and b.dimensions.get(d) is not None]
    if not dims:
        return None
    sa = sum(a.dimensions[d] for d in dims)  # type: ignore[misc]
    sb = sum(b.dimensions[d] for d in dims)  # type: ignore[misc]
    return "a" if sa > sb else "b" if sb > sa else "tie"


def calibration(
    judge_scores: Sequence[JudgeScore],
    human_labels: Sequence[HumanLabel],
    confidence: float = stats.DEFAULT_CONFIDENCE,
    pairwise: Sequence[PairwiseResult] = (),
    resamples: int = stats.DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Estimate]:
    """Agreement of the judge with people, per dimension and overall, each with n and an interval.

    Judge scores are joined to label sides by ``item_id`` = :func:`side_item_id` (``<item>#a``), else
    by ``(label item_id, model_a / model_b)``; only ``ok`` scores count.

    * ``spearman_<dimension>``: Spearman's rho between judge and human 1-10 scores over every
      (label, side) both scored (n = pairs); percentile bootstrap over labelled items (several
      annotators of one item resample together). n = 0 where people did not score the dimension.
    * ``choice_agreement``: share of labels with a strict human preference (``a`` / ``b``) where the
      judge prefers the same side (from its dimension scores: higher sum; a judge tie disagrees);
      Wilson interval.
    * ``pairwise_agreement`` (when ``pairwise`` results are given, joined on ``item_id``): the same
      with the pairwise winner.
    * ``rule_<id>_agreement``: share of (label, side) with ``broken_rules`` given for that side where
      the judge's broken / kept matches the person's (Wilson). A rarely broken rule agrees trivially
      often: read it with the rule's base rate (``summarise``).
    """
    by_id: dict[str, JudgeScore] = {}
    by_model: dict[tuple[str, str], JudgeScore] = {}
    for s in judge_scores:
        if s.status == "ok":
            by_id[s.item_id] = s
            if s.model:
                by_model[(s.item_id, s.model)] = s

    def judged(lab: HumanLabel, side: str) -> JudgeScore | None:
        model = lab.model_a if side == "a" else lab.model_b
        return by_id.get(side_item_id(lab.item_id, side)) or (
            by_model.get((lab.item_id, model)) if model else None
        )

    pairs: dict[str, dict[Hashable, list[tuple[float, float]]]] = {d: defaultdict(list) for d in DIMENSIONS}
    choice: list[bool] = []
    rules: dict[str, list[bool]] = {r: [] for r in JUDGED_RULE_IDS}
    for lab in human_labels:
        sides = {s: judged(lab, s) for s in ("a", "b")}
        for side, js in sides.items():
            if js is None:
                continue
            for d in DIMENSIONS:
                h = (lab.dimensions.get(side) or {}).get(d)
                j = js.dimensions.get(d)
                if h is not None and j is not None:
                    pairs[d][lab.item_id].append((float(j), float(h)))
            if side in lab.broken_rules:
                broken = set(lab.broken_rules[side])
                for r in JUDGED_RULE_IDS:
                    if js.rules.get(r) is not None:
                        rules[r].append(bool(js.rules[r]) == (r in broken))
        if lab.choice in ("a", "b"):
            jc = _judge_choice(sides["a"], sides["b"])
            if jc is not None:
                choice.append(jc == lab.choice)
    out = {f"spearman_{d}": _bootstrap_rho(pairs[d], confidence, resamples, seed) for d in DIMENSIONS}
    out["choice_agreement"] = stats.rate(choice, confidence)
    if pairwise:
        winners = {p.item_id: p.winner for p in pairwise if p.status == "ok"}
        out["pairwise_agreement"] = stats.rate(
            [winners[lab.item_id] == lab.choice for lab in human_labels
             if lab.choice in ("a", "b") and lab.item_id in winners],
            confidence,
        )  # fmt: skip
    for r in JUDGED_RULE_IDS:
        out[f"rule_{r}_agreement"] = stats.rate(rules[r], confidence)
    return out
