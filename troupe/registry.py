"""MLflow model registry: register the candidate, gate it, move aliases.

* ``troupe registry register`` creates a registered model version of the candidate
  (``paths.dpo_model`` by default) in a child run ``register``: a model given by URI
  (``s3://bucket/run/dpo``, written by training) is registered from that URI as it is (no second
  copy); a local directory (``dvc repro``) is logged as the run's ``model`` artifacts first. The
  characters the model was trained and evaluated with (``paths.splits/characters.jsonl``) travel
  with the version: logged as the run's ``characters.jsonl`` artifact and named by the version tags
  ``troupe.characters_uri`` / ``troupe.characters_sha256`` (:mod:`serving.contract`), and the
  character catalogue by ``troupe.catalogue_version`` / ``troupe.catalogue_uri``: the catalogue
  ``troupe characters build`` wrote (``work/catalogue/characters.jsonl``) when there is one, else the
  logged characters file itself (:func:`troupe.characters.catalogue.catalogue_version`). The gate
  (:func:`gate`) decides on evidence from the :class:`troupe.eval_contract.EvalResult` in
  ``paths.eval``: thresholds apply to interval bounds, a split with fewer than the policy's ``min_n``
  replies is "insufficient evidence", and regression against the ``champion`` alias is a paired
  difference on the same eval set (the champion scored in the same evaluation, else its stored
  per-item scores when its eval-set hash matches). Outcome ``pass``: alias ``challenger``; ``fail``: no
  alias; ``insufficient``: no alias, tag ``troupe.gate=insufficient``, exit status 3. The version
  carries its evidence (tags ``troupe.metrics``, ``troupe.eval_set``, ``troupe.scores_uri``); the
  decision is ``paths.registry`` ``decision.json`` (the verdicts) and ``gate.md``.
* ``troupe registry promote`` moves ``champion`` (default: to the current ``challenger``).
* :func:`resolve_model_dir` turns ``models:/name@alias`` / ``models:/name/<n>`` (or a local dir) into
  a local checkpoint dir, downloading from the version's source (``s3://`` or MLflow artifacts);
  :func:`characters_file` downloads only a version's characters.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from serving import contract
from troupe.cli import step_options
from troupe.config import ConfigError, path_of, repo_path, section
from troupe.eval_contract import (
    CHAMPION_MODEL,
    EVAL_SET_FILE,
    METRICS_FILE,
    SAMPLES_FILE,
    EvalResult,
    ItemKey,
    item_key,
)
from troupe.stats import (
    DEFAULT_CONFIDENCE,
    FAIL,
    INSUFFICIENT,
    PASS,
    Estimate,
    Verdict,
    combine,
    empty,
    paired_difference,
    replies_needed,
    wilson,
)

CHALLENGER, CHAMPION = "challenger", "champion"
_MODEL_KEY = {"base": "base_model", "sft": "sft_model", "dpo": "dpo_model", "quantized": "quantized_model"}
#: version tags of a quantised candidate (troupe model quantize): scheme, parent version / model, calibration
QUANTIZATION_TAG, PARENT_VERSION_TAG, PARENT_MODEL_TAG = (
    "troupe.quantization",
    "troupe.parent_version",
    "troupe.parent_model",
)


#: ``troupe registry register`` exit status when the gate lacks evidence (pass and a decided fail exit 0)
INSUFFICIENT_EXIT = 3
#: version tags written on register
METRICS_TAG, EVAL_SET_TAG, SCORES_URI_TAG, GATE_TAG = (
    "troupe.metrics",
    "troupe.eval_set",
    "troupe.scores_uri",
    "troupe.gate",
)
SCORES_FILE = "scores.jsonl"
_GATE_TAG_VALUE = {PASS: "passed", FAIL: "failed", INSUFFICIENT: "insufficient"}
#: lower-is-better metrics the evaluator may emit beyond troupe.evaluate.LOWER_IS_BETTER (used only
#: for a ``no_regression.metrics`` list entry whose direction the policy does not state)
_LOWER_EXTRA = frozenset({"in_reply_repetition", "truncated", "empty_reply", "perplexity"})
_DIRECTIONS = ("higher", "lower")


def load_policy(path: str | Path) -> dict[str, Any]:
    """Read and check a gate policy YAML (see configs/gate_policy.yaml).

    Returns the policy with defaults filled in: ``candidate`` (dpo), ``confidence`` (0.95), ``min_n``
    (0), ``no_regression.margin`` (0.0; ``max_regression`` is read as its old name) and
    ``no_regression.metrics`` as ``{split.metric: "higher" | "lower"}``.

    Raises:
        ConfigError: missing file, or a field that does not parse (names the file and the field).
    """
    p = repo_path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: gate policy not found (registry.gate_policy)")
    pol = yaml.safe_load(p.read_text()) or {}
    if not isinstance(pol, dict):
        raise ConfigError(f"{p}: a gate policy is a mapping")
    pol.setdefault("candidate", "dpo")
    conf = pol.setdefault("confidence", DEFAULT_CONFIDENCE)
    if not isinstance(conf, int | float) or not 0 < conf < 1:
        raise ConfigError(f"{p}: confidence: expected a number in (0, 1), got {conf!r}")
    min_n = pol.setdefault("min_n", 0)
    if not isinstance(min_n, int) or isinstance(min_n, bool) or min_n < 0:
        raise ConfigError(f"{p}: min_n: expected an integer >= 0, got {min_n!r}")
    for key, rule in (pol.get("absolute") or {}).items():
        if (
            not isinstance(rule, dict)
            or not rule
            or not set(rule) <= {"min", "max", "min_n"}
            or not {"min", "max"} & set(rule)
            or any(not isinstance(rule[b], int | float) for b in rule)
            or len(str(key).split(".")) != 2
        ):
            raise ConfigError(
                f"{p}: absolute.{key}: expected split.metric: {{min: x}} and/or {{max: y}} (optional min_n)"
            )
    nr = pol.get("no_regression") or {}
    margin = nr.get("margin", nr.get("max_regression", 0.0))
    if not isinstance(margin, int | float) or margin < 0:
        raise ConfigError(f"{p}: no_regression.margin: expected a number >= 0, got {margin!r}")
    metrics = nr.get("metrics") or {}
    if isinstance(metrics, list):  # direction from the absolute rule on the same key, else the lists
        metrics = {k: _direction(k, pol) for k in metrics}
    if not isinstance(metrics, dict) or any(d not in _DIRECTIONS for d in metrics.values()):
        raise ConfigError(f"{p}: no_regression.metrics: expected {{split.metric: higher|lower}}")
    pol["no_regression"] = {"margin": float(margin), "metrics": metrics}
    if "selfplay" in pol:
        pol["selfplay"] = _selfplay_policy(pol.get("selfplay") or {}, p)
    return pol


def _selfplay_policy(sec: Any, p: Path) -> dict[str, Any]:
    """The policy's ``selfplay`` section with defaults: ``required`` (False), ``min_n`` (0, paired
    scenarios), ``margin`` (0.0) and ``metrics`` as ``{metric: {direction, margin, min_n}}`` (a metric
    may be given as just its direction; a margin or min_n it does not set is None: the section's)."""
    if not isinstance(sec, dict):
        raise ConfigError(f"{p}: selfplay: expected a mapping (required, min_n, margin, metrics)")
    required, min_n, margin = sec.get("required", False), sec.get("min_n", 0), sec.get("margin", 0.0)
    if not isinstance(required, bool):
        raise ConfigError(f"{p}: selfplay.required: expected true or false, got {required!r}")
    if not isinstance(min_n, int) or isinstance(min_n, bool) or min_n < 0:
        raise ConfigError(f"{p}: selfplay.min_n: expected an integer >= 0, got {min_n!r}")
    if not isinstance(margin, int | float) or margin < 0:
        raise ConfigError(f"{p}: selfplay.margin: expected a number >= 0, got {margin!r}")
    metrics = {}
    for name, rule in (sec.get("metrics") or {}).items():
        rule = {"direction": rule} if isinstance(rule, str) else rule
        if (
            not isinstance(rule, dict)
            or rule.get("direction") not in _DIRECTIONS
            or not set(rule) <= {"direction", "margin", "min_n"}
            or not isinstance(rule.get("margin", 0.0), int | float)
            or not isinstance(rule.get("min_n", 0), int)
        ):
            raise ConfigError(
                f"{p}: selfplay.metrics.{name}: expected higher|lower or {{direction, margin?, min_n?}}"
            )
        metrics[str(name)] = {
            "direction": rule["direction"],
            "margin": None if rule.get("margin") is None else float(rule["margin"]),
            "min_n": rule.get("min_n"),
        }
    return {"required": required, "min_n": min_n, "margin": float(margin), "metrics": metrics}


def _direction(key: str, policy: dict[str, Any]) -> str:
    rule = (policy.get("absolute") or {}).get(key) or {}
    if "min" in rule or "max" in rule:
        return "higher" if "min" in rule else "lower"
    from troupe.evaluate import LOWER_IS_BETTER

    return "lower" if key.split(".")[-1] in LOWER_IS_BETTER | _LOWER_EXTRA else "higher"


@dataclass
class Champion:
    """The model version holding the ``champion`` alias, as the gate sees it.

    Attributes:
        version: its version number.
        eval_set: ``{split: sha256}`` of the eval set its stored scores came from, and the evaluation
            ``settings`` (version tag ``troupe.eval_set``; empty when registered before eval sets
            were recorded).
        scores: loads its stored per-item scores (``scores.jsonl`` rows: split, dialogue_id, turn,
            scores); None when it has none. Called only when the sets match.
    """

    version: str
    eval_set: dict[str, str] = field(default_factory=dict)
    scores: Callable[[], list[dict[str, Any]]] | None = None


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.3f}"


