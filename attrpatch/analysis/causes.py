"""Measured causes of a disagreement between an estimator and the exact effect of one component.

Pure functions on numbers measured by patching (``patch(..., alpha=0.5)``, methods/patching/frozen.py) and by the
estimators. Let f(alpha) be the metric of the receiving run with the component moved alpha of the way from
its receiver value to its source value, e(alpha) = f(alpha) - f(0) (e(1) = the exact effect). For one
component, AtP's score IS the slope at the receiver, f'(0), so AtP's error is always the bend of f along
this one path, and the half patch splits it exactly:

    a - e(1) = (a - s1) + (s1 - e(1))      s1 = 2 e(1/2), s2 = 2 (e(1) - e(1/2)): the two halves' secants
                                           s1 - e(1) = (s1 - s2) / 2

    bend near the receiver   |a - s1| > THRESHOLD max(|a|, |e(1)|): the slope at alpha = 0 differs from the
                             first half's secant, the bend lies in alpha in [0, 1/2] (AtP only: other
                             estimators are not f'(0))
    curvature                |e(1) - 2 e(1/2)| > THRESHOLD |e(1)|: the two halves' secants differ
    path                     AtP off, IG (the gradient averaged along the straight path of the inputs)
                             within THRESHOLD of exact: non-linearity along the path, which more steps remove
    interaction              IG off too: the component's effect depends on others moving with it

Since large_error means |a - e(1)| > 0.5 max(|a|, |e(1)|), one of the first two always names an AtP large
error: "no cause found" cannot be the verdict of a large AtP error. Which non-linearity carries the bend:
``frozen_causes``, from runs with the downstream attention patterns (or norm scales) held at the receiver's
(methods/patching/frozen.py): an error that mostly disappears there is carried by that non-linearity.

Each cause carries its number; ``no cause found`` only when every measurement is below its threshold.
"""

from .records import Finding

THRESHOLD = 0.2  # relative size above which a measurement names a cause
REMOVED = 0.5  # share of the AtP error a freeze must remove to name its non-linearity
NO_CAUSE = "no cause found: every measurement below its threshold"
NOT_MEASURED = ("cause not measured (--no-causes): the flag stands on exact patching; any cause after this is "
                "evidence only")
FREEZE_WORDS = {"pattern": "attention pattern change", "norm": "norm scale change"}
FROZEN_WHAT = {"pattern": "the attention patterns", "norm": "the norm scales"}


def _relative(a: float, b: float, scale: float) -> float:
    return abs(a - b) / max(abs(scale), 1e-9)


def bend(exact: float, half: float, slope: float) -> dict[str, float]:
    """Where the bend of f lives: slope at alpha = 0 (AtP), the secants of the first and second halves, and
    the parts of the AtP error in the first half (``near``) and between the halves (``between``);
    near + between == slope - exact."""
    first, second = 2 * half, 2 * (exact - half)
    return {"slope": slope, "first": first, "second": second, "near": slope - first, "between": first - exact}


def measured_causes(exact: float, half: float, atp: float, ig: float | None = None,
                    threshold: float = THRESHOLD, slope: bool = True) -> list[str]:
    """exact: e(1); half: e(1/2); atp: the estimate being explained; ig: the component's IG score (None if
    not run); slope: ``atp`` is AtP, the slope f'(0) (False for other estimators: no bend-near-receiver).
    IG is read only when ``atp`` is off by more than ``threshold``."""
    causes = []
    b = bend(exact, half, atp)
    error = atp - exact
    if slope and abs(b["near"]) > threshold * max(abs(atp), abs(exact), 1e-9):
        causes.append(f"bend near the receiver: slope at alpha=0 (AtP) {atp:+.3g} vs secant of the first half "
                      f"2 e(1/2) {b['first']:+.3g} and of the second half {b['second']:+.3g} "
                      f"({b['near'] / (error if error else 1e-9):.0%} of the AtP error lies in alpha 0..1/2)")
    curvature = _relative(exact, 2 * half, exact)
    if curvature > threshold:
        causes.append(f"curvature along the patch: e(1) {exact:+.3g} vs 2 e(1/2) {2 * half:+.3g} "
                      f"({curvature:.0%} of e(1); secants of the halves {b['first']:+.3g}, {b['second']:+.3g})")
    if ig is not None and _relative(atp, exact, exact) > threshold:
        off = _relative(ig, exact, exact)
        if off <= threshold:
            causes.append(f"non-linearity along the straight path: IG {ig:+.3g} within {off:.0%} of exact")
        else:
            causes.append(f"interaction with other components: IG {ig:+.3g} also off by {off:.0%}")
    return causes or [NO_CAUSE]


