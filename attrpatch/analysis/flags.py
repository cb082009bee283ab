"""Flags: where the approximation and the exact effect disagree, where metrics or directions disagree, and
the measured cause behind each (docs/methods.md#flags, docs/methods.md#measured-causes). The one home of
flag names and thresholds.

    sign_flip           opposite signs, both above the tolerance
    large_error         |approx - exact| > 50% of max(|approx|, |exact|), and above the tolerance
    missed              exact ranks in the top-k of the verified, approx outside its top-k
    overestimated       approx ranks in the top-k, exact outside it
    metrics_disagree    normalised effects change sign or importance across metrics
    directions_disagree denoising restores a different share of the gap than noising removes
    corruptions_disagree normalised effects change sign or importance across corruptions (several
                        corruptions in one run: the comparison's own output, corruptions.json)
    non_finite          an exact effect is NaN or infinite
"""

from ..engine.metrics import DISCRETE_METRICS
from ..inputs.directions import restored_share
from ..model.sites import RESID_LIKE, Component
from .records import Finding

APPROX_FLAGS = ("sign_flip", "large_error", "missed", "overestimated")  # approximation vs exact
LABELLED_FLAGS = ("sign_flip", "large_error", "missed")  # the ones figures name their points by
CORRUPTIONS_DISAGREE = "corruptions_disagree"
NON_FINITE = "non_finite"

SATURATED_MAX_PROB = 0.95  # a head whose rows put more than this on one token is called saturated
LARGE_CHANGE = 0.75  # relative activation change above which linearisation is doubtful
METRIC_TOL = 0.1  # normalised effect below which a component "does nothing" under a metric
DIRECTION_TOL = 0.3  # normalised denoise/noise difference called a disagreement


def disagreement_flags(approx: float, exact: float, tol: float, rank_approx: int, rank_exact: int,
                       k: int) -> list[str]:
    """The APPROX_FLAGS that apply (see the module docstring); ``tol``: the size below which an effect
    counts as zero."""
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


def causes(flags: list[str], c: Component, evidence: dict) -> list[str]:
    """Likely causes of an AtP/exact disagreement, each with the number that backs it."""
    if not flags:
        return []
    causes = []
    p = evidence.get("attn_max_prob")
    if p is not None and p > SATURATED_MAX_PROB:
        causes.append(f"attention saturation: mean max attention probability {p:.3f} in L{c.layer}")
    ch = evidence["activation_change"]
    if ch > LARGE_CHANGE:
        causes.append(f"large activation change: |a_src - a_recv| = {ch:.2f} x max(|a_src|, |a_recv|)")
    if c.site == "embed" or (c.site in RESID_LIKE and c.layer == 0):
        causes.append("early-layer non-linearity (embeddings, layer 0)")
    return causes


def disagree(norms: dict[str, float]) -> bool:
    """Normalised effects (finite) that change sign between two that matter (>= METRIC_TOL), or that matter
    under one and are about zero (< METRIC_TOL / 2) under another."""
    big = [m for m, v in norms.items() if abs(v) >= METRIC_TOL]
    small = [m for m, v in norms.items() if abs(v) < METRIC_TOL / 2]
    return any(norms[a] * norms[b] < 0 for a in big for b in big) or bool(big and small)


def corruption_comparison(runs: dict[str, list[dict]], metric: str) -> list[dict]:
    """The components verified under two or more corruptions (``runs``: corruption label -> a report's
    components), one entry per component x direction with its normalised exact effect under ``metric``
    per corruption, flagged CORRUPTIONS_DISAGREE by the rule of :func:`disagree`."""
    by_key: dict = {}
    for label, comps in runs.items():
        for e in comps:
            entry = by_key.setdefault((e["name"], e["direction"]), {
                "name": e["name"], "direction": e["direction"], "site": e["site"], "layer": e["layer"],
                "pos": e["pos"], "exact_norm": {}, "flags": []})
            value = e["exact_norm"].get(metric)
            if value is not None and value == value:  # NaN (JSON: null) is left out
                entry["exact_norm"][label] = value
    out = [e for e in by_key.values() if len(e["exact_norm"]) > 1]
    for e in out:
        if disagree(e["exact_norm"]):
            e["flags"].append(CORRUPTIONS_DISAGREE)
    return out


def mark_cross_flags(comps: list[Finding], metric: str) -> None:
    """Flags that compare metrics with one another, and denoising with noising, for the same component."""
    for e in comps:
        norms = {m: v for m, v in e.exact_norm.items()  # drop NaN; discrete metrics hide small effects
                 if v == v and m not in DISCRETE_METRICS}
        if disagree(norms):
            e.flags.append("metrics_disagree")
            e.causes.append("metric non-linearity: normalised effects " +
                            ", ".join(f"{m} {v:+.2f}" for m, v in norms.items()))
    by_key: dict = {}
    for e in comps:
        by_key.setdefault(e.name, {})[e.direction] = e
    for pair in by_key.values():
        if len(pair) < 2:
            continue
        d = restored_share("denoise", pair["denoise"].exact_norm[metric])
        n = restored_share("noise", pair["noise"].exact_norm[metric])
        if d == d and n == n and abs(d - n) > DIRECTION_TOL:
            kind = "sufficient but not necessary (backup/OR-like)" if abs(d) > abs(n) else \
                "necessary but not sufficient (AND-like)"
            for e in pair.values():
                e.flags.append("directions_disagree")
                e.causes.append(f"backup behaviour: denoising restores {d:+.2f}, noising removes {n:+.2f} "
                                f"of the clean-corrupt gap: {kind}")
