"""The edge benchmark: EAP for every edge, and exact patching of random edges, per edge, marginal."""

from __future__ import annotations

import random

import attrpatch as ap

from .common import CLOCKS, Bench, fmt, mb, med, verdict


def bench_edges(b: Bench, repeats: int, n_edges: int, rng: random.Random) -> dict:
    """EAP for every edge (ratio to one forward) and exact patching of random edges, per edge, marginal."""
    times = []
    for _ in range(repeats):
        b.forward()
        t, peak, scores = b.timed(lambda: ap.attribute_edges(b.model, b.batch, metrics=["logit_diff"]))
        times.append(t)
        b.log(f"  EAP, {scores.graph.n_edges} edges: {fmt(t)}")
    edges = rng.sample(scores.graph.edges(), n_edges)
    b.forward()
    empty, _, _ = b.timed(lambda: ap.patch_edges(b.model, b.batch, []))
    b.forward()
    full, _, effects = b.timed(lambda: ap.patch_edges(b.model, b.batch, edges))
    b.log(f"  exact edge patching, {n_edges} edges: {fmt(full)} (fixed cost {fmt(empty)})")
    res = {"n_edges": scores.graph.n_edges, "n_patched": n_edges, "peak_bytes": peak,
           "forward_equivalents_per_edge": effects.passes["forward_equivalents"] / n_edges}
    for clock in CLOCKS:
        res[f"fwd_{clock}"] = med(times, clock) / b.unit(clock)
        res[f"per_edge_fwd_{clock}"] = (full[clock] - empty[clock]) / n_edges / b.unit(clock)
        res[f"fixed_fwd_{clock}"] = empty[clock] / b.unit(clock)
    return res


def edge_lines(e: dict) -> list[str]:
    return [
        f"{'EAP, every edge (' + str(e['n_edges']) + '), 1 metric':<44}{e['fwd_wall']:>7.2f}x{'':>10}{'<= 4x':>9}  "
        f"{verdict('eap', e['fwd_wall']):<7}{e['fwd_cpu']:>6.2f}x{'':>9}  {verdict('eap', e['fwd_cpu']):<6}"
        f"{mb(e['peak_bytes']):>9}",
        f"{'exact edge patching, per edge (marginal)':<44}{e['per_edge_fwd_wall']:>7.3f}x{'':>10}{'<= 0.35x':>9}  "
        f"{verdict('edge_patch', e['per_edge_fwd_wall']):<7}{e['per_edge_fwd_cpu']:>6.3f}x{'':>9}  "
        f"{verdict('edge_patch', e['per_edge_fwd_cpu']):<6}",
        f"  ({e['n_patched']} random edges, {e['forward_equivalents_per_edge']:.2f} forward-equivalents each; "
        f"fixed cost per call {e['fixed_fwd_wall']:.2f} fwd wall)",
    ]
