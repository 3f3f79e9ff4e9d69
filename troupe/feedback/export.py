"""``troupe feedback export``: people's side-by-side labels -> DPO pairs, judge calibration labels and
inter-annotator agreement.

Per item (all its labels, choices mapped back to the item's own sides):

1. fewer than ``feedback.min_labels_per_item`` labels -> ``pending`` (not exported yet);
2. the plurality choice; a tie between choices -> ``no_majority``;
3. plurality ``tie`` or ``both_bad`` -> ``no_preference`` (DPO needs a better reply);
4. the preferred reply is *chosen*, the other *rejected*, unless
   - an annotator ticked a broken basic rule on the chosen reply -> dropped ``chosen_rule_ticked``
     (a person saw it break a rule: DPO must not learn it as the better reply), or
   - :func:`troupe.checks.check_reply` finds a violation in it -> dropped ``chosen_fails_checks``
     (the same automatic rules the generated pairs are held to);
   dropped items go to ``quarantine.jsonl`` (:class:`~troupe.contract.QuarantineRecord`) with the reason.

Counts (``export_report.json``): per outcome in items and in labels (every label counts towards its
item's outcome), and both add up: ``items == sum(outcome_items.values())``,
``labels == sum(outcome_labels.values())``; ``pairs == outcome_items["pair"]``.

Files written into the output directory (``feedback.export_dir``):

* ``pairs.jsonl``      :class:`~troupe.contract.PreferencePair` (``id`` = ``human:<item id>``); set
  ``feedback.pairs`` to this file and ``troupe train dpo`` trains on them with the generated pairs;
* ``quarantine.jsonl`` the dropped items with their labels and reason;
* ``labels.jsonl``     one :class:`~troupe.dialogue.contract.HumanLabel` per label, sides as shown
  (the judge calibration's ground truth);
* ``agreement.json``   chance-corrected agreement on the choice over items with >= 2 labels:
  Cohen's kappa (Cohen 1960; :func:`sklearn.metrics.cohen_kappa_score`) when exactly two people
  labelled, else Fleiss' kappa (Fleiss 1971, :func:`fleiss_kappa`), with n (items) and a 95 %
  percentile-bootstrap interval over items (:func:`troupe.stats.cluster_bootstrap`);
* ``export_report.json`` the counts above.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from troupe.checks import check_reply, last_user_text
from troupe.contract import PreferencePair, QuarantineRecord, write_jsonl
from troupe.dialogue.contract import BASIC_RULES, HumanLabel
from troupe.feedback.store import CHOICES, LabelRow, Store
from troupe.stats import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, Estimate, cluster_bootstrap, empty

OUTCOMES = ("pair", "chosen_rule_ticked", "chosen_fails_checks", "no_preference", "no_majority", "pending")
DROPPED = ("chosen_rule_ticked", "chosen_fails_checks")
_RULE_EN = {r.id: r.en for r in BASIC_RULES}


# ------------------------------------------------------------------------------------------ agreement


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two raters' labels on the same items (sklearn's ``cohen_kappa_score``).

    When both raters used one and the same category throughout, chance agreement is 1 and kappa is
    undefined; it is reported as 1.0 (perfect agreement), so bootstrap resamples stay numeric.
    """
    from sklearn.metrics import cohen_kappa_score

    if len(set(a) | set(b)) == 1:
        return 1.0
    return float(cohen_kappa_score(list(a), list(b), labels=list(CHOICES)))


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa (Fleiss 1971, "Measuring nominal scale agreement among many raters",
    Psychological Bulletin 76(5)) of an items x categories table of rating counts.

    ``P_i = (sum_j n_ij^2 - n_i) / (n_i (n_i - 1))``, ``p_j = sum_i n_ij / sum_i n_i``,
    ``kappa = (mean P_i - sum p_j^2) / (1 - sum p_j^2)``; with every ``n_i`` equal this is Fleiss'
    formula, with unequal ``n_i`` (>= 2) each item's agreement uses its own rater count. All ratings
    in one category (chance agreement 1) gives 1.0.

    Raises:
        ValueError: an item with fewer than 2 ratings, or an empty table.
    """
    rows = [list(map(int, r)) for r in table]
    if not rows:
        raise ValueError("fleiss_kappa: empty table")
    totals = [sum(r) for r in rows]
    if min(totals) < 2:
        raise ValueError("fleiss_kappa: every item needs >= 2 ratings")
    p_bar = sum((sum(x * x for x in r) - n) / (n * (n - 1)) for r, n in zip(rows, totals, strict=True)) / len(
        rows
    )
    grand = sum(totals)
    p_e = sum((sum(r[j] for r in rows) / grand) ** 2 for j in range(len(rows[0])))
    if math.isclose(p_e, 1.0):
        return 1.0
    return (p_bar - p_e) / (1 - p_e)


def agreement(
    rows: list[LabelRow],
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Agreement on the (canonical) choice over items with >= 2 labels (module docstring).

    Returns:
        ``{"method": "cohen" | "fleiss" | "none", "kappa": Estimate dict (value, n = items, lo, hi,
        confidence, method "bootstrap"), "items", "labels", "annotators", "raw_agreement"}``;
        ``"none"`` with n = 0 when no item has 2+ labels; one such item gives the value without an
        interval (nothing to resample).
    """
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    for r in rows:
        by_item[r.item.id][r.annotator] = r.canonical_choice()
    multi = {i: v for i, v in by_item.items() if len(v) >= 2}
    people = sorted({a for v in multi.values() for a in v})
    out: dict[str, Any] = {
        "items": len(multi),
        "labels": sum(len(v) for v in multi.values()),
        "annotators": people,
        "categories": list(CHOICES),
    }
    if not multi:
        return {**out, "method": "none", "kappa": empty(confidence).to_dict(), "raw_agreement": None}
    if len(people) == 2:
        x, y = people

        def stat(items: list[dict[str, str]]) -> float:
            return cohen_kappa([v[x] for v in items], [v[y] for v in items])

        method = "cohen"
    else:

        def stat(items: list[dict[str, str]]) -> float:
            return fleiss_kappa([[Counter(v.values())[c] for c in CHOICES] for v in items])

        method = "fleiss"
    est: Estimate = cluster_bootstrap({i: [v] for i, v in multi.items()}, stat, confidence, resamples, seed)
    raw = sum(len(set(v.values())) == 1 for v in multi.values()) / len(multi)
    return {**out, "method": method, "kappa": est.to_dict(), "raw_agreement": raw}


