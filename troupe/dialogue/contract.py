"""The one typed owner of what the dialogue engine, the judge, self-play, the CharacterEval suite
and the human preference store hand each other (files and processes): agents, scenarios, probes,
conversations, judge scores and human labels, plus the seeds' basic rules and judge dimensions.

Everything here is data; behaviour lives in the modules that import it:

* :mod:`troupe.dialogue.client`       one OpenAI-compatible call with retries, rate limit, usage
* :mod:`troupe.dialogue.scenarios`    seed variables -> seeded scenarios with probes
* :mod:`troupe.dialogue.engine`       user / character / host agents play scenarios -> conversations
* :mod:`troupe.dialogue.synthesize`   ``troupe data synthesize`` (a ``synthetic`` source kind)
* :mod:`troupe.dialogue.judge`        rubric judge, pairwise mode, Bradley-Terry, calibration
* :mod:`troupe.dialogue.selfplay`     candidate vs champion on the same scenarios, paired intervals
* :mod:`troupe.dialogue.charactereval` the CharacterEval protocol (``troupe evaluate --suite``)
* :mod:`troupe.feedback`              human side-by-side labels, ``/v1/feedback``, export to DPO pairs

Files (JSONL, one record per line, ``model_dump_json``): ``conversations.jsonl`` (finished
:class:`Conversation`), ``failed.jsonl`` (a :class:`Conversation` with ``status="failed"`` and its
``reason``; re-runs retry them), ``judge.jsonl`` (:class:`JudgeScore`), human labels
(:class:`HumanLabel`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from troupe.contract import Message

#: Version of the engine's agent prompts; recorded in every conversation's provenance and bumped
#: whenever a prompt text in :mod:`troupe.dialogue.engine` changes (synthetic data is only comparable
#: within one prompt version).
PROMPT_VERSION = "dialogue-0.1"
#: Version of the judge's rubric prompts (:mod:`troupe.dialogue.judge`), recorded with every score.
JUDGE_PROMPT_VERSION = "rubric-0.1"

#: Agent roles of the engine and the judge; ``params.agents.<role>`` binds each to an endpoint.
AgentRole = Literal["user", "character", "host", "judge"]
AGENT_ROLES: tuple[str, ...] = ("user", "character", "host", "judge")

#: The seeds' four judged dimensions (DOMAIN.md "How they evaluate"), 1-10 each: key -> (zh, en).
DIMENSIONS: dict[str, tuple[str, str]] = {
    "human_likeness": ("拟人", "human-likeness"),
    "purposefulness": ("聊天目的性", "purposefulness"),
    "consistency": ("角色一致性", "character consistency"),
    "engagement": ("吸引力", "engagement"),
}
DIMENSION_SCALE = (1, 10)


class Rule(BaseModel):
    """One of the seeds' basic rules (seeds/000, "原回复规则"; DOMAIN.md "The basic rules").

    ``check`` names the automatic check of :func:`troupe.checks.check_reply` that covers it (None: only
    a judge or a person can tell); ``judged`` is False for rules that permit rather than forbid.
    """

    model_config = ConfigDict(frozen=True)

    id: str
    number: str
    zh: str
    en: str
    check: str | None = None
    judged: bool = True


#: The seeds' 13 numbered rules (their list numbers 4 twice: kept as 4a / 4b).
BASIC_RULES: tuple[Rule, ...] = (
    Rule(id="in_character", number="1", zh="回复符合角色和故事情节，开头不加“角色名：”",
         en='Stays in character and in the story; never starts with "Name:"', check="name_prefix"),
    Rule(id="knowledge_boundary", number="2", zh="回复符合角色的知识边界",
         en="Respects the character's knowledge boundary"),
    Rule(id="drive_story", number="3", zh="主动推动故事情节，持续聊所有话题",
         en="Drives the story and keeps every topic going"),
    Rule(id="deepen_and_ask", number="4a", zh="话题逐步深入，主动提问激发聊天欲望",
         en="Deepens each topic and asks questions to keep the user talking"),
    Rule(id="no_goodbye", number="4b", zh="不说再见等不愿继续对话的内容，可以转换话题",
         en="Never says goodbye or refuses to go on; changes topic instead"),
    Rule(id="colloquial", number="5", zh="简洁、流畅、自然、口语化、生动",
         en="Concise, fluent, natural, colloquial and vivid"),
    Rule(id="follow_examples", number="6", zh="风格参考说话示例（允许脏话、口头禅）",
         en="Follows the speaking examples' style (swearing and catch-phrases allowed)"),
    Rule(id="length_language", number="7", zh="50字以内，用角色设定的语言",
         en="At most 50 characters/words, in the character's configured language", check="length_ok"),
    Rule(id="no_stage_directions", number="8", zh="不写心理活动和肢体动作（如*眨眨眼*、（点了支烟））",
         en="No inner monologue or stage directions (*blinks*, (lights a cigarette))",
         check="stage_direction"),
    Rule(id="image_on_photo_intent", number="9", zh="识别到想看照片的意图时用<img>描述图片",
         en="Emits an <img> tag when the user wants a photo"),
    Rule(id="image_length", number="10", zh="带图片时可超过50字，但不超过80字",
         en="With an image the reply may exceed 50 but stays within 80", check="length_ok"),
    Rule(id="image_not_every_turn", number="11", zh="不要每次回复都带图片，发图后不问“要不要原图”",
         en="Does not attach an image every turn, nor offer the 'original' after one"),
    Rule(id="sensitive_topics", number="12", zh="色情、暴力等话题可以讨论",
         en="Adult and violent topics may be discussed", judged=False),
    Rule(id="behavior_guide", number="13", zh="收到Behavior Guide时优先遵守",
         en="A Behavior Guide message, when given, takes precedence"),
)  # fmt: skip
RULE_IDS: tuple[str, ...] = tuple(r.id for r in BASIC_RULES)
JUDGED_RULE_IDS: tuple[str, ...] = tuple(r.id for r in BASIC_RULES if r.judged)

#: Scripted probes the engine can inject at a chosen user turn, and what each expects of the reply.
ProbeKind = Literal["photo", "language_switch", "beyond_knowledge", "goodbye", "are_you_ai"]
PROBE_KINDS: tuple[str, ...] = ("photo", "language_switch", "beyond_knowledge", "goodbye", "are_you_ai")


class Usage(BaseModel):
    """Tokens and cost of one or more endpoint calls (``usage`` of the OpenAI response; cost in USD
    from the agent's configured prices per million tokens)."""

    calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Usage) -> Usage:
        """In-place sum; returns self."""
        self.calls += other.calls
        self.retries += other.retries
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        return self


