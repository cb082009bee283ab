"""Ranking by the approximation and choosing what to verify: the top-k by |score| and a seeded uniform
control sample of the rest (the one control draw). Pure functions on numbers: no model here.

A site's components are listed in ``model.sites.components`` order; ``approx`` is their mean score,
[component] float32.
"""

from dataclasses import replace
from itertools import islice
from typing import Callable

import torch
from torch import Tensor

from ..config import ScreenConfig
from ..engine.metrics import graded
from ..methods.estimators.attribution import Scores
from ..model.sites import Component, Dims, components
from .records import SitePlan

THRESHOLD_SHARE = 0.1  # of interest: this share of the largest verified |effect| of the site (false negatives too)
BLOCK = 10  # adaptive verification extends a site's top list by this many components at a time


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


def plan_verification(dims: Dims, n_pos: int, est_scores: dict[str, Scores], config: ScreenConfig,
                      cost: Callable[[Component], float | None] | None = None) -> dict[str, SitePlan]:
    """Per site: every component, each estimator's scores per metric, and what to verify: the union of
    the estimators' top-k by |score| under the primary metric (the first estimator's order first), and a
    random control sample of the rest: {site: SitePlan}.

    ``cost(c)``: one component's verification in forward-equivalents, None where it cannot have an effect
    (methods/patching/passes.copy_cost; no ``cost``: the top-k only). ``config.verify_budget`` is what a
    direction may spend beyond the top-k and controls: sites in order, a site whose components that can have
    an effect fit in what is left is verified exhaustively (all of them in the estimator's order, no
    controls: its agreement and recall are facts); what remains then grows the others (:func:`extend`)."""
    plan = {}
    for i, site in enumerate(config.sites):
        per_pos = config.per_position(site)
        comps = None
        approx: dict[str, dict] = {}
        for est, scores in est_scores.items():
            approx[est] = {}
            for m in graded(config.metrics):  # discrete metrics have no scores
                comps, approx[est][m] = candidates(scores, site, m, dims, n_pos, per_pos)
        site_plan = plan_site(site, comps, approx, first=config.estimators[0], metric=config.metric,
                              k=config.top_k, random_k=config.random_k, seed=config.seed + i)
        if cost is not None and config.top_k is not None:
            costs = [cost(c) for c in comps]
            base = sum(costs[j] or 0.0 for j in site_plan.indices)
            can = [j for j in magnitude_order(site_plan.approx[config.metric]) if costs[j] is not None]
            whole = sum(costs[j] for j in can)
            spare = spare_budget(plan, config)  # what the sites before this one left
            if spare and whole - base <= spare:  # exhaustive: every component that can have an effect
                site_plan = replace(site_plan, top=can, control=[], mode="exhaustive", stopped="all verified",
                                    no_effect=len(comps) - len(can), cost=whole, extra=max(whole - base, 0.0))
            else:
                site_plan = replace(site_plan, cost=base)
        plan[site] = site_plan
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


def spare_budget(plan: dict[str, SitePlan], config: ScreenConfig) -> float:
    """What is left of the direction's ``verify_budget`` after the sites' extra verification so far."""
    return config.verify_budget - sum(p.extra for p in plan.values())


def extend(plan: SitePlan, exact: Callable[[Component], float], config: ScreenConfig,
           cost: Callable[[Component], float | None], spare: float) -> SitePlan:
    """AtP*'s adaptive stopping for a site not verified exhaustively: while the last ``BLOCK`` components of
    its top list (the estimator's order) hold one with |exact| >= THRESHOLD_SHARE x the largest |exact|
    verified at the site, the next ``BLOCK`` components in that order (not yet verified) join the top list,
    while their cost fits in ``spare`` (forward-equivalents left of the direction's budget).
    ``exact(c)``: a verified component's exact effect under the primary metric. Returns ``plan`` itself when
    it has stopped, with ``stopped`` set: "below threshold", "budget" or "all verified"."""
    if plan.stopped or not config.verify_budget or config.top_k is None:
        return plan
    verified = [abs(exact(plan.all[j])) for j in plan.indices]
    threshold = THRESHOLD_SHARE * max(verified, default=0.0)
    if all(abs(exact(plan.all[j])) < threshold for j in plan.top[-BLOCK:]):
        return replace(plan, stopped="below threshold")
    taken = set(plan.indices)
    order = magnitude_order(plan.approx[config.metric])
    costs = ((j, cost(plan.all[j])) for j in order if j not in taken)
    block = list(islice(((j, c) for j, c in costs if c is not None), BLOCK))  # priced only as far as needed
    if not block:
        return replace(plan, stopped="all verified")
    more = sum(c for _, c in block)
    block = [j for j, _ in block]
    if more > spare:
        return replace(plan, stopped="budget")
    return replace(plan, top=plan.top + block, mode="adaptive", cost=plan.cost + more, extra=plan.extra + more)
