"""Sliding-window sweeps: the effect of patching W adjacent layers against the window's centre layer, one
line per window width (exact solid, AtP dashed), one panel per corruption, drawn from a sweep file alone.

The file (JSON) maps a corruption label to a ``WindowSweep.to_dict()`` (methods/patching/windows.py); effects are
normalised by that sweep's clean - corrupt gap (an optional ``pos_label`` names the position in the titles) of the metric (0: nothing restored, 1: the whole gap).
"""

import json
import math
from pathlib import Path

from .run import suptitle
from .style import DOUBLE, METRIC_LABELS, PALETTE, SINGLE, _panels, _style


def load_sweeps(path: str | Path) -> dict[str, dict]:
    """{corruption label: sweep dict} from a JSON file written by scripts/windows_real.py."""
    return json.loads(Path(path).read_text())


def normalised(sweep: dict, kind: str, width: int, metric: str) -> list[float]:
    """``kind`` (exact | atp) effects of the windows of ``width``, one per centre layer, over the metric's
    clean - corrupt gap (NaN when the gap is ~0 or the metric has no such value)."""
    j = sweep["metrics"].index(metric)
    gap = sweep["clean_metric"].get(metric, math.nan) - sweep["corrupt_metric"].get(metric, math.nan)
    if sweep["direction"] == "noise":
        gap = -gap
    values = [row[j] for row in sweep[kind][str(width)]]
    return [v / gap if math.isfinite(gap) and abs(gap) > 1e-6 else math.nan for v in values]


def plot_windows(sweeps, metric: str = "logit_diff", *, ax=None, fig=None):
    """One panel per corruption: normalised effect against centre layer, one colour per window width;
    solid: exact (joint patch), dashed: AtP (sum over the window). ``ax.lines``: per width, exact then AtP.
    A figure of its own is titled with the model, task (the sweeps' ``model`` and ``task``), direction and
    metric."""
    sweeps = sweeps if isinstance(sweeps, dict) else load_sweeps(sweeps)
    labels, own = list(sweeps), ax is None
    with _style():
        fig, axes = _panels(len(labels), ax, fig, (DOUBLE if len(labels) > 1 else SINGLE, 2.3), sharey=True)
        for a, label in zip(axes, labels):
            sweep = sweeps[label]
            for k, width in enumerate(sorted(int(w) for w in sweep["exact"])):
                colour = PALETTE[k % len(PALETTE)]
                layers = range(len(sweep["exact"][str(width)]))
                a.plot(layers, normalised(sweep, "exact", width, metric), color=colour, marker="o", markersize=2.5,
                       label=f"exact, window {width}")
                a.plot(layers, normalised(sweep, "atp", width, metric), color=colour, linestyle=(0, (4, 1.5)),
                       label=f"AtP, window {width}")
            a.axhline(0, color="#777777", linewidth=0.5, zorder=0)
            where = "all positions" if sweep["pos"] is None else f"position {sweep['pos']}"
            where = f"{sweep['pos_label']} ({where})" if sweep.get("pos_label") else where
            a.set_title(f"{label}: {sweep['site']} at {where}")
            a.set_xlabel("centre layer of the window")
        axes[0].set_ylabel(f"{METRIC_LABELS.get(metric, metric)} effect / (clean - corrupt)")
        axes[-1].legend(loc="best")
        first = sweeps[labels[0]]
        if own and first.get("model"):  # sweeps written before they named it: no title
            suptitle(fig, first, first["direction"], metric)
    return fig
