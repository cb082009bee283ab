"""The grading of each estimator on the verified set: how its scores track the exact effects (with
bootstrap intervals), the recall of the true top-k, the verified components it missed, and its cost.
Pure functions on numbers: no model here.
"""

import torch

from ..config import ScreenConfig
from .agreement import agreement, tolerance
from .intervals import with_intervals
from .records import SitePlan


def grade_estimators(plan: dict[str, SitePlan], exact: dict, config: ScreenConfig, est_scores: dict, seconds: dict,
                     forward_s: float, prompts: dict) -> dict:
    """Per estimator: its cost, and per site how well its scores (primary metric) track the exact effects
    of everything verified (with 95% bootstrap intervals from ``prompts``, steps.Steps.verify), the
    recall of the true top-k, and the controls that beat its top-k."""
    primary = config.metrics.index(config.metric)
    out = {}
    for est, scores in est_scores.items():
        sites = {}
        for site, p in plan.items():
            idx = p.indices
            if not idx:
                continue
            ex = torch.stack([exact[p.all[j]][primary] for j in idx])
            approx = p.by_estimator[est][config.metric][idx]
            k = len(p.tops[est])
            tol = tolerance(scores, config.metric)
            a = agreement(approx, ex, k=max(k, 1), tol=tol).to_dict()
            a = with_intervals(a, prompts["scores"][est][config.metric][site][idx],
                               torch.stack([prompts["exact"][p.all[j]][primary] for j in idx]), tol)
            in_top = torch.tensor([j in set(p.tops[est]) for j in idx])
            weakest = ex[in_top].abs().min() if in_top.any() else torch.tensor(float("inf"))
            a["false_negatives"] = int((ex[~in_top].abs() > weakest).sum())  # verified, outside its top-k
            sites[site] = a
        out[est] = {"cost": {**scores.passes, "seconds": seconds[est],
                             "forward_equivalents": seconds[est] / max(forward_s, 1e-9)}, "sites": sites}
    return out
