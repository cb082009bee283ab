"""Findings: one entry per verified component x direction (approximation, exact effect under every
metric, ranks, flags, the measured evidence and causes), and every non-finite number, named. Pure: the
measurements come in as numbers.
"""

import torch

from ..config import ScreenConfig
from ..engine.metrics import graded, normalise
from ..methods.estimators.attribution import Scores
from ..model.sites import HEAD_LIKE, Component
from .agreement import agreement, false_negatives, tolerance
from .flags import NON_FINITE, causes, disagreement_flags
from .intervals import effect_intervals, with_intervals
from .ranking import candidates, ranks
from .records import Finding, SitePlan


def site_results(site, plan: SitePlan, exact, config: ScreenConfig, scores: Scores, direction, max_prob, change, n_kv, prompts):
    """The findings of one site's verified components, its agreement per metric (with 95% bootstrap intervals
    over prompt pairs) and its false-negative bound. ``prompts``: per-prompt scores and exact effects
    (steps.Steps.verify)."""
    idx = plan.indices
    comps = plan.verified
    primary = config.metrics.index(config.metric)
    ex = torch.stack([exact[c] for c in comps]) if comps else torch.zeros(0, len(config.metrics))  # [comp, metric]
    k = len(plan.top) if config.top_k is None else min(config.top_k, len(plan.top))
    ex_prompts = torch.stack([prompts["exact"][c] for c in comps]) if comps else None  # [comp, metric, batch]
    approx_prompts = prompts["scores"][config.estimators[0]]
    site_agree = {}
    for j, m in enumerate(config.metrics):
        if m not in plan.approx:  # a discrete metric: exact values only, nothing to agree with
            continue
        tol = tolerance(scores, m)
        site_agree[m] = agreement(plan.approx[m][idx], ex[:, j], k=max(k, 1), tol=tol).to_dict()
        if comps:
            site_agree[m] = with_intervals(site_agree[m], approx_prompts[m][site][idx], ex_prompts[:, j], tol)
    low, high = effect_intervals(ex_prompts[:, primary]) if comps else ([], [])
    n_top = len(plan.top)
    fn = false_negatives(ex[n_top:, primary], ex[:n_top, primary],
                         n_unverified=len(plan.all) - len(idx) - plan.no_effect).to_dict()  # controls are verified
    rank_exact = ranks(ex[:, primary]) if comps else torch.zeros(0)
    entries = []
    for r, (j, c) in enumerate(zip(idx, comps)):
        approx = float(plan.approx[config.metric][j])
        value = float(ex[r, primary])
        flags = disagreement_flags(approx, value, tolerance(scores, config.metric), int(plan.rank_approx[j]),
                                   int(rank_exact[r]), k)
        evidence = {"activation_change": change[c]}
        by_est = {est: float(v[config.metric][j]) for est, v in plan.by_estimator.items()}
        if c.site in HEAD_LIKE:
            evidence["attn_max_prob"] = float(max_prob[c.layer, query_heads(c, max_prob.shape[1], n_kv)].max())
        entries.append(Finding(
            where={"site": c.site, "layer": c.layer, "head": c.head, "neuron": c.neuron, "pos": c.pos},
            direction=direction, name=str(c), selected="top" if r < n_top else "control",
            approx=approx, exact=value, exact_ci=[float(low[r]), float(high[r])],
            approx_estimators=by_est,
            approx_metrics={m: float(plan.approx[m][j]) if m in plan.approx else float("nan")
                            for m in config.metrics},
            exact_metrics={m: float(ex[r, i]) for i, m in enumerate(config.metrics)},
            exact_norm={m: normalise(float(ex[r, i]), scores.clean_metric[m], scores.corrupt_metric[m],
                                     offset=False) for i, m in enumerate(config.metrics)},
            rank_approx=int(plan.rank_approx[j]), rank_exact=int(rank_exact[r]),
            flags=flags, evidence=evidence, causes=causes(flags, c, evidence),
        ))
    return entries, site_agree, fn


def query_heads(c: Component, n_heads: int, n_kv: int) -> slice:
    """The query heads whose attention pattern a head/q (one head) or k/v (its group) component shapes."""
    if c.site in ("head", "q"):
        return slice(c.unit, c.unit + 1)
    group = n_heads // n_kv
    return slice(c.unit * group, (c.unit + 1) * group)


def non_finite(scores, est_scores, comps: list[Finding], config: ScreenConfig, n_pos: int, spec) -> dict:
    """Every non-finite score (per estimator, metric, site) and exact effect, named per component."""
    found = {"scores": [], "effects": []}
    for direction, per_est in est_scores.items():
        for est, sc in per_est.items():
            for m in graded(config.metrics):
                for site in config.sites:
                    names, approx = candidates(sc, site, m, spec.dims, n_pos, config.per_position(site))
                    bad = (~torch.isfinite(approx)).nonzero().flatten().tolist()
                    if bad:
                        found["scores"].append({"direction": direction, "estimator": est, "metric": m,
                                                "site": site, "count": len(bad),
                                                "components": [str(names[i]) for i in bad[:50]]})
    for e in comps:
        bad = [m for m, v in e.exact_metrics.items() if v != v or abs(v) == float("inf")]
        if bad:
            e.flags.append(NON_FINITE)
            found["effects"].append({"direction": e.direction, "component": e.name, "metrics": bad})
    return found
