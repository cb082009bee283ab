"""A feature screen's figure (features.json): AtP vs exact effect of the verified latents and error terms,
one colour per dictionary, the top features named by id; beside it the few that matter, layer by layer:
the largest |exact| per dictionary as bars (exact) with their AtP score (marker)."""

import json
from pathlib import Path

import numpy as np

from .style import GREY, METRIC_UNITS, PALETTE, _layout, _panels, _square_limits, _style

N_NAMED = 6  # top features named in the scatter
N_BARS = 5  # features per dictionary in the bar panel


def _load(found) -> dict:
    return json.loads((Path(found) / "features.json").read_text()) if isinstance(found, (str, Path)) else found


def plot_features(found, direction: str | None = None, *, ax=None, fig=None):
    """``found``: a run folder holding features.json, or its dict. Returns the Figure."""
    found = _load(found)
    metric = found["metric"]
    direction = direction or next(iter(found["agreement"]))
    rows = [r for r in found["rows"] if r["direction"] == direction]
    hooks = list(found["agreement"][direction])
    with _style():
        fig, (left, right) = _panels(2, ax, fig, (7.0, 3.4))
        xs = np.array([r.get("approx", r["atp"]) for r in rows], dtype=float)
        est = found.get("estimator", "atp")
        label = "AtP" if est == "atp" else est
        ys = np.array([r[f"exact_{metric}"] for r in rows], dtype=float)
        if len(rows):
            _square_limits(left, xs, ys)
        left.axline((0, 0), slope=1, color=GREY, lw=0.6, ls="--", zorder=0)
        for i, hook in enumerate(hooks):
            mine = [j for j, r in enumerate(rows) if r["hook"] == hook]
            r_ = found["agreement"][direction][hook]["pearson"]
            left.scatter(xs[mine], ys[mine], s=10, color=PALETTE[i % len(PALETTE)], label=f"{hook} (r={r_:.2f})",
                         edgecolors="white", linewidths=0.3, zorder=2)
        for j in sorted(range(len(rows)), key=lambda j: -abs(ys[j]))[:N_NAMED]:
            left.annotate(rows[j]["name"], (xs[j], ys[j]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        left.set_xlabel(f"{label} ({METRIC_UNITS.get(metric, metric)})")
        left.set_ylabel(f"exact ({METRIC_UNITS.get(metric, metric)})")
        named = [Path(str(found["model"])).name if found.get("model") else None, found.get("task"), direction, metric]
        fig.suptitle("features: " + ", ".join(str(v) for v in named if v), fontsize=8)
        left.set_title(f"{label} vs exact", loc="left")
        left.legend(fontsize=6, loc="upper left")
        _bars(right, rows, hooks, metric, label)
        _layout(fig)
    return fig


def _bars(ax, rows: list[dict], hooks: list[str], metric: str, label: str = "AtP") -> None:
    """Per dictionary (one colour, top to bottom by layer) its N_BARS largest |exact| features."""
    names, exact, approx, colors = [], [], [], []
    for i, hook in enumerate(hooks):
        mine = sorted((r for r in rows if r["hook"] == hook), key=lambda r: -abs(r[f"exact_{metric}"]))[:N_BARS]
        for r in mine:
            names.append(r["name"])
            exact.append(r[f"exact_{metric}"])
            approx.append(r.get("approx", r["atp"]))
            colors.append(PALETTE[i % len(PALETTE)])
    y = np.arange(len(names))[::-1]
    ax.barh(y, exact, color=colors, height=0.7, label="exact")
    ax.scatter(approx, y, marker="|", color="black", s=40, zorder=3, label=label)
    ax.set_yticks(y, names, fontsize=6)
    ax.axvline(0, color=GREY, lw=0.5)
    ax.set_xlabel(f"effect ({METRIC_UNITS.get(metric, metric)})")
    ax.set_title("largest features per layer", loc="left")
    ax.legend(fontsize=6, loc="lower right")
