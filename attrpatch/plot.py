"""Figures of a screen run, drawn from its files alone (report.json and scores.safetensors).

    draw_run(run_dir)            every applicable figure into run_dir/figures/ (png and pdf)
    figures(run)                 (file stem, Figure) of each applicable figure; save(fig, path, formats)
    load_run(run_dir)            the report and the AtP scores, for the plot functions below

Each plot function takes a :class:`Run` (or a run folder), optional ``ax`` (one Axes, or a sequence of
them, one per panel) or ``fig`` (a Figure to draw into), and returns the Figure:

    plot_positions   layer x position heatmaps of resid_pre/attn_out/mlp_out: AtP | exact (hatched: not verified)
    plot_heads       layer x head heatmaps: AtP | exact | exact - AtP
    plot_scatter     AtP vs exact, one panel per site, diagonal, Pearson r, flagged components named
    plot_metrics     normalised exact effects of the same components under every metric
    plot_cost_recall recall of the true top-N against forward passes spent verifying, in AtP order,
                     in random order (expected) and exhaustively
    plot_directions  denoising vs noising, normalised, one point per component verified in both

Sizes fit a paper column (3.3 in single, 6.75 in double) with fonts of 7 pt or more. Matplotlib is
imported lazily and no global style is changed: the style applies inside each call only. Figures are
plain ``matplotlib.figure.Figure`` objects (no pyplot state), saved with fixed metadata so that
re-drawing a run gives identical bytes.
"""

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

RESID_SITES = ("resid_pre", "attn_out", "mlp_out")
HEAD_SITES = ("head", "q", "k", "v")
DISAGREE = ("sign_flip", "large_error", "missed")
SINGLE, DOUBLE = 3.3, 6.75  # column widths, inches
CMAP = "RdBu_r"  # red positive, blue negative, white zero
ESTIMATOR_LABELS = {"atp": "AtP", "atp_star": "AtP*", "ig": "IG", "graddrop": "GradDrop"}
METRIC_LABELS = {"logit_diff": "logit diff", "logprob": "log prob", "prob": "prob", "kl": "KL"}
METRIC_UNITS = {"logit_diff": "Δ logit diff", "logprob": "Δ log p(answer)", "prob": "Δ p(answer)",
                "kl": "Δ KL(clean ‖ run)"}
# Okabe-Ito: distinguishable in colour-blind vision and in greyscale print.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000")
EST_DASHES = ("-", (0, (4, 1.5)), (0, (1, 1)), (0, (3, 1, 1, 1)))  # the other estimators' lines
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
TOP_C, CONTROL_C, FLAG_C, GREY = "#0072B2", "#BBBBBB", "#D55E00", "#777777"
STYLE = {
    "font.size": 7, "axes.titlesize": 7.5, "axes.labelsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "figure.titlesize": 8, "font.family": "DejaVu Sans",
    "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6, "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4, "xtick.major.size": 2.5, "ytick.major.size": 2.5, "xtick.minor.size": 1.5,
    "ytick.minor.size": 1.5, "axes.spines.top": False, "axes.spines.right": False, "lines.linewidth": 1.0,
    "legend.frameon": False, "legend.handletextpad": 0.4, "legend.columnspacing": 1.0,
    "hatch.linewidth": 0.4, "hatch.color": "#B0B0B0", "image.interpolation": "nearest",
    "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "svg.hashsalt": "attrpatch",
    "figure.constrained_layout.h_pad": 0.02, "figure.constrained_layout.w_pad": 0.02,
}
SAVE_METADATA = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None, "Creator": None},
                 "svg": {"Date": None, "Creator": None}}
PNG_DPI = 200


# ------------------------------------------------------------------------------------------- data

