"""AtP vs exact effect, one panel per site, with the diagonal, Pearson r and the flagged components named."""

from typing import Sequence

import numpy as np

from .labels import _label_points
from .run import DISAGREE, _approx, _as_run, _default, _exact, _fmt, titled
from .style import (CONTROL_C, FLAG_C, GREY, METRIC_UNITS, TOP_C, _DIR_WORD, _layout, _site_panels,
                    _square_limits, _style)


def scatter_panel(ax, run, site: str, direction: str | None = None, metric: str | None = None,
                  max_labels: int = 5, label: bool = True):
    """AtP (x) vs exact (y) of one site's verified components: ``ax.collections[0]`` holds every
    component in report order; flagged ones (sign_flip, large_error, missed) are orange and named."""
    run = _as_run(run)
    direction, metric = _default(run, direction, metric)
    comps = run.components(direction, site)
    xs = np.array([_approx(c, metric) for c in comps], dtype=float)
    ys = np.array([_exact(c, metric) for c in comps], dtype=float)
    primary = metric == run.metric  # flags are computed under the primary metric
    flagged = [primary and bool(set(c["flags"]) & set(DISAGREE)) for c in comps]
    colors = [FLAG_C if f else (TOP_C if c["selected"] == "top" else CONTROL_C) for c, f in zip(comps, flagged)]
    if len(comps):
        _square_limits(ax, xs, ys)
    ax.axline((0, 0), slope=1, color=GREY, lw=0.6, ls="--", zorder=0)
    ax.axhline(0, color="#DDDDDD", lw=0.5, zorder=0)
    ax.axvline(0, color="#DDDDDD", lw=0.5, zorder=0)
    many = len(comps) > 300
    ax.scatter(xs, ys, s=4 if many else 9, c=colors, linewidths=0 if many else 0.3,
               edgecolors="none" if many else "white", zorder=2)
    a = run.report["agreement"].get(direction, {}).get(site, {}).get(metric, {})
    ax.set_title(f"{site}  (n={len(comps)}, r={_fmt(a.get('pearson'))})", loc="left")
    if label:
        _layout(ax.figure)
        _label_flagged(ax, comps, xs, ys, flagged, max_labels)
    return ax.figure


def _label_flagged(ax, comps, xs, ys, flagged, max_labels):
    idx = [i for i, f in enumerate(flagged) if f]
    _label_points(ax, [comps[i] for i in idx], xs[idx], ys[idx], max_labels)


def plot_scatter(run, direction: str | None = None, metric: str | None = None,
                 sites: Sequence[str] | None = None, *, ax=None, fig=None, max_labels: int = 5):
    """AtP vs exact, one panel per site, with the diagonal y = x and Pearson r in each title."""
    run = _as_run(run)
    direction, metric = _default(run, direction, metric)
    sites = [s for s in (sites or run.sites) if run.components(direction, s)]
    with _style():
        fig, axes = _site_panels(len(sites), ax, fig, 2.15, 0.45)
        for a, site in zip(axes, sites):
            scatter_panel(a, run, site, direction, metric, max_labels, label=False)
        if ax is None:
            from matplotlib.lines import Line2D
            comps = [c for s in sites for c in run.components(direction, s)]
            kinds = {"top": any(c["selected"] == "top" for c in comps),
                     "control": any(c["selected"] == "control" for c in comps),
                     "flag": metric == run.metric and any(set(c["flags"]) & set(DISAGREE) for c in comps)}
            entries = [(k, c, t) for k, c, t in (
                ("top", TOP_C, f"verified ({run.est_label} top-k)" if run.report.get("top_k") else "verified (all)"),
                ("control", CONTROL_C, "verified (random control)"),
                ("flag", FLAG_C, "sign flip / large error / missed")) if kinds[k]]
            handles = [Line2D([], [], ls="", marker="o", ms=3.5, color=c, label=t) for _, c, t in entries]
            handles.append(Line2D([], [], color=GREY, lw=0.6, ls="--", label=f"{run.est_label} = exact"))
            fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), handlelength=1.5,
                       **titled(fig, run, direction, metric))
            fig.supxlabel(f"{run.est_label} estimate ({METRIC_UNITS.get(metric, metric)})", fontsize=7)
            fig.supylabel(f"exact effect, {_DIR_WORD[direction]} ({METRIC_UNITS.get(metric, metric)})", fontsize=7)
        _layout(fig)
        for a, site in zip(axes, sites):
            comps = run.components(direction, site)
            xs = np.array([_approx(c, metric) for c in comps], dtype=float)
            ys = np.array([_exact(c, metric) for c in comps], dtype=float)
            flagged = [metric == run.metric and bool(set(c["flags"]) & set(DISAGREE)) for c in comps]
            _label_flagged(a, comps, xs, ys, flagged, max_labels)
    return fig
