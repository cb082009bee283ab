"""Figures of a screen run, drawn from its files alone (report.json and scores.safetensors).

    draw_run(run_dir)            every applicable figure into run_dir/figures/ (png; formats= for pdf, svg)
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

One module per figure family, on shared ones; each imports only those listed before it:

    style       sizes, colours, labels, the rc style, panel layout, save
    run         Run, load_run, component accessors, position labels
    labels      place_labels: point labels without overlaps
    heatmaps    plot_positions, plot_heads, exact_grid
    scatter     plot_scatter, scatter_panel
    metrics     plot_metrics, metric_components
    recall      plot_cost_recall, cost_recall_panel, recall_curve, estimator_ranks, top_n
    directions  plot_directions, direction_pairs
    windows     plot_windows (sliding-window sweeps, from their JSON file; not part of a screen run)
    features    plot_features (a feature screen, from features.json; drawn by the run when --sae is given)
    corruptions plot_corruptions (several corruptions compared, from corruptions.json; not drawn by draw_run)
    circuit     plot_circuit, plot_faithfulness, plot_edge_scatter, draw_edges (an edge screen's figures, from
                its report.json and circuit.json)
    circuit_layout    what the two circuit graphs share (edges with their values, rows of layers, colours, titles)
    position_circuit  plot_position_circuit (a per-position edge screen's circuit on a position x layer grid;
                plot_circuit draws it for circuits of --positions each)

Sizes fit a paper column (3.3 in single, 6.75 in double) with fonts of 7 pt or more. Matplotlib is
imported lazily and no global style is changed: the style applies inside each call only. Figures are
plain ``matplotlib.figure.Figure`` objects (no pyplot state), saved with fixed metadata so that
re-drawing a run gives identical bytes.
"""

from functools import partial
from itertools import zip_longest
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..engine import forked
from ..engine.forked import Forked

from .directions import direction_pairs, plot_directions
from .heatmaps import exact_grid, plot_heads, plot_positions
from .labels import CHAR_W, LINE_H, OFFSETS, place_labels
from .metrics import metric_components, plot_metrics
from .recall import cost_recall_panel, estimator_ranks, plot_cost_recall, recall_curve, top_n
from .run import DISAGREE, HEAD_SITES, RESID_SITES, Run, _as_run, load_run, position_labels
from .run import _short  # noqa: F401  (plot._short: the component names the figures print)
from .scatter import plot_scatter, scatter_panel
from .style import (CMAP, CONTROL_C, DEFAULT_FORMATS, DOUBLE, EST_DASHES, ESTIMATOR_LABELS, FLAG_C, GREY, MARKERS,
                    METRIC_LABELS, METRIC_UNITS, PALETTE, PNG_DPI, SAVE_METADATA, SINGLE, STYLE, TOP_C, save)

__all__ = [
    "draw_run", "figures", "save", "load_run", "Run", "position_labels",
    "plot_positions", "plot_heads", "exact_grid", "plot_scatter", "scatter_panel", "plot_metrics",
    "metric_components", "plot_cost_recall", "cost_recall_panel", "recall_curve", "estimator_ranks", "top_n",
    "plot_directions", "direction_pairs", "place_labels",
    "RESID_SITES", "HEAD_SITES", "DISAGREE", "SINGLE", "DOUBLE", "CMAP", "ESTIMATOR_LABELS", "METRIC_LABELS",
    "METRIC_UNITS", "PALETTE", "EST_DASHES", "MARKERS", "TOP_C", "CONTROL_C", "FLAG_C", "GREY", "STYLE",
    "SAVE_METADATA", "PNG_DPI", "DEFAULT_FORMATS", "CHAR_W", "LINE_H", "OFFSETS",
]


def figures(run, keep: Callable[[int], bool] | None = None) -> Iterator[tuple[str, object]]:
    """(file stem, Figure) of every figure that applies to the run, one at a time:

    positions_{direction}   resid_pre/attn_out/mlp_out screened
    heads_{direction}       head screened (heads_q_..., heads_k_..., heads_v_... likewise)
    scatter_{direction}     always
    metrics_{direction}     more than one metric
    cost_recall_{direction} always
    directions              both directions

    keep: which of them (by their index in this order) to draw; None: all.
    An ablation run (report "corruption" names one) says so in the title of every figure's first panel.
    """
    run = _as_run(run)
    ablation = (run.report.get("corruption") or {}).get("ablation")
    for i, (stem, make) in enumerate(_figures(run)):
        if keep is not None and not keep(i):
            continue
        fig = make()
        if ablation:  # the first panel's title says it (a suptitle would sit on the figure legends)
            ax = fig.axes[0]
            ax.set_title(f"{ablation} ablation, not a corrupted prompt\n" + ax.get_title(loc="left"), loc="left",
                         fontsize=STYLE["axes.titlesize"])
        yield stem, fig


def _figures(run: Run) -> Iterator[tuple[str, Callable[[], object]]]:
    """(stem, a function drawing that figure) for each figure that applies, in ``figures``' order."""
    for d in run.directions:
        if any(s in run.sites for s in RESID_SITES):
            yield f"positions_{d}", partial(plot_positions, run, d)
        for site in HEAD_SITES:
            if site in run.sites:
                yield (f"heads_{d}" if site == "head" else f"heads_{site}_{d}"), partial(plot_heads, run, d, site=site)
        if run.components(d):
            yield f"scatter_{d}", partial(plot_scatter, run, d)
            if len(run.report["metrics"]) > 1:
                yield f"metrics_{d}", partial(plot_metrics, run, d)
            yield f"cost_recall_{d}", partial(plot_cost_recall, run, d)
    if set(run.directions) == {"denoise", "noise"} and direction_pairs(run):
        yield "directions", partial(plot_directions, run)


def draw_run(run_dir: str | Path, formats: Sequence[str] = DEFAULT_FORMATS,
             out: str | Path | None = None, processes: int | None = None) -> list[Path]:
    """Draw every applicable figure of the run in ``run_dir`` into ``out`` (default run_dir/figures/),
    once per format. Returns the written files, in ``figures``' order. processes: 2 draws every other figure in
    a forked second process (engine/forked.py; matplotlib draws on one core); default: 2 on Linux with two cores
    or more (1.6-1.9x faster on the SmolLM2 screen's 11 figures)."""
    run = load_run(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / "figures"
    draw = lambda keep: [save(fig, out / stem, formats) for stem, fig in figures(run, keep)]
    if (processes or (2 if forked.available() >= 2 else 1)) == 1:
        return [p for paths in draw(None) for p in paths]
    with Forked(lambda: draw(lambda i: i % 2 == 1)) as child:  # torch's threads as they are: matplotlib draws
        even = draw(lambda i: i % 2 == 0)
        odd = child.result()
    both = [paths for pair in zip_longest(even, odd) for paths in pair if paths is not None]
    return [p for paths in both for p in paths]
