"""Measured causes of a disagreement between an estimator and the exact effect of one component.

Pure functions on numbers measured by patching (``patch(..., alpha=0.5)``) and by the estimators:

    curvature    |e(1) - 2 e(1/2)| / |e(1)|   e(alpha): exact effect of moving the component alpha of the way
                 from receiver to source. 0 when the metric is linear along that path; AtP assumes it is.
    path         AtP off, IG (the gradient averaged along the straight path of the inputs) within THRESHOLD of exact:
                 the error is non-linearity along the path, which more integration steps remove.
    interaction  IG off too: the component's effect depends on others moving with it.

Each cause carries its number; ``no cause found`` only when every measurement is below its threshold.
"""

THRESHOLD = 0.2  # relative size above which a measurement names a cause
NO_CAUSE = "no cause found: every measurement below its threshold"


def _relative(a: float, b: float, scale: float) -> float:
    return abs(a - b) / max(abs(scale), 1e-9)


def measured_causes(exact: float, half: float, atp: float, ig: float | None = None,
                    threshold: float = THRESHOLD) -> list[str]:
    """exact: e(1); half: e(1/2); atp: the estimate being explained; ig: the component's IG score (None if
    not run). IG is read only when ``atp`` is off by more than ``threshold``."""
    causes = []
    curvature = _relative(exact, 2 * half, exact)
    if curvature > threshold:
        causes.append(f"curvature along the patch: e(1) {exact:+.3g} vs 2 e(1/2) {2 * half:+.3g} "
                      f"({curvature:.0%} of e(1))")
    if ig is not None and _relative(atp, exact, exact) > threshold:
        off = _relative(ig, exact, exact)
        if off <= threshold:
            causes.append(f"non-linearity along the straight path: IG {ig:+.3g} within {off:.0%} of exact")
        else:
            causes.append(f"interaction with other components: IG {ig:+.3g} also off by {off:.0%}")
    return causes or [NO_CAUSE]


def explain(entries: list[dict], half: dict[str, float]) -> None:
    """Put the measured causes of each flagged entry (findings.site_results) first in its ``causes``:
    ``half``: e(1/2) per component name; IG's score is read from the entry's ``approx_estimators`` when the
    screen ran IG. The evidence-based causes stay after them; NO_CAUSE only when none is left."""
    for e in entries:
        e["evidence"]["half_effect"] = half[e["name"]]
        ig = e["approx_estimators"].get("ig")
        measured = [c for c in measured_causes(e["exact"], half[e["name"]], e["approx"], ig) if c != NO_CAUSE]
        e["causes"] = measured + e["causes"] or [NO_CAUSE]