def _split_replies(result: EvalResult, model: str, split: str) -> int:
    """Replies of ``model`` on ``split``: its samples there, else eval_set ``items``, else the largest
    n among its rate estimates of that split."""
    n = sum(1 for s in result.samples if s.get("model") == model and s.get("split") == split)
    if n:
        return n
    entry = result.eval_set.get(split)
    if isinstance(entry, dict) and entry.get("items"):
        return int(entry["items"])
    ests = result.metrics.get(model, {}).get(split, {}).values()
    return max((e.n for e in ests if e.k is not None), default=0)


def _at_confidence(e: Estimate, confidence: float) -> Estimate:
    """A rate recomputed at the policy's confidence (Wilson, from k and n); other estimates as they are."""
    if e.k is not None and e.n and e.method == "wilson" and e.confidence != confidence:
        return wilson(e.k, e.n, confidence)
    return e


def _scaled_more(e: Estimate, distance: float) -> int | None:
    """For an interval without a count: how many more observations until its half-width shrinks to
    ``distance`` (half-width ~ 1/sqrt(n)); None when it never would."""
    half = (e.hi - e.lo) / 2
    if distance <= 0 or not e.n or math.isnan(half):
        return None
    return max(math.ceil(e.n * (half / distance) ** 2) - e.n, 1)


