"""The dialogue engine: a user agent, a character agent and a host play a scenario into a conversation.

Seeds (seeds/001, "多agent模拟对话": 角色1 + 角色2 + 场景话题 agent + 主持人 agent): two LLMs talk, a host
"does only one thing: decide whether the session should stop"; "the user knows the bot's role
information, the bot does not know the user's; both know the scene". One exchange is:

1. **user turn**: the user agent (any OpenAI-compatible endpoint, :class:`~troupe.dialogue.client.AgentClient`)
   gets a system prompt in the character's language describing its persona (personality, profession,
   relation), the scene, its topic and who the character is, and sees the dialogue from its side
   (roles swapped: the character's lines are its ``user`` turns). At a probe's turn the scripted probe
   line replaces it (``Turn.agent="probe"``, ``Turn.probe=kind``).
2. **character turn**: if the character agent's ``model`` contains ``{character_id}`` it is a Troupe
   gateway: the model name is formatted with the character id and only the scene note + history is
   sent (the gateway renders the persona card itself), with ``extra_body={"conversation_id": id}`` for
   sticky routing. Otherwise the engine sends ``to_chat(messages, render_system_prompt(card))``: the
   one persona renderer, with the scene note appended to the card exactly as training renders the
   resulting dialogue (:func:`troupe.contract.to_chat`).
3. **host**: after each exchange (once every probe has been played) the host reads the transcript and
   answers END / CONTINUE (结束 / 继续), parsed tolerantly (:func:`parse_host`); an answer that does not
   parse within ``1 + parse_retries`` asks means *continue* and is counted. The scene ends when the
   host says so (``ended_by="host"``) or at ``scenario.max_turns`` character turns (``"turn_limit"``).

Failures: the client retries timeouts / 429 / 5xx itself; an :class:`~troupe.dialogue.client.EndpointFailed`
after that budget ends the conversation as ``status="failed"`` with the reason and the turns so far.

Runs (:func:`run_conversations`): conversations play concurrently (``asyncio.Semaphore``; each agent's
rate limit is its client's). Each finished conversation is appended to ``conversations.jsonl`` as it
finishes (flushed), a failed one to ``failed.jsonl``; a re-run skips scenario ids (of the same label)
already in ``conversations.jsonl`` and retries the failed ones. ``summary.json`` counts
``scenarios == finished + failed + skipped``, how scenes ended, host answers that did not parse, and
calls / retries / tokens / cost per agent role.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

from troupe.config import ConfigError
from troupe.contract import Character, Message, to_chat
from troupe.dialogue.client import AgentClient, EndpointFailed, Reply
from troupe.dialogue.contract import PROMPT_VERSION, Conversation, Scenario, Turn, Usage
from troupe.dialogue.scenarios import text_language
from troupe.persona import render_system_prompt

#: Agent roles the engine needs (``params.agents.<role>``).
ENGINE_ROLES: tuple[str, ...] = ("user", "character", "host")
#: Placeholder in ``agents.character.model`` that marks a Troupe gateway (one model name per character).
GATEWAY_PLACEHOLDER = "{character_id}"

# ------------------------------------------------------------------------------------------ prompts
# Any change to a text below changes what synthetic data looks like: bump contract.PROMPT_VERSION.

_USER_SYSTEM = {
    "zh": (
        "你在一段对话里扮演“用户”，正在和{name}聊天。\n"
        "关于{name}：{about}\n"
        "你的设定：\n{persona}\n"
        "要求：像真人一样说话，口语化，每次只说一两句话；只说你自己的话，不要替{name}说话；"
        "不要写动作、旁白或说明；始终用中文。"
    ),
    "en": (
        "In this conversation you play the *user*, chatting with {name}.\n"
        "About {name}: {about}\n"
        "Who you are:\n{persona}\n"
        "Talk like a real person: casual, one or two sentences at a time; say only your own lines, never "
        "{name}'s; no actions, stage directions or explanations; always write in {language}."
    ),
}
_USER_LABELS = {
    "zh": {"personality": "性格", "profession": "职业", "user_persona": "你和对方的关系", "scene": "场景",
           "topic": "你想聊的话题"},
    "en": {"personality": "personality", "profession": "profession", "user_persona": "your relation to them",
           "scene": "scene", "topic": "what you want to talk about"},
}  # fmt: skip
_USER_KICKOFF = {
    "zh": "（对话开始。请说出你的第一句话。）",
    "en": "(The conversation starts. Say your first line.)",
}
_SCENE_NOTE = {"zh": "场景：{scene}", "en": "Scene: {scene}"}
_HOST_SYSTEM = {
    "zh": (
        "你是一段对话的主持人，只做一件事：判断这段对话现在是否应该结束。话题已经聊完、双方开始重复、"
        "一方明显想离开或对话失去意义时应该结束，否则继续。只回答一个词：结束 或 继续。"
    ),
    "en": (
        "You host a conversation and do one thing only: decide whether it should end now. End it when the "
        "topic is exhausted, the two repeat themselves, one clearly wants to leave or it has lost its point; "
        "otherwise it continues. Answer with one word: END or CONTINUE."
    ),
}
_HOST_QUESTION = {
    "zh": "对话记录：\n{transcript}\n\n这段对话现在应该结束吗？只回答：结束 或 继续。",
    "en": "Transcript:\n{transcript}\n\nShould this conversation end now? Answer only: END or CONTINUE.",
}
_USER_NAME = {"zh": "用户", "en": "User"}
_LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "fr": "French",
                   "de": "German", "es": "Spanish", "ar": "Arabic", "ru": "Russian", "pt": "Portuguese"}  # fmt: skip


def user_system_prompt(scenario: Scenario, character: Character) -> str:
    """The user agent's system prompt, in the character's language (zh template for ``zh``, else en).

    Names the character and its profile (the seeds: the user knows the character's role information)
    and every scenario variable the user is told (all of them: personality, profession, relation,
    scene, topic), in :data:`troupe.dialogue.scenarios.VARIABLES` order.
    """
    lang = text_language(character.language)
    labels = _USER_LABELS[lang]
    persona = "\n".join(
        f"- {labels.get(k, k)}{'：' if lang == 'zh' else ': '}{v}" for k, v in scenario.variables.items()
    )
    sep = "；" if lang == "zh" else "; "
    about = sep.join(f"{k}{'：' if lang == 'zh' else ': '}{v}" for k, v in character.profile.items())
    about = (about or character.name)[:400]
    language = _LANGUAGE_NAMES.get(character.language, character.language)
    return _USER_SYSTEM[lang].format(name=character.name, about=about, persona=persona, language=language)


def scene_note(scenario: Scenario, character: Character) -> str:
    """The character's scene note (a leading ``system`` message of the dialogue), ``""`` without a scene."""
    scene = scenario.variables.get("scene", "").strip()
    return _SCENE_NOTE[text_language(character.language)].format(scene=scene) if scene else ""


def user_view(messages: list[Message], language: str) -> list[dict[str, str]]:
    """The dialogue from the user agent's side: roles swapped, system notes dropped, and a kick-off
    line when the user speaks first (an OpenAI chat needs a user turn to answer)."""
    swap = {"user": "assistant", "assistant": "user"}
    out = [{"role": swap[m.role], "content": m.content} for m in messages if m.role in swap]
    if not out or out[-1]["role"] != "user":
        out.append({"role": "user", "content": _USER_KICKOFF[text_language(language)]})
    return out


def transcript(messages: list[Message], character: Character) -> str:
    """``用户：... / Name：...`` lines of the non-system turns (the host's view)."""
    lang = text_language(character.language)
    sep = "：" if lang == "zh" else ": "
    who = {"user": _USER_NAME[lang], "assistant": character.name}
    return "\n".join(f"{who[m.role]}{sep}{m.content}" for m in messages if m.role in who)


_END = re.compile(r"\b(end|stop|ended|finish(?:ed)?)\b|结束|停止|该结束", re.I)
_CONTINUE = re.compile(r"\b(continue|go on|keep going)\b|继续|不(?:要|用|应该|该)?结束", re.I)


def parse_host(text: str) -> bool:
    """The host's answer: True = end the scene, False = continue.

    Tolerant: the first of END/STOP/FINISH(ED) or 结束/停止 vs CONTINUE/GO ON or 继续/不(要)结束 found
    anywhere in the answer wins (case-insensitive; markdown, punctuation and explanations around it are
    ignored).

    Raises:
        ValueError: neither found (the caller asks again, then counts it as unparseable = continue).
    """
    e, c = _END.search(text), _CONTINUE.search(text)
    if e is None and c is None:
        raise ValueError(f"no END/CONTINUE in host answer {text[:80]!r}")
    if c is not None and (e is None or c.start() <= e.start()):
        return False
    return True


# ------------------------------------------------------------------------------------------ one conversation


def is_gateway(client: AgentClient) -> bool:
    """True when the agent's model name is a per-character template (a Troupe gateway)."""
    return GATEWAY_PLACEHOLDER in client.model


def conversation_id(scenario: Scenario, label: str = "") -> str:
    """``<scenario id>`` or ``<scenario id>-<label>`` (self-play plays one scenario per model)."""
    return f"{scenario.id}-{label}" if label else scenario.id


async def _call(
    conv: Conversation, role: str, client: AgentClient, messages: list[dict[str, str]], **kw: Any
) -> Reply:
    """One agent call, its usage added to ``conv.usage[role]``; an EndpointFailed names the role."""
    try:
        reply = await client.chat(messages, **kw)
    except EndpointFailed as e:
        conv.usage.setdefault(role, Usage()).add(Usage(calls=1))
        raise EndpointFailed(f"{role}: {e.reason}") from e
    conv.usage.setdefault(role, Usage()).add(reply.usage)
    return reply


async def play(
    scenario: Scenario, character: Character, agents: dict[str, AgentClient], label: str = ""
) -> Conversation:
    """Play one scenario (the exchange, host and failure rules are in the module docstring).

    Args:
        scenario: what to play; ``scenario.character_id`` must be ``character.id``.
        character: the persona card.
        agents: ``{"user", "character", "host"}`` -> :class:`AgentClient`.
        label: who played the character (self-play: ``candidate`` / ``champion``); part of the id.

    Returns:
        A :class:`Conversation`: ``messages`` (a leading ``system`` scene note when the scenario has a
        scene, then alternating user / assistant turns), one :class:`Turn` per user/assistant message
        (``index`` = its position in ``messages``), ``status`` finished (``ended_by`` host | turn_limit)
        or failed (``reason`` = "<role>: <EndpointFailed reason>"), ``usage`` per role, and
        ``provenance``: ``agents`` ({role: {base_url, model}}), ``character_model`` (the model name
        sent), ``prompt_version``, ``scenario_seed``, ``variables``, ``host`` ({asked, unparseable}).

    Raises:
        ConfigError: missing agent role, or the scenario names another character.
    """
    missing = [r for r in ENGINE_ROLES if r not in agents]
    if missing:
        raise ConfigError(f"dialogue engine: agents {missing} not configured (agents.<role> in params)")
    if scenario.character_id != character.id:
        raise ConfigError(f"scenario {scenario.id} is for {scenario.character_id!r}, not {character.id!r}")
    user, char, host = agents["user"], agents["character"], agents["host"]
    cid = conversation_id(scenario, label)
    gateway = is_gateway(char)
    char_model = char.model.replace(GATEWAY_PLACEHOLDER, character.id) if gateway else char.model
    conv = Conversation(
        id=cid,
        scenario=scenario,
        character_id=character.id,
        label=label,
        usage={r: Usage() for r in ENGINE_ROLES},
        provenance={
            "agents": {r: agents[r].describe() for r in ENGINE_ROLES},
            "character_model": char_model,
            "prompt_version": PROMPT_VERSION,
            "scenario_seed": scenario.seed,
            "variables": dict(scenario.variables),
            "host": {"asked": 0, "unparseable": 0},
        },
    )
    note = scene_note(scenario, character)
    if note:
        conv.messages.append(Message(role="system", content=note))
    card = None if gateway else render_system_prompt(character)
    user_sys = {"role": "system", "content": user_system_prompt(scenario, character)}
    host_sys = {"role": "system", "content": _HOST_SYSTEM[text_language(character.language)]}
    probes = {p.turn: p for p in scenario.probes}
    last_probe = max(probes, default=-1)

    def add(role: str, content: str, **turn: Any) -> None:
        conv.turns.append(Turn(index=len(conv.messages), role=role, **turn))
        conv.messages.append(Message(role=role, content=content))

    try:
        for t in range(scenario.max_turns):
            if t in probes:
                add("user", probes[t].text, agent="probe", probe=probes[t].kind)
            else:
                r = await _call(conv, "user", user, [user_sys, *user_view(conv.messages, character.language)])
                add(
                    "user",
                    r.text.strip(),
                    agent=user.model,
                    latency_ms=r.latency_ms,
                    finish_reason=r.finish_reason,
                )
            if gateway:
                lead = [{"role": "system", "content": note}] if note else []
                history = [
                    {"role": m.role, "content": m.content} for m in conv.messages if m.role != "system"
                ]
                r = await _call(conv, "character", char, lead + history, model=char_model,
                                extra_body={"conversation_id": cid})  # fmt: skip
            else:
                r = await _call(conv, "character", char, to_chat(conv.messages, card))
            add(
                "assistant",
                r.text.strip(),
                agent=char_model,
                latency_ms=r.latency_ms,
                finish_reason=r.finish_reason,
            )
            if t == scenario.max_turns - 1:
                conv.ended_by = "turn_limit"
                break
            if t < last_probe:  # a probe is still to come: the scene goes on
                continue
            question = _HOST_QUESTION[text_language(character.language)].format(
                transcript=transcript(conv.messages, character)
            )
            conv.provenance["host"]["asked"] += 1
            verdict = None
            for _ in range(1 + max(0, host.parse_retries)):
                r = await _call(conv, "host", host, [host_sys, {"role": "user", "content": question}])
                try:
                    verdict = parse_host(r.text)
                    break
                except ValueError:
                    continue
            if verdict is None:
                conv.provenance["host"]["unparseable"] += 1
            elif verdict:
                conv.ended_by = "host"
                break
    except EndpointFailed as e:
        conv.status, conv.reason = "failed", e.reason
    return conv


# ------------------------------------------------------------------------------------------ runs


def _usage_delta(after: Usage, before: Usage) -> Usage:
    return Usage(**{k: getattr(after, k) - getattr(before, k) for k in Usage.model_fields})


def finished_ids(path: Path, label: str = "") -> tuple[set[str], int]:
    """Scenario ids with a finished conversation of ``label`` in ``path`` and the number of unreadable
    lines. A last line cut short by a crash (no newline at the end, not valid JSON) is removed from the
    file, so appending goes on cleanly; it counts as unreadable (its scenario is played again).
    """
    if not path.is_file():
        return set(), 0
    text = path.read_text(encoding="utf-8")
    bad = 0
    if text and not text.endswith("\n"):
        head, _, tail = text.rpartition("\n")
        try:
            json.loads(tail)
            text += "\n"
        except json.JSONDecodeError:
            text = head + "\n" if head else ""
            bad += 1
        path.write_text(text, encoding="utf-8")
    ids: set[str] = set()
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if rec.get("label", "") == label and rec.get("status", "finished") == "finished":
                ids.add(rec["scenario"]["id"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            bad += 1
    return ids, bad


async def run_conversations(
    scenarios: list[Scenario],
    characters: dict[str, Character],
    agents: dict[str, AgentClient],
    out_dir: str | Path,
    concurrency: int = 4,
    label: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Play ``scenarios`` concurrently into ``out_dir`` (files and re-run rules in the module docstring).

    Args:
        scenarios: what to play (:func:`troupe.dialogue.scenarios.sample_scenarios`).
        characters: ``{id: card}`` holding every scenario's character.
        agents: ``{"user", "character", "host"}`` -> :class:`AgentClient` (shared by all conversations).
        out_dir: local directory for ``conversations.jsonl``, ``failed.jsonl``, ``summary.json``.
        concurrency: conversations in flight at once (>= 1).
        label: who plays the character (self-play); re-runs skip per (label, scenario id).
        progress: show a tqdm bar (conversations done, failed, tokens/s).

    Returns:
        The summary written to ``summary.json``: ``scenarios`` (= ``finished + failed + skipped``),
        ``finished``, ``failed``, ``skipped``, ``retried_failed`` (failed in an earlier run, played
        again now), ``unreadable_lines`` (of conversations.jsonl), ``ended_by`` {host, turn_limit},
        ``host`` {asked, unparseable}, ``probes_played`` {kind: n}, ``usage`` {role: calls, retries,
        prompt_tokens, completion_tokens, cost_usd} of this run (from the clients' own accounting, failed
        calls included), ``tokens``, ``cost_usd``, ``wall_s``, ``tokens_per_s``, ``label``,
        ``prompt_version``, ``failures`` {reason: n}.

    Raises:
        ConfigError: a scenario names a character not in ``characters``, a missing agent, concurrency < 1.
    """
    from tqdm.auto import tqdm

    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    missing_roles = [r for r in ENGINE_ROLES if r not in agents]
    if missing_roles:
        raise ConfigError(f"dialogue engine: agents {missing_roles} not configured (agents.<role> in params)")
    unknown = sorted({s.character_id for s in scenarios} - set(characters))
    if unknown:
        raise ConfigError(f"scenarios name characters that are not in the character file: {unknown}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    conv_path, failed_path = out / "conversations.jsonl", out / "failed.jsonl"
    done, unreadable = finished_ids(conv_path, label)
    todo = [s for s in scenarios if s.id not in done]
    # failures of earlier runs: those played again now leave failed.jsonl; the rest stay
    again = {s.id for s in todo}
    kept, retried = [], 0
    if failed_path.is_file():
        for line in failed_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (rec.get("label", ""), rec["scenario"]["id"])
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                kept.append(line)  # not ours to judge: kept as it was
                continue
            if key[0] == label and key[1] in again:
                retried += 1
            else:
                kept.append(line)
    failed_path.write_text("".join(f"{x}\n" for x in kept), encoding="utf-8")

    before = {r: agents[r].usage.model_copy() for r in ENGINE_ROLES}
    counts: dict[str, Any] = {"finished": 0, "failed": 0, "ended_by": {}, "host": {"asked": 0, "unparseable": 0},
                              "probes_played": {}, "failures": {}}  # fmt: skip
    sem = asyncio.Semaphore(concurrency)
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"conversations{f' [{label}]' if label else ''}", unit="conv",
               disable=not progress)  # fmt: skip

    with conv_path.open("a", encoding="utf-8") as fc, failed_path.open("a", encoding="utf-8") as ff:

        async def one(s: Scenario) -> None:
            async with sem:
                try:
                    conv = await play(s, characters[s.character_id], agents, label)
                except Exception as e:  # a bug or an unexpected answer: recorded, never lost
                    conv = Conversation(id=conversation_id(s, label), scenario=s, character_id=s.character_id,
                                        label=label, status="failed", reason=f"error: {type(e).__name__}: {e}")  # fmt: skip
                    bar.write(f"[engine] {s.id}: {conv.reason}")
            f = fc if conv.status == "finished" else ff
            f.write(conv.model_dump_json() + "\n")
            f.flush()
            if conv.status == "finished":
                counts["finished"] += 1
                counts["ended_by"][conv.ended_by] = counts["ended_by"].get(conv.ended_by, 0) + 1
            else:
                counts["failed"] += 1
                counts["failures"][conv.reason] = counts["failures"].get(conv.reason, 0) + 1
            for k in ("asked", "unparseable"):
                counts["host"][k] += conv.provenance.get("host", {}).get(k, 0)
            for turn in conv.turns:
                if turn.probe:
                    counts["probes_played"][turn.probe] = counts["probes_played"].get(turn.probe, 0) + 1
            tokens = sum(agents[r].usage.prompt_tokens + agents[r].usage.completion_tokens - before[r].prompt_tokens
                         - before[r].completion_tokens for r in ENGINE_ROLES)  # fmt: skip
            bar.update(1)
            bar.set_postfix(
                failed=counts["failed"], tok_s=f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}"
            )

        try:
            await asyncio.gather(*(one(s) for s in todo))
        finally:
            bar.close()

    wall = time.perf_counter() - t0
    usage = {r: _usage_delta(agents[r].usage, before[r]) for r in ENGINE_ROLES}
    tokens = sum(u.prompt_tokens + u.completion_tokens for u in usage.values())
    summary = {
        "label": label,
        "prompt_version": PROMPT_VERSION,
        "scenarios": len(scenarios),
        "finished": counts["finished"],
        "failed": counts["failed"],
        "skipped": len(scenarios) - len(todo),
        "retried_failed": retried,
        "unreadable_lines": unreadable,
        "ended_by": dict(sorted(counts["ended_by"].items())),
        "host": counts["host"],
        "probes_played": dict(sorted(counts["probes_played"].items())),
        "failures": counts["failures"],
        "usage": {r: u.model_dump() for r, u in usage.items()},
        "agents": {r: agents[r].describe() for r in ENGINE_ROLES},
        "tokens": tokens,
        "cost_usd": sum(u.cost_usd for u in usage.values()),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
    }
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    return summary


def run(
    scenarios: list[Scenario],
    characters: dict[str, Character],
    agents: dict[str, AgentClient],
    out_dir: str | Path,
    concurrency: int = 4,
    label: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Synchronous :func:`run_conversations` (``asyncio.run``); closes the agents' connection pools at
    the end (they belong to the loop that ends), so build new clients for another run."""

    async def main() -> dict[str, Any]:
        try:
            return await run_conversations(
                scenarios, characters, agents, out_dir, concurrency, label, progress
            )
        finally:
            for client in {id(c): c for c in agents.values()}.values():
                await client.aclose()

    return asyncio.run(main())
