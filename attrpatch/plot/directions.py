"""Denoising vs noising: one point per component verified in both directions, normalised."""

from typing import Sequence

from .labels import place_labels
from .run import _as_run, _default, _num, title
from .style import GREY, MARKERS, METRIC_LABELS, PALETTE, SINGLE, _layout, _panels, _square_limits, _style


def direction_pairs(run, site: str | None = None) -> list[tuple[dict, dict]]:
    """(denoise, noise) component pairs verified in both directions, in report order."""
    run = _as_run(run)
    noise = {c["name"]: c for c in run.components("noise", site)} if "noise" in run.directions else {}
    return [(c, noise[c["name"]]) for c in run.components("denoise", site) if c["name"] in noise]


def plot_directions(run, metric: str | None = None, sites: Sequence[str] | None = None, *, ax=None,
                    fig=None, max_labels: int = 8):
    """Denoising vs noising: x = gap fraction restored by patching the clean activation into the corrupt
    run, y = gap fraction removed by patching the corrupt one into the clean run (minus the noising
    effect), both normalised. ``ax.collections[j]``: site j. On y = x both agree; below it the component
    is sufficient but not necessary (backup, OR-like), above it necessary but not sufficient (AND-like)."""
    run = _as_run(run)
    if set(run.directions) != {"denoise", "noise"}:
        raise ValueError("this run has one direction only; screen with direction='both'")
    _, metric = _default(run, None, metric)
    sites = [s for s in (sites or run.sites) if direction_pairs(run, s)]
    with _style():
        fig, (a,) = _panels(1, ax, fig, (SINGLE, 3.25))
        all_x, all_y, flagged = [], [], []
        for j, site in enumerate(sites):
            pairs = direction_pairs(run, site)
            xs = [_num(d["exact_norm"].get(metric)) for d, _ in pairs]
            ys = [-_num(n["exact_norm"].get(metric)) for _, n in pairs]
            many = len(pairs) > 300
            a.scatter(xs, ys, s=5 if many else 9, marker=MARKERS[j % len(MARKERS)],
                      color=PALETTE[j % len(PALETTE)], label=site, linewidths=0 if many else 0.3,
                      edgecolors="none" if many else "white", alpha=0.85, zorder=2 + j)
            all_x += xs
            all_y += ys
            flagged += [(d, x, y) for (d, _), x, y in zip(pairs, xs, ys) if "directions_disagree" in d["flags"]]
        if all_x:
            _square_limits(a, all_x, all_y)
        a.axline((0, 0), slope=1, color=GREY, lw=0.6, ls="--", zorder=0)
        a.axhline(0, color="#DDDDDD", lw=0.5, zorder=0)
        a.axvline(0, color="#DDDDDD", lw=0.5, zorder=0)
        a.text(0.03, 0.97, "necessary,\nnot sufficient", transform=a.transAxes, ha="left", va="top",
               fontsize=7, color=GREY)
        a.text(0.97, 0.03, "sufficient,\nnot necessary", transform=a.transAxes, ha="right", va="bottom",
               fontsize=7, color=GREY)
        a.set_xlabel(f"restored by denoising (normalised {METRIC_LABELS[metric]})")
        a.set_ylabel(f"removed by noising (normalised {METRIC_LABELS[metric]})")
        a.legend(loc="upper left", bbox_to_anchor=(0.0, 0.86), handletextpad=0.2, borderaxespad=0.2,
                 markerscale=1.3)
        flagged.sort(key=lambda t: -abs(t[1] - t[2]))
        if ax is None:
            title(fig, run, None, metric)
        _layout(fig)
        place_labels(a, [(x, y) for _, x, y in flagged], [d["name"] for d, _, _ in flagged], "black", max_labels)
    return fig
