"""The AtP benchmark: ap.attribute over every default site, the plain backward and the block-wise one
(recompute=True, the CLI's --low-memory), interleaved; their time and memory, and the live-memory probe in a
fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import attrpatch as ap

from .common import CLOCKS, PRESETS, Bench, _max, fmt, mb, med, site_bytes, verdict, git_state

BENCH = Path(__file__).resolve().parent.parent / "bench.py"  # the entry point the memory probe reruns


ATP_SITES = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")


ATP_MODES = {"plain": {}, "recompute": {"recompute": True}}  # mode -> attribute(...) options


def bare_passes(b: Bench) -> None:
    """AtP's floor: its three passes without attrpatch's hooks. The source run without grad, the receiving
    run with grad from a leaf at the embeddings (forward_last: last-position logits only, as AtP), and one
    backward of logit_diff to that leaf: what AtP costs before any site is read, delta formed or product taken."""
    from attrpatch.engine.forward import forward_last
    from attrpatch.engine.metrics import Target, metric

    spec = ap.model_spec(b.model)
    batch, leaf = b.batch, []

    def make_leaf(module, args, out):
        leaf.append(out.detach().requires_grad_(True))
        return leaf[-1]
    with torch.no_grad():
        source = forward_last(spec, batch.clean, batch.mask, batch.last)
    handle = b.model.get_input_embeddings().register_forward_hook(make_leaf)
    try:
        with torch.enable_grad():
            logits = forward_last(spec, batch.corrupt, batch.mask, batch.last)
            total = metric("logit_diff", logits, Target.from_clean(batch.answer, batch.wrong, source)).sum()
            torch.autograd.grad(total, leaf)
    finally:
        handle.remove()


def bench_atp(b: Bench, dims, repeats: int, itemsize: int) -> dict:
    """AtP over ATP_SITES, each mode ``repeats`` times, and its floor (bare_passes), interleaved with plain
    forwards."""
    calls = {mode: (lambda options=options: ap.attribute(b.model, b.batch, sites=ATP_SITES, metrics=["logit_diff"],
                                                           **options)) for mode, options in ATP_MODES.items()}
    calls["floor"] = lambda: bare_passes(b)
    res = {mode: {"seconds": [], "peaks": []} for mode in calls}
    for _ in range(repeats):
        for mode, call in calls.items():
            b.forward()
            t, peak, _ = b.timed(call)
            res[mode]["seconds"].append(t)
            res[mode]["peaks"].append(peak)
            b.log(f"  AtP {mode} {fmt(t)}")
    n, n_pos = b.batch.n, b.batch.n_pos
    cache = sum(site_bytes(s, dims, n, n_pos, itemsize) * dims.n_layers for s in ATP_SITES)
    return {mode: dict(seconds=r["seconds"], peak_bytes=_max(r["peaks"]), cache_bytes=cache,
                       prompt_bytes=prompt_bytes(dims, n, n_pos)) for mode, r in res.items()}


def atp_live_memory(atp: dict, args) -> None:
    """AtP's peak per mode once more, in a fresh process whose glibc mmap threshold is 64 KiB from the start
    (see the module docstring): ``live_peak_bytes``. CPU only."""
    import subprocess
    if (args.device or PRESETS[args.preset]["device"]) != "cpu":
        return
    argv = [sys.executable, str(BENCH), "--preset", args.preset, "--memory-probe",
            "--threads", str(args.threads), "--seed", str(args.seed)]
    for flag in ("dtype", "batch", "seq"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"live memory probe failed: {done.stderr[-1000:]}", file=sys.stderr)
        return
    for mode, peak in json.loads(done.stdout.strip().splitlines()[-1]).items():
        atp[mode]["live_peak_bytes"] = peak


def memory_probe(b: Bench) -> None:
    """--memory-probe (run by atp_live_memory): each mode's peak RSS growth, after one warm-up call, as JSON."""
    peaks = {}
    for mode, options in ATP_MODES.items():
        def call():
            return ap.attribute(b.model, b.batch, sites=ATP_SITES, metrics=["logit_diff"], **options)
        call()
        peaks[mode] = b.timed(call)[1]
    print(json.dumps(peaks))


