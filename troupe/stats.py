"""Statistics for every decision Troupe makes: estimates with their n and a confidence interval.

One owner for the numbers a gate, a report or a rollout reads. An :class:`Estimate` is what crosses
processes (``metrics.json``, MLflow tags, rollout records): ``value``, ``n``, ``lo``/``hi`` at
``confidence``, the ``method`` that produced the interval and, for rates, the count ``k``.

* Rates: Wilson score interval (Wilson 1927, JASA 22:209; recommended by Brown, Cai & DasGupta 2001,
  Statist. Sci. 16:101, over the Wald interval, which collapses to a point at 0 or n).
* Means and corpus statistics: percentile bootstrap over clusters (replies of one dialogue are not
  independent, so whole dialogues are resampled; Efron & Tibshirani 1993, ch. 13; the cluster
  bootstrap of Field & Welsh 2007, JRSS-B 69:369).
* Paired comparison (candidate vs champion on the same eval set): cluster bootstrap of the mean
  per-item difference over the items both were scored on.
* Two independent rates (canary vs stable in one time window): Newcombe's hybrid score interval for
  a difference of proportions (Newcombe 1998, Statist. Med. 17:873, method 10), and a one-sided
  two-proportion z-test (pooled variance) for "is the canary worse by more than the margin".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000


def z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile for ``confidence`` (0.95 -> 1.95996).

    Raises:
        ValueError: confidence not in (0, 1).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass
class Estimate:
    """A statistic with its sample size and confidence interval.

    Attributes:
        value: the point estimate (a rate in [0, 1], a mean, a difference).
        n: number of observations it rests on (replies for rates, items for paired differences);
            0 means "not measured", with ``value``/``lo``/``hi`` NaN.
        lo, hi: interval bounds at ``confidence`` (NaN when ``n`` is 0).
        confidence: two-sided confidence level of ``[lo, hi]``.
        method: ``wilson``, ``bootstrap``, ``paired-bootstrap``, ``newcombe`` or ``none``.
        k: successes, for rates (``value == k / n``); None otherwise.
        clusters: number of independent clusters (dialogues) a bootstrap resampled; None otherwise.
    """

    value: float
    n: int
    lo: float
    hi: float
    confidence: float = DEFAULT_CONFIDENCE
    method: str = "none"
    k: int | None = None
    clusters: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; NaN becomes None (JSON has no NaN)."""
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
            if v is not None or k in ("value", "lo", "hi")
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Estimate:
        """Inverse of :meth:`to_dict`. A bare number (an old ``metrics.json``) is an estimate with
        n = 0 and no interval.

        Raises:
            ValueError: ``d`` is neither a number nor a dict with ``value`` and ``n``.
        """
        if isinstance(d, int | float):
            return cls(float(d), 0, math.nan, math.nan)
        if not isinstance(d, Mapping) or "value" not in d or "n" not in d:
            raise ValueError(f"not an estimate: {d!r} (expected {{value, n, lo, hi, ...}})")
        nan = math.nan
        return cls(
            value=nan if d["value"] is None else float(d["value"]),
            n=int(d["n"]),
            lo=nan if d.get("lo") is None else float(d["lo"]),
            hi=nan if d.get("hi") is None else float(d["hi"]),
            confidence=float(d.get("confidence", DEFAULT_CONFIDENCE)),
            method=str(d.get("method", "none")),
            k=None if d.get("k") is None else int(d["k"]),
            clusters=None if d.get("clusters") is None else int(d["clusters"]),
        )

    def __str__(self) -> str:
        if not self.n:
            return "n/a (n=0)"
        pct = round(self.confidence * 100)
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}] ({pct}% {self.method}, n={self.n})"


