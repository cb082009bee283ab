"""How approximation and exact effect agree: correlations, sign agreement, recall of the true top-k, the
false-negative bound from the control sample, and the grading of each estimator on the verified set.

Pure functions on numbers: no model here. ``approx`` is a score, ``exact`` an exact effect, both per
component ([component] float tensors, same order).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..methods.estimators.attribution import Scores
from .ranking import THRESHOLD_SHARE, magnitude_order

def pearson(x: Tensor, y: Tensor) -> float:
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([x.double(), y.double()]))[0, 1])


def spearman(x: Tensor, y: Tensor) -> float:
    def rank(v):
        r = torch.empty(len(v), dtype=torch.float64)
        r[torch.argsort(v, stable=True)] = torch.arange(len(v), dtype=torch.float64)
        return r
    return pearson(rank(x), rank(y))


@dataclass(frozen=True)
class Agreement:
    """How well approx tracks exact on the verified components of one site/direction/metric."""

    n: int
    pearson: float
    spearman: float
    sign_agreement: float  # fraction with the same sign, among components whose |exact| > tol
    recall_at_k: float  # of the true top-k (by |exact|, among verified), the fraction approx put in its top-k
    k: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def agreement(approx: Tensor, exact: Tensor, k: int, tol: float) -> Agreement:
    """Non-finite pairs are left out (they are reported separately, never ranked)."""
    finite = torch.isfinite(approx) & torch.isfinite(exact)
    approx, exact = approx[finite], exact[finite]
    k = min(k, len(exact))
    big = exact.abs() > tol
    signs = (torch.sign(approx[big]) == torch.sign(exact[big])).double().mean() if big.any() else torch.tensor(float("nan"))
    true_top = set(magnitude_order(exact)[:k])  # finite here, so the order is by |value| alone
    approx_top = set(magnitude_order(approx)[:k])
    return Agreement(n=len(exact), pearson=pearson(approx, exact), spearman=spearman(approx, exact),
                     sign_agreement=float(signs), recall_at_k=len(true_top & approx_top) / max(k, 1), k=k)


@dataclass(frozen=True)
class FalseNegatives:
    """What the estimator may have missed among the components never verified, from a uniform random control
    sample of those outside its top-k (docs/methods.md#control-sample).

    ``threshold`` = THRESHOLD_SHARE x the largest |exact| verified at the site (top-k and controls): an
    effect that matters next to what was found. ``n_unverified`` counts the components neither in the top-k
    nor in the control sample. The controls are a sample without replacement of the N = n_control +
    n_unverified components outside the top-k; if K of those N exceed the threshold, the number of controls
    that do is hypergeometric, so ``count_upper`` = K_upper - n_control_above, with K_upper the largest K
    whose probability of showing at most n_control_above is >= 1 - confidence: with that confidence at most
    ``count_upper`` unverified components exceed the threshold.

    ``verdict``: "bounded"; "cannot_bound" when ``count_upper`` > ``n_verified_above`` (the unverified might
    hold more components above the threshold than the verified do, so the sample rules out nothing worth
    saying; ``controls_needed`` is about how many controls, none above it, would bound it, when none of them is above); "all_verified";
    "no_control". ``max_control``, ``fraction`` and ``count``: the order-statistics reading (at most a
    fraction 1 - (1 - confidence)^(1/n) of the unverified exceed the largest control). ``exceeding_top``:
    controls whose |exact| beats the smallest |exact| of the verified top-k: direct evidence of misses.
    """

    n_control: int
    n_unverified: int
    max_control: float
    confidence: float
    fraction: float
    count: float
    exceeding_top: int
    threshold: float = math.nan
    n_verified_above: int = 0
    n_control_above: int = 0
    count_upper: int = 0
    controls_needed: int = 0
    verdict: str = "no_control"

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _at_most(k: int, pool: int, hits: int, drawn: int) -> float:
    """P(X <= k), X hypergeometric: ``drawn`` of ``pool`` without replacement, ``hits`` of them marked."""
    low, high = max(0, drawn - (pool - hits)), min(k, hits, drawn)
    total = _log_comb(pool, drawn)
    return sum(math.exp(_log_comb(hits, x) + _log_comb(pool - hits, drawn - x) - total) for x in range(low, high + 1))


def upper_hits(k: int, pool: int, drawn: int, confidence: float = 0.95) -> int:
    """The largest number of marked components among ``pool`` that still shows at most ``k`` of them in
    ``drawn`` uniform draws with probability >= 1 - confidence (the exact one-sided upper bound)."""
    low, high = k, pool - (drawn - k)  # P(X <= k) decreases in the number marked
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if _at_most(k, pool, mid, drawn) >= 1 - confidence else (low, mid - 1)
    return low


def _controls_needed(pool: int, allowed: int, confidence: float) -> int:
    """About how many controls, none above the threshold, bound the unverified by ``allowed``."""
    low, high = 1, pool
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if upper_hits(0, pool, mid, confidence) <= allowed else (mid + 1, high)
    return low


def false_negatives(control_exact: Tensor, top_exact: Tensor, n_unverified: int,
                    confidence: float = 0.95) -> FalseNegatives:
    """``n_unverified``: the components neither in the top-k nor among the controls."""
    n = len(control_exact)
    verified = torch.cat([top_exact, control_exact]).abs()
    threshold = THRESHOLD_SHARE * float(verified.max()) if len(verified) else math.nan
    above = int((verified > threshold).sum()) if len(verified) else 0
    if n == 0:
        verdict = "all_verified" if n_unverified == 0 else "no_control"
        return FalseNegatives(n_control=0, n_unverified=n_unverified, max_control=float("nan"), confidence=confidence,
                              fraction=1.0, count=float(n_unverified), exceeding_top=0, threshold=threshold,
                              n_verified_above=above, count_upper=n_unverified, verdict=verdict)
    fraction = 1 - (1 - confidence) ** (1 / n)
    min_top = float(top_exact.abs().min()) if len(top_exact) else math.inf
    hits = int((control_exact.abs() > threshold).sum())
    pool = n + n_unverified
    upper = upper_hits(hits, pool, n, confidence) - hits if n_unverified else 0
    verdict = "all_verified" if n_unverified == 0 else "bounded" if upper <= above else "cannot_bound"
    needed = _controls_needed(pool, above, confidence) if verdict == "cannot_bound" and not hits else 0
    return FalseNegatives(
        n_control=n, n_unverified=n_unverified, max_control=float(control_exact.abs().max()),
        confidence=confidence, fraction=fraction, count=fraction * n_unverified,
        exceeding_top=int((control_exact.abs() > min_top).sum()), threshold=threshold, n_verified_above=above,
        n_control_above=hits, count_upper=upper, controls_needed=needed, verdict=verdict)


def tolerance(scores: Scores, metric: str) -> float:
    """Effects smaller than 1% of the clean-corrupt gap are treated as zero when comparing signs."""
    return max(0.01 * abs(scores.clean_metric[metric] - scores.corrupt_metric[metric]), 1e-6)
