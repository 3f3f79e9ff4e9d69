"""``troupe data synthesize``: the dialogue engine writes a ``synthetic`` import source.

Reads ``synthesis.*`` (scenario file, counts, seed, concurrency), the agents ``agents.user``,
``agents.character`` and ``agents.host``, and the characters from ``synthesis.characters`` (empty =
``paths.catalogue``; a path or an ``s3://`` URI), and writes under ``paths.synthetic``:

* ``conversations.jsonl`` / ``failed.jsonl`` / ``summary.json`` (:func:`troupe.dialogue.engine.run_conversations`;
  a re-run skips the scenarios already finished and retries the failed ones);
* ``characters.jsonl``: the persona cards the conversations were played with (merged with the cards of
  earlier runs, current cards first), so the directory is a self-contained import source
  (``{kind: synthetic, path: work/synthetic}``, :mod:`troupe.data.importers`).

With ``synthesis.enabled: false`` (the default) it calls nothing and writes empty files and a summary
``{"status": "disabled"}``, so the dvc stage graph stays valid offline. When enabled, ``troupe data
import`` adds this directory to the selected source set (:func:`troupe.data.importers.synthetic_source`)
and ``troupe data split`` caps the synthetic share of the training split at ``synthesis.mix_ratio``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from troupe.config import path_of, section
from troupe.contract import Character

#: Files a synthesis directory holds.
FILES = ("conversations.jsonl", "failed.jsonl", "characters.jsonl", "summary.json")


def _write_cards(path: Path, used: dict[str, Character]) -> None:
    """``characters.jsonl`` = the cards used now + the cards of earlier runs not redefined now."""
    old: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                old.setdefault(json.loads(line)["id"], line)
    lines = [c.model_dump_json(exclude_none=True) for c in used.values()]
    lines += [line for cid, line in old.items() if cid not in used]
    path.write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")


def synthesize(params: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """The ``troupe data synthesize`` step (files and rules in the module docstring).

    Args:
        params: resolved params (:func:`troupe.config.load_params`).
        progress: show the engine's tqdm bar.

    Returns:
        The summary written to ``summary.json``: ``status`` (``disabled`` | ``enabled``) and, when
        enabled, the engine's counts / usage / cost (:func:`troupe.dialogue.engine.run_conversations`)
        plus ``scenario_file`` ({source, sha256, variables}) and ``characters`` ({source, version, count}).

    Raises:
        ConfigError: an agent not configured, a bad scenario file, a scenario for an unknown character.
        ContractError: a bad characters file.
    """
    syn = section(params, "synthesis")
    out = path_of(params, "synthetic")
    out.mkdir(parents=True, exist_ok=True)
    if not syn.get("enabled"):
        for name in FILES[:3]:
            (out / name).write_text("", encoding="utf-8")
        summary: dict[str, Any] = {"status": "disabled", "scenarios": 0, "finished": 0, "failed": 0, "skipped": 0,
                                   "note": "synthesis.enabled is false: nothing synthesised"}  # fmt: skip
        (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return summary

    from troupe.characters.catalogue import load_catalogue
    from troupe.dialogue.client import agent_clients
    from troupe.dialogue.engine import ENGINE_ROLES, run
    from troupe.dialogue.scenarios import describe, load_spec, sample_scenarios

    location = syn.get("characters") or str(section(params, "paths")["catalogue"])
    catalogue = load_catalogue(location)  # a characters.jsonl or the catalogue: the same record format
    characters = catalogue.characters
    spec = load_spec(syn["scenarios"])
    scenarios = sample_scenarios(
        spec,
        characters,
        int(syn["conversations"]),
        seed=int(syn["seed"]),
        max_turns=int(syn["max_turns"]),
        probe_share=float(syn["probe_share"]),
    )
    agents = agent_clients(params, ENGINE_ROLES)
    used = {s.character_id: characters[s.character_id] for s in scenarios}
    _write_cards(out / "characters.jsonl", used)
    summary = run(scenarios, characters, agents, out, concurrency=int(syn["concurrency"]), progress=progress)
    summary = {
        "status": "enabled",
        **summary,
        "scenario_file": describe(spec),
        "characters": {
            "source": location,
            "version": catalogue.version,
            "count": len(characters),
            "played": len(used),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2), encoding="utf-8")
    return summary