def empty(confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """The estimate of nothing measured: n = 0, NaN value and bounds."""
    return Estimate(math.nan, 0, math.nan, math.nan, confidence, "none")


def wilson(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Rate ``k/n`` with the Wilson score interval (Wilson 1927).

    Args:
        k: successes, 0 <= k <= n.
        n: trials; 0 gives :func:`empty`.

    Raises:
        ValueError: k outside [0, n].
    """
    if n == 0:
        return empty(confidence)
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k={k} outside [0, n={n}]")
    z = z_value(confidence)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the edges (no rounding residue)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return Estimate(p, n, lo, hi, confidence, "wilson", k=k)


def rate(flags: Sequence[bool | None], confidence: float = DEFAULT_CONFIDENCE) -> Estimate:
    """Wilson estimate of the share of True among ``flags``; None entries (not applicable) are left out."""
    seen = [bool(f) for f in flags if f is not None]
    return wilson(sum(seen), len(seen), confidence)


def _percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 1], of a sorted sequence."""
    if len(sorted_xs) == 1:
        return float(sorted_xs[0])
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return float(sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo))


def cluster_bootstrap(
    clusters: Mapping[Hashable, Sequence[Any]],
    statistic: Callable[[list[Any]], float],
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    method: str = "bootstrap",
) -> Estimate:
    """Percentile-bootstrap interval of ``statistic`` over items grouped in clusters (dialogues).

    Each resample draws as many clusters as there are, with replacement, and applies ``statistic`` to
    the concatenation of their items. ``n`` is the number of items, ``clusters`` the number of clusters.

    Args:
        clusters: cluster id -> its items (empty clusters are dropped).
        statistic: items -> number (e.g. the mean; a corpus BLEU; a rank correlation). A resample where
            it is NaN (undefined, e.g. a correlation of constant values) is dropped; none left = no interval.
        resamples: bootstrap replicates (2,000 is Efron & Tibshirani's suggestion for percentile intervals).
        seed: RNG seed (results are reproducible).
    """
    import numpy as np

    groups = [list(v) for v in clusters.values() if len(v)]
    items = [x for g in groups for x in g]
    if not items:
        return empty(confidence)
    value = float(statistic(items))
    if len(groups) == 1:  # one cluster: no between-cluster variation to resample
        return Estimate(value, len(items), math.nan, math.nan, confidence, method, clusters=1)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(resamples):
        pick = rng.integers(0, len(groups), len(groups))
        reps.append(float(statistic([x for i in pick for x in groups[i]])))
    reps = sorted(r for r in reps if not math.isnan(r))  # resamples where the statistic is undefined
    if not reps:
        return Estimate(value, len(items), math.nan, math.nan, confidence, method, clusters=len(groups))
    alpha = (1 - confidence) / 2
    return Estimate(
        value, len(items), _percentile(reps, alpha), _percentile(reps, 1 - alpha), confidence, method,
        clusters=len(groups),
    )  # fmt: skip


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean (NaN for no values)."""
    return sum(xs) / len(xs) if xs else math.nan


def bootstrap_mean(
    values: Mapping[Hashable, Sequence[float]],
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Estimate:
    """Mean of per-item values with a cluster-bootstrap interval (``values``: cluster -> item values)."""
    return cluster_bootstrap(values, mean, confidence, resamples, seed)


def paired_difference(
    candidate: Mapping[Hashable, float],
    baseline: Mapping[Hashable, float],
    cluster_of: Callable[[Hashable], Hashable],
    confidence: float = DEFAULT_CONFIDENCE,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Estimate:
    """Mean of ``candidate[i] - baseline[i]`` over the items both scored, cluster-bootstrapped.

    Args:
        candidate, baseline: item key (e.g. ``(split, dialogue_id, turn)``) -> per-item score (0/1 for
            a rate). Items scored by only one side are left out (the estimate's ``n`` says how many
            were paired).
        cluster_of: item key -> cluster (the dialogue), so replies of one dialogue resample together.
    """
    groups: dict[Hashable, list[float]] = {}
    for key in candidate.keys() & baseline.keys():
        groups.setdefault(cluster_of(key), []).append(float(candidate[key]) - float(baseline[key]))
    return cluster_bootstrap(groups, mean, confidence, resamples, seed, method="paired-bootstrap")


def newcombe_difference(
    k1: int, n1: int, k2: int, n2: int, confidence: float = DEFAULT_CONFIDENCE
) -> Estimate:
    """Difference of two independent rates ``k1/n1 - k2/n2`` with Newcombe's hybrid score interval
    (Newcombe 1998, method 10: built from the two Wilson intervals). n = n1 + n2; empty when either
    side has no trials."""
    if not n1 or not n2:
        return empty(confidence)
    a, b = wilson(k1, n1, confidence), wilson(k2, n2, confidence)
    d = a.value - b.value
    lo = d - math.sqrt((a.value - a.lo) ** 2 + (b.hi - b.value) ** 2)
    hi = d + math.sqrt((a.hi - a.value) ** 2 + (b.value - b.lo) ** 2)
    return Estimate(d, n1 + n2, lo, hi, confidence, "newcombe")


def worse_by_more_than(k1: int, n1: int, k2: int, n2: int, margin: float, alpha: float = 0.05) -> float:
    """One-sided p-value of H0: ``p1 - p2 <= margin`` against H1: ``p1 - p2 > margin`` (rate 1 is
    worse than rate 2 by more than ``margin``), a two-proportion z-test with unpooled variance
    (Farrington & Manning 1990 use a restricted MLE; the unpooled Wald form is enough at canary
    sizes). Returns 1.0 when
    either side is empty. Small p (< ``alpha``) = evidence the canary is worse."""
    if not n1 or not n2:
        return 1.0
    p1, p2 = k1 / n1, k2 / n2
    # a continuity floor keeps the variance non-zero when both rates are 0 or 1
    v = max(p1 * (1 - p1), 0.25 / n1) / n1 + max(p2 * (1 - p2), 0.25 / n2) / n2
    z = (p1 - p2 - margin) / math.sqrt(v)
    from statistics import NormalDist

    return 1 - NormalDist().cdf(z)


def replies_needed(
    k: int, n: int, threshold: float, bound: str, confidence: float = DEFAULT_CONFIDENCE, cap: int = 100_000
) -> int | None:
    """How many more observations, at the observed rate ``k/n``, until the Wilson bound clears
    ``threshold`` (``bound="lo"``: lower bound >= threshold; ``"hi"``: upper bound <= threshold).

    Returns 0 when it already clears, None when it never would at this rate (the point estimate is
    on the wrong side of the threshold) or would need more than ``cap``.
    """
    p = k / n if n else 0.5

    def clears(m: int) -> bool:
        e = wilson(round(p * m), m, confidence)
        return e.lo >= threshold if bound == "lo" else e.hi <= threshold

    if bound not in ("lo", "hi"):
        raise ValueError(f"bound must be 'lo' or 'hi', got {bound!r}")
    if n:
        e = wilson(k, n, confidence)
        if (e.lo >= threshold) if bound == "lo" else (e.hi <= threshold):
            return 0
    if (p <= threshold) if bound == "lo" else (p >= threshold):
        return None
    m = max(n, 1)
    while not clears(m):
        m *= 2
        if m > cap:
            return None
    lo_m, hi_m = m // 2, m
    while lo_m + 1 < hi_m:  # smallest m that clears
        mid = (lo_m + hi_m) // 2
        lo_m, hi_m = (lo_m, mid) if clears(mid) else (mid, hi_m)
    return max(hi_m - n, 0)


@dataclass
class Verdict:
    """One gate or rollout check: ``pass``, ``fail`` or ``insufficient`` (not enough evidence either way).

    Attributes:
        status: ``pass`` | ``fail`` | ``insufficient``.
        rule: the rule as written in the policy (e.g. ``heldout_characters.markup_validity lo >= 0.8``).
        estimate: the statistic the rule read (with its n and interval).
        detail: why, in words (and for ``insufficient``: how many more observations are needed).
    """

    status: str
    rule: str
    estimate: Estimate = field(default_factory=empty)
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "status": self.status,
            "rule": self.rule,
            "estimate": self.estimate.to_dict(),
            "detail": self.detail,
        }


PASS, FAIL, INSUFFICIENT = "pass", "fail", "insufficient"


def combine(verdicts: Sequence[Verdict]) -> str:
    """Overall verdict: ``fail`` if any check fails, else ``insufficient`` if any lacks evidence, else ``pass``."""
    statuses = {v.status for v in verdicts}
    return FAIL if FAIL in statuses else INSUFFICIENT if INSUFFICIENT in statuses else PASS


def quantile_interval(
    sorted_xs: Sequence[float], q: float, confidence: float = DEFAULT_CONFIDENCE
) -> Estimate:
    """The ``q``-quantile (``q`` in (0, 1), e.g. 0.95 for a p95 latency) of a sorted sample with a
    distribution-free confidence interval from order statistics.

    The number of observations below the true quantile is Binomial(n, q), so the order statistics
    at ranks ``n q -/+ z sqrt(n q (1 - q))`` bracket it with probability ~``confidence`` (normal
    approximation of the binomial; Conover 1999, *Practical Nonparametric Statistics*, 3rd ed.,
    sec. 3.2). Ranks outside the sample are clamped to its minimum / maximum, so at small n the
    interval is the sample range (callers require a minimum n before judging).

    Args:
        sorted_xs: the sample, ascending (any indexable sequence: list, numpy array).
        q: the quantile.

    Returns:
        An :class:`Estimate` (``method="order-statistic"``) whose value is the nearest-rank quantile;
        :func:`empty` for no data.

    Raises:
        ValueError: ``q`` outside (0, 1).
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile_interval: q={q} outside (0, 1)")
    n = len(sorted_xs)
    if n == 0:
        return empty(confidence)
    z = z_value(confidence)
    half = z * math.sqrt(n * q * (1 - q))
    rank = min(n, max(1, math.ceil(q * n)))  # nearest rank, 1-based
    lo_rank = min(n, max(1, math.floor(n * q - half)))
    hi_rank = min(n, max(1, math.ceil(n * q + half) + 1))
    return Estimate(
        float(sorted_xs[rank - 1]), n, float(sorted_xs[lo_rank - 1]), float(sorted_xs[hi_rank - 1]),
        confidence, "order-statistic",
    )  # fmt: skip


def cluster_jackknife(
    clusters: Mapping[Hashable, Sequence[Any]],
    statistic: Callable[[list[Any]], float],
    confidence: float = DEFAULT_CONFIDENCE,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> Estimate:
    """Delete-one-cluster jackknife interval of a corpus statistic: ``value ± z * se`` with
    ``se² = (g-1)/g * Σ (θ₋ᵢ - θ̄)²`` over the g leave-one-cluster-out values (Quenouille 1956; Efron &
    Stein 1981, Ann. Statist. 9:586), clipped to ``bounds``.

    For statistics that a bootstrap biases: resampling with replacement repeats whole dialogues, and
    a repeated dialogue repeats its n-grams, so distinct-n of a bootstrap replicate is systematically
    lower than the sample's (measured on the default run: distinct-2 0.299 with a bootstrap interval
    of [0.176, 0.234], not covering the value). Leaving a cluster out repeats nothing.
    """
    groups = [list(v) for v in clusters.values() if len(v)]
    items = [x for g in groups for x in g]
    if not items:
        return empty(confidence)
    value = float(statistic(items))
    g = len(groups)
    if g == 1:
        return Estimate(value, len(items), math.nan, math.nan, confidence, "jackknife", clusters=1)
    loo = [float(statistic([x for j, grp in enumerate(groups) if j != i for x in grp])) for i in range(g)]
    bar = sum(loo) / g
    se = math.sqrt((g - 1) / g * sum((t - bar) ** 2 for t in loo))
    z = z_value(confidence)
    lo, hi = max(bounds[0], value - z * se), min(bounds[1], value + z * se)
    return Estimate(value, len(items), lo, hi, confidence, "jackknife", clusters=g)
