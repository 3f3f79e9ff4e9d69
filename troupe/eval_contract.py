"""The evaluation result: what ``troupe evaluate`` writes and the gate, the report and MLflow read.

One typed owner for the files in ``paths.eval`` (both sides import this module):

* ``metrics.json``  ``{model: {split: {metric: Estimate}}}`` (:class:`troupe.stats.Estimate` dicts:
  value, n, lo, hi, confidence, method, k).
* ``eval_set.json`` ``{split: {"sha256": ..., "dialogues": int, "items": int}}``: the identity of the
  items evaluated, so a champion's scores are only ever compared with a candidate's on the same set.
  ``"champion_version"`` (top level, optional) names the registry version evaluated as ``champion``.
* ``samples.jsonl`` one line per generated reply: ``model``, ``split``, ``character_id``,
  ``dialogue_id``, ``turn``, ``context``, ``reply``, ``reference``, ``finished`` and ``scores``
  (``{metric: 0 | 1 | float | null}``; null = the metric does not apply to this reply, e.g. markup
  validity of a reply without tags). :func:`item_key` pairs the same item across models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from troupe.stats import Estimate

METRICS_FILE, EVAL_SET_FILE, SAMPLES_FILE = "metrics.json", "eval_set.json", "samples.jsonl"
#: the model name under which ``troupe evaluate`` scores the registry's current champion
CHAMPION_MODEL = "champion"

ItemKey = tuple[str, str, int]


def item_key(sample: dict[str, Any]) -> ItemKey:
    """``(split, dialogue_id, turn)``: the same evaluation item across models and runs."""
    return (str(sample["split"]), str(sample["dialogue_id"]), int(sample["turn"]))


def eval_set_hash(items: Iterable[tuple[str, int, list[dict[str, Any]], str]]) -> str:
    """sha256 over the sorted ``(dialogue_id, turn, context messages, reference)`` items of one split:
    equal hashes mean the same prompts and references, in any order."""
    rows = sorted(
        json.dumps([d, t, ctx, ref], ensure_ascii=False, sort_keys=True) for d, t, ctx, ref in items
    )
    h = hashlib.sha256()
    for r in rows:
        h.update(r.encode("utf-8") + b"\n")
    return h.hexdigest()


@dataclass
class EvalResult:
    """The contents of one ``paths.eval`` directory.

    Attributes:
        metrics: model -> split -> metric -> estimate.
        eval_set: split -> ``{"sha256", "dialogues", "items"}``; may hold ``champion_version``.
        samples: the ``samples.jsonl`` rows.
    """

    metrics: dict[str, dict[str, dict[str, Estimate]]]
    eval_set: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def write(self, out: Path) -> list[Path]:
        """Write the three files into ``out``; returns their paths."""
        out.mkdir(parents=True, exist_ok=True)
        m = {
            model: {split: {k: e.to_dict() for k, e in ms.items()} for split, ms in splits.items()}
            for model, splits in self.metrics.items()
        }
        paths = [out / METRICS_FILE, out / EVAL_SET_FILE, out / SAMPLES_FILE]
        paths[0].write_text(json.dumps(m, indent=2, ensure_ascii=False), encoding="utf-8")
        paths[1].write_text(json.dumps(self.eval_set, indent=2), encoding="utf-8")
        with paths[2].open("w", encoding="utf-8") as f:
            for s in self.samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        return paths

    @classmethod
    def read(cls, d: Path, with_samples: bool = True) -> EvalResult:
        """Read a ``paths.eval`` directory.

        Raises:
            FileNotFoundError: ``metrics.json`` missing.
            ValueError: a metric is not an estimate (names model, split and metric).
        """
        raw = json.loads((d / METRICS_FILE).read_text(encoding="utf-8"))
        metrics: dict[str, dict[str, dict[str, Estimate]]] = {}
        for model, splits in raw.items():
            for split, ms in splits.items():
                for k, v in ms.items():
                    try:
                        metrics.setdefault(model, {}).setdefault(split, {})[k] = Estimate.from_dict(v)
                    except ValueError as e:
                        raise ValueError(f"{d / METRICS_FILE}: {model}.{split}.{k}: {e}") from e
        es = d / EVAL_SET_FILE
        eval_set = json.loads(es.read_text(encoding="utf-8")) if es.is_file() else {}
        samples = []
        sp = d / SAMPLES_FILE
        if with_samples and sp.is_file():
            samples = [
                json.loads(line) for line in sp.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
        return cls(metrics, eval_set, samples)

    def scores(self, model: str, metric: str) -> dict[ItemKey, float]:
        """Per-item scores of ``model`` on ``metric`` (items where it does not apply are left out)."""
        out = {}
        for s in self.samples:
            if s.get("model") == model:
                v = (s.get("scores") or {}).get(metric)
                if v is not None:
                    out[item_key(s)] = float(v)
        return out

    def values(self, model: str) -> dict[str, dict[str, float]]:
        """``{split: {metric: point value}}`` of one model (for tags and tables)."""
        return {
            split: {k: e.value for k, e in ms.items()} for split, ms in self.metrics.get(model, {}).items()
        }