# ------------------------------------------------------------------------------------------ export


def human_label(r: LabelRow) -> HumanLabel:
    """The :class:`HumanLabel` of one stored label, sides as shown (model names mapped likewise)."""
    it = r.item
    a, b = (it.reply_b, it.reply_a) if r.swapped else (it.reply_a, it.reply_b)
    ma, mb = (it.model_b, it.model_a) if r.swapped else (it.model_a, it.model_b)
    return HumanLabel(
        item_id=it.id,
        annotator=r.annotator,
        character_id=it.character_id,
        context=it.context,
        reply_a=a,
        reply_b=b,
        model_a=ma,
        model_b=mb,
        choice=r.choice_shown,
        broken_rules={k: v for k, v in r.broken_shown.items() if v},
        dimensions={k: v for k, v in r.dims_shown.items() if v},
        created_at=r.created_at,
    )


def decide(labels: list[LabelRow], min_labels: int) -> tuple[str, PreferencePair | None, str]:
    """Outcome of one item's labels (module docstring, steps 1-4): ``(outcome, pair or None, reason)``."""
    it = labels[0].item
    if len(labels) < min_labels:
        return "pending", None, f"{len(labels)} < {min_labels} labels"
    votes = Counter(r.canonical_choice() for r in labels)
    ranked = votes.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return "no_majority", None, f"votes {dict(votes)}"
    top = ranked[0][0]
    if top not in ("a", "b"):
        return "no_preference", None, f"majority {top}"
    other = "b" if top == "a" else "a"
    chosen, rejected = (it.reply_a, it.reply_b) if top == "a" else (it.reply_b, it.reply_a)
    ticked = sorted({rule for r in labels for rule in r.canonical_broken()[top]})
    if ticked:
        texts = "; ".join(f"{k} ({_RULE_EN[k]})" for k in ticked)
        return "chosen_rule_ticked", None, f"chosen_rule_ticked: {texts}"
    check = check_reply(
        chosen, character_name=it.character_name, language=it.language, user_text=last_user_text(it.context)
    )
    if check.violations:
        return "chosen_fails_checks", None, "chosen_fails_checks: " + "; ".join(check.violations)
    pair = PreferencePair(
        id=f"human:{it.id}",
        character_id=it.character_id,
        messages=it.context,
        chosen=chosen,
        rejected=rejected,
        meta={
            "source": "human",
            "item_source": it.source,
            "source_ref": it.source_ref,
            "votes": dict(votes),
            "labels": len(labels),
            "chosen_model": it.model_a if top == "a" else it.model_b,
            "rejected_model": it.model_a if other == "a" else it.model_b,
            "rejected_rules_ticked": sorted({x for r in labels for x in r.canonical_broken()[other]}),
        },
    )
    return "pair", pair, ""


def export(
    store: Store,
    out: Path,
    min_labels: int = 1,
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the five files of the module docstring into ``out``; returns the report.

    Raises:
        RuntimeError: the counts do not add up (a bug, never silently written).
    """
    rows = store.labels()
    groups: dict[str, list[LabelRow]] = defaultdict(list)
    for r in rows:
        groups[r.item.id].append(r)
    pairs: list[PreferencePair] = []
    quarantine: list[QuarantineRecord] = []
    items_by: Counter[str] = Counter({k: 0 for k in OUTCOMES})
    labels_by: Counter[str] = Counter({k: 0 for k in OUTCOMES})
    for iid, labels in groups.items():
        outcome, pair, reason = decide(labels, min_labels)
        items_by[outcome] += 1
        labels_by[outcome] += len(labels)
        if pair is not None:
            pairs.append(pair)
        if outcome in DROPPED:
            quarantine.append(
                QuarantineRecord(
                    file=store.safe_url(),
                    stage="feedback_export",
                    reason=reason,
                    record_id=iid,
                    raw={"labels": [human_label(r).model_dump(mode="json") for r in labels]},
                )
            )
    report = {
        "labels": len(rows),
        "items": len(groups),
        "pairs": len(pairs),
        "min_labels_per_item": min_labels,
        "outcome_items": dict(items_by),
        "outcome_labels": dict(labels_by),
        "dropped": {k: items_by[k] for k in DROPPED},
    }
    if sum(items_by.values()) != len(groups) or sum(labels_by.values()) != len(rows):
        raise RuntimeError(f"feedback export counts do not add up: {report}")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "quarantine.jsonl", quarantine)
    write_jsonl(out / "labels.jsonl", [human_label(r) for r in rows])
    agree = agreement(rows, confidence, resamples, seed)
    (out / "agreement.json").write_text(json.dumps(agree, indent=2, ensure_ascii=False), encoding="utf-8")
    report["agreement"] = {"method": agree["method"], "kappa": agree["kappa"]}
    (out / "export_report.json").write_text(
        json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    return report
