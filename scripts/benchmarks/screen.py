"""The default screen benchmark (the smollm2 preset): the screen as the CLI runs it (pipeline.run_screen: prompts,
screen, report files, figures), phase by phase as ratios to one forward; its attribution phase against the
library's AtP over the same sites and metrics; and the whole run on all cores in one process and in two
(--processes), each against a forward at that thread count. Every number from one run."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import replace

import torch

import attrpatch as ap
from attrpatch import pipeline, plot
from attrpatch.config import ScreenConfig, with_primary_metric
from attrpatch.steps import Steps, attribution_options

from .common import Bench

# (phase, owner, attribute): the wall time of each call, the outermost only (grow's verify rounds are grow's)
PHASES = (("prompts", pipeline, "_draw"), ("inputs, baselines, unit forward", Steps, "check_inputs"),
          ("attribution", Steps, "attribute"), ("verification: top-k, controls, exhaustive", Steps, "verify"),
          ("verification: adaptive rounds", Steps, "grow"), ("diagnostics", Steps, "diagnose"),
          ("causes: half patches", Steps, "half"), ("causes: frozen runs", Steps, "frozen"),
          ("subset bound", Steps, "subsets"), ("report files", pipeline, "write_run"), ("figures", plot, "draw_run"))


@contextlib.contextmanager
def phase_clock(seconds: dict):
    """Add each PHASES call's wall time to ``seconds[phase]`` while open (nested calls count to the outer)."""
    depth, saved = [0], []

    def timed(name, real):
        def call(*args, **kwargs):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return call
    for name, owner, attr in PHASES:
        saved.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    try:
        yield seconds
    finally:
        for owner, attr, real in saved:
            setattr(owner, attr, real)


