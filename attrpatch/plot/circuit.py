"""Figures of an edge screen, drawn from its files alone (report.json, circuit.json):

    circuit_graph        the circuit's edges, one row per layer holding a node (bottom to top), skipped layers
                         shaded; orange positive, blue negative, width |effect|; per-position edges on a grid of
                         positions x layers (position_circuit.py)
    faithfulness         faithfulness against circuit size, with CPR and CMD
    mib_faithfulness     MIB's curves at its edge shares, by signed and by absolute score (runs with --mib)
    edges_scatter_{dir}  edge score (EAP) vs exact edge patching
"""

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .circuit_layout import (NEG_C, POS_C, ROW_H, _circuit_title, _layer, _short_node, _target, circuit_edges,
                             circuit_rows)
from .position_circuit import plot_position_circuit
from .run import suptitle
from .style import (CONTROL_C, DEFAULT_FORMATS, FLAG_C, GREY, SINGLE, TOP_C, _panels, _square_limits,
                    _style, save)


def _node_xy(name: str, rows: dict[int, int], n_heads: int) -> tuple[float, float]:
    """Position of a node: one row per layer that holds a node (embed at the bottom, logits at the top), heads
    at their index, the MLP right of them."""
    layer = _layer(name, max(rows) if rows else 0)
    if name in ("embed", "logits"):
        return (n_heads - 1) / 2, float(rows[layer])
    if ".mlp" in name:
        return n_heads + 0.3, rows[layer] + 0.3
    return float(re.match(r"L\d+H(\d+)", name).group(1)), float(rows[layer])


def plot_circuit(circuit: dict, report: dict | None = None, n: int | None = None, ax=None):
    """The top-n edges (default: the smallest circuit reaching the threshold) as a graph, one row per layer that
    holds a node (skipped layers marked), orange positive and blue negative, width |effect|."""
    if circuit.get("positions") == "each":  # a position x layer grid (position_circuit.py)
        return plot_position_circuit(circuit, report, n, ax)
    edges = circuit_edges(circuit, report, n)
    names = {e["sender"] for e in edges} | {_target(e["receiver"]) for e in edges}
    heads = [int(m.group(1)) for x in names if (m := re.match(r"L\d+H(\d+)", x))]
    n_heads = max(heads, default=0) + 1
    rows = circuit_rows(edges)
    from matplotlib.lines import Line2D
    with _style():
        fig, (ax,) = _panels(1, ax, None, (SINGLE * 1.4, ROW_H * len(rows) + 1.0))
        top = max((abs(e["value"]) for e in edges), default=1.0) or 1.0
        inputs: dict[str, set] = {}  # a head's q/k/v inputs that receive edges, written once beside it
        for e in edges:
            target = _target(e["receiver"])
            (x0, y0), (x1, y1) = _node_xy(e["sender"], rows, n_heads), _node_xy(target, rows, n_heads)
            ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(
                arrowstyle="-|>", lw=0.4 + 2.5 * abs(e["value"]) / top, color=POS_C if e["value"] > 0 else NEG_C,
                alpha=0.75, shrinkA=4, shrinkB=4, connectionstyle="arc3,rad=0.08"))
            if target != e["receiver"]:
                inputs.setdefault(target, set()).add(e["receiver"][-1])
        for target, letters in inputs.items():
            x, y = _node_xy(target, rows, n_heads)
            ax.text(x + 0.18, y - 0.12, "".join(sorted(letters)), fontsize=5, ha="left", va="top", color=GREY)
        for name in sorted(names):
            x, y = _node_xy(name, rows, n_heads)
            ax.scatter([x], [y], s=40, c="white", edgecolors="#333333", linewidths=0.6, zorder=3)
            ax.text(x, y + 0.13, _short_node(name), fontsize=5.5, ha="center", va="bottom", zorder=4)
        layers = sorted(rows)
        ax.set_yticks(range(len(layers)), [{-1: "embed"}.get(la, "logits" if la == layers[-1] and "logits" in names
                                                             else f"L{la}") for la in layers])
        for below, above in zip(layers, layers[1:]):
            if above - below > 1 and below >= 0:  # layers without a node of the circuit
                ax.axhspan(rows[below] + 0.4, rows[above] - 0.4, color="#F2F2F2", lw=0, zorder=0)
        ax.set_ylim(-0.6, len(layers) - 0.4)
        ax.set_xlim(-0.8, n_heads + 1.2)
        ax.set_xticks([])
        what = "exact effect" if any(e["exact"] for e in edges) else "edge score"
        handles = [Line2D([], [], color=POS_C, lw=1.5, label=f"positive {what}"),
                   Line2D([], [], color=NEG_C, lw=1.5, label=f"negative {what}")]
        if fig.get_layout_engine() is not None and len(fig.axes) == 1:  # a figure of its own: legend below
            fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=6, handlelength=1.5)
        else:
            ax.legend(handles=handles, loc="lower right", fontsize=6, handlelength=1.5)
        skipped = any(b - a > 1 for a, b in zip(layers, layers[1:]) if a >= 0 and b < max(layers))
        ax.set_title(_circuit_title(circuit, report, len(edges), skipped), loc="left", fontsize=6.5)
    return fig