def removed_share(exact: float, atp: float, slope: float, effect: float) -> float:
    """1 - |g'(0) - (g(1) - g(0))| / |f'(0) - (f(1) - f(0))|: the share of AtP's error a freeze removes."""
    return 1 - abs(slope - effect) / max(abs(atp - exact), 1e-9)


def frozen_causes(exact: float, atp: float, frozen: dict[str, tuple[float, float]],
                  removed: float = REMOVED) -> list[str]:
    """Which non-linearity carries AtP's error ``atp - exact``: ``frozen``: {freeze: (slope, effect)} of the
    same component with that part of the model held at the receiver's values (methods/patching/frozen.py: slope =
    the gradient with it frozen, RelP with that one rule; effect = the frozen patched run). A freeze that
    removes at least ``removed`` of the error names its non-linearity, with both errors and the split of the
    effect: f(1) - g(1) went through that change, f'(0) - g'(0) is AtP's linear estimate of that part."""
    error = atp - exact
    causes = []
    for name, (slope, effect) in frozen.items():
        left = slope - effect
        share = removed_share(exact, atp, slope, effect)
        if share >= removed:
            causes.append(f"{FREEZE_WORDS[name]}: with {FROZEN_WHAT[name]} frozen at the receiver's, AtP's error "
                          f"{error:+.3g} falls to {left:+.3g} ({share:.0%} removed); the effect through that change "
                          f"is {exact - effect:+.3g}, AtP's linear estimate of it {atp - slope:+.3g}")
    if frozen and not causes:
        causes.append("neither frozen non-linearity carries it: AtP's error " + f"{error:+.3g} is " + ", ".join(
            f"{slope - effect:+.3g} with {FROZEN_WHAT[name]} frozen" for name, (slope, effect) in frozen.items())
            + " (left: the MLP activations, or several parts together)")
    return causes


def explain(entries: list[Finding], half: dict[str, float], slope: bool = True,
            frozen: dict[str, dict[str, tuple[float, float]]] | None = None) -> None:
    """Put the measured causes of each flagged entry (findings.site_results) first in its ``causes``:
    ``half``: e(1/2) per component name; IG's score is read from the entry's ``approx_estimators`` when the
    screen ran IG; ``slope``: the entries' ``approx`` is AtP (f'(0)); ``frozen``: per component name,
    {freeze: (slope, effect)} (``frozen_causes``), for the entries measured frozen. The which-non-linearity
    causes come first, then the bend's location; the evidence-based causes stay after them; NO_CAUSE only
    when none is left."""
    frozen = frozen or {}
    for e in entries:
        e.evidence["half_effect"] = half[e.name]
        ig = e.approx_estimators.get("ig")
        measured = [c for c in measured_causes(e.exact, half[e.name], e.approx, ig, slope=slope)
                    if c != NO_CAUSE]
        if e.name in frozen:
            e.evidence["frozen"] = {k: list(v) for k, v in frozen[e.name].items()}
            measured = frozen_causes(e.exact, e.approx, frozen[e.name]) + measured
        e.causes = measured + e.causes or [NO_CAUSE]


def unmeasured(causes: list[str]) -> list[str]:
    """A flagged entry's causes when the screen measured none (ScreenConfig.measure_causes False):
    NOT_MEASURED in the measured causes' place, first, then the evidence-based ones."""
    return [NOT_MEASURED, *causes]
