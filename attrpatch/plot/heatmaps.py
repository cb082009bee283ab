"""Heatmaps: layer x position (resid_pre/attn_out/mlp_out) and layer x head, AtP beside exact patching,
unverified cells hatched."""

import math
from typing import Sequence

import numpy as np

from .run import RESID_SITES, Run, _as_run, _default, _exact, position_labels, title
from .style import CMAP, DOUBLE, GREY, METRIC_UNITS, SINGLE, _mpl, _panels, _style


def _symmetric(*arrays) -> float:
    vals = [np.abs(np.ma.masked_invalid(np.asarray(a, dtype=float))).max() for a in arrays if np.size(a)]
    v = max([float(x) for x in vals if x is not np.ma.masked] or [0.0])
    return v if v > 0 and math.isfinite(v) else 1.0


def _norm(vmax: float):
    _, colors, *_ = _mpl()
    return colors.Normalize(vmin=-vmax, vmax=vmax)


def _cmap():
    import matplotlib
    return matplotlib.colormaps[CMAP].with_extremes(bad=(0, 0, 0, 0))  # masked cells show the hatching


def _heatmap(ax, values, vmax: float):
    """imshow of a [rows, cols] array (masked cells transparent over a hatched background)."""
    _, _, patches, _, _ = _mpl()
    values = np.ma.masked_invalid(np.asarray(values, dtype=float))
    rows, cols = values.shape
    ax.add_patch(patches.Rectangle((-0.5, -0.5), cols, rows, facecolor="white", edgecolor="none",
                                   hatch="//////", zorder=-1))
    im = ax.imshow(values, cmap=_cmap(), norm=_norm(vmax), aspect="auto", origin="lower",
                   interpolation="nearest", zorder=0)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(-0.5, rows - 0.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)
    ax.tick_params(length=1.5, pad=1.5)
    return im


def _cell_values(ax, values, vmax: float) -> str:
    """Write each cell's value in it (small grids only), white on dark cells, to two significant digits
    of the colour scale's maximum; below 0.001 in units of a power of ten, returned as a title suffix
    (e.g. ' (×10⁻⁴)'), else ''."""
    exp = math.floor(math.log10(vmax)) if vmax > 0 and math.isfinite(vmax) else 0
    scale, suffix = (10.0 ** exp, f" (×10$^{{{exp}}}$)") if exp < -2 else (1.0, "")
    digits = 1 if scale != 1 else max(2, 1 - exp)
    for (r, c), v in np.ndenumerate(np.asarray(values, dtype=float)):
        if math.isfinite(v):
            x = v / scale
            text = f"{x:.{digits}f}" if round(x, digits) != 0 else f"{0:.{digits}f}"
            ax.text(c, r, text.replace("-", "−"), ha="center", va="center", fontsize=7,
                    color="white" if abs(v) > 0.6 * vmax else "black")
    return suffix


def _int_ticks(ax, axis: str, n: int, labels: Sequence[str] | None = None, rotate: bool = False):
    _, _, _, ticker, _ = _mpl()
    target = ax.xaxis if axis == "x" else ax.yaxis
    if labels is not None:
        target.set_major_locator(ticker.FixedLocator(range(n)))
        target.set_major_formatter(ticker.FixedFormatter(list(labels)))
        if rotate:
            ax.tick_params(axis=axis, labelrotation=90)
    elif n <= 16:
        target.set_major_locator(ticker.FixedLocator(range(n)))
    else:
        target.set_major_locator(ticker.MaxNLocator(8, integer=True))


def _colorbar(fig, im, ax, label: str):
    cb = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02, aspect=15)
    cb.set_label(label, labelpad=2)
    cb.outline.set_linewidth(0.5)
    cb.ax.tick_params(length=1.5, pad=1.5)
    return cb


def exact_grid(run: Run, direction: str, metric: str, site: str) -> np.ndarray:
    """Exact effects on the grid of the site's heatmap ([layer, pos] per position, else [layer, unit]);
    NaN where not verified."""
    t = run.score(direction, metric, site)
    per_pos = run.per_position(site)
    if per_pos:
        grid = np.full(t.shape[:2], np.nan)
    else:
        grid = np.full((t.shape[0], t.shape[2]) if t.ndim > 2 else (t.shape[0], 1), np.nan)
    comps = run.components(direction, site)
    for c in comps:
        unit = c["head"] if c["head"] is not None else c["neuron"]
        col = c["pos"] if per_pos else (unit if unit is not None else 0)
        grid[c["layer"], col] = _exact(c, metric)
    if per_pos and comps and _verification(run, direction, site).get("no_effect"):  # exhaustive: the positions
        grid[:, :min(c["pos"] for c in comps)] = 0.0  # before the first differing one have no effect, exactly
    return grid


def _verification(run: Run, direction: str, site: str) -> dict:
    """How the site was verified (report.json ``verification``; {} for runs made before it)."""
    return ((run.report.get("verification") or {}).get(direction) or {}).get(site, {})


