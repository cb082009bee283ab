"""How approximation and exact effect agree: correlations, sign agreement, recall of the true top-k, the
false-negative bound from the control sample, and the grading of each estimator on the verified set.

Pure functions on numbers: no model here. ``approx`` is a score, ``exact`` an exact effect, both per
component ([component] float tensors, same order).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..methods.attribution import Scores
from .ranking import magnitude_order

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
    """From a uniform random control sample of the components AtP did not put in its top-k.

    With probability ``confidence``, at most ``fraction`` (about ``count``) of the unverified components
    have |exact effect| above ``max_control`` (order statistics: P(all n draws fall below the (1-p)
    quantile) = (1-p)^n). ``exceeding_top``: control components whose |exact| beats the smallest |exact|
    of the verified top-k: direct evidence of misses.
    """

    n_control: int
    n_unverified: int
    max_control: float
    confidence: float
    fraction: float
    count: float
    exceeding_top: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def false_negatives(control_exact: Tensor, top_exact: Tensor, n_unverified: int,
                    confidence: float = 0.95) -> FalseNegatives:
    n = len(control_exact)
    if n == 0:
        return FalseNegatives(0, n_unverified, float("nan"), confidence, 1.0, float(n_unverified), 0)
    fraction = 1 - (1 - confidence) ** (1 / n)
    min_top = float(top_exact.abs().min()) if len(top_exact) else math.inf
    return FalseNegatives(
        n_control=n, n_unverified=n_unverified, max_control=float(control_exact.abs().max()),
        confidence=confidence, fraction=fraction, count=fraction * n_unverified,
        exceeding_top=int((control_exact.abs() > min_top).sum()))


def tolerance(scores: Scores, metric: str) -> float:
    """Effects smaller than 1% of the clean-corrupt gap are treated as zero when comparing signs."""
    return max(0.01 * abs(scores.clean_metric[metric] - scores.corrupt_metric[metric]), 1e-6)
