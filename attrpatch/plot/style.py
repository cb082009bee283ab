"""Shared look of every figure: paper sizes, colours, labels, the rc style applied inside each call,
panel layout and saving with fixed metadata (identical bytes on re-runs). Matplotlib is imported lazily."""

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np

from ..inputs.directions import GERUND


SINGLE, DOUBLE = 3.3, 6.75  # column widths, inches
CMAP = "RdBu_r"  # red positive, blue negative, white zero
ESTIMATOR_LABELS = {"atp": "AtP", "atp_star": "AtP*", "ig": "IG", "graddrop": "GradDrop", "relp": "RelP", "gim": "GIM",
                    "relp_gim": "RelP+GIM", "relp_t4": "RelP+T4"}
METRIC_LABELS = {"logit_diff": "logit diff", "logprob": "log prob", "prob": "prob", "kl": "KL", "rank": "rank",
                 "accuracy": "accuracy", "top1": "top-1"}
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
# formats written unless asked for more: each format is a full render (a PDF cost more than the PNG of the same
# figure, 8.4 s against 6.8 s cpu for the 11 figures of a SmolLM2 screen); `--format png,pdf` adds the rest
DEFAULT_FORMATS = ("png",)
_DIR_WORD = GERUND


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


def _layout(fig) -> None:
    """Run the figure's layout engine now (final axes positions for place_labels)."""
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)


def _square_limits(ax, xs, ys):
    """Equal x and y limits around the points and 0, with square data units (y = x at 45 degrees)."""
    vals = np.concatenate([np.asarray(xs, float), np.asarray(ys, float), [0.0]])
    vals = vals[np.isfinite(vals)]
    lo, hi = float(vals.min()), float(vals.max())
    pad = 0.08 * (hi - lo or 1.0)
    lo, hi = lo - pad, hi + pad
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")
    return lo, hi


def save(fig, path: str | Path, formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
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