def prompt_bytes(dims, n: int, n_pos: int) -> dict[str, int]:
    """Bytes of the per-prompt float32 scores the default screen keeps per direction and estimator (4 graded
    metrics, the default sites): every position (attribute(per_prompt=True), before) or summed over positions
    for the all-position head and neuron sites (prompt_positions, now)."""
    def size(site, per_pos):
        units = dims.n_units(site) or 1
        return n * dims.n_layers * (n_pos if per_pos else 1) * units * 4
    sites = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")
    return {"before": 4 * sum(size(s, True) for s in sites),
            "now": 4 * sum(size(s, s not in ("head", "neuron")) for s in sites)}


def atp_lines(atp: dict) -> list[str]:
    lines = []
    for mode, title in (("plain", "AtP, 5 sites, all layers x pos, 1 metric"),
                        ("recompute", "  the same, recompute=True (--low-memory)")):
        a, goal = atp[mode], mode == "plain"  # the speed goal is the plain backward's; recompute trades time
        lines.append(f"{title:<44}{a['fwd_wall']:>7.2f}x{'':>10}{'<= 2.5x' if goal else '':>9}  "
                     f"{verdict('atp', a['fwd_wall']) if goal else '':<7}{a['fwd_cpu']:>6.2f}x{'':>9}  "
                     f"{verdict('atp', a['fwd_cpu']) if goal else '':<6}{mb(a['peak_bytes']):>9}{mb(a['cache_bytes']):>8}")
    floor = atp["floor"]
    lines.append(f"  its floor: the same 3 passes, no hooks{floor['fwd_wall']:>11.2f}x{'':>28}{floor['fwd_cpu']:>6.2f}x"
                 f"   AtP / floor: {atp['plain']['fwd_wall'] / floor['fwd_wall']:.2f}x wall, "
                 f"{atp['plain']['fwd_cpu'] / floor['fwd_cpu']:.2f}x cpu")
    for mode in ATP_MODES:
        a = atp[mode]
        rss = a["peak_bytes"] / a["cache_bytes"] if a["peak_bytes"] is not None else float("nan")
        live = a.get("live_peak_bytes")
        live_text = "" if live is None else (f", live {mb(live)} = {live / a['cache_bytes']:.2f}x "
                                             f"({verdict('atp_memory', live / a['cache_bytes'])})")
        lines.append(f"  AtP {mode} memory / cached site activations (target <= 1.5x): peak RSS {rss:.2f}x "
                     f"({verdict('atp_memory', rss)}){live_text}")
    kept = atp["plain"]["prompt_bytes"]
    lines.append(f"  per-prompt scores the screen keeps per direction and estimator (4 metrics): {mb(kept['now'])}, "
                 f"was {mb(kept['before'])} with every position kept")
    return lines


def atp_ratios(b: Bench, atp: dict) -> None:
    for a in atp.values():
        for clock in CLOCKS:
            a[f"fwd_{clock}"] = med(a["seconds"], clock) / b.unit(clock)


def only_atp(b: Bench, dims, args, itemsize: int, t_start: float) -> dict:
    """--only atp: the AtP rows (both modes, time and memory) and the unit."""
    atp = bench_atp(b, dims, args.repeats, itemsize)
    b.forward()
    atp_ratios(b, atp)
    atp_live_memory(atp, args)
    b.mem.close()
    print(f"AtP on {args.preset}, batch {b.batch.n} x {b.batch.n_pos}; unit: 1 plain forward, median of {len(b.fwd)}: "
          f"{b.unit('wall'):.3f} s wall, {b.unit('cpu'):.3f} s cpu; attrpatch {git_state()}; load avg "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'measurement (ratios to the unit)':<44}{'wall':>8}{'':>10}{'target':>9}  {'result':<7}{'cpu':>7}{'':>9}  "
          f"{'result':<6}{'peak mem':>9}{'cache':>8}")
    print("\n".join(atp_lines(atp)))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    result = {"preset": args.preset, "atp": atp, "unit_seconds": {c: b.unit(c) for c in CLOCKS},
              "forward_seconds": b.fwd}
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result
