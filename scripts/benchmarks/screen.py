"""The default screen benchmark (the smollm2 preset): each phase as a ratio to one forward, and
verification's forward-equivalents as attrpatch counts them against its own clock."""

from __future__ import annotations

import attrpatch as ap

from .common import Bench, fmt


def bench_screen(b: Bench) -> dict:
    """The default screen (ap.screen, both directions, no files) on the bench batch: each phase as a ratio to
    the unit, and verification's forward-equivalents as attrpatch counts them against its own clock."""
    b.forward()
    t, peak, result = b.timed(lambda: ap.screen(b.model, b.batch, ap.ScreenConfig(direction="both", progress=False)))
    b.log(f"  screen {fmt(t)}")
    timing = dict(result.timing)
    counted = timing["forward_equivalents_verification"]
    clock = {"wall": timing["verification_s"] / timing["forward_s"],
             "cpu": timing["verification_cpu_s"] / timing["forward_cpu_s"]}
    return dict(seconds=t, peak_bytes=peak, timing=timing, rows=len(result.rows), counted_fwd=counted,
                clock_fwd=clock, count_over_clock={c: counted / v for c, v in clock.items()})


def screen_lines(r: dict) -> list[str]:
    s = r.get("screen")
    if not s:
        return []
    t, unit = s["timing"], r["unit_seconds"]["wall"]
    ratio = s["count_over_clock"]
    return [f"default screen, both directions, {s['rows']} rows: {s['seconds']['wall'] / unit:.1f}x wall "
            f"({s['seconds']['wall']:.1f} s), {s['seconds']['cpu'] / r['unit_seconds']['cpu']:.1f}x cpu: attribution "
            f"{t['attribution_s'] / unit:.1f}x, verification {t['verification_s'] / unit:.1f}x, diagnostics "
            f"{t['diagnostics_s'] / unit:.1f}x the unit (wall)",
            f"  verification forward-equivalents: counted {s['counted_fwd']:.1f}; by the clock (verification time / "
            f"the screen's own forward_last time) {s['clock_fwd']['wall']:.1f} wall, {s['clock_fwd']['cpu']:.1f} cpu; "
            f"count / clock = {ratio['wall']:.2f} wall, {ratio['cpu']:.2f} cpu (target 0.8-1.2: cpu "
            f"{'PASS' if 0.8 <= ratio['cpu'] <= 1.2 else 'MISS'})"]
