"""Seed variables -> seeded scenarios: what the dialogue engine plays (synthesis and self-play).

A scenario file (``configs/scenarios.yaml``, :func:`load_spec`) lists the seeds' generation variables
(DOMAIN.md "Data": character x personality (29) x profession (15) x user persona x scene x topic),
each with bilingual values (who is told which variable is the engine's business: the scene goes to
both sides, the rest describes the user), plus scripted probe lines per kind (:data:`troupe.dialogue.contract.PROBE_KINDS`) and character language.

:func:`sample_scenarios` draws ``n`` :class:`~troupe.dialogue.contract.Scenario` deterministically:

* characters round-robin over a seeded permutation of the character ids (each gets ``n/len`` +- 1);
* each variable's value from a per-scenario RNG seeded by (file hash, seed, index), in the
  character's language (``zh`` for Chinese characters, ``en`` for every other language);
* one probe for ``probe_share`` of the scenarios, spread evenly (scenario ``i`` has one when
  ``floor((i+1)*share) > floor(i*share)``), kinds cycling through a seeded order of the five kinds,
  at a random user turn (``1..max_turns-1``, so the user has said something first; 0 when
  ``max_turns == 1``);
* ``id`` = ``sc-`` + sha1 of (file content hash, seed, index, character id)[:12], so the first ``k``
  scenarios of a larger ``n`` are the same scenarios (a re-run or a bigger run finds them).
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from troupe.config import ConfigError, repo_path
from troupe.contract import Character
from troupe.dialogue.contract import PROBE_KINDS, Probe, Scenario

#: Variables the engine's prompts know (troupe.dialogue.engine); a scenario file may use a subset.
VARIABLES: tuple[str, ...] = ("personality", "profession", "user_persona", "scene", "topic")
#: Languages a scenario file writes values in; characters of other languages use ``en``.
LANGUAGES: tuple[str, ...] = ("zh", "en")


def text_language(language: str) -> str:
    """The scenario-file language used for a character language (``zh`` -> ``zh``, anything else -> ``en``)."""
    return "zh" if language.split("-")[0].lower() == "zh" else "en"


class Bilingual(BaseModel):
    """One text in both scenario languages."""

    model_config = ConfigDict(extra="forbid")

    zh: str = Field(min_length=1)
    en: str = Field(min_length=1)

    def get(self, language: str) -> str:
        """The text for a character language (:func:`text_language`)."""
        return getattr(self, text_language(language))


class ScenarioSpec(BaseModel):
    """A parsed scenario file; ``content_hash`` (sha256 of its bytes) makes scenario ids stable."""

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    variables: dict[str, list[Bilingual]]
    probes: dict[str, dict[str, list[str]]] = Field(default_factory=dict)
    source: str = ""
    content_hash: str = ""

    @field_validator("variables")
    @classmethod
    def _known_variables(cls, v: dict[str, list[Bilingual]]) -> dict[str, list[Bilingual]]:
        bad = sorted(set(v) - set(VARIABLES))
        if bad:
            raise ValueError(f"unknown variable(s) {bad}; known: {list(VARIABLES)}")
        empty = sorted(k for k, vals in v.items() if not vals)
        if empty:
            raise ValueError(f"variable(s) {empty} have no values")
        return v

    @field_validator("probes")
    @classmethod
    def _known_probes(cls, v: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, list[str]]]:
        bad = sorted(set(v) - set(PROBE_KINDS))
        if bad:
            raise ValueError(f"unknown probe kind(s) {bad}; known: {list(PROBE_KINDS)}")
        for kind, by_lang in v.items():
            langs = sorted(set(by_lang) - set(LANGUAGES))
            if langs:
                raise ValueError(f"probes.{kind}: unknown language(s) {langs}; known: {list(LANGUAGES)}")
            if "en" not in by_lang or not all(t.strip() for t in by_lang["en"]) or not by_lang["en"]:
                raise ValueError(f"probes.{kind}: needs non-empty `en` texts (the fallback language)")
        return v

    def probe_texts(self, kind: str, language: str) -> list[str]:
        """Probe lines of ``kind`` for a character language (falls back to ``en``)."""
        by_lang = self.probes.get(kind, {})
        return by_lang.get(text_language(language)) or by_lang.get("en", [])


def load_spec(path: str | Path) -> ScenarioSpec:
    """Read and check a scenario file (YAML; layout in ``configs/scenarios.yaml``).

    Args:
        path: the file; a relative path resolves from the working directory, else the repository root.

    Returns:
        The :class:`ScenarioSpec` with ``source`` (the path) and ``content_hash`` (sha256 hex of the bytes).

    Raises:
        ConfigError: missing file, invalid YAML, or content that does not validate: unknown top-level
            keys, unknown variables, unknown keys of a variable, unknown probe kinds or languages,
            empty values; the message names the file and every offending key path.
    """
    p = repo_path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: scenario file not found (synthesis.scenarios)")
    raw_bytes = p.read_bytes()
    try:
        raw = yaml.safe_load(raw_bytes.decode("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping with `variables` and `probes`")
    bad_top = sorted(set(raw) - {"version", "variables", "probes"})
    if bad_top:
        raise ConfigError(f"{p}: unknown key(s) {bad_top}; allowed: version, variables, probes")
    try:
        spec = ScenarioSpec.model_validate(raw)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        raise ConfigError(f"{p}: " + "; ".join(parts)) from None
    return spec.model_copy(update={"source": str(p), "content_hash": hashlib.sha256(raw_bytes).hexdigest()})


def scenario_id(content_hash: str, seed: int, index: int, character_id: str) -> str:
    """Stable scenario id: ``sc-`` + sha1 of (scenario file hash, seed, index, character id)[:12]."""
    key = f"{content_hash}\0{seed}\0{index}\0{character_id}"
    return "sc-" + hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]


def sample_scenarios(
    spec: ScenarioSpec,
    characters: dict[str, Character] | list[Character],
    n: int,
    seed: int = 0,
    max_turns: int = 6,
    probe_share: float = 0.5,
) -> list[Scenario]:
    """Draw ``n`` scenarios (the rules are in the module docstring).

    Args:
        spec: the scenario file (:func:`load_spec`).
        characters: persona cards (``{id: card}`` or a list); each scenario names one by id.
        n: number of scenarios (>= 0).
        seed: sampling seed; the same (file, characters, n, seed) gives the same scenarios.
        max_turns: character turns per conversation at most (>= 1).
        probe_share: share of scenarios with one scripted probe, in [0, 1].

    Returns:
        ``n`` :class:`Scenario` in index order; ``variables`` maps each variable name to its value in
        the character's language.

    Raises:
        ConfigError: no characters, ``n < 0``, ``max_turns < 1``, ``probe_share`` outside [0, 1], or a
            probe share > 0 with no probe texts in the file.
    """
    chars = list(characters.values()) if isinstance(characters, dict) else list(characters)
    if not chars:
        raise ConfigError("sample_scenarios: no characters to play (synthesis.characters / paths.catalogue)")
    if n < 0 or max_turns < 1 or not 0.0 <= probe_share <= 1.0:
        raise ConfigError(
            f"sample_scenarios: need n >= 0, max_turns >= 1, 0 <= probe_share <= 1 (got {n}, {max_turns}, "
            f"{probe_share})"
        )
    kinds = [k for k in PROBE_KINDS if spec.probes.get(k)]
    if probe_share > 0 and not kinds:
        raise ConfigError(f"{spec.source}: probe_share={probe_share} but the file defines no probes")
    by_id = {c.id: c for c in chars}
    order = sorted(by_id)
    top = random.Random(f"{spec.content_hash}:{seed}")
    top.shuffle(order)
    top.shuffle(kinds)
    out: list[Scenario] = []
    probes_so_far = 0
    for i in range(n):
        char = by_id[order[i % len(order)]]
        rng = random.Random(f"{spec.content_hash}:{seed}:{i}")
        variables = {name: rng.choice(values).get(char.language) for name, values in spec.variables.items()}
        probes: list[Probe] = []
        if math.floor((i + 1) * probe_share) > math.floor(i * probe_share):
            kind = kinds[probes_so_far % len(kinds)]
            probes_so_far += 1
            turn = rng.randrange(1, max_turns) if max_turns > 1 else 0
            probes.append(Probe(turn=turn, kind=kind, text=rng.choice(spec.probe_texts(kind, char.language))))
        out.append(
            Scenario(
                id=scenario_id(spec.content_hash, seed, i, char.id),
                seed=seed,
                character_id=char.id,
                language=char.language,
                variables=variables,
                max_turns=max_turns,
                probes=probes,
            )
        )
    return out


def describe(spec: ScenarioSpec) -> dict[str, Any]:
    """Provenance entry of a scenario file: ``{source, sha256, variables: {name: number of values}}``."""
    return {
        "source": spec.source,
        "sha256": spec.content_hash,
        "variables": {k: len(v) for k, v in spec.variables.items()},
    }