@dataclass
class Run:
    """A screen run's report dict and its AtP scores (numpy, [layer, pos, (unit)], mean over prompts)."""

    report: dict
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None

    @property
    def directions(self) -> list[str]:
        return list(self.report["directions"])

    @property
    def sites(self) -> list[str]:
        return list(self.report["sites"])

    @property
    def metric(self) -> str:
        return self.report["metric"]

    @property
    def estimator(self) -> str:
        """The estimator that ranked, flagged and filled ``approx`` (the first of ``estimators``)."""
        return self.estimators[0]

    @property
    def estimators(self) -> list[str]:
        """Estimators whose scores the components carry (``approx_estimators``), the ranking one first."""
        for c in self.report["components"]:
            if c.get("approx_estimators"):
                return list(c["approx_estimators"])
        est = self.report.get("estimator") or "atp"
        return ["atp" if est == "all" else est]

    @property
    def est_label(self) -> str:
        return ESTIMATOR_LABELS.get(self.estimator, self.estimator)

    def per_position(self, site: str) -> bool:
        return self.report["positions"].get(site) == "each"

    def components(self, direction: str, site: str | None = None) -> list[dict]:
        return [c for c in self.report["components"]
                if c["direction"] == direction and (site is None or c["site"] == site)]

    def score(self, direction: str, metric: str, site: str) -> np.ndarray:
        """AtP scores per position: [layer, pos] or [layer, pos, unit]."""
        name = f"{direction}/{metric}/{site}"
        if name not in self.scores:
            raise KeyError(f"no AtP scores {name!r} in this run (have: {', '.join(sorted(self.scores))})")
        return self.scores[name]

    def n_components(self, site: str) -> int:
        """How many components the site has in this run (what exhaustive patching would verify)."""
        t = self.score(self.directions[0], self.metric, site)
        return t.shape[0] * (t.shape[1] if self.per_position(site) else 1) * (t.shape[2] if t.ndim > 2 else 1)


def load_run(run_dir: str | Path) -> Run:
    """Read report.json and, when present, scores.safetensors of a screen run."""
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"{report_path} not found: give the output folder of `attrpatch screen`")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    scores = {}
    if (run_dir / "scores.safetensors").is_file():
        from .report import load_scores

        tensors, axes = load_scores(run_dir / "scores.safetensors")
        for name, t in tensors.items():
            a = t.float().numpy()
            scores[name] = a.mean(0) if axes.get(name, "").startswith("batch ") else a
    return Run(report=report, scores=scores, path=run_dir)


def _as_run(run) -> Run:
    return run if isinstance(run, Run) else load_run(run)


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _approx(c: dict, metric: str) -> float:
    return _num(c["approx_metrics"].get(metric))


def _exact(c: dict, metric: str) -> float:
    return _num(c["exact_metrics"].get(metric))


def _short(c: dict) -> str:
    """Component name without the site suffix that a panel title already gives (L2.resid_pre@4 -> L2@4)."""
    return c["name"].replace(f".{c['site']}", "") if c["site"] in RESID_SITES else c["name"]


