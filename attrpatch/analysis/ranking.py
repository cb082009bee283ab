"""Ranking by the approximation and choosing what to verify: the top-k by |score| and a seeded uniform
control sample of the rest (the one control draw). Pure functions on numbers: no model here.

A site's components are listed in ``model.sites.components`` order; ``approx`` is their mean score,
[component] float32.
"""

import torch
from torch import Tensor

from ..config import ScreenConfig
from ..engine.metrics import graded
from ..methods.estimators.attribution import Scores
from ..model.sites import Component, Dims, components
from .records import SitePlan


def magnitude_order(values: Tensor) -> list[int]:
    """Indices by descending |value|, ties in index order; non-finite values last (never ranked first)."""
    return torch.argsort(torch.nan_to_num(values.abs(), nan=-1.0, posinf=-1.0), descending=True,
                         stable=True).tolist()


def ranks(values: Tensor) -> Tensor:
    """1 = largest |value|; ties broken by order; non-finite values rank last."""
    order = torch.tensor(magnitude_order(values), dtype=torch.long)
    out = torch.empty_like(order)
    out[order] = torch.arange(1, len(values) + 1)
    return out


def top_k(approx: Tensor, k: int | None) -> list[int]:
    """Indices of the k largest |approx| (all for None), largest first."""
    order = magnitude_order(approx)
    return order if k is None else order[:k]


def control_sample(n: int, chosen: list[int], k: int, seed: int) -> list[int]:
    """A uniform sample of k of the indices 0..n-1 not in ``chosen`` (seeded), sorted: the control sample
    that estimates what the approximation missed."""
    taken = set(chosen)
    rest = torch.tensor([j for j in range(n) if j not in taken], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    return sorted(rest[torch.randperm(len(rest), generator=g)[:k]].tolist())


def candidates(scores: Scores, site: str, metric: str, dims: Dims, n_pos: int,
               per_position: bool) -> tuple[list[Component], Tensor]:
    """Every component of ``site`` and its mean score under ``metric``: (components, [component])."""
    values = scores.values[metric][site]
    if scores.per_prompt:
        values = values.mean(0)
    values = values if per_position else values.sum(1, keepdim=True)  # [layer, pos|1, (unit)]
    return components(site, dims, n_pos, per_position=per_position), values.flatten().float().cpu()


def plan_verification(dims: Dims, n_pos: int, est_scores: dict[str, Scores],
                      config: ScreenConfig) -> dict[str, SitePlan]:
    """Per site: every component, each estimator's scores per metric, and what to verify: the union of
    the estimators' top-k by |score| under the primary metric (the first estimator's order first), and a
    random control sample of the rest: {site: SitePlan}."""
    plan = {}
    for i, site in enumerate(config.sites):
        per_pos = config.per_position(site)
        comps = None
        approx: dict[str, dict] = {}
        for est, scores in est_scores.items():
            approx[est] = {}
            for m in graded(config.metrics):  # discrete metrics have no scores
                comps, approx[est][m] = candidates(scores, site, m, dims, n_pos, per_pos)
        plan[site] = plan_site(site, comps, approx, first=config.estimators[0], metric=config.metric,
                               k=config.top_k, random_k=config.random_k, seed=config.seed + i)
    return plan


def plan_site(site: str, every: list, approx: dict[str, dict[str, Tensor]], *, first: str, metric: str,
              k: int | None, random_k: int, seed: int) -> SitePlan:
    """What to verify among one site's candidates ``every`` (components, or the edge screen's edges), scored
    per estimator and metric (``approx``: {estimator: {metric: [candidate]}}; ``first`` ranks): the union of
    the estimators' top-k by |score| under ``metric`` (``first``'s order first) and a seeded uniform control
    sample of ``random_k`` of the rest."""
    tops = {est: top_k(by_metric[metric], k) for est, by_metric in approx.items()}
    top = list(dict.fromkeys(j for est in (first, *tops) for j in tops[est]))
    control = control_sample(len(every), top, random_k, seed)
    return SitePlan(site=site, all=every, approx=approx[first], by_estimator=approx, tops=tops, top=top,
                    control=control, rank_approx=ranks(approx[first][metric]))