def _absolute(
    key: str, bound: str, threshold: float, e: Estimate | None, replies: int, min_n: int, conf: float
) -> Verdict:
    """One absolute rule on interval bounds: ``min``: lo >= t passes, hi < t fails; ``max``: hi <= t
    passes, lo > t fails; otherwise, or with fewer than ``min_n`` replies, insufficient."""
    sym = ">=" if bound == "min" else "<="
    side = "lo" if bound == "min" else "hi"
    rule = f"{key}: {side} {sym} {threshold:g} (n >= {min_n}, {round(conf * 100)}% interval)"
    if e is None:
        return Verdict(
            INSUFFICIENT, rule, empty(conf),
            f"not measured: metrics.json has no {key} for the candidate (re-run `troupe evaluate`, or check the name)",
        )  # fmt: skip
    e = _at_confidence(e, conf)
    if not e.n and not math.isnan(e.value):  # a bare number: Estimate.from_dict reads it as n = 0
        return Verdict(
            INSUFFICIENT, rule, e,
            "no sample size or interval (a metrics.json written before estimates): re-run `troupe evaluate`",
        )  # fmt: skip
    if not e.n or math.isnan(e.value):
        return Verdict(
            INSUFFICIENT, rule, e,
            f"n = 0: none of the {replies} replies on {key.split('.')[0]} is one this metric applies to",
        )  # fmt: skip
    if math.isnan(e.lo) or math.isnan(e.hi):
        return Verdict(INSUFFICIENT, rule, e, "no interval (one dialogue only): evaluate more dialogues")
    lo, hi = e.lo, e.hi
    passes = lo >= threshold if bound == "min" else hi <= threshold
    fails = hi < threshold if bound == "min" else lo > threshold
    if replies < min_n:
        lean = " (the interval already lies on the failing side)" if fails else ""
        lean = " (the interval already clears the threshold)" if passes else lean
        return Verdict(
            INSUFFICIENT, rule, e,
            f"{replies} replies on {key.split('.')[0]}, below min_n {min_n}: {min_n - replies} more replies needed{lean}",
        )  # fmt: skip
    where = f"{e.value:.3f} [{_fmt(lo)}, {_fmt(hi)}]"
    if passes:
        return Verdict(PASS, rule, e, f"{where}: {side} {sym} {threshold:g}")
    if fails:
        return Verdict(FAIL, rule, e, f"{where}: the whole interval is beyond {threshold:g}")
    # straddles: how many more replies at the observed rate until it clears either way
    good_side = e.value >= threshold if bound == "min" else e.value <= threshold
    if e.k is not None:
        to = side if good_side else ("hi" if bound == "min" else "lo")
        more = replies_needed(e.k, e.n, threshold, to, conf)
    else:
        more = _scaled_more(e, abs(e.value - threshold))
    outcome = "pass" if good_side else "fail"
    need = f"about {more} more replies at the observed rate until it would {outcome}" if more else (
        "more replies at the observed rate would not settle it (the point estimate is on the threshold)"
    )  # fmt: skip
    return Verdict(INSUFFICIENT, rule, e, f"{where} straddles {threshold:g}: {need}")


_Pairing = tuple[Callable[[str], dict[ItemKey, float]] | None, set[ItemKey], str]


def _pair_source(result: EvalResult, champion: Champion, split: str) -> _Pairing:
    """Where the champion's per-item scores on ``split`` come from: (metric -> scores, the items it
    was scored on, description), or (None, empty, why not)."""
    ev_version = result.eval_set.get("champion_version")
    champ_keys = {
        item_key(s) for s in result.samples if s.get("model") == CHAMPION_MODEL and s.get("split") == split
    }
    in_result = bool(champ_keys)
    if in_result and ev_version is not None and str(ev_version) == str(champion.version):
        return (
            lambda m: {k: v for k, v in result.scores(CHAMPION_MODEL, m).items() if k[0] == split},
            champ_keys,
            f"champion v{champion.version} scored in this evaluation",
        )
    stale = (
        f"this evaluation scored champion version {ev_version}, but the alias points at {champion.version}; "
        if in_result
        else ""
    )
    entry = result.eval_set.get(split)
    mine = entry.get("sha256") if isinstance(entry, dict) else None
    theirs = champion.eval_set.get(split)
    mine_settings, their_settings = result.eval_set.get("settings"), champion.eval_set.get("settings")
    if mine and theirs == mine and mine_settings and their_settings and mine_settings != their_settings:
        changed = sorted(
            k for k in {*mine_settings, *their_settings} if mine_settings.get(k) != their_settings.get(k)
        )
        return (
            None,
            set(),
            (
                f"{stale}champion v{champion.version} was scored on the same items with other evaluation settings "
                f"({', '.join(f'{k} {their_settings.get(k)} vs {mine_settings.get(k)}' for k in changed)}): add "
                "`champion` to eval.models so `troupe evaluate` scores it with these settings"
            ),
        )
    if mine and theirs == mine and champion.scores is not None:
        rows = [r for r in champion.scores() if r.get("split") == split]
        if rows:

            def stored(m: str) -> dict[ItemKey, float]:
                return {
                    item_key(r): float(r["scores"][m])
                    for r in rows
                    if (r.get("scores") or {}).get(m) is not None
                }

            keys = {item_key(r) for r in rows}
            return (
                stored,
                keys,
                f"champion v{champion.version}'s stored scores on the same eval set ({mine[:12]})",
            )
    fix = "add `champion` to eval.models so `troupe evaluate` scores it on this eval set"
    if not mine:
        return (
            None,
            set(),
            f"{stale}this evaluation recorded no eval-set hash for {split} (eval_set.json): re-run `troupe evaluate`",
        )
    if not theirs:
        return (
            None,
            set(),
            f"{stale}champion v{champion.version} has no stored scores for {split} (registered before eval sets were recorded): {fix}",
        )
    if theirs != mine:
        return (
            None,
            set(),
            (
                f"{stale}champion v{champion.version} was scored on another eval set ({theirs[:12]}, this one "
                f"{mine[:12]}): {fix}"
            ),
        )
    return None, set(), f"{stale}champion v{champion.version}'s stored scores cannot be read: {fix}"