def plot_positions(run, direction: str | None = None, metric: str | None = None,
                   sites: Sequence[str] | None = None, *, ax=None, fig=None):
    """Layer x position heatmaps, one row per site: AtP scores | exact effects (hatched: not verified).

    ``ax``: one Axes per panel, row by row (two per site verified per position, one otherwise)."""
    run = _as_run(run)
    direction, metric = _default(run, direction, metric)
    sites = [s for s in (sites or RESID_SITES) if s in run.sites]
    if not sites:
        raise ValueError(f"none of {', '.join(RESID_SITES)} was screened in this run")
    labels = position_labels(run)
    n_pos = run.report["n_pos"]
    n_layers = max(run.score(direction, metric, s).shape[0] for s in sites)
    has_exact = {s: run.per_position(s) and bool(run.components(direction, s)) for s in sites}
    ncols = 2 if any(has_exact.values()) else 1
    row_h = min(2.2, max(0.95, 0.16 * n_layers + 0.35))
    label_h = 0.12 + 0.055 * max(len(t) for t in labels)
    with _style():
        if ax is None:
            *_, Figure = _mpl()
            fig = fig or Figure(figsize=(DOUBLE, row_h * len(sites) + label_h + 0.25), layout="constrained")
            grid = fig.subplots(len(sites), ncols, squeeze=False, sharex=True)
            slots = [[grid[r, c] for c in range(ncols)] for r in range(len(sites))]
        else:
            axes = list(np.atleast_1d(np.asarray(ax, dtype=object)).ravel())
            need = sum(1 + has_exact[s] for s in sites)
            if len(axes) != need:
                raise ValueError(f"this figure has {need} panels; got {len(axes)} axes")
            it = iter(axes)
            slots = [[next(it) for _ in range(1 + has_exact[s])] for s in sites]
            fig = axes[0].figure
        for r, site in enumerate(sites):
            atp = run.score(direction, metric, site)
            exact = exact_grid(run, direction, metric, site) if has_exact[site] else None
            vmax = _symmetric(atp, *([] if exact is None else [exact]))
            row = slots[r]
            im = _heatmap(row[0], atp, vmax)
            row[0].set_ylabel(f"{site}\nlayer")
            if exact is not None:
                _heatmap(row[1], exact, vmax)
                how = _verification(run, direction, site)
                n_ver = int(np.isfinite(exact).sum()) - how.get("no_effect", 0)
                note = (f"all {exact.size} ({how['no_effect']} exactly 0)"  # before the prompts differ
                        if how.get("mode") == "exhaustive" else f"{n_ver}/{exact.size} verified")
                row[1].text(1.0, 1.02, note, transform=row[1].transAxes,
                            ha="right", va="bottom", fontsize=7, color=GREY)
            elif len(row) > 1:
                row[1].set_axis_off()
                row[1].text(0.5, 0.5, f"{site}: exact effects not per position\n(positions=all)",
                            ha="center", va="center", transform=row[1].transAxes, color=GREY)
            for a in row[: 1 + (exact is not None)]:
                _int_ticks(a, "y", atp.shape[0])
                _int_ticks(a, "x", n_pos, labels, rotate=True)
                a.tick_params(axis="x", labelbottom=(r == len(sites) - 1) or ax is not None)
            if r == 0:
                row[0].set_title("attribution patching (AtP)" if run.estimator == "atp" else
                                 f"attribution: {run.est_label}", loc="left")
                if exact is not None:
                    row[1].set_title("exact activation patching", loc="left")
            _colorbar(fig, im, row[: 1 + (exact is not None)], METRIC_UNITS.get(metric, metric))
        if ax is None:
            title(fig, run, direction, metric)
    return fig


def plot_heads(run, direction: str | None = None, metric: str | None = None, site: str = "head", *,
               ax=None, fig=None):
    """Layer x head heatmaps: AtP (summed over positions) | exact | exact - AtP (hatched: not verified)."""
    run = _as_run(run)
    direction, metric = _default(run, direction, metric)
    if site not in run.sites:
        raise ValueError(f"site {site!r} was not screened in this run")
    t = run.score(direction, metric, site)
    atp = t.sum(1)  # [layer, unit]: the all-position component's score
    exact = None if run.per_position(site) else exact_grid(run, direction, metric, site)
    n = 1 if exact is None else 3
    n_layers, n_units = atp.shape
    width = DOUBLE if n > 1 else SINGLE
    panel_w = (width - 1.0) / n
    height = float(np.clip(panel_w * n_layers / n_units * 0.8 + 0.75, 1.6, 4.5))
    unit_word = "KV head" if site in ("k", "v") else "head"
    with _style():
        fig, axes = _panels(n, ax, fig, (width, height), sharey=True)
        vmax = _symmetric(atp, *([] if exact is None else [exact]))
        im = _heatmap(axes[0], atp, vmax)
        est = run.est_label
        axes[0].set_title(f"{est} (all positions)", loc="left")
        axes[0].set_ylabel("layer")
        if exact is not None:
            _heatmap(axes[1], exact, vmax)
            axes[1].set_title(f"exact ({int(np.isfinite(exact).sum())}/{exact.size} verified)", loc="left")
            diff = exact - atp
            im_d = _heatmap(axes[2], diff, _symmetric(diff))
            axes[2].set_title(f"exact − {est}", loc="left")
            _colorbar(fig, im, axes[:2], METRIC_UNITS.get(metric, metric))
            _colorbar(fig, im_d, axes[2], f"error of {est}")
        else:
            _colorbar(fig, im, axes[0], METRIC_UNITS.get(metric, metric))
            axes[0].set_title(f"{est} (all positions; exact is per position)", loc="left")
        for a in axes:
            _int_ticks(a, "x", n_units)
            _int_ticks(a, "y", n_layers)
            a.set_xlabel(unit_word)
        if n_units <= 8 and n_layers <= 16:
            for a, values, scale in zip(axes, [atp] + ([] if exact is None else [exact, diff]),
                                        [vmax, vmax, _symmetric(diff) if exact is not None else 1]):
                suffix = _cell_values(a, values, scale)
                if suffix:
                    a.set_title(a.get_title(loc="left") + suffix, loc="left")
        if ax is None:
            title(fig, run, direction, metric)
    return fig
