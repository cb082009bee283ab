"""Circuits from edge scores and their faithfulness (docs/methods.md#circuits-and-faithfulness). Pure: numbers in,
numbers out.

    circuit(n)       the n edges with the largest |score|
    faithfulness(n)  (m(n) - m_corrupt) / (m_clean - m_corrupt), m(n) the metric of the clean run with every
                     edge OUTSIDE the circuit patched to the corrupted run's value: 0 = corrupted, 1 = clean
    CPR              area under faithfulness against the fraction of edges n / E (MIB; higher is better)
    CMD              area under |1 - faithfulness| against n / E (MIB; lower is better)
"""

import math

from ..engine.metrics import normalise


def circuit_sizes(n_edges: int, n_points: int = 12) -> list[int]:
    """0, then about ``n_points`` sizes spaced geometrically up to every edge: where curves change fastest."""
    if n_edges < 1:
        return [0]
    ratio = n_edges ** (1 / max(n_points - 1, 1))
    sizes = {0, n_edges} | {min(n_edges, round(ratio ** i)) for i in range(n_points)}
    return sorted(sizes)


def faithfulness(patched_metric: list[float], clean: float, corrupt: float) -> list[float]:
    """Normalised metric of each circuit (0 = corrupted, 1 = clean; NaN when the gap is ~0)."""
    return [normalise(m, clean, corrupt, offset=True) for m in patched_metric]


def area(sizes: list[int], values: list[float], n_edges: int) -> float:
    """Trapezoid area under ``values`` against sizes / n_edges (NaN with fewer than two finite points)."""
    pts = [(s / max(n_edges, 1), v) for s, v in zip(sizes, values) if v == v]
    if len(pts) < 2:
        return float("nan")
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(pts, pts[1:]))


def summary(sizes: list[int], faith: list[float], n_edges: int, threshold: float = 0.8) -> dict:
    """CPR, CMD, and the smallest circuit reaching ``threshold`` of the clean behaviour (None if none does)."""
    reach = next((s for s, f in zip(sizes, faith) if f == f and f >= threshold), None)
    return {"cpr": area(sizes, faith, n_edges), "cmd": area(sizes, [abs(1 - f) for f in faith], n_edges),
            "threshold": threshold, "smallest_faithful": reach,
            "final": faith[-1] if faith and not math.isnan(faith[-1]) else None}
