"""The patching benchmark: exact patching batched and resumed vs naive, on the per-position head sweep and on
top-k all-position components; costs per component, marginal."""

from __future__ import annotations

import random
import statistics

import attrpatch as ap

from .common import CLOCKS, Bench, _max, fmt, med, site_bytes


TOPK_SITES = ("head", "neuron", "resid_pre")


def bench_patch(b: Bench, comps: list, n_naive: int, repeats: int, overhead: list[dict], label: str,
                dims, itemsize: int) -> dict:
    """Batched (copies default, resumed) on all of ``comps``; naive on the first ``n_naive``."""
    naive_comps = comps[:n_naive]
    res = {"n_batched": len(comps), "n_naive": len(naive_comps), "batched_seconds": [], "naive_seconds": []}
    peaks = {"batched": [], "naive": []}
    effects = {}
    for _ in range(repeats):
        b.forward()
        t, peak, eff = b.timed(lambda: ap.patch(b.model, b.batch, comps, metrics=["logit_diff"]))
        res["batched_seconds"].append(t)
        peaks["batched"].append(peak)
        effects["batched"] = eff
        b.log(f"  {label} batched ({len(comps)} components): {fmt(t)}")
        b.forward()
        t, peak, eff = b.timed(lambda: ap.patch(b.model, b.batch, naive_comps, metrics=["logit_diff"],
                                                copies=1, resume=False))
        res["naive_seconds"].append(t)
        peaks["naive"].append(peak)
        effects["naive"] = eff
        b.log(f"  {label} naive ({len(naive_comps)} components): {fmt(t)}")
    batched = effects["batched"].values[:len(naive_comps)]
    res["max_abs_diff_naive_vs_batched"] = float((batched - effects["naive"].values).abs().max())
    passes = effects["batched"].passes  # its count includes the source and receiving runs: left out here
    res["forward_equivalents_per_component"] = (passes["forward_equivalents"] - passes.get("runs", 0)) / len(comps)
    for clock in CLOCKS:
        per = {}
        for mode, n in (("batched", len(comps)), ("naive", len(naive_comps))):
            per[mode] = max(med(res[f"{mode}_seconds"], clock) - med(overhead, clock), 0.0) / n
            res[f"{mode}_per_component_fwd_{clock}"] = per[mode] / b.unit(clock)
        res[f"speedup_own_naive_{clock}"] = per["naive"] / per["batched"] if per["batched"] > 0 else float("inf")
    for mode in peaks:
        res[f"{mode}_peak_bytes"] = _max(peaks[mode])
    n, n_pos = b.batch.n, b.batch.n_pos
    keys = sorted({(c.site, c.layer) for c in comps})
    first = min(c.layer for c in comps)
    res["cache_bytes"] = (sum(site_bytes(s, dims, n, n_pos, itemsize) for s, _ in keys)  # source values
                          + (dims.n_layers - first) * n * n_pos * dims.d_model * itemsize)  # block inputs
    return res


def pool_naive(b: Bench, overhead: list[dict], *cases: dict) -> None:
    """Speed-ups against the naive cost per component pooled over all cases: naive patching is one full
    forward per component whatever the component, so pooling only averages out noise."""
    for clock in CLOCKS:
        fixed = med(overhead, clock)
        total = sum(max(med(p["naive_seconds"], clock) - fixed, 0.0) for p in cases)
        naive = total / sum(p["n_naive"] for p in cases) / b.unit(clock)
        for p in cases:
            p[f"pooled_naive_per_component_fwd_{clock}"] = naive
            batched = p[f"batched_per_component_fwd_{clock}"]
            p[f"speedup_{clock}"] = naive / batched if batched > 0 else float("inf")


def per_position_sample(dims, n_pos: int, copies: int, same: int = 0) -> list:
    """Two whole patched passes of the per-position ``head`` sweep: ``copies`` consecutive components in
    (layer, position, head) order, at layers a = L//4 and L-1-a, starting at the same position p.

    A resumed pass costs ~ f(layer) * g(first position), f = (L - l)/L and, where positions before the
    patch are reused, g = (P - p)/P, both affine. The two layers average f over all layers exactly, and p
    is the chunk start with g(p) closest to the mean of g over every component's own position, so the pair
    costs about what the average component of the full sweep does (however attrpatch groups it, as long as
    it never mixes layers and its passes start at their earliest position).

    same: the prompts' shared prefix (passes.same_prefix): heads there change nothing and cost no pass, so
    the sample is drawn from positions ``same`` on (the speed-up is then that of the sweep's real work)."""
    sweep = [c for c in ap.components("head", dims, n_pos, per_position=True) if c.pos >= same]  # layer, pos, head
    per_layer = len(sweep) // dims.n_layers
    starts = range(0, per_layer - copies + 1, copies) if per_layer >= copies else [0]
    mean_g = statistics.mean((n_pos - c.pos) / n_pos for c in sweep[:per_layer])  # same's heads: no pass
    k = min(starts, key=lambda i: abs((n_pos - sweep[i].pos) / n_pos - mean_g))
    a = dims.n_layers // 4
    return [sweep[layer * per_layer + i] for layer in sorted({a, dims.n_layers - 1 - a})
            for i in range(k, min(k + copies, per_layer))]


def topk_sample(dims, n_pos: int, k: int, rng: random.Random) -> list:
    """k random all-position components, as even a mix of TOPK_SITES as k allows (uniform over the pooled
    components would be almost all neurons), at uniformly random layers."""
    pools = {s: ap.components(s, dims, n_pos, per_position=False) for s in TOPK_SITES}
    out, i = [], 0
    while len(out) < k and any(pools.values()):
        pool = pools[TOPK_SITES[i % len(TOPK_SITES)]]
        i += 1
        if pool:  # a small model runs out of resid_pre (one per layer) first
            out.append(pool.pop(rng.randrange(len(pool))))
    rng.shuffle(out)
    return out