def _run(b: Bench, config: ScreenConfig, n_prompts: int | None = None) -> tuple[float, dict]:
    """One CLI-equivalent run (run_screen into a temporary folder, figures included) of ``n_prompts`` pairs (the
    bench's batch size by default): (wall seconds, report)."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        report = pipeline.run_screen(b.model, b.tokenizer, task=b.task, config=config, out=out,
                                     model_name="bench", n_prompts=n_prompts or b.batch.n)
        return time.perf_counter() - start, report


def _unit(b: Bench) -> float:
    """Median wall seconds of three plain forwards at the current thread count."""
    return sorted(b.timed(lambda: b.plain_forward().logits.sum().item())[0]["wall"] for _ in range(3))[1]


def bench_screen(b: Bench) -> dict:
    """The default screen (both directions): its phases in one process at the bench's threads, the library's AtP
    over the same sites and metrics, then the whole run on every core in one process and in two."""
    config = ScreenConfig(direction="both", progress=False)
    b.forward()
    seconds: dict = {}
    with phase_clock(seconds):
        total, report = _run(b, replace(config, processes=1))
    b.log(f"  screen, phases: {total:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    b.forward()
    full = with_primary_metric(config)
    library = {}
    for d in full.directions:  # the screen's own attribute call, without its condensing and saving
        options = {k: v for k, v in attribution_options(full, d, "atp").items() if k != "progress"}
        library[d] = b.timed(lambda: ap.attribute(b.model, b.batch, **options))[0]["wall"]
    b.log(f"  library AtP, same sites and metrics: {sum(library.values()):.1f} s")
    b.forward()
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    try:
        unit_all = _unit(b)
        whole = {n: _run(b, replace(config, processes=n))[0] for n in (1, 2)}
    finally:
        torch.set_num_threads(threads)
    b.log(f"  screen on {cores} threads: one process {whole[1]:.1f} s, two {whole[2]:.1f} s")
    timing = report["timing"]
    counted = timing["forward_equivalents_verification"]
    verification = sum(v for k, v in seconds.items() if k.startswith(("verification", "causes")))
    return dict(seconds=total, phases=seconds, library_atp=library, timing=timing, counted_fwd=counted,
                clock_fwd=verification / b.unit("wall"), threads=threads, cores=cores, unit_all_threads=unit_all,
                whole=whole)


def bench_growth(b: Bench, sizes: tuple[int, ...] = (16, 64)) -> dict:
    """The default screen (both directions, one process, the bench's threads) at each number of prompt pairs,
    phase by phase: {"sizes", "seconds": {n: wall}, "phases": {n: {phase: wall}}, "counted_fwd": {n: count}}.
    Issue 27's goal: from 16 to 64 pairs each phase grows no faster than the prompts (4x)."""
    config = ScreenConfig(direction="both", progress=False, processes=1)
    out = {"sizes": list(sizes), "seconds": {}, "phases": {}, "counted_fwd": {}, "verified": {}}
    for n in sizes:
        b.forward()
        seconds: dict = {}
        with phase_clock(seconds):
            total, report = _run(b, config, n)
        out["seconds"][n], out["phases"][n] = total, seconds
        out["counted_fwd"][n] = report["timing"]["forward_equivalents_verification"]
        out["verified"][n] = len(report["components"])  # verified (component, direction) entries
        b.log(f"  screen of {n} pairs: {total:.1f} s: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return out


def growth_lines(g: dict) -> list[str]:
    small, large = g["sizes"][0], g["sizes"][-1]
    grow = large / small
    lines = [f"default screen growth, {small} -> {large} prompt pairs ({grow:.0f}x), one process, measured in one run:"]
    for name, _, _ in PHASES:
        a, z = g["phases"][small].get(name), g["phases"][large].get(name)
        if a and z:
            lines.append(f"  {name:44s} {a:7.1f} s -> {z:7.1f} s  {z / a:5.2f}x")
    a, z = g["seconds"][small], g["seconds"][large]
    lines.append(f"  {'whole run':44s} {a:7.1f} s -> {z:7.1f} s  {z / a:5.2f}x (goal: <= {grow:.0f}x, linear or better)")
    lines.append(f"  counted verification forward-equivalents {g['counted_fwd'][small]:.1f} -> {g['counted_fwd'][large]:.1f}; "
                 f"verified (component, direction) entries {g['verified'][small]} -> {g['verified'][large]}")
    return lines


def screen_lines(r: dict) -> list[str]:
    s = r.get("screen")
    if not s:
        return []
    unit = r["unit_seconds"]["wall"]
    lines = [f"default screen, both directions, as the CLI runs it (prompts, screen, files, figures), one process on "
             f"{s['threads']} thread(s): {s['seconds'] / unit:.1f}x one forward ({s['seconds']:.1f} s)"]
    rest = s["seconds"] - sum(s["phases"].values())
    for name, _, _ in PHASES:
        if name in s["phases"]:
            t = s["phases"][name]
            lines.append(f"  {name:44s} {t / unit:7.1f}x  {t:7.1f} s  {t / s['seconds']:5.1%}")
    lines.append(f"  {'other (plan, findings, flags)':44s} {rest / unit:7.1f}x  {rest:7.1f} s  {rest / s['seconds']:5.1%}")
    lib, phase = sum(s["library_atp"].values()), s["phases"]["attribution"]
    lines.append(f"  attribution phase {phase / unit:.2f}x vs the library's AtP over the same sites and metrics "
                 f"{lib / unit:.2f}x: {phase / lib:.2f} (target <= 1.10: {'PASS' if phase <= 1.1 * lib else 'MISS'})")
    lines.append(f"  verification forward-equivalents: counted {s['counted_fwd']:.1f}, by the clock "
                 f"{s['clock_fwd']:.1f} (verification and causes / one forward)")
    w, u = s["whole"], s["unit_all_threads"]
    lines.append(f"on all {s['cores']} cores (the CLI's default threads; one forward {u:.2f} s there): one process "
                 f"{w[1] / u:.1f}x ({w[1]:.1f} s), the directions in two processes {w[2] / u:.1f}x ({w[2]:.1f} s): "
                 f"{w[1] / w[2]:.2f}x faster")
    return lines