def _token(text: str, limit: int = 12) -> str:
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    text = text.strip() or repr(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def position_labels(run: Run) -> list[str]:
    """Position-axis labels: the run's tokens (first clean prompt), else the position numbers."""
    tokens = run.report.get("tokens")
    n = run.report["n_pos"]
    if not tokens or len(tokens) != n:
        return [str(i) for i in range(n)]
    return [_token(t) for t in tokens]


# ------------------------------------------------------------------------------------- helpers

def _mpl():
    import matplotlib
    from matplotlib import colors, patches, ticker
    from matplotlib.figure import Figure
    return matplotlib, colors, patches, ticker, Figure


@contextlib.contextmanager
def _style():
    import matplotlib
    with matplotlib.rc_context(STYLE):
        yield


def _panels(n: int, ax, fig, figsize, ncols: int | None = None, **kw):
    """(figure, list of n axes): the given axes, or new subplots in ``fig`` or a new figure."""
    *_, Figure = _mpl()
    if ax is not None:
        axes = list(np.atleast_1d(np.asarray(ax, dtype=object)).ravel())
        if len(axes) != n:
            raise ValueError(f"this figure has {n} panel(s); got {len(axes)} axes")
        return axes[0].figure, axes
    if fig is None:
        fig = Figure(figsize=figsize, layout="constrained")
    ncols = ncols or n
    nrows = -(-n // ncols)
    grid = fig.subplots(nrows, ncols, squeeze=False, **kw)
    axes = list(grid.ravel())
    for extra in axes[n:]:
        extra.set_axis_off()
    return fig, axes[:n]


def _site_panels(n: int, ax, fig, row_height: float, pad: float, **kw):
    """One panel per site, three to a row, at a paper's width: (figure, list of n axes)."""
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    return _panels(n, ax, fig, (DOUBLE if ncols > 1 else SINGLE, row_height * nrows + pad), ncols, **kw)


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


def _default(run: Run, direction, metric):
    direction = direction or run.directions[0]
    if direction not in run.directions:
        raise ValueError(f"direction {direction!r} not in this run ({', '.join(run.directions)})")
    metric = metric or run.metric
    if metric not in run.report["metrics"]:
        raise ValueError(f"metric {metric!r} not in this run ({', '.join(run.report['metrics'])})")
    return direction, metric


_DIR_WORD = {"denoise": "denoising", "noise": "noising"}


# ------------------------------------------------------------------------------- the figures

def exact_grid(run: Run, direction: str, metric: str, site: str) -> np.ndarray:
    """Exact effects on the grid of the site's heatmap ([layer, pos] per position, else [layer, unit]);
    NaN where not verified."""
    t = run.score(direction, metric, site)
    per_pos = run.per_position(site)
    if per_pos:
        grid = np.full(t.shape[:2], np.nan)
    else:
        grid = np.full((t.shape[0], t.shape[2]) if t.ndim > 2 else (t.shape[0], 1), np.nan)
    for c in run.components(direction, site):
        unit = c["head"] if c["head"] is not None else c["neuron"]
        col = c["pos"] if per_pos else (unit if unit is not None else 0)
        grid[c["layer"], col] = _exact(c, metric)
    return grid


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
                n_ver = int(np.isfinite(exact).sum())
                row[1].text(1.0, 1.02, f"{n_ver}/{exact.size} verified", transform=row[1].transAxes,
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
    return fig


CHAR_W, LINE_H = 0.6, 1.15  # label box estimate, in font sizes (DejaVu Sans)
OFFSETS = ((3, 3, "left", "bottom"), (-3, 3, "right", "bottom"), (3, -3, "left", "top"),
           (-3, -3, "right", "top"), (0, 5, "center", "bottom"), (0, -5, "center", "top"),
           (6, 0, "left", "center"), (-6, 0, "right", "center"), (10, 9, "left", "bottom"),
           (-10, 9, "right", "bottom"), (10, -9, "left", "top"), (-10, -9, "right", "top"))


def place_labels(ax, points, texts, color="black", max_labels: int = 8, fontsize: float = 7) -> int:
    """Name points without overlaps: each label takes the first offset around its point whose box
    (estimated from the text length) stays inside the axes and clear of the labels and named points
    placed before it. Points come in priority order. Returns how many were left unnamed. Run the
    figure's layout first (:func:`_layout`) so that the axes sizes the estimate uses are final."""
    fig = ax.figure
    pos = ax.get_position()
    w, h = pos.width * fig.get_figwidth() * 72, pos.height * fig.get_figheight() * 72
    if ax.get_aspect() == 1.0:
        w = h = min(w, h)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    logx = ax.get_xscale() == "log"

    def to_pt(x, y):
        if logx:
            x, x0_, x1_ = math.log10(x), math.log10(x0), math.log10(x1)
        else:
            x0_, x1_ = x0, x1
        return (x - x0_) / (x1_ - x0_) * w, (y - y0) / (y1 - y0) * h

    pts = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    boxes = [(px - 2, py - 2, px + 2, py + 2) for px, py in (to_pt(x, y) for x, y in pts[:50])]
    named = 0
    for (x, y), text in zip(points, texts):
        if named >= max_labels or not (math.isfinite(x) and math.isfinite(y)):
            continue
        px, py = to_pt(x, y)
        tw, th = CHAR_W * fontsize * len(text), LINE_H * fontsize
        for dx, dy, ha, va in OFFSETS:
            left = px + dx - (tw if ha == "right" else tw / 2 if ha == "center" else 0)
            bottom = py + dy - (th if va == "top" else th / 2 if va == "center" else 0)
            box = (left, bottom, left + tw, bottom + th)
            inside = box[0] >= 0 and box[1] >= 0 and box[2] <= w and box[3] <= h
            clear = all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in boxes)
            if inside and clear:
                far = abs(dx) + abs(dy) > 10
                ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                            fontsize=fontsize, color=color, zorder=5,
                            arrowprops=dict(arrowstyle="-", lw=0.4, color=color, shrinkA=0, shrinkB=2)
                            if far else None)
                boxes.append(box)
                named += 1
                break
    return sum(1 for x, y in points if math.isfinite(x) and math.isfinite(y)) - named


def _layout(fig) -> None:
    """Run the figure's layout engine now (final axes positions for place_labels)."""
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)


def _label_points(ax, comps: list[dict], xs, ys, max_labels: int) -> int:
    """Name the components farthest from the diagonal first; returns how many were left unnamed."""
    order = sorted(range(len(comps)), key=lambda i: -abs(ys[i] - xs[i]))
    return place_labels(ax, [(xs[i], ys[i]) for i in order], [_short(comps[i]) for i in order], FLAG_C,
                        max_labels)