def _regression(
    key: str,
    direction: str,
    margin: float,
    diff: Estimate,
    replies: int,
    source: str,
    min_n: int,
    conf: float,
    unit: str = "replies",
) -> Verdict:
    """Paired difference (candidate - champion) against ``margin``: pass when the bad-side bound is
    within the margin (non-inferiority), fail when the whole interval is beyond it, else insufficient
    (also when fewer than ``min_n`` ``unit`` (replies of the split; self-play: scenarios) were scored
    by both)."""
    higher = direction == "higher"
    rule = (
        f"{key}: candidate - champion {'lo >= ' + format(-margin, 'g') if higher else 'hi <= ' + format(margin, 'g')}"
        f" (paired, n >= {min_n}, {round(conf * 100)}% interval)"
    )
    if not diff.n:
        return Verdict(INSUFFICIENT, rule, diff, f"no item scored by both ({source})")
    if replies < min_n:
        return Verdict(
            INSUFFICIENT, rule, diff,
            f"{replies} {unit} scored by both, below min_n {min_n}: {min_n - replies} more needed ({source})",
        )  # fmt: skip
    if math.isnan(diff.lo) or math.isnan(diff.hi):
        return Verdict(INSUFFICIENT, rule, diff, f"no interval (one dialogue only; {source})")
    where = (
        f"difference {diff.value:+.3f} [{diff.lo:+.3f}, {diff.hi:+.3f}] over {diff.n} paired items ({source})"
    )
    bad_bound, far_bound = (diff.lo, diff.hi) if higher else (-diff.hi, -diff.lo)  # in "higher" terms
    if bad_bound >= -margin:
        return Verdict(PASS, rule, diff, f"{where}: no regression beyond {margin:g}")
    if far_bound < -margin:
        return Verdict(FAIL, rule, diff, f"{where}: worse than the champion by more than {margin:g}")
    value = diff.value if higher else -diff.value
    more = _scaled_more(diff, value + margin) if value + margin > 0 else None
    need = (
        f"about {more} more paired items until it would pass"
        if more
        else "more items would likely confirm a regression"
    )
    return Verdict(INSUFFICIENT, rule, diff, f"{where}: interval crosses the margin {margin:g}; {need}")


def gate(
    result: EvalResult,
    policy: dict[str, Any],
    champion: Champion | None,
    selfplay: dict[str, Any] | None = None,
) -> list[Verdict]:
    """Apply ``policy`` (from :func:`load_policy`) to the candidate's estimates in ``result``.

    Absolute rules read interval bounds at the policy's confidence; a split with fewer than ``min_n``
    candidate replies gives "insufficient" for its rules. Regression rules compare the candidate with
    ``champion`` paired, item by item, on the same eval set: the champion scored in ``result`` (model
    ``champion`` with ``eval_set.json`` ``champion_version`` equal to ``champion.version``), else its
    stored scores when its stored eval-set hash equals this one; otherwise the check is insufficient.
    With a ``selfplay`` policy section, the self-play result (``selfplay``: the parsed
    ``paths.selfplay/metrics.json``, None when there is none) adds :func:`selfplay_gate`'s verdicts.

    Returns:
        one :class:`troupe.stats.Verdict` per rule bound and regression metric; the overall outcome is
        :func:`troupe.stats.combine` of them.
    """
    cand = policy.get("candidate", "dpo")
    conf = float(policy.get("confidence", DEFAULT_CONFIDENCE))
    min_n = int(policy.get("min_n", 0))
    metrics = result.metrics.get(cand, {})
    out = []
    for key, rule in (policy.get("absolute") or {}).items():
        split, metric = key.split(".", 1)
        e = metrics.get(split, {}).get(metric)
        replies = _split_replies(result, cand, split)
        for bound in ("min", "max"):
            if bound in rule:
                out.append(
                    _absolute(key, bound, float(rule[bound]), e, replies, int(rule.get("min_n", min_n)), conf)
                )
    nr = policy.get("no_regression") or {}
    reg = nr.get("metrics") or {}
    if isinstance(reg, list):
        reg = {k: _direction(k, policy) for k in reg}
    margin = float(nr.get("margin", nr.get("max_regression", 0.0)))
    out += selfplay_gate(selfplay, policy)[0]
    if reg and champion is None:
        out.append(Verdict(PASS, "no_regression", empty(conf), "no champion yet: regression check skipped"))
        return out
    sources: dict[str, _Pairing] = {}
    for key, direction in reg.items():
        split, metric = key.split(".", 1)
        if split not in sources:
            sources[split] = _pair_source(result, champion, split)
        load, champ_keys, source = sources[split]
        if load is None:
            rule = f"{key}: paired vs champion v{champion.version}"
            out.append(Verdict(INSUFFICIENT, rule, empty(conf), source))
            continue
        mine = {k: v for k, v in result.scores(cand, metric).items() if k[0] == split}
        diff = paired_difference(mine, load(metric), cluster_of=lambda k: (k[0], k[1]), confidence=conf)
        cand_keys = {
            item_key(s) for s in result.samples if s.get("model") == cand and s.get("split") == split
        }
        replies = len(cand_keys & champ_keys)
        out.append(_regression(key, direction, margin, diff, replies, source, min_n, conf))
    return out


def selfplay_gate(selfplay: dict[str, Any] | None, policy: dict[str, Any]) -> tuple[list[Verdict], str]:
    """The policy's ``selfplay`` rules on a self-play result (:mod:`troupe.dialogue.selfplay`'s
    ``metrics.json``): per metric, the paired difference candidate - champion over the scenarios both
    finished against the metric's margin, as :func:`_regression` (pass: the bad-side bound within the
    margin; fail: the whole interval beyond it; else, or with fewer than ``min_n`` paired scenarios,
    insufficient). The difference is recomputed from the per-scenario values when the policy's
    confidence differs from the result's.

    Returns:
        ``(verdicts, note)``: no verdicts when the policy has no ``selfplay`` section; without a result,
        one "insufficient" verdict when ``required`` is true, else none and the note says the rules
        were skipped (the note is recorded in decision.json and gate.md).
    """
    sec = policy.get("selfplay")
    if not sec:
        return [], ""
    conf = float(policy.get("confidence", DEFAULT_CONFIDENCE))
    if selfplay is None:
        why = "no self-play result (paths.selfplay/metrics.json): run `troupe evaluate --suite selfplay`"
        if sec.get("required"):
            missing = Verdict(INSUFFICIENT, "selfplay (required)", empty(conf), why)
            return [missing], f"required, missing: {why}"
        return [], f"rules skipped (selfplay.required is false): {why}"
    sides = selfplay.get("sides") or {}
    source = "self-play {} vs {} ({})".format(
        (sides.get("candidate") or {}).get("url", "?"),
        (sides.get("champion") or {}).get("url", "?"),
        selfplay.get("created", "undated"),
    )
    stored_conf = float(selfplay.get("confidence", DEFAULT_CONFIDENCE))
    out = []
    for metric, rule in sec["metrics"].items():
        margin = float(sec.get("margin", 0.0) if rule.get("margin") is None else rule["margin"])
        min_n = int(sec.get("min_n", 0) if rule.get("min_n") is None else rule["min_n"])
        raw = (selfplay.get("paired") or {}).get(metric)
        values = (selfplay.get("values") or {}).get(metric)
        if raw is None:
            out.append(
                Verdict(
                    INSUFFICIENT,
                    f"selfplay.{metric}: paired vs champion",
                    empty(conf),
                    f"not measured: the self-play metrics.json has no {metric} ({source})",
                )
            )
            continue
        diff = Estimate.from_dict(raw)
        if stored_conf != conf and values:
            cand = {s: v["candidate"] for s, v in values.items() if v.get("candidate") is not None}
            champ = {s: v["champion"] for s, v in values.items() if v.get("champion") is not None}
            diff = paired_difference(
                cand, champ, cluster_of=lambda k: k, confidence=conf,
                resamples=int(selfplay.get("resamples", 2000)),
            )  # fmt: skip
        out.append(
            _regression(
                f"selfplay.{metric}",
                rule["direction"],
                margin,
                diff,
                diff.n,
                source,
                min_n,
                conf,
                unit="scenarios",
            )
        )
    return out, f"{len(out)} rule(s) on {source}"