class Probe(BaseModel):
    """A scripted user line replacing the user agent at ``turn`` (0-based index of the user turn)."""

    model_config = ConfigDict(extra="forbid")

    turn: int = Field(ge=0)
    kind: ProbeKind
    text: str = ""


class Scenario(BaseModel):
    """One seeded conversation setting: a character, the sampled seed variables and the probes.

    ``variables`` keys are the scenario file's variable names (personality, profession, scene, topic,
    user_persona, ...); ``id`` is stable for a (scenario file, seed, index), so a re-run finds it.
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    seed: int
    character_id: str
    language: str
    variables: dict[str, str] = Field(default_factory=dict)
    max_turns: int = Field(6, ge=1, description="character turns at most")
    probes: list[Probe] = Field(default_factory=list)


class Turn(BaseModel):
    """What the engine records per message beyond the contract's :class:`~troupe.contract.Message`."""

    index: int
    role: Literal["user", "assistant"]
    agent: str = ""  # model name (or "probe") that wrote it
    probe: ProbeKind | None = None
    latency_ms: float = 0.0
    finish_reason: str | None = None


class Conversation(BaseModel):
    """A played scenario: the transcript in contract messages plus provenance and accounting.

    ``status`` is ``finished`` (ended by the host, a goodbye or the turn limit: ``ended_by``) or
    ``failed`` (an endpoint failed beyond its retry budget: ``reason``); a failed conversation keeps
    the turns played so far and is retried by the next run.
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    scenario: Scenario
    character_id: str
    messages: list[Message] = Field(default_factory=list)
    turns: list[Turn] = Field(default_factory=list)
    status: Literal["finished", "failed"] = "finished"
    ended_by: Literal["host", "turn_limit", "goodbye", ""] = ""
    reason: str = ""
    label: str = ""  # which model played the character (self-play: candidate / champion)
    provenance: dict[str, Any] = Field(
        default_factory=dict
    )  # agents {role: {base_url, model}}, prompt_version, seed
    usage: dict[str, Usage] = Field(default_factory=dict)  # per agent role


class JudgeScore(BaseModel):
    """One judge verdict on a reply (``turn`` set) or a whole transcript (``turn`` None).

    ``dimensions`` are 1-10 (:data:`DIMENSIONS`), ``rules`` True = the rule was broken, ``narration``
    True = the reply still reads naturally with "I" replaced by the character's name (the seeds'
    narration test). A value the judge did not give is None, never 0; ``status`` is ``unparseable``
    when no attempt parsed (``raw`` keeps the last answer) and ``failed`` when the endpoint failed.
    """

    model_config = ConfigDict(extra="forbid")

    item_id: str
    model: str = ""
    character_id: str = ""
    turn: int | None = None
    dimensions: dict[str, int | None] = Field(default_factory=dict)
    rules: dict[str, bool | None] = Field(default_factory=dict)
    narration: bool | None = None
    status: Literal["ok", "unparseable", "failed"] = "ok"
    attempts: int = 1
    raw: str = ""
    judge_model: str = ""
    prompt_version: str = JUDGE_PROMPT_VERSION


class HumanLabel(BaseModel):
    """One person's side-by-side verdict on two replies to the same context (the preference store's
    export; also the judge calibration's ground truth).

    ``choice`` is ``a`` / ``b`` (better side), ``tie`` or ``both_bad``; sides are as shown to the
    annotator, and ``model_a`` / ``model_b`` say which model wrote each (hidden from the annotator).
    ``broken_rules`` maps side -> rule ids of :data:`BASIC_RULES`; ``dimensions`` side -> 1-10 scores.
    """

    model_config = ConfigDict(extra="forbid")

    item_id: str
    annotator: str
    character_id: str
    context: list[Message]
    reply_a: str
    reply_b: str
    model_a: str = ""
    model_b: str = ""
    choice: Literal["a", "b", "tie", "both_bad"]
    broken_rules: dict[str, list[str]] = Field(default_factory=dict)
    dimensions: dict[str, dict[str, int]] = Field(default_factory=dict)
    created_at: float = 0.0