def _square_limits(ax, xs, ys):
    vals = np.concatenate([np.asarray(xs, float), np.asarray(ys, float), [0.0]])
    vals = vals[np.isfinite(vals)]
    lo, hi = float(vals.min()), float(vals.max())
    pad = 0.08 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    return lo, hi


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
    rest = _label_points(ax, [comps[i] for i in idx], xs[idx], ys[idx], max_labels)
    if rest:
        ax.text(0.98, 0.02, f"+{rest} more flagged", transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7, color=FLAG_C)


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
            fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), handlelength=1.5)
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


def metric_components(run, direction: str, n: int = 16) -> list[dict]:
    """The components of the metric comparison: the n largest by max |normalised exact| over metrics,
    ordered by their primary normalised effect."""
    run = _as_run(run)
    comps = [c for c in run.components(direction)
             if any(v is not None and math.isfinite(v) for v in c["exact_norm"].values())]

    def size(c):
        return max(abs(v) for v in c["exact_norm"].values() if v is not None and math.isfinite(v))
    comps = sorted(comps, key=lambda c: -size(c))[:n]
    return sorted(comps, key=lambda c: -_num(c["exact_norm"].get(run.metric)) if math.isfinite(
        _num(c["exact_norm"].get(run.metric))) else 0.0)


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
        ref = 1 if direction == "denoise" else -1
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
            fig.legend(handles=handles, loc="outside upper center", ncols=ncols, handlelength=1)
        else:
            a.legend(handles=handles, loc="best", ncols=ncols, handlelength=1)
    return fig


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
            fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), handlelength=2)
            label = f"patched forward passes spent verifying ({_DIR_WORD[direction]})"
            if any(len(run.components(direction, s)) < run.n_components(s) for s in sites):
                label += "\nnot exhaustive: the true top-N is taken among the verified components only"
            fig.supxlabel(label, fontsize=7)
            fig.supylabel("recall of the true top-N (by |exact|)", fontsize=7)
    return fig


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
        _layout(fig)
        place_labels(a, [(x, y) for _, x, y in flagged], [d["name"] for d, _, _ in flagged], "black", max_labels)
    return fig


# ---------------------------------------------------------------------------------- saving

def save(fig, path: str | Path, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save ``fig`` as ``path`` with each format's suffix, with fixed metadata (identical bytes on
    re-runs). Returns the written paths."""
    import matplotlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    with matplotlib.rc_context({"svg.hashsalt": "attrpatch", "pdf.fonttype": 42}):
        for fmt in formats:
            if fmt not in SAVE_METADATA:
                raise ValueError(f"unknown figure format {fmt!r}; choose from {', '.join(SAVE_METADATA)}")
            target = path.with_suffix(f".{fmt}")
            fig.savefig(target, format=fmt, metadata=SAVE_METADATA[fmt], dpi=PNG_DPI)
            out.append(target)
    return out


def figures(run) -> Iterator[tuple[str, object]]:
    """(file stem, Figure) of every figure that applies to the run, one at a time:

    positions_{direction}   resid_pre/attn_out/mlp_out screened
    heads_{direction}       head screened (heads_q_..., heads_k_..., heads_v_... likewise)
    scatter_{direction}     always
    metrics_{direction}     more than one metric
    cost_recall_{direction} always
    directions              both directions
    """
    run = _as_run(run)
    for d in run.directions:
        if any(s in run.sites for s in RESID_SITES):
            yield f"positions_{d}", plot_positions(run, d)
        for site in HEAD_SITES:
            if site in run.sites:
                yield (f"heads_{d}" if site == "head" else f"heads_{site}_{d}"), plot_heads(run, d, site=site)
        if run.components(d):
            yield f"scatter_{d}", plot_scatter(run, d)
            if len(run.report["metrics"]) > 1:
                yield f"metrics_{d}", plot_metrics(run, d)
            yield f"cost_recall_{d}", plot_cost_recall(run, d)
    if set(run.directions) == {"denoise", "noise"} and direction_pairs(run):
        yield "directions", plot_directions(run)


def draw_run(run_dir: str | Path, formats: Sequence[str] = ("png", "pdf"),
             out: str | Path | None = None) -> list[Path]:
    """Draw every applicable figure of the run in ``run_dir`` into ``out`` (default run_dir/figures/),
    once per format. Returns the written files."""
    run = load_run(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "figures"
    written = []
    for stem, fig in figures(run):
        written += save(fig, out / stem, formats)
    return written