def _read_selfplay(params: dict[str, Any]) -> dict[str, Any] | None:
    """The parsed ``paths.selfplay/metrics.json`` (local or a URI), None when paths.selfplay is not set
    or has no result.

    Raises:
        ConfigError: the file is there but is not a JSON object.
    """
    from troupe import storage

    loc = (params.get("paths") or {}).get("selfplay")
    if not loc or not storage.exists(storage.join(str(loc), METRICS_FILE)):
        return None
    where = storage.join(str(loc), METRICS_FILE)
    try:
        got = json.loads(storage.read_text(where))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not JSON ({e})") from e
    if not isinstance(got, dict):
        raise ConfigError(f"{where}: expected a JSON object (troupe evaluate --suite selfplay)")
    return got


def _client():
    import mlflow

    from troupe.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


def _champion(client, name: str, tmp: Path) -> Champion | None:
    """The version holding ``champion`` with its stored eval-set hashes and (lazily) its scores."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    try:
        eval_set = json.loads(mv.tags.get(EVAL_SET_TAG) or "{}")
    except json.JSONDecodeError:
        eval_set = {}
    uri = mv.tags.get(SCORES_URI_TAG)

    def scores() -> list[dict[str, Any]]:
        import mlflow

        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        except Exception:  # unreadable stored scores: the regression check says so (insufficient)
            return []
        return [json.loads(x) for x in got.read_text(encoding="utf-8").splitlines() if x.strip()]

    return Champion(str(mv.version), eval_set if isinstance(eval_set, dict) else {}, scores if uri else None)


def _location(params: dict[str, Any], key: str) -> str:
    """``paths.<key>`` as given: a local path or a URI such as ``s3://bucket/run/dpo``."""
    paths = section(params, "paths")
    if not paths.get(key):
        raise ConfigError(f"params: missing paths.{key}")
    return str(paths[key])


def _read_eval(loc: str, tmp: Path) -> EvalResult:
    """The :class:`EvalResult` at ``loc`` (a local directory or a URI, downloaded to ``tmp``)."""
    from troupe import storage

    metrics_loc = storage.join(loc, METRICS_FILE)
    if not storage.exists(metrics_loc):
        raise ConfigError(f"{metrics_loc}: not found (run `troupe evaluate` first)")
    local = Path(loc.removeprefix("file://")) if not storage.is_remote(loc) else tmp / "eval"
    if storage.is_remote(loc):
        for f in (METRICS_FILE, EVAL_SET_FILE, SAMPLES_FILE):
            if storage.exists(storage.join(loc, f)):
                storage.download(storage.join(loc, f), local / f)
    try:
        return EvalResult.read(local)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _report(verdicts: list[Verdict], status: str, head: str, alias_line: str) -> str:
    """gate.md: the outcome, then one row per verdict with n, the interval, the rule and the detail."""
    title = {PASS: "PASSED", FAIL: "FAILED", INSUFFICIENT: "INSUFFICIENT EVIDENCE"}[status]
    md = [f"# Gate decision: {title}", "", head, "", "| verdict | rule | value | n | interval | detail |"]
    md.append("|---|---|---|---|---|---|")
    for v in verdicts:
        e = v.estimate
        interval = f"[{_fmt(e.lo)}, {_fmt(e.hi)}] {round(e.confidence * 100)}% {e.method}" if e.n else "-"
        cells = [v.status.upper(), f"`{v.rule}`", _fmt(e.value) if e.n else "-", str(e.n), interval, v.detail]
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    md += ["", alias_line]
    if status == INSUFFICIENT:
        md += [
            "",
            "Insufficient evidence is neither a pass nor a fail: evaluate more replies (see the details) "
            f"and register again; `troupe registry register` exits {INSUFFICIENT_EXIT}.",
        ]
    return "\n".join(md) + "\n"


def _compact(metrics: dict[str, dict[str, Estimate]]) -> dict[str, Any]:
    """``{split: {metric: {value, n, lo, hi[, k]}}}`` rounded to 4 places (the version tag)."""

    def r(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 4)

    return {
        split: {
            m: {
                "value": r(e.value),
                "n": e.n,
                "lo": r(e.lo),
                "hi": r(e.hi),
                **({"k": e.k} if e.k is not None else {}),
            }
            for m, e in ms.items()
        }
        for split, ms in metrics.items()
    }


def _log_model_dir(model_dir: Path) -> None:
    """Log a local model directory as the active run's ``model`` artefact, without its LoRA
    ``adapter/`` (logged once, as the run's own ``adapter`` artefact, by
    :func:`troupe.train.lora.log_adapter`)."""
    import mlflow

    from troupe.train.lora import ADAPTER_DIR

    for p in sorted(model_dir.iterdir()):
        if p.name == ADAPTER_DIR and p.is_dir():
            continue
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=f"model/{p.name}")
        else:
            mlflow.log_artifact(str(p), artifact_path="model")