def plot_faithfulness(circuit: dict, ax=None, report: dict | None = None):
    """Faithfulness (0 = corrupted, 1 = clean) against the number of edges in the circuit; titled with the
    model and task of ``report`` (report.json) when given: noising, the circuits ranked by ``ranked_by``."""
    sizes = np.array(circuit["sizes"], dtype=float)
    faith = np.array([np.nan if f is None else f for f in circuit["faithfulness"]], dtype=float)
    own = ax is None
    with _style():
        fig, (ax,) = _panels(1, ax, None, (SINGLE, 2.3))
        ax.plot(np.maximum(sizes, 0.5), faith, marker="o", ms=2.5, color=TOP_C)
        ax.axhline(1, color=GREY, lw=0.6, ls="--")
        ax.axhline(0, color="#DDDDDD", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("edges in the circuit (top by |score|; 0 plotted at 0.5)")
        ax.set_ylabel("faithfulness (0 corrupt, 1 clean)")
        ax.set_title(f"CPR {circuit['cpr']:.3f}, CMD {circuit['cmd']:.3f}  ({circuit['n_edges']} edges; ranked by "
                     f"{circuit.get('ranked_by', 'score')})", loc="left", fontsize=6.5)
        if report is not None and own:
            suptitle(fig, report, "noise", circuit.get("metric", report.get("metric")))
    return fig


def _area(x: float | None) -> str:
    """CPR / CMD for a label; n/a when not measured (a kept top-K left shares undecided)."""
    return "n/a" if x is None or x != x else f"{x:.3f}"


def plot_mib(mib: dict, ax=None, report: dict | None = None):
    """MIB's faithfulness curves (report.json ``mib``): f at MIB's edge shares (log x), the circuits ranked by
    signed score (CPR: the area under f, shaded) and by |score| (CMD: the area between f and 1, hatched), both
    areas from the first share as MIB's; the edges left after pruning are the x of each point's label."""
    c = mib["curve"]
    shares = 100 * np.array(c["shares"], dtype=float)
    signed = np.array([np.nan if f is None else f for f in c["faithfulness_signed"]], dtype=float)
    absolute = np.array([np.nan if f is None else f for f in c["faithfulness_absolute"]], dtype=float)
    own = ax is None
    with _style():
        fig, (ax,) = _panels(1, ax, None, (SINGLE, 2.5))
        ax.fill_between(shares, 0, signed, color=POS_C, alpha=0.15, lw=0)
        ax.fill_between(shares, absolute, 1, facecolor="none", edgecolor=NEG_C, hatch="////", lw=0, alpha=0.5)
        ax.plot(shares, signed, marker="o", ms=2.5, color=POS_C, label=f"by signed score: CPR {_area(mib['cpr'])}")
        ax.plot(shares, absolute, marker="s", ms=2.5, color=NEG_C, label=f"by |score|: CMD {_area(mib['cmd'])}")
        ax.axhline(1, color=GREY, lw=0.6, ls="--")
        ax.axhline(0, color="#DDDDDD", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("share of MIB's edges asked for (%, log; CPR and CMD integrate over the linear share)")
        ax.set_ylabel("faithfulness (0 empty, 1 full)")
        ax.legend(loc="upper left", fontsize=6, frameon=False)
        ax.set_title(f"MIB: {mib['n_edges']} {'per-position ' if mib.get('positions') == 'each' else ''}edges, {mib['intervention']}; {mib['metric']}", loc="left", fontsize=6.5)
        if report is not None and own:
            suptitle(fig, report, "noise", mib.get("metric", report.get("metric")))
    return fig


def plot_edge_scatter(report: dict, direction: str, ax=None):
    """EAP score (x) vs exact edge patching (y) of the verified edges; flagged ones orange."""
    entries = [e for e in report["edges"] if e["direction"] == direction]
    xs = np.array([e["approx"] for e in entries], dtype=float)
    ys = np.array([np.nan if e["exact"] is None else e["exact"] for e in entries], dtype=float)
    colours = [FLAG_C if set(e["flags"]) & {"sign_flip", "large_error", "missed"} else
               (TOP_C if e["selected"] == "top" else CONTROL_C) for e in entries]
    a = report["agreement"][direction][report["metric"]]
    own = ax is None
    with _style():
        fig, (ax,) = _panels(1, ax, None, (SINGLE, SINGLE))
        if len(entries):
            _square_limits(ax, xs, ys)
        ax.axline((0, 0), slope=1, color=GREY, lw=0.6, ls="--", zorder=0)
        ax.scatter(xs, ys, s=9, c=colours, linewidths=0.3, edgecolors="white", zorder=2)
        ax.set_xlabel(f"edge score ({report['estimator']})")
        ax.set_ylabel("exact edge patching")
        pearson = "n/a" if a.get("pearson") is None else f"{a['pearson']:.2f}"
        ax.set_title(f"{len(entries)} edges verified, r = {pearson}", loc="left")
        if own:  # a figure of its own, not a caller's axes
            suptitle(fig, report, direction, report["metric"])
    return fig


def draw_edges(run_dir: str | Path, formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """Every edge figure of the run in ``run_dir`` into run_dir/figures/."""
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    circuit = json.loads((run_dir / "circuit.json").read_text())
    out, written = run_dir / "figures", []
    written += save(plot_circuit(circuit, report), out / "circuit_graph", formats)
    written += save(plot_faithfulness(circuit, report=report), out / "faithfulness", formats)
    if report.get("mib"):
        written += save(plot_mib(report["mib"], report=report), out / "mib_faithfulness", formats)
    for d in report["directions"]:
        written += save(plot_edge_scatter(report, d), out / f"edges_scatter_{d}", formats)
    return written
