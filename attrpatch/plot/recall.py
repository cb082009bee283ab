"""Cost vs recall: patched forward passes spent verifying against recall of the true top-N, in the
estimators' order, in random order (expected) and exhaustively."""

import math
from typing import Sequence

import numpy as np

from .run import _as_run, _default, _num, titled
from .style import (CONTROL_C, ESTIMATOR_LABELS, EST_DASHES, GREY, PALETTE, TOP_C, _DIR_WORD, _site_panels,
                    _style)


def recall_curve(comps: list[dict], n_top: int, ranks: Sequence[int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """Recall of the true top-``n_top`` (by |exact|, rank_exact <= n_top) against the number of patched
    forward passes when verifying in the estimator's order (pass x verifies the component of rank x;
    ``ranks``: one per component, default its rank_approx). Returns (passes, recall) at each step of
    the curve, and the pass count at full recall."""
    ranks = [c["rank_approx"] for c in comps] if ranks is None else list(ranks)
    truth = sorted(r for c, r in zip(comps, ranks) if c["rank_exact"] <= n_top)
    if not truth:
        return np.array([1.0]), np.array([0.0]), 0
    xs = sorted({1, *truth})
    ys = [sum(r <= x for r in truth) / len(truth) for x in xs]
    return np.asarray(xs, float), np.asarray(ys, float), truth[-1]


def cost_recall_panel(ax, run, site: str, direction: str | None = None, n_top: int = 10):
    """One site: recall against forward passes for AtP order (``ax.lines[0]``, a step curve), random
    order (``ax.lines[1]``, the expectation x / M) and exhaustive patching (M passes, ``ax.lines[2]``)."""
    run = _as_run(run)
    direction, _ = _default(run, direction, None)
    comps = run.components(direction, site)
    total = run.n_components(site)
    k = top_n(run, site, direction, n_top)
    xs, ys, full = recall_curve(comps, k)
    log = total >= 100
    x_end = total * (1.15 if log else 1.04)
    several = len(run.estimators) > 1 and len(comps) >= total
    ax.plot(np.append(xs, x_end), np.append(ys, ys[-1]), drawstyle="steps-post", color=TOP_C,
            lw=1.8 if several else 1.2, label=f"{run.est_label} order", zorder=3)
    rx = np.geomspace(1, total, 200) if log else np.linspace(0, total, 200)
    ax.plot(rx, rx / total, color=GREY, lw=0.9, ls="--", label="random order (expected)", zorder=2)
    ax.plot([total, total], [0, 1], color="black", lw=0.8, ls=":", marker="o", ms=2.5, markevery=[1],
            label="exhaustive", zorder=2)
    if len(comps) >= total:  # exhaustive: every estimator's full order is known
        for j, est in enumerate(run.estimators[1:], start=1):
            ex, ey, _ = recall_curve(comps, k, estimator_ranks(comps, est))
            ax.plot(np.append(ex, x_end), np.append(ey, ey[-1]), drawstyle="steps-post", lw=0.9,
                    ls=EST_DASHES[(j - 1) % len(EST_DASHES)], color=PALETTE[j % len(PALETTE)],
                    label=f"{ESTIMATOR_LABELS.get(est, est)} order", zorder=3 + 0.1 * j)
    if run.report.get("top_k") and run.report["top_k"] < total:
        ax.axvline(run.report["top_k"], color=CONTROL_C, lw=0.8, zorder=1, label="verified top-k (this run)")
    if full:
        ax.plot([full], [1], ls="", marker="o", ms=2.5, color=TOP_C, zorder=4)
    if log:
        ax.set_xscale("log")
        ax.set_xlim(0.8, x_end)
    else:
        ax.set_xlim(0, x_end)
    ax.set_ylim(-0.03, 1.06)
    found = f"all found after {full} passes" if full and ys[-1] >= 1 else f"recall {ys[-1]:.0%}"
    ax.set_title(f"{site}: top {k} of {total}\n{run.est_label} order: {found}", loc="left")
    return ax.figure


def estimator_ranks(comps: list[dict], estimator: str) -> list[int]:
    """Rank (1 = largest |score|, non-finite last, ties by order) of each component under
    ``approx_estimators[estimator]``, among ``comps``."""
    mags = [abs(_num(c.get("approx_estimators", {}).get(estimator))) for c in comps]
    order = sorted(range(len(comps)), key=lambda i: -mags[i] if math.isfinite(mags[i]) else math.inf)
    ranks = [0] * len(comps)
    for r, i in enumerate(order, start=1):
        ranks[i] = r
    return ranks


def top_n(run, site: str, direction: str, n_top: int = 10) -> int:
    """N of the cost-recall figure: n_top, at most a quarter of the site's components (at least 1) and
    at most the run's top_k (the true top-N is then taken among the verified only)."""
    run = _as_run(run)
    n_ver = len(run.components(direction, site))
    cap = run.report.get("top_k") or n_ver
    return max(1, min(n_top, n_ver, cap, run.n_components(site) // 4)) if n_ver else 0


def plot_cost_recall(run, direction: str | None = None, sites: Sequence[str] | None = None, n_top: int = 10,
                     *, ax=None, fig=None):
    """Cost vs recall, one panel per site: how many patched forward passes find the true top-N
    components in AtP order, in random order, and by exhaustive patching."""
    run = _as_run(run)
    direction, _ = _default(run, direction, None)
    sites = [s for s in (sites or run.sites) if run.components(direction, s)]
    with _style():
        fig, axes = _site_panels(len(sites), ax, fig, 1.55, 0.5, sharey=True)
        for a, site in zip(axes, sites):
            cost_recall_panel(a, run, site, direction, n_top)
        if ax is None:
            handles = axes[0].lines[:3] + [ln for ln in axes[0].lines[3:] if not ln.get_label().startswith("_")]
            handles = handles[:1] + handles[3:] + handles[1:3]  # the estimators first
            fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), handlelength=2,
                       **titled(fig, run, direction, run.metric))
            label = f"patched forward passes spent verifying ({_DIR_WORD[direction]})"
            if any(len(run.components(direction, s)) < run.n_components(s) for s in sites):
                label += "\nnot exhaustive: the true top-N is taken among the verified components only"
            fig.supxlabel(label, fontsize=7)
            fig.supylabel("recall of the true top-N (by |exact|)", fontsize=7)
    return fig