def register(params: dict[str, Any], candidate: str | None = None) -> dict[str, Any]:
    """Register and gate the candidate model with its characters; returns the decision dict (also
    written to ``paths.registry``: ``decision.json`` and ``gate.md``).

    ``candidate`` overrides the gate policy's ``candidate`` (e.g. ``quantized``: ``paths.quantized_model``,
    evaluated in the same ``metrics.json``); a quantised candidate's version is linked to its parent by
    the tags ``troupe.quantization`` / ``troupe.parent_version`` / ``troupe.parent_model`` (from its
    ``quantize.json``, :func:`quantization_tags`).

    The version carries its evidence: ``troupe.metrics`` (estimates), ``troupe.eval_set`` (``{split:
    sha256}``) and ``troupe.scores_uri`` (the candidate's per-item scores, an MLflow artifact) so a later
    candidate scored on the same set is compared with it paired. Outcome ``pass``: alias ``challenger``;
    ``fail``: no alias; ``insufficient``: no alias, tag ``troupe.gate=insufficient``.

    Raises:
        ConfigError: missing metrics.json / candidate model / characters / policy (storage errors
            name the location and the reason before anything is registered).
    """
    import tempfile

    from troupe import storage

    reg = section(params, "registry")
    policy = load_policy(reg.get("gate_policy", "configs/gate_policy.yaml"))
    if candidate:
        policy["candidate"] = candidate
    cand_name = policy["candidate"]
    eval_loc = _location(params, "eval")
    with tempfile.TemporaryDirectory(prefix="troupe-gate-") as tmp_dir:
        tmp = Path(tmp_dir)
        result = _read_eval(eval_loc, tmp)
        if cand_name not in result.metrics:
            raise ConfigError(
                f"{storage.join(eval_loc, METRICS_FILE)}: no metrics for candidate {cand_name!r} (gate policy `candidate`)"
            )
        if cand_name not in _MODEL_KEY:
            raise ConfigError(f"gate policy candidate {cand_name!r}: expected one of {sorted(_MODEL_KEY)}")
        model_loc = _location(params, _MODEL_KEY[cand_name])
        storage.check_readable(model_loc, f"paths.{_MODEL_KEY[cand_name]} (candidate model)", kind="dir")
        if not storage.exists(storage.join(model_loc, "config.json")):
            raise ConfigError(f"{model_loc}: no config.json (not a model checkpoint directory)")
        chars_loc = storage.join(_location(params, "splits"), contract.CHARACTERS_FILE)
        storage.check_readable(
            chars_loc, "paths.splits/characters.jsonl (characters of the model)", kind="file"
        )
        chars_text = storage.read_text(chars_loc)
        chars_sha = hashlib.sha256(chars_text.encode("utf-8")).hexdigest()
        catalogue = _catalogue(params)
        out = path_of(params, "registry")
        out.mkdir(parents=True, exist_ok=True)
        name = reg.get("model_name", "troupe-roleplay")
        champion = _champion(_client(), name, tmp / "champion")
        selfplay = _read_selfplay(params)
        verdicts = gate(result, policy, champion, selfplay)
        decision = _record(
            params, result, policy, verdicts, champion, model_loc, chars_text, chars_sha, out, catalogue,
            selfplay_note=selfplay_gate(selfplay, policy)[1],
        )  # fmt: skip
    click.echo((out / "gate.md").read_text())
    return decision


def _catalogue(params: dict[str, Any]) -> tuple[str, str] | None:
    """``(version, uri)`` of the run's character catalogue (``troupe characters build``), None when it
    has none; a local catalogue is named by its absolute path."""
    from troupe import storage
    from troupe.characters.catalogue import catalogue_location, catalogue_version

    loc = catalogue_location(params)
    if not storage.exists(loc):
        return None
    uri = loc if storage.is_remote(loc) else str(Path(loc).resolve())
    return catalogue_version(storage.read_text(loc)), uri


