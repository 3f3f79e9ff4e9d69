"""Train / held-out splits: whole held-out characters (unseen persona cards) and held-out dialogues.

``troupe data split`` reads ``paths.validated`` and writes to ``paths.splits``:

- ``heldout_characters.jsonl``: every dialogue of ``split.heldout_characters`` whole characters, chosen
  deterministically from ``split.seed`` among characters with at least 2 dialogues when there are
  enough, round-robin over languages so that each language is represented when possible;
- ``heldout_dialogues.jsonl``: ``split.heldout_dialogue_share`` of each remaining character's
  dialogues (at least 1 when the character has >= 2, never all of them), drawn as whole groups (below),
  so a character can land off target (``report["grouping"]["heldout_dialogues_off_target"]``: held
  minus target); plus the seen characters' dialogues that share a group with a held-out character's;
- ``train.jsonl``: the rest (``split.max_train_dialogues`` > 0 caps it);
- ``train.jsonl`` keeps at most ``synthesis.mix_ratio`` synthetic dialogues (:func:`cap_synthetic`;
  ``report["synthetic"]`` counts what the cap dropped);
- general instruction data (:func:`troupe.contract.is_general`) is no character: it is never held out
  (nor counted by ``split.max_train_dialogues`` / the synthetic mix), every such dialogue goes to
  ``train.jsonl`` and :func:`cap_general` keeps its share of the training *tokens* at most
  ``split.general_max_share`` (``report["general"]``);
- both eval files capped at ``split.max_eval_dialogues`` (0 = no cap); every cap is a seeded sample
  spread round-robin over characters, so a capped split keeps as many characters as it can;
- ``characters.jsonl`` (every card) and ``split_report.json``.

When ``eval.suites`` has ``charactereval``, every dialogue of a CharacterEval character
(:func:`charactereval_characters`) is set aside before splitting: it enters no split, so the suite
(:mod:`troupe.dialogue.charactereval`) scores characters the model never trained on;
``report["excluded"]`` counts them (``in = excluded + sum(before_caps)``).

Every output dialogue has ``split`` set to ``train`` / ``heldout_dialogues`` / ``heldout_characters``;
no held-out character has a dialogue in ``train``. File order follows the input order.

Leakage: the unit of the split is a *group* of dialogues (:func:`dialogue_groups`), never a single
dialogue. Two dialogues are in one group when one's turns are a prefix of the other's, when they share
their first ``split.shared_prefix_turns`` turns, or when they carry the same
``meta["source_dialogue"]`` (importers set it for records cut from one source conversation, e.g.
CharacterEval's scenes cut at several points and for several roles); groups are closed under these
links (connected components). A group never straddles train and held-out: a group holding a held-out
character's dialogue goes to the held-out side whole (its other characters' dialogues become held-out
dialogues, counted in ``report["grouping"]["pulled_with_heldout_characters"]``), and held-out
dialogues of seen characters are drawn group by group. So no held-out context appears in training.
"""

from __future__ import annotations

import json
import math
import random
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from troupe.config import ConfigError, path_of, section
from troupe.contract import Character, Dialogue, is_general, load_characters, read_jsonl, write_jsonl

SPLITS = ("train", "heldout_dialogues", "heldout_characters")


