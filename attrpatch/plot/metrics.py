"""The same verified components under every metric, normalised by each metric's clean-corrupt gap."""

import math

import numpy as np

from ..inputs.directions import SIGN
from .run import _as_run, _default, _num, titled
from .style import FLAG_C, GREY, MARKERS, METRIC_LABELS, PALETTE, SINGLE, _DIR_WORD, _mpl, _panels, _style


REFERENCE_ROWS = 4  # components where the metrics agree, shown beside the disagreeing ones for scale


def metric_components(run, direction: str, n: int = 16) -> list[dict]:
    """The components of the metric comparison: those flagged ``metrics_disagree`` (the largest first, at
    most n), then up to REFERENCE_ROWS of the largest others for scale, each block ordered by its primary
    normalised effect; the n largest when no component is flagged. Size: max |normalised exact| over
    metrics."""
    run = _as_run(run)
    comps = [c for c in run.components(direction)
             if any(v is not None and math.isfinite(v) for v in c["exact_norm"].values())]

    def size(c):
        return max(abs(v) for v in c["exact_norm"].values() if v is not None and math.isfinite(v))

    def primary(c):
        v = _num(c["exact_norm"].get(run.metric))
        return -v if math.isfinite(v) else 0.0
    comps = sorted(comps, key=lambda c: -size(c))
    flagged = [c for c in comps if "metrics_disagree" in c["flags"]][:n]
    if not flagged:
        return sorted(comps[:n], key=primary)
    others = [c for c in comps if "metrics_disagree" not in c["flags"]][:min(REFERENCE_ROWS, n - len(flagged))]
    return sorted(flagged, key=primary) + sorted(others, key=primary)


def plot_metrics(run, direction: str | None = None, n: int = 16, *, ax=None, fig=None):
    """The same verified components under every metric, normalised by each metric's clean-corrupt gap
    (0 = corrupted run, 1 = clean run). ``ax.collections[j]``: metric j, offsets (normalised effect, row).
    Rows flagged ``metrics_disagree`` are shaded and their names bold."""
    run = _as_run(run)
    direction, _ = _default(run, direction, None)
    metrics = run.report["metrics"]
    comps = metric_components(run, direction, n)
    rows = len(comps)
    _, _, patches, _, _ = _mpl()
    with _style():
        fig, (a,) = _panels(1, ax, fig, (SINGLE, 0.17 * max(rows, 3) + 0.9))
        rows_y = np.arange(rows)[::-1]  # first component on top
        for y, c in zip(rows_y, comps):
            if "metrics_disagree" in c["flags"]:
                a.axhspan(y - 0.5, y + 0.5, color="#FBE3D6", lw=0, zorder=0)
        a.axvline(0, color=GREY, lw=0.6, zorder=1)
        ref = SIGN[direction]
        a.axvline(ref, color=GREY, lw=0.6, ls="--", zorder=1)
        for j, m in enumerate(metrics):
            xs = [_num(c["exact_norm"].get(m)) for c in comps]
            a.scatter(xs, rows_y, s=14 if j == 0 else 11, marker=MARKERS[j % len(MARKERS)],
                      color=PALETTE[j % len(PALETTE)], label=METRIC_LABELS.get(m, m), zorder=3 + j,
                      linewidths=0.3, edgecolors="white", alpha=0.9)
        a.set_yticks(rows_y, [f"{c['name']}" for c in comps])
        for tick, c in zip(a.get_yticklabels(), comps):
            if "metrics_disagree" in c["flags"]:
                tick.set_fontweight("bold")
                tick.set_color(FLAG_C)
        a.set_ylim(-0.6, rows - 0.4)
        a.tick_params(axis="y", length=0)
        a.spines["left"].set_visible(False)
        a.set_xlabel(f"normalised exact effect, {_DIR_WORD[direction]}\n(fraction of the clean−corrupt gap)")
        handles = a.get_legend_handles_labels()[0]
        if any("metrics_disagree" in c["flags"] for c in comps):
            handles.append(patches.Patch(color="#FBE3D6", label="metrics disagree"))
        ncols = len(handles) if len(handles) <= 4 else -(-len(handles) // 2)
        if ax is None:
            fig.legend(handles=handles, loc="outside upper center", ncols=ncols, handlelength=1,
                       **titled(fig, run, direction, None))
        else:
            a.legend(handles=handles, loc="best", ncols=ncols, handlelength=1)
    return fig
