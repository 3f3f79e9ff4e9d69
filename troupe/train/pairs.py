"""DPO preference pairs built from the model's own samples.

A *prompt* is a training context: a prefix of a ``train`` dialogue ending in a user turn, whose next
turn (the reference character reply) is the *chosen* reply. Contexts are walked in a seeded order
until ``pairs.max_pairs`` of them have a chosen reply that passes the rules; the ones walked over are
the prompts.

Turns (``pairs.turns``): ``all`` (default) makes a context of every character turn that follows a
user turn, with the dialogue's whole history before it (multi-turn DPO: the pair is trained at that
turn, conditioned on everything said so far); the seeded shuffle spreads ``max_pairs`` over dialogues
and turns, each context equally likely (so a dialogue's share grows with its character turns).
``last`` keeps only each dialogue's last such turn (one pair per dialogue at most). General-data
dialogues (:func:`troupe.contract.is_general`) have no character and give no contexts.

Chosen: the reference reply must pass the rules accepted data is held to, through the one
implementation of them, :func:`troupe.data.validate.reply_violations` (non-empty, markup, the
character's language, personal data, stage directions), with stage directions always counted as broken
(rule 8): ``data.stage_directions=flag`` lets narration into training data, but a preferred reply
that narrates (CharacterEval's ``（...）``) would teach DPO the opposite of the rule the rejected side is
judged by. A context whose reference fails is dropped and written to ``quarantine.jsonl`` with the
rules it breaks.

Rejected (``pairs.samples_per_prompt`` = S): S replies are sampled from the SFT model per prompt and
each is judged by :func:`troupe.checks.check_reply`; the rejected reply is the sample breaking the most
rules (the first on ties), so S > 1 raises the chance of a rule-breaking rejected reply and picks the
worst. If no SFT sample breaks a rule, S base-model samples (an untuned, assistant-like reply) are
picked the same way: the worst, else the first. One pair per prompt. A sample that is empty or equal
to the chosen reply is never picked; a prompt left with no usable sample is dropped and quarantined.
With ``pairs.temperature=0`` the S samples are identical (greedy), so S > 1 only costs time.
DOMAIN.md: sampling the model's own outputs as candidates "worked surprisingly well";
Index-1.9B-Character uses the same recipe.

Counts (``pairs_report.json``): ``prompts == pairs + sum(dropped.values())`` and
``contexts == prompts + not_considered``.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from troupe.checks import ReplyCheck, check_reply, last_user_text, violation_kind
from troupe.config import ConfigError, section
from troupe.contract import (
    Character,
    Dialogue,
    Message,
    PreferencePair,
    QuarantineRecord,
    is_general,
    load_characters,
    read_jsonl,
    write_jsonl,
)
from troupe.data.validate import reply_violations

#: reasons a prompt yields no pair (keys of ``pairs_report.json["dropped"]``)
DROP_CHOSEN = "chosen_breaks_rules"
DROP_NO_REJECTED = "no_usable_rejected"


@dataclass
class Context:
    """One prompt candidate: ``messages`` (ending in a user turn) of ``dialogue`` and the reference reply.

    ``line`` is the dialogue's 1-based line in the file it was read from (0 = unknown).
    """

    dialogue: Dialogue
    messages: list[Message]
    reference: str
    line: int = 0

    @property
    def id(self) -> str:
        return f"{self.dialogue.id}#{len(self.messages)}"


def contexts(dialogues: list[Dialogue], seed: int, turns: str = "all") -> list[Context]:
    """(context, reference reply) pairs of ``dialogues`` in a seeded random order (same dialogues +
    seed -> same order).

    Args:
        dialogues: training dialogues; general-data ones are skipped (no character to prefer).
        seed: shuffle seed.
        turns: ``all``: one context per assistant turn that follows a user turn, its messages the
            whole history before that turn; ``last``: only the last such turn of each dialogue.

    Raises:
        ConfigError: ``turns`` not all | last (names ``pairs.turns``).
    """
    if turns not in ("all", "last"):
        raise ConfigError(f"pairs.turns={turns!r}: expected all or last")
    out = []
    for n, d in enumerate(dialogues, start=1):
        if is_general(d):
            continue
        own = [
            Context(d, d.messages[:i], m.content, n)
            for i, m in enumerate(d.messages)
            if m.role == "assistant" and i > 0 and d.messages[i - 1].role == "user"
        ]
        out += own[-1:] if turns == "last" else own
    random.Random(seed).shuffle(out)
    return out


def chosen_violations(reply: str, language: str) -> list[str]:
    """Rules a chosen reply breaks: the accepted-data rules with stage directions counted (module docstring)."""
    return reply_violations(reply, language, stage_directions="reject")


def select_prompts(
    ctx: list[Context], characters: dict[str, Character], max_pairs: int, file: str = ""
) -> tuple[list[Context], list[QuarantineRecord], int]:
    """Walk ``ctx`` in order, keeping contexts whose reference passes :func:`chosen_violations`, until
    ``max_pairs`` are kept (0 = no cap).

    Returns:
        ``(kept, quarantined, walked)``: ``walked == len(kept) + len(quarantined)`` contexts were looked at;
        each quarantine record names ``file``, the dialogue's line, the context id and the broken rules.

    Raises:
        ConfigError: a context's character has no persona card (names the dialogue).
    """
    kept: list[Context] = []
    dropped: list[QuarantineRecord] = []
    walked = 0
    for c in ctx:
        if max_pairs and len(kept) >= max_pairs:
            break
        walked += 1
        char = characters.get(c.dialogue.character_id)
        if char is None:
            raise ConfigError(
                f"{file}:{c.line}: dialogue {c.dialogue.id}: no card for {c.dialogue.character_id!r}"
            )
        v = chosen_violations(c.reference, char.language)
        if not v:
            kept.append(c)
            continue
        dropped.append(
            QuarantineRecord(
                file=file,
                line=c.line or None,
                stage="pairs",
                reason=f"{DROP_CHOSEN}: " + "; ".join(v),
                record_id=c.id,
                raw={
                    "messages": [m.model_dump(exclude_none=True) for m in c.messages],
                    "chosen": c.reference,
                    "violations": v,
                },
            )
        )
    return kept, dropped, walked


def pick_rejected(candidates: list[str], checks: list[ReplyCheck], chosen: str) -> int | None:
    """Index of the candidate breaking the most rules (first on ties; with no rule broken, the first),
    among the usable ones (non-empty, not equal to ``chosen`` after stripping); None when none is usable.

    Args:
        candidates: S sampled replies; ``checks``: their :func:`troupe.checks.check_reply` results.
    """
    usable = [i for i, s in enumerate(candidates) if s.strip() and s.strip() != chosen.strip()]
    if not usable:
        return None
    return max(usable, key=lambda i: (len(checks[i].violations), -i))


#: ``sampler(prompt indices, samples per prompt) -> per index, that many replies``
Sampler = Callable[[list[int], int], list[list[str]]]


def assemble_pairs(
    prompts: list[Context],
    characters: dict[str, Character],
    sample_sft: Sampler,
    sample_base: Sampler,
    samples_per_prompt: int,
    file: str = "",
) -> tuple[list[PreferencePair], list[QuarantineRecord], dict[str, Any]]:
    """One pair per prompt from S sampled candidates (the module docstring's rule).

    Args:
        prompts: contexts whose chosen reply passed (:func:`select_prompts`).
        characters: persona cards (name and language for :func:`troupe.checks.check_reply`).
        sample_sft / sample_base: samplers of the SFT / base model; ``sample_base`` is called once, for
            the prompts no SFT sample broke a rule on (not at all when there are none).
        samples_per_prompt: S >= 1.
        file: source file named in quarantine records.

    Returns:
        ``(pairs, quarantined, counts)``; ``counts`` holds ``rejected_source``, ``rejected_violations``
        (rule -> pairs), ``candidates`` (sampled per model) and ``dropped_no_rejected``.

    Raises:
        ConfigError: ``samples_per_prompt < 1``.
    """
    s = int(samples_per_prompt)
    if s < 1:
        raise ConfigError(f"pairs.samples_per_prompt must be >= 1, got {s}")

    def judge(c: Context, reply: str) -> ReplyCheck:
        ch = characters[c.dialogue.character_id]
        return check_reply(
            reply, character_name=ch.name, language=ch.language, user_text=last_user_text(c.messages)
        )

    idx = list(range(len(prompts)))
    sft = sample_sft(idx, s) if idx else []
    picked: dict[int, tuple[str, str, list[str]]] = {}
    need_base = []
    for i, cands in zip(idx, sft, strict=True):
        checks = [judge(prompts[i], r) for r in cands]
        k = pick_rejected(cands, checks, prompts[i].reference)
        if k is not None and checks[k].violations:
            picked[i] = (cands[k], "sft_violation", checks[k].violations)
        else:
            need_base.append(i)
    base = sample_base(need_base, s) if need_base else []
    unusable: dict[int, list[str]] = {}
    for i, cands in zip(need_base, base, strict=True):
        checks = [judge(prompts[i], r) for r in cands]
        k = pick_rejected(cands, checks, prompts[i].reference)
        if k is None:
            unusable[i] = list(sft[i]) + list(cands)
        else:
            picked[i] = (cands[k], "base_violation" if checks[k].violations else "base", checks[k].violations)
    pairs: list[PreferencePair] = []
    dropped: list[QuarantineRecord] = []
    for i, c in enumerate(prompts):
        if i in unusable:
            dropped.append(
                QuarantineRecord(
                    file=file,
                    line=c.line or None,
                    stage="pairs",
                    reason=f"{DROP_NO_REJECTED}: all {2 * s} samples empty or equal to the chosen reply",
                    record_id=c.id,
                    raw={
                        "messages": [m.model_dump(exclude_none=True) for m in c.messages],
                        "chosen": c.reference,
                        "samples": unusable[i],
                    },
                )
            )
            continue
        rejected, src, violations = picked[i]
        pairs.append(
            PreferencePair(
                id=c.id,
                character_id=c.dialogue.character_id,
                messages=c.messages,
                chosen=c.reference,
                rejected=rejected,
                meta={"rejected_source": src, "violations": violations, "samples_per_prompt": s},
            )
        )
    counts = {
        "rejected_source": dict(Counter(p.meta["rejected_source"] for p in pairs)),
        "rejected_violations": dict(
            Counter(violation_kind(v) for p in pairs for v in p.meta["violations"]).most_common()
        ),
        "candidates": {"sft": len(idx) * s, "base": len(need_base) * s},
        "dropped_no_rejected": len(dropped),
    }
    return pairs, dropped, counts


def build_pairs(params: dict[str, Any]) -> str:
    """Write ``paths.pairs/`` ``pairs.jsonl``, ``quarantine.jsonl`` and ``pairs_report.json``; returns
    ``paths.pairs``.

    Reads ``paths.splits`` (train.jsonl, characters.jsonl), ``paths.sft_model`` and ``paths.base_model``;
    each a local path or a URI (:mod:`troupe.storage`). Params: ``pairs.max_pairs``,
    ``pairs.samples_per_prompt``, ``pairs.max_new_tokens``, ``pairs.temperature``, ``pairs.turns``;
    ``sft.seed`` orders the contexts.

    Raises:
        ContractError: missing / malformed split files. ConfigError: bad ``pairs`` params.
    """
    from troupe import storage

    paths = section(params, "paths")
    with storage.output_dir(paths["pairs"]) as out:
        _build_pairs(params, out)
    return str(paths["pairs"])


def _build_pairs(params: dict[str, Any], out: Path) -> dict[str, Any]:
    from troupe import storage
    from troupe.generation import GenRequest, PrefixGenerator
    from troupe.modeling import load_model
    from troupe.train.encoding import chat_messages

    cfg = section(params, "pairs")
    paths = section(params, "paths")
    splits = storage.local_copy(paths["splits"], what="paths.splits")
    chars = load_characters(splits / "characters.jsonl")
    train_file = splits / "train.jsonl"
    ctx = contexts(
        read_jsonl(train_file, Dialogue),
        int(params.get("sft", {}).get("seed", 17)),
        str(cfg.get("turns", "all")),
    )
    prompts, chosen_bad, walked = select_prompts(ctx, chars, int(cfg.get("max_pairs", 32)), str(train_file))
    max_new, temperature = int(cfg.get("max_new_tokens", 48)), float(cfg.get("temperature", 0.9))

    def sampler(model_key: str, desc: str, seed: int) -> Sampler:
        def sample(idx: list[int], s: int) -> list[list[str]]:
            model, tok = load_model(storage.local_copy(paths[model_key], what=f"paths.{model_key}"))
            gen = PrefixGenerator(model, tok)  # each character's persona card prefilled once
            reqs = []
            for i in idx:
                c = chars[prompts[i].dialogue.character_id]
                reqs += [GenRequest(chat_messages(prompts[i].messages, c), max_new, temperature, c.id)] * s
            flat = [r.text for r in gen.generate(reqs, batch_size=8, seed=seed, desc=desc)]
            return [flat[j * s : (j + 1) * s] for j in range(len(idx))]

        return sample

    pairs, no_rejected, counts = assemble_pairs(
        prompts,
        chars,
        sampler("sft_model", "pairs/sft", 0),
        sampler("base_model", "pairs/base", 1),
        int(cfg.get("samples_per_prompt", 1)),
        str(train_file),
    )
    dropped = {DROP_CHOSEN: len(chosen_bad), DROP_NO_REJECTED: len(no_rejected)}
    report = {
        "contexts": len(ctx),
        "prompts": walked,
        "not_considered": len(ctx) - walked,
        "pairs": len(pairs),
        "dropped": dropped,
        "chosen_violations": dict(
            Counter(violation_kind(v) for q in chosen_bad for v in q.raw["violations"]).most_common()
        ),
        "samples_per_prompt": int(cfg.get("samples_per_prompt", 1)),
        **counts,
    }
    if report["pairs"] + sum(dropped.values()) != report["prompts"]:
        raise RuntimeError(f"pair counts do not add up: {report}")
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "quarantine.jsonl", chosen_bad + no_rejected)
    (out / "pairs_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(f"[pairs] {report}", flush=True)
    return report


def load_pairs(pairs_dir: Path) -> list[PreferencePair]:
    """Read ``pairs.jsonl`` from a pairs directory."""
    return read_jsonl(pairs_dir / "pairs.jsonl", PreferencePair)
