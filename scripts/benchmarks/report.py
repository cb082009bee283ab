"""The benchmark's table: every measurement as a ratio to one plain forward, with its target and verdict."""

from __future__ import annotations

import statistics

from .atp import atp_lines
from .common import TARGETS, mb, verdict
from .edges import edge_lines
from .screen import screen_lines


def table(r: dict) -> str:
    fw = r["forward_seconds"]
    walls, cpus = [x["wall"] for x in fw], [x["cpu"] for x in fw]
    w = 110
    lines = [
        f"attrpatch benchmark: {r['preset']} ({r['model']}, {r['n_layers']} layers, d_model {r['d_model']}), "
        f"batch {r['batch']} x {r['seq']} tokens, {r['dtype']}, {r['device']}, copies={r['copies']}",
        f"attrpatch {r['attrpatch']}, torch {r['torch']}, transformers {r['transformers']}, {r['threads']} torch threads, {r['machine']}",
        f"unit = 1 plain no-grad forward model(input_ids, attention_mask), median of {len(fw)}: "
        f"wall {statistics.median(walls):.3f} s (range {min(walls):.3f}-{max(walls):.3f}), "
        f"cpu {statistics.median(cpus):.3f} s (range {min(cpus):.3f}-{max(cpus):.3f}); peak {mb(r['forward_peak_bytes'])}",
        f"patch(...) fixed cost per call (source + receiver runs; subtracted below): "
        f"{r['patch_overhead_fwd']['wall']:.2f} fwd wall, {r['patch_overhead_fwd']['cpu']:.2f} fwd cpu",
        "",
        f"{'measurement (ratios to the unit)':<44}{'wall':>8}{'speed-up':>10}{'target':>9}  {'result':<7}"
        f"{'cpu':>7}{'speed-up':>9}  {'result':<6}{'peak mem':>9}{'cache':>8}",
        "-" * w,
    ]
    lines += atp_lines(r["atp"])
    for key, title in (("patch_pos", "head x pos sweep"), ("patch_all", "top-k all-position")):
        p = r[key]
        target = f">= {TARGETS[key][1]}x"
        lines.append(f"{'patch ' + title + ': naive, per comp':<44}{p['naive_per_component_fwd_wall']:>7.3f}x"
                     f"{'':>10}{'':>9}  {'':<7}{p['naive_per_component_fwd_cpu']:>6.3f}x{'':>9}  {'':<6}"
                     f"{mb(p['naive_peak_bytes']):>9}")
        lines.append(f"{'patch ' + title + ': batched, per comp':<44}{p['batched_per_component_fwd_wall']:>7.3f}x"
                     f"{p['speedup_wall']:>9.2f}x{target:>9}  {verdict(key, p['speedup_wall']):<7}"
                     f"{p['batched_per_component_fwd_cpu']:>6.3f}x{p['speedup_cpu']:>8.2f}x  "
                     f"{verdict(key, p['speedup_cpu']):<6}{mb(p['batched_peak_bytes']):>9}{mb(p['cache_bytes']):>8}")
    lines += edge_lines(r["edges"])
    lines.append(f"{'patch naive, per comp, pooled (= 1x base)':<44}"
                 f"{r['patch_pos']['pooled_naive_per_component_fwd_wall']:>7.3f}x{'':>10}{'':>9}  {'':<7}"
                 f"{r['patch_pos']['pooled_naive_per_component_fwd_cpu']:>6.3f}x")
    lines.append("-" * w)
    for key, title in (("patch_pos", "head x pos"), ("patch_all", "top-k all-pos")):
        p = r[key]
        lines.append(f"{title}: batched on {p['n_batched']} components ({p['forward_equivalents_per_component']:.2f}"
                     f" forward-equivalents each, attrpatch's count), naive on {p['n_naive']}; "
                     f"max |naive - batched| = {p['max_abs_diff_naive_vs_batched']:.1e}")
    t = r.get("transformer_lens")
    if t is None:
        lines.append("TransformerLens not installed: skipped")
    elif "error" in t:
        lines.append(f"TransformerLens: failed ({t['error']})")
    else:
        lines.append(f"TransformerLens, same weights: naive hook patching {t['patch_per_component_fwd_wall']:.3f}x "
                     f"per comp (cpu {t['patch_per_component_fwd_cpu']:.3f}x; {t['n_patch']} comps, its 2 setup runs "
                     f"included); "
                     f"hook AtP (cache fwd+bwd) {t['atp_fwd_wall']:.2f}x (cpu {t['atp_fwd_cpu']:.2f}x)")
    lines += screen_lines(r)
    lines.append("wall = perf_counter, cpu = process_time; patching per comp = (time - fixed cost) / components; "
                 "speed-up = pooled naive / batched")
    lines.append(f"peak mem = peak {'allocated' if r['device'] == 'cuda' else 'RSS'} growth during the call; "
                 "cache = analytic bytes of the site activations it caches from one run")
    lines.append(f"total benchmark time {r['total_seconds']:.0f} s")
    return "\n".join(lines)