@dataclass
class SplitResult:
    """The three splits (input order kept), the held-out character ids and the report dict."""

    train: list[Dialogue] = field(default_factory=list)
    heldout_dialogues: list[Dialogue] = field(default_factory=list)
    heldout_characters: list[Dialogue] = field(default_factory=list)
    heldout_character_ids: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def choose_heldout_characters(
    counts: dict[str, int], languages: dict[str, str], n: int, seed: int
) -> list[str]:
    """Pick ``n`` character ids to hold out whole.

    Args:
        counts: dialogues per character id (characters with 0 dialogues are never picked).
        languages: character id -> language.
        n: how many to pick; at most ``len(candidates) - 1`` so training keeps a character.
        seed: RNG seed (same inputs + seed -> same choice).

    Returns:
        Sorted character ids. Characters with >= 2 dialogues are preferred (if at least ``n`` exist);
        picks alternate across languages (languages in seeded order) so each is represented when possible.
    """
    present = sorted(c for c, k in counts.items() if k > 0)
    n = max(0, min(n, len(present) - 1))
    if n == 0:
        return []
    several = [c for c in present if counts[c] >= 2]
    pool = several if len(several) >= n else present
    rng = random.Random(seed)
    by_lang: dict[str, list[str]] = defaultdict(list)
    for c in pool:
        by_lang[languages.get(c, "")].append(c)
    langs = sorted(by_lang)
    rng.shuffle(langs)
    for lang in langs:
        rng.shuffle(by_lang[lang])
    picked: list[str] = []
    while len(picked) < n:
        for lang in langs:
            if by_lang[lang] and len(picked) < n:
                picked.append(by_lang[lang].pop())
    return sorted(picked)


def _turn_key(m: Any) -> tuple[str, str]:
    """(role, NFKC text with whitespace collapsed) of one turn: the unit of prefix comparison."""
    return m.role, " ".join(unicodedata.normalize("NFKC", m.content).split())