def _record(
    params,
    result,
    policy,
    verdicts,
    champion,
    model_loc,
    chars_text,
    chars_sha,
    out,
    catalogue=None,
    selfplay_note: str = "",
) -> dict[str, Any]:
    """Log the register run, create the version with its evidence, set tags/alias, write the files.

    ``catalogue`` is ``(version, uri)`` of the run's catalogue; None: the logged characters file is it.
    ``selfplay_note`` (from :func:`selfplay_gate`) says what the policy's self-play rules read or why
    they were skipped.
    """
    import mlflow

    from troupe import storage
    from troupe.characters.catalogue import catalogue_version
    from troupe.tracking import step_run

    reg = section(params, "registry")
    name = reg.get("model_name", "troupe-roleplay")
    cand_name = policy["candidate"]
    client = _client()
    status = combine(verdicts)
    passed = status == PASS
    cand_metrics = result.metrics[cand_name]
    eval_hashes: dict[str, Any] = {
        s: v["sha256"] for s, v in result.eval_set.items() if isinstance(v, dict) and v.get("sha256")
    }
    if isinstance(result.eval_set.get("settings"), dict):  # generation settings the scores depend on
        eval_hashes["settings"] = result.eval_set["settings"]
    score_rows = [
        {
            "split": s["split"],
            "dialogue_id": s["dialogue_id"],
            "turn": s["turn"],
            "scores": s.get("scores") or {},
        }
        for s in result.samples
        if s.get("model") == cand_name
    ]
    with step_run(params, "register", ("registry",)) as run:
        if storage.is_remote(model_loc):
            source = model_loc.rstrip("/")  # MLflow registers the model from its URI; no copy
        else:
            _log_model_dir(Path(model_loc))
            source = f"{run.info.artifact_uri}/model"
        from troupe.train.lora import log_adapter

        adapter_tags = log_adapter(str(model_loc), run.info.artifact_uri)  # LoRA: adapter/ + base URI
        if adapter_tags:
            mlflow.set_tags(adapter_tags)
        mlflow.log_text(chars_text, contract.CHARACTERS_FILE)
        all_metrics = {
            m: {s: {k: e.to_dict() for k, e in ms.items()} for s, ms in splits.items()}
            for m, splits in result.metrics.items()
        }
        mlflow.log_dict(all_metrics, "metrics.json")
        mlflow.log_dict(result.eval_set, f"eval/{EVAL_SET_FILE}")
        mlflow.log_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in score_rows), f"eval/{SCORES_FILE}"
        )
        if not _exists(client, name):
            client.create_registered_model(name, description="Troupe role-play character model")
        tags = {
            "troupe.candidate": cand_name,
            EVAL_SET_TAG: json.dumps(eval_hashes),
            contract.CHARACTERS_URI_TAG: f"{run.info.artifact_uri}/{contract.CHARACTERS_FILE}",
            contract.CHARACTERS_SHA256_TAG: chars_sha,
            "troupe.metrics_uri": f"{run.info.artifact_uri}/metrics.json",
            **adapter_tags,
        }
        cat_version, cat_uri = catalogue or (
            catalogue_version(chars_text),
            f"{run.info.artifact_uri}/{contract.CHARACTERS_FILE}",
        )
        tags[contract.CATALOGUE_VERSION_TAG] = cat_version
        tags[contract.CATALOGUE_URI_TAG] = cat_uri
        tags.update(quantization_tags(model_loc))
        if score_rows:
            tags[SCORES_URI_TAG] = f"{run.info.artifact_uri}/eval/{SCORES_FILE}"
        compact = json.dumps(_compact(cand_metrics), separators=(",", ":"))
        if len(compact) <= 8000:  # MLflow's tag value limit; the full estimates are the metrics.json artifact
            tags[METRICS_TAG] = compact
        mv = client.create_model_version(name, source=source, run_id=run.info.run_id, tags=tags)
        counts = {s: sum(v.status == s for v in verdicts) for s in (PASS, FAIL, INSUFFICIENT)}
        decision = {
            "model_name": name,
            "version": mv.version,
            "model_uri": contract.model_version_uri(name, mv.version),
            "source": source,
            "characters_sha256": chars_sha,
            "catalogue_version": cat_version,
            "catalogue_uri": cat_uri,
            "candidate": cand_name,
            "status": status,
            "passed": passed,
            "counts": counts,
            "confidence": policy.get("confidence"),
            "min_n": policy.get("min_n"),
            "verdicts": [v.to_dict() for v in verdicts],
            "reasons": [f"{v.status.upper()} {v.rule}: {v.detail}" for v in verdicts],
            "eval_set": eval_hashes,
            "champion_version": champion.version if champion else None,
            "selfplay": selfplay_note or None,
            "run_id": run.info.run_id,
            "alias": CHALLENGER if passed else None,
        }
        gate_value = _GATE_TAG_VALUE[status]
        client.set_model_version_tag(name, mv.version, GATE_TAG, gate_value)
        client.set_model_version_tag(
            name, mv.version, "troupe.gate_reasons", "\n".join(decision["reasons"])[:5000]
        )
        mlflow.set_tags({GATE_TAG: gate_value, "troupe.model_version": mv.version})
        if passed:
            client.set_registered_model_alias(name, CHALLENGER, mv.version)
        head = (
            f"Model `{name}` version {mv.version} ({cand_name}) from `{source}`; champion: "
            f"{'v' + champion.version if champion else 'none'}; policy: {round(float(policy['confidence']) * 100)}% "
            f"intervals, min_n {policy['min_n']} replies per split; "
            f"{counts[PASS]} pass, {counts[FAIL]} fail, {counts[INSUFFICIENT]} insufficient."
            + (f" Self-play: {selfplay_note}." if selfplay_note else "")
        )
        alias_line = f"Alias `{CHALLENGER}` set." if passed else "No alias set."
        (out / "gate.md").write_text(_report(verdicts, status, head, alias_line), encoding="utf-8")
        (out / "decision.json").write_text(
            json.dumps(decision, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        mlflow.log_artifact(str(out / "gate.md"))
        mlflow.log_artifact(str(out / "decision.json"))
    return decision


def quantization_tags(model_loc: str | Path) -> dict[str, str]:
    """Version tags linking a quantised checkpoint to its parent, from its ``quantize.json``
    (:mod:`troupe.quantize`): ``troupe.quantization`` (scheme, e.g. ``W8A16``), ``troupe.parent_version``
    (when the parent was a registered version), ``troupe.parent_model`` (its URI or path) and
    ``troupe.calibration_sha256``. Empty for a checkpoint that is not quantised."""
    from troupe import storage

    loc = storage.join(str(model_loc), "quantize.json")
    if not storage.exists(loc):
        return {}
    meta = json.loads(storage.read_text(loc))
    parent = meta.get("parent") or {}
    tags = {
        QUANTIZATION_TAG: str(meta.get("scheme", "")),
        PARENT_MODEL_TAG: str(parent.get("uri") or parent.get("path") or ""),
        "troupe.calibration_sha256": str((meta.get("calibration") or {}).get("sha256", "")),
    }
    if parent.get("version"):
        tags[PARENT_VERSION_TAG] = str(parent["version"])
    return tags


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def promote(name: str, version: str | None = None, alias: str = CHAMPION) -> str:
    """Point ``alias`` (default ``champion``) at ``version`` (default: the ``challenger`` version).

    Raises:
        ConfigError: no version given and no ``challenger`` alias exists, or unknown version.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        if version is None:
            version = client.get_model_version_by_alias(name, CHALLENGER).version
        client.get_model_version(name, version)
    except MlflowException as e:
        raise ConfigError(f"model {name!r}: cannot promote ({e.message}); pass --version") from e
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "troupe.promoted_to", alias)
    return str(version)


def model_version(uri: str, tracking_uri: str | None = None):
    """The MLflow ``ModelVersion`` named by ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.

    Raises:
        ConfigError: not a ``models:/`` URI, or an unknown alias/version (MLflow's message).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from troupe.tracking import tracking_uri as default_uri

    if not uri.startswith("models:/"):
        raise ConfigError(f"{uri}: not a models:/<name>/<version> or models:/<name>@<alias> URI")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri or default_uri())
    ref = uri[len("models:/") :]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, version = ref.rsplit("/", 1)
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise ConfigError(f"{uri}: {e.message}") from e


def model_source(uri: str, tracking_uri: str | None = None) -> str:
    """Where a model's weights are: the version's source URI for ``models:/``, else ``uri`` itself."""
    return str(model_version(uri, tracking_uri).source) if uri.startswith("models:/") else uri


def _cache_root(cache_dir: str | Path | None) -> Path:
    """Download root: ``cache_dir``, else ``$TROUPE_SCRATCH/models`` (this node's scratch), else
    ``~/.cache/troupe/models``."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("TROUPE_SCRATCH"):
        return Path(os.environ["TROUPE_SCRATCH"]) / "models"
    return Path.home() / ".cache" / "troupe" / "models"


def characters_file(uri: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The characters stored with a registered version, downloaded alone (not the weights).

    Args:
        uri: ``models:/<name>/<version>`` or ``models:/<name>@<alias>``.
        tracking_uri: MLflow tracking URI.
        cache_dir: download root (default ``~/.cache/troupe/models``); a file whose SHA-256 matches
            the version's tag is reused.

    Raises:
        ConfigError: the version carries no characters (registered before characters travelled with
            versions: register it again) or they cannot be downloaded.
    """
    import mlflow

    mv = model_version(uri, tracking_uri)
    src = mv.tags.get(contract.CHARACTERS_URI_TAG)
    if not src:
        raise ConfigError(
            f"{uri} (version {mv.version}): no {contract.CHARACTERS_URI_TAG} tag; the version carries no "
            "characters (register it with `troupe registry register`, or set 'characters' in the serving config)"
        )
    dst = _cache_root(cache_dir) / mv.name / str(mv.version) / "characters"
    local = dst / contract.CHARACTERS_FILE
    sha = mv.tags.get(contract.CHARACTERS_SHA256_TAG)
    if local.is_file() and sha and hashlib.sha256(local.read_bytes()).hexdigest() == sha:
        return local
    dst.mkdir(parents=True, exist_ok=True)
    from troupe.tracking import tracking_uri as default_uri

    mlflow.set_tracking_uri(tracking_uri or default_uri())
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=src, dst_path=str(dst)))
    except Exception as e:
        raise ConfigError(f"{uri}: characters {src} cannot be downloaded: {e}") from e
    if sha and hashlib.sha256(got.read_bytes()).hexdigest() != sha:
        raise ConfigError(f"{uri}: characters {src} do not match {contract.CHARACTERS_SHA256_TAG}={sha}")
    return got


