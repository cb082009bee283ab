"""Rank by the approximation, choose what to verify, and measure how approximation and exact agree.

Pure functions on numbers: no model here. ``approx`` is an AtP score, ``exact`` an exact effect, both
per component ([component] float tensors, same order).
"""

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .attribute import Scores
from .sites import Component, Dims, components

RESID_LIKE = ("embed", "resid_pre", "attn_out", "mlp_out")


def default_per_position(site: str) -> bool:
    """Researchers start per position for the residual-stream sites, at all positions for heads/neurons."""
    return site in RESID_LIKE


def candidates(scores: Scores, site: str, metric: str, dims: Dims, n_pos: int,
               per_position: bool) -> tuple[list[Component], Tensor]:
    """Every component of ``site`` and its mean score under ``metric``: (components, [component])."""
    values = scores.values[metric][site]
    if scores.per_prompt:
        values = values.mean(0)
    values = values if per_position else values.sum(1, keepdim=True)  # [layer, pos|1, (unit)]
    return components(site, dims, n_pos, per_position=per_position), values.flatten().float().cpu()


def select(approx: Tensor, top_k: int | None, random_k: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the top-k by |approx| (all for None), and a seeded random sample of the rest."""
    magnitude = torch.nan_to_num(approx.abs(), nan=-1.0, posinf=-1.0)  # non-finite scores rank last
    order = torch.argsort(magnitude, descending=True, stable=True).tolist()
    k = len(order) if top_k is None else min(top_k, len(order))
    rest = order[k:]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(rest), generator=g)[:random_k].tolist()
    return order[:k], sorted(rest[i] for i in pick)


def ranks(values: Tensor) -> Tensor:
    """1 = largest |value|; ties broken by order; non-finite values rank last."""
    order = torch.argsort(torch.nan_to_num(values.abs(), nan=-1.0, posinf=-1.0), descending=True, stable=True)
    out = torch.empty_like(order)
    out[order] = torch.arange(1, len(values) + 1)
    return out


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
    true_top = set(torch.argsort(exact.abs(), descending=True, stable=True)[:k].tolist())
    approx_top = set(torch.argsort(approx.abs(), descending=True, stable=True)[:k].tolist())
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


def disagreement_flags(approx: float, exact: float, tol: float, rank_approx: int, rank_exact: int,
                       k: int) -> list[str]:
    """Where the linear approximation and the exact effect disagree, in words researchers grep for.

    sign_flip       opposite signs, |exact| > tol and |approx| > tol
    large_error     |approx - exact| > 50% of max(|approx|, |exact|), and > tol
    missed          exact ranks in the top-k of the verified, approx outside its top-k; |exact| > tol
    overestimated   approx ranks in the top-k, exact outside it; |approx| > tol
    """
    flags = []
    if abs(exact) > tol and abs(approx) > tol and approx * exact < 0:
        flags.append("sign_flip")
    err = abs(approx - exact)
    if err > tol and err > 0.5 * max(abs(approx), abs(exact)):
        flags.append("large_error")
    if rank_exact <= k < rank_approx and abs(exact) > tol:
        flags.append("missed")
    if rank_approx <= k < rank_exact and abs(approx) > tol:
        flags.append("overestimated")
    return flags