def dialogue_groups(dialogues: list[Dialogue], shared_prefix_turns: int = 2) -> list[int]:
    """Group index per dialogue: connected components of the "shares context" relation.

    Two dialogues are linked when (a) the non-system turns of one are a prefix of the other's (equal
    sequences included), (b) they share their first ``shared_prefix_turns`` non-system turns, or (c)
    their ``meta["source_dialogue"]`` strings are equal and non-empty. Turns compare by role and text
    (NFKC, whitespace collapsed); a leading system (scene) turn is ignored, as are ``name`` fields.
    Linear in the total number of turns (hash look-ups of prefixes up to ``shared_prefix_turns``).

    Args:
        dialogues: N dialogues.
        shared_prefix_turns: k >= 1; a prefix longer than k is caught by (b), shorter ones by (a).

    Returns:
        N ints in ``[0, groups)``, numbered in order of first appearance.

    Raises:
        ConfigError: ``shared_prefix_turns < 1``.
    """
    k = int(shared_prefix_turns)
    if k < 1:
        raise ConfigError(f"split.shared_prefix_turns must be >= 1, got {k}")
    parent = list(range(len(dialogues)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first_at: dict[Any, int] = {}  # key -> first dialogue holding it
    turns = [[_turn_key(m) for m in d.messages if m.role != "system"] for d in dialogues]
    for i, d in enumerate(dialogues):
        src = d.meta.get("source_dialogue")
        keys: list[Any] = [("src", str(src))] if src else []
        t = turns[i]
        # (b) and the long case of (a): the first k turns; (a) short case: the whole of a dialogue shorter
        # than k is registered as "short", and every dialogue looks its prefixes shorter than k up there
        keys.append(("k", tuple(t[:k])) if len(t) >= k else ("short", tuple(t)))
        for key in keys:
            union(i, first_at.setdefault(key, i))
    for i, t in enumerate(turns):
        for j in range(1, min(len(t), k - 1) + 1):
            hit = first_at.get(("short", tuple(t[:j])))
            if hit is not None:
                union(i, hit)
    number: dict[int, int] = {}
    return [number.setdefault(find(i), len(number)) for i in range(len(dialogues))]


def _sample(items: list[Dialogue], k: int, rng: random.Random) -> list[Dialogue]:
    """Seeded sample of ``k`` items spread over characters, in their original order.

    Round-robin over characters (characters and each one's dialogues in seeded order), so a cap of
    ``k`` covers ``min(k, characters)`` characters and no character gets two more than another:
    "many characters x few sessions" for training, every held-out character in a capped eval split.
    All items when ``k <= 0`` or ``k >= len(items)``.
    """
    if k <= 0 or k >= len(items):
        return list(items)
    by_char: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(items):
        by_char[d.character_id].append(i)
    queues = [by_char[c] for c in sorted(by_char)]
    rng.shuffle(queues)
    for q in queues:
        rng.shuffle(q)
    keep: set[int] = set()
    while len(keep) < k:
        for q in queues:
            if q and len(keep) < k:
                keep.add(q.pop())
    return [d for i, d in enumerate(items) if i in keep]


def charactereval_characters(dialogues: list[Dialogue]) -> set[str]:
    """Ids of the characters with a CharacterEval dialogue: imported from a ``charactereval`` source
    (the importer's ``meta["charactereval_id"]``, or ``source`` ``charactereval``)."""
    return {d.character_id for d in dialogues if "charactereval_id" in d.meta or d.source == "charactereval"}


def cap_synthetic(
    train: list[Dialogue], mix_ratio: float, rng: random.Random
) -> tuple[list[Dialogue], dict[str, Any]]:
    """Keep at most ``mix_ratio`` synthetic dialogues (``source == "synthetic"``) in the training split.

    With ``R`` real and ``S`` synthetic training dialogues, ``min(S, floor(r * R / (1 - r)))`` synthetic
    ones stay (so ``S' / (R + S') <= r``; every one when ``r >= 1``, none when ``r == 0``): a seeded
    sample spread over characters (:func:`_sample`), input order kept. ``synthesis.mix_ratio``; the
    seeds mixed generated dialogues into real ones rather than training on them alone.

    Returns:
        ``(train, report)``; report: ``mix_ratio``, ``real``, ``synthetic_before_cap``, ``synthetic``,
        ``dropped_by_mix_ratio``, ``share`` (synthetic share of the capped training split).
    """
    synthetic = [d for d in train if d.source == "synthetic"]
    real = len(train) - len(synthetic)
    r = float(mix_ratio)
    allowed = len(synthetic) if r >= 1.0 else min(len(synthetic), math.floor(r * real / (1.0 - r) + 1e-9))
    keep = {id(d) for d in (_sample(synthetic, allowed, rng) if allowed > 0 else [])}
    out = [d for d in train if d.source != "synthetic" or id(d) in keep]
    n_syn = len(out) - real
    report = {
        "mix_ratio": r,
        "real": real,
        "synthetic_before_cap": len(synthetic),
        "synthetic": n_syn,
        "dropped_by_mix_ratio": len(synthetic) - n_syn,
        "share": n_syn / len(out) if out else 0.0,
    }
    return out, report


def text_tokens(d: Dialogue) -> int:
    """A tokenizer-free size of a dialogue: characters of its turns' text (fallback unit ``chars``)."""
    return sum(len(m.content) for m in d.messages)


def cap_general(
    train: list[Dialogue],
    max_share: float,
    rng: random.Random,
    n_tokens: Callable[[Dialogue], int] = text_tokens,
    unit: str = "chars",
) -> tuple[list[Dialogue], dict[str, Any]]:
    """Keep general-data dialogues (:func:`troupe.contract.is_general`) at most ``max_share`` of the
    training split's tokens.

    With ``C`` tokens of character dialogues, general dialogues are taken in a seeded order while their
    tokens ``G`` stay ``<= r * C / (1 - r)`` (so ``G / (C + G) <= r``; a dialogue that would overshoot is
    skipped and later, smaller ones are still tried; all of them when ``r >= 1``, none when ``r == 0``).
    DOMAIN.md: general data <= 50 % of the tokens, 1/4 to 1/3 worked. Input order kept.

    Args:
        train: the training split (character and general dialogues).
        max_share: ``split.general_max_share`` r in [0, 1].
        rng: the seeded order of the general dialogues.
        n_tokens: size of one dialogue (``troupe data split`` uses validate's ``n_tokens``: the rendered
            dialogue in the base model's tokens).
        unit: what ``n_tokens`` counts, for the report (``tokens`` | ``chars``).

    Returns:
        ``(train, report)``; report: ``max_share``, ``unit``, ``character_tokens``,
        ``general_before_cap``, ``general`` (dialogues kept), ``general_tokens`` (kept),
        ``dropped_by_max_share`` (dialogues) and ``share`` (general share of the capped split's tokens).
    """
    r = float(max_share)
    general = [d for d in train if is_general(d)]
    c_tok = sum(n_tokens(d) for d in train if not is_general(d))
    budget = math.inf if r >= 1.0 else r * c_tok / (1.0 - r) + 1e-9
    order = list(range(len(general)))
    rng.shuffle(order)
    keep: set[int] = set()
    g_tok = 0
    for i in order:
        n = n_tokens(general[i])
        if g_tok + n <= budget:
            keep.add(id(general[i]))
            g_tok += n
    out = [d for d in train if not is_general(d) or id(d) in keep]
    report = {
        "max_share": r,
        "unit": unit,
        "character_tokens": c_tok,
        "general_before_cap": len(general),
        "general": len(keep),
        "general_tokens": g_tok,
        "dropped_by_max_share": len(general) - len(keep),
        "share": g_tok / (c_tok + g_tok) if c_tok + g_tok else 0.0,
    }
    return out, report


def split_dialogues(
    dialogues: list[Dialogue],
    characters: dict[str, Character],
    split_params: dict[str, Any],
    exclude_characters: frozenset[str] | set[str] = frozenset(),
    mix_ratio: float = 1.0,
    n_tokens: Callable[[Dialogue], int] | None = None,
    token_unit: str = "chars",
) -> SplitResult:
    """Split dialogues into train / held-out dialogues / held-out characters (see the module docstring).

    Held-out dialogues of a seen character are drawn group by group (:func:`dialogue_groups`), in a
    seeded order per character: a group is taken when it does not overshoot the character's target
    ``max(1, round(share * n))`` (at most ``n - 1``) and leaves every character in it at least one
    training dialogue; when no group fits and nothing is held out yet, the smallest group that keeps
    that guarantee is taken. With singleton groups this is exactly the per-dialogue target.

    Args:
        dialogues: accepted dialogues.
        characters: persona cards (their ``language`` guides the held-out character choice).
        split_params: ``params['split']``: ``heldout_characters``, ``heldout_dialogue_share``, ``seed``,
            ``max_train_dialogues`` (0 = all), ``max_eval_dialogues`` (0 = all), ``shared_prefix_turns``
            (default 2).
        exclude_characters: character ids whose dialogues enter no split, counted in
            ``report["excluded"]`` (CharacterEval's characters when ``eval.suites`` has it: module docstring).
        mix_ratio: max share of synthetic dialogues in ``train`` (``synthesis.mix_ratio``; 1 = no cap),
            applied after ``max_train_dialogues``; :func:`cap_synthetic`, ``report["synthetic"]``.
        n_tokens, token_unit: size of a dialogue and its unit for :func:`cap_general`
            (``split_params["general_max_share"]``, default 0.5; ``report["general"]``); None =
            :func:`text_tokens` in ``chars``. General dialogues skip the held-out split and the caps above.

    Returns:
        :class:`SplitResult`; ``report["grouping"]`` counts groups, dialogues in multi-dialogue groups,
        groups spanning several characters and dialogues pulled to the held-out side with a held-out
        character.

    Raises:
        ConfigError: a share outside [0, 1), ``shared_prefix_turns < 1``.
    """
    excluded = [d for d in dialogues if d.character_id in exclude_characters]
    dialogues = [d for d in dialogues if d.character_id not in exclude_characters]
    position = {id(d): i for i, d in enumerate(dialogues)}  # input order, to merge general data back
    general: list[Dialogue] = []
    for d in dialogues:
        if is_general(d):
            general.append(d.model_copy(update={"split": "train"}))
            position[id(general[-1])] = position[id(d)]
    dialogues = [d for d in dialogues if not is_general(d)]
    seed = int(split_params.get("seed", 0))
    share = float(split_params.get("heldout_dialogue_share", 0.15))
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"split.heldout_dialogue_share must be in [0, 1), got {share}")
    group = dialogue_groups(dialogues, int(split_params.get("shared_prefix_turns", 2)))
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(group):
        members[g].append(i)
    by_char: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(dialogues):
        by_char[d.character_id].append(i)
    langs = {cid: c.language for cid, c in characters.items()}
    held_chars = choose_heldout_characters(
        {c: len(ix) for c, ix in by_char.items()}, langs, int(split_params.get("heldout_characters", 0)), seed
    )
    held_set = set(held_chars)
    label: list[str] = ["train"] * len(dialogues)
    pulled = 0
    for g in sorted({group[i] for c in held_chars for i in by_char[c]}):
        for i in members[g]:
            if dialogues[i].character_id in held_set:
                label[i] = "heldout_characters"
            else:
                label[i] = "heldout_dialogues"
                pulled += 1
    train_left = Counter(dialogues[i].character_id for i, s in enumerate(label) if s == "train")
    held_n = Counter(dialogues[i].character_id for i, s in enumerate(label) if s == "heldout_dialogues")
    short: dict[str, int] = {}

    def fits(g: int) -> bool:
        per = Counter(dialogues[i].character_id for i in members[g])
        return all(train_left[c] - k >= 1 for c, k in per.items())

    def take(g: int) -> None:
        for i in members[g]:
            label[i] = "heldout_dialogues"
            train_left[dialogues[i].character_id] -= 1
            held_n[dialogues[i].character_id] += 1

    for cid in sorted(by_char):
        ix = by_char[cid]
        if cid in held_set or len(ix) < 2 or share == 0.0:
            continue
        target = min(len(ix) - 1, max(1, round(share * len(ix))))
        cand = sorted({group[i] for i in ix})
        random.Random(f"{seed}:{cid}").shuffle(cand)
        for g in cand:
            need = target - held_n[cid]
            if need <= 0:
                break
            if label[members[g][0]] != "train":
                continue
            own = sum(1 for i in members[g] if dialogues[i].character_id == cid)
            if own <= need and fits(g):
                take(g)
        if held_n[cid] == 0:
            free = [g for g in cand if label[members[g][0]] == "train" and fits(g)]
            if free:
                take(min(free, key=lambda g: (len(members[g]), cand.index(g))))
        if held_n[cid] != target:
            short[cid] = held_n[cid] - target
    parts: dict[str, list[Dialogue]] = {s: [] for s in SPLITS}
    for d, s in zip(dialogues, label, strict=True):
        parts[s].append(d.model_copy(update={"split": s}))
        position[id(parts[s][-1])] = position[id(d)]
    before = {s: len(v) for s, v in parts.items()}
    before["train"] += len(general)
    rng = random.Random(seed)
    parts["train"] = _sample(parts["train"], int(split_params.get("max_train_dialogues", 0)), rng)
    parts["train"], synthetic_mix = cap_synthetic(parts["train"], mix_ratio, random.Random(f"{seed}:mix"))
    parts["train"], general_mix = cap_general(
        parts["train"] + general,
        float(split_params.get("general_max_share", 0.5)),
        random.Random(f"{seed}:general"),
        n_tokens or text_tokens,
        token_unit if n_tokens else "chars",
    )
    if general:
        parts["train"].sort(key=lambda d: position[id(d)])
    max_eval = int(split_params.get("max_eval_dialogues", 0))
    for s in ("heldout_dialogues", "heldout_characters"):
        parts[s] = _sample(parts[s], max_eval, rng)

    def per_char(ds: list[Dialogue]) -> dict[str, int]:
        return dict(sorted(Counter(d.character_id for d in ds).items()))

    sizes = Counter(group)
    report = {
        "in": len(dialogues) + len(general) + len(excluded),
        "excluded": {
            "characters": sorted({d.character_id for d in excluded}),
            "dialogues": len(excluded),
            "why": "eval suite characters (charactereval) never train" if excluded else "",
        },
        "seed": seed,
        "grouping": {
            "shared_prefix_turns": int(split_params.get("shared_prefix_turns", 2)),
            "groups": len(members),
            "multi_dialogue_groups": sum(1 for n in sizes.values() if n > 1),
            "dialogues_in_multi_dialogue_groups": sum(n for n in sizes.values() if n > 1),
            "largest_group": max(sizes.values(), default=0),
            "multi_character_groups": sum(
                1 for ix in members.values() if len({dialogues[i].character_id for i in ix}) > 1
            ),
            "pulled_with_heldout_characters": pulled,
            "heldout_dialogues_off_target": dict(sorted(short.items())),
        },
        "heldout_characters": [
            {
                "id": c,
                "name": characters[c].name if c in characters else c,
                "language": langs.get(c, ""),
                "dialogues": len(by_char[c]),
            }
            for c in held_chars
        ],
        "before_caps": before,
        "counts": {s: len(v) for s, v in parts.items()},
        "dropped_by_caps": {s: before[s] - len(parts[s]) for s in SPLITS},
        "languages": {s: dict(Counter(langs.get(d.character_id, "") for d in v)) for s, v in parts.items()},
        "per_character": {s: per_char(v) for s, v in parts.items()},
    }
    report["synthetic"] = synthetic_mix
    report["general"] = general_mix
    return SplitResult(
        train=parts["train"],
        heldout_dialogues=parts["heldout_dialogues"],
        heldout_characters=parts["heldout_characters"],
        heldout_character_ids=held_chars,
        report=report,
    )


def validated_tokens(features_csv: Path) -> dict[str, int]:
    """Dialogue id -> ``n_tokens`` (rendered dialogue, base-model tokens) from validate's ``features.csv``;
    empty when the file or the column is missing."""
    import csv

    if not Path(features_csv).is_file():
        return {}
    with open(features_csv, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f)
        if not rows.fieldnames or not {"dialogue_id", "n_tokens"} <= set(rows.fieldnames):
            return {}
        return {r["dialogue_id"]: int(float(r["n_tokens"] or 0)) for r in rows}


def split_dir(params: dict[str, Any]) -> SplitResult:
    """The ``troupe data split`` step: ``paths.validated`` -> ``paths.splits`` (files in the module docstring).

    Raises:
        ContractError: missing / malformed validated files.
        ConfigError: missing ``split`` section or paths.
    """
    src, out = path_of(params, "validated"), path_of(params, "splits")
    characters = load_characters(src / "characters.jsonl")
    dialogues = read_jsonl(src / "dialogues.jsonl", Dialogue)
    suites = (params.get("eval") or {}).get("suites") or []
    exclude = charactereval_characters(dialogues) if "charactereval" in suites else set()
    mix = float((params.get("synthesis") or {}).get("mix_ratio", 1.0))
    sizes = validated_tokens(src / "features.csv")
    have = all(d.id in sizes for d in dialogues if is_general(d)) and bool(sizes)
    res = split_dialogues(
        dialogues,
        characters,
        section(params, "split"),
        exclude,
        mix_ratio=mix,
        n_tokens=(lambda d: sizes.get(d.id, text_tokens(d))) if have else None,
        token_unit="tokens" if have else "chars",
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for s in SPLITS:
        write_jsonl(out / f"{s}.jsonl", getattr(res, s))
    write_jsonl(out / "characters.jsonl", characters.values())
    (out / "split_report.json").write_text(
        json.dumps(res.report, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    return res