def resolve_model_dir(uri: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """A local checkpoint directory for ``uri``.

    Args:
        uri: a local directory, or ``models:/<name>@<alias>`` / ``models:/<name>/<version>``; the
            version's source (``s3://...`` or MLflow run artifacts) is downloaded once.
        tracking_uri: MLflow tracking URI (default: env / local SQLite, see :mod:`troupe.tracking`).
        cache_dir: where downloaded artifacts go (default ``~/.cache/troupe/models/<name>/<version>``).

    Raises:
        ConfigError: unknown alias/version, or a non-existent local path.
    """
    import mlflow

    if not uri.startswith("models:/"):
        p = Path(uri)
        if not p.is_dir():
            raise ConfigError(f"{uri}: model directory not found")
        return p
    from troupe.tracking import tracking_uri as default_uri

    mv = model_version(uri, tracking_uri)
    dst = _cache_root(cache_dir) / mv.name / str(mv.version) / "weights"
    marker = dst / ".troupe-source"  # what the cached copy was downloaded from

    def checkpoint() -> Path | None:
        # a download lands in <dst>/<last part of the source> (e.g. <dst>/model or <dst>/dpo)
        cands = [dst, *sorted(d for d in dst.iterdir() if d.is_dir())]
        return next((d for d in cands if (d / "config.json").is_file()), None)

    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst.parent / ".lock", "w") as lock:  # replicas of one version on one node download once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == str(mv.source) and (cached := checkpoint()) is not None:
            return cached  # no second download
        shutil.rmtree(dst, ignore_errors=True)  # a stale copy (another registry's version of that number)
        dst.mkdir(parents=True)
        mlflow.set_tracking_uri(tracking_uri or default_uri())
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=str(mv.source), dst_path=str(dst))
        except Exception as e:
            raise ConfigError(f"{uri}: model source {mv.source} cannot be downloaded: {e}") from e
        if (local := checkpoint()) is None:
            raise ConfigError(f"{uri}: downloaded artifacts of {mv.source} hold no config.json under {dst}")
        marker.write_text(str(mv.source))
        return local


@click.group("registry")
def registry_cli() -> None:
    """MLflow registry: register + gate, promote."""


@registry_cli.command("register")
@click.option(
    "--candidate",
    default=None,
    help="model of metrics.json to register (default: the gate policy's candidate), e.g. quantized",
)
@step_options
def register_cmd(params: dict, candidate: str | None) -> None:
    """Log + register the candidate, apply the gate policy, set alias challenger on pass.

    Exit status: 0 when the gate decided (pass, or fail: read decision.json / gate.md), 3 when the
    evidence is insufficient (the version is registered and tagged ``troupe.gate=insufficient``, no alias).
    """
    decision = register(params, candidate)
    if decision["status"] == INSUFFICIENT:
        click.echo(
            f"gate: insufficient evidence for version {decision['version']} (exit {INSUFFICIENT_EXIT}); "
            "see gate.md for how many more replies each check needs",
            err=True,
        )
        sys.exit(INSUFFICIENT_EXIT)  # not click's Exit: troupe.cli.main runs click non-standalone


@registry_cli.command("promote")
@click.option("--name", default=None, help="registered model name (default: registry.model_name)")
@click.option("--version", default=None, help="version to promote (default: the challenger)")
@click.option("--alias", default=CHAMPION, show_default=True)
@step_options
def promote_cmd(params: dict, name: str | None, version: str | None, alias: str) -> None:
    """Move an alias (default champion) to a version (default: the current challenger)."""
    name = name or params.get("registry", {}).get("model_name", "troupe-roleplay")
    v = promote(name, version, alias)
    click.echo(f"{name}: alias {alias} -> version {v}")
