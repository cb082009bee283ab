"""Figures of an edge screen, drawn from its files alone (report.json, circuit.json):

    circuit_graph        the circuit's edges, layers bottom to top; colour = sign, width = |effect|
    faithfulness         faithfulness against circuit size, with CPR and CMD
    edges_scatter_{dir}  edge score (EAP) vs exact edge patching
"""

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from .style import CONTROL_C, DEFAULT_FORMATS, FLAG_C, GREY, SINGLE, TOP_C, _panels, _square_limits, _style, save

POS_C, NEG_C = "#D55E00", "#0072B2"  # positive / negative effect (Okabe-Ito vermillion / blue)
MAX_CIRCUIT_EDGES = 40


def _node_xy(name: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    """Position of a node: embed at the bottom, logits at the top, heads in a row per layer, MLP above them."""
    if name == "embed":
        return (n_heads - 1) / 2, -1.0
    if name == "logits":
        return (n_heads - 1) / 2, float(n_layers)
    layer = int(re.match(r"L(\d+)", name).group(1))
    if ".mlp" in name:
        return n_heads + 0.3, layer + 0.45
    return float(re.match(r"L\d+H(\d+)", name).group(1)), float(layer)


def circuit_edges(circuit: dict, report: dict | None = None, n: int | None = None) -> list[dict]:
    """The circuit's top-n edges with ``value``: the exact effect (first direction) where verified, else the
    score, and ``exact`` saying which."""
    n = n or circuit.get("smallest_faithful") or 20
    edges = circuit["edges"][:min(n, MAX_CIRCUIT_EDGES)]
    exact = {}
    if report is not None:
        first = report["directions"][0]
        exact = {(e["sender"], e["receiver"]): e["exact"] for e in report["edges"] if e["direction"] == first}
    return [{**e, "value": exact.get((e["sender"], e["receiver"]), e["score"]),
             "exact": (e["sender"], e["receiver"]) in exact} for e in edges]


def plot_circuit(circuit: dict, report: dict | None = None, n: int | None = None, ax=None):
    """The top-n edges (default: the smallest circuit reaching the threshold) as a graph."""
    edges = circuit_edges(circuit, report, n)
    names = {e["sender"] for e in edges} | {e["receiver"].split(".")[0] if "H" in e["receiver"] else e["receiver"]
                                           for e in edges}
    layers = [int(m.group(1)) for x in names if (m := re.match(r"L(\d+)", x))]
    heads = [int(m.group(1)) for x in names if (m := re.match(r"L\d+H(\d+)", x))]
    n_layers, n_heads = max(layers, default=0) + 1, max(heads, default=0) + 1
    with _style():
        fig, (ax,) = _panels(1, ax, None, (SINGLE * 1.4, 0.8 * (n_layers + 2) + 0.6))
        top = max((abs(e["value"]) for e in edges), default=1.0) or 1.0
        for e in edges:
            receiver = e["receiver"]
            target = receiver.rsplit(".", 1)[0] if re.search(r"H\d+\.[qkv]$", receiver) else receiver
            (x0, y0), (x1, y1) = _node_xy(e["sender"], n_layers, n_heads), _node_xy(target, n_layers, n_heads)
            ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(
                arrowstyle="-|>", lw=0.4 + 3.0 * abs(e["value"]) / top, color=POS_C if e["value"] > 0 else NEG_C,
                alpha=0.8, shrinkA=4, shrinkB=4, connectionstyle="arc3,rad=0.08"))
            if target != receiver:
                ax.text(x1, y1 - 0.22, receiver[-1], fontsize=5, ha="center", va="top", color=GREY)
        for name in sorted(names):
            x, y = _node_xy(name, n_layers, n_heads)
            ax.scatter([x], [y], s=60, c="white", edgecolors="#333333", linewidths=0.6, zorder=3)
            ax.text(x, y + 0.16, name, fontsize=5.5, ha="center", va="bottom", zorder=4)
        ax.set_ylim(-1.6, n_layers + 0.7)
        ax.set_xlim(-0.8, n_heads + 1.2)
        ax.set_yticks(range(-1, n_layers + 1), ["embed", *(f"L{i}" for i in range(n_layers)), "logits"])
        ax.set_xticks([])
        ax.set_title(f"top {len(edges)} of {circuit['n_edges']} edges; width |exact| (EAP score where unverified),"
                     " red +, blue -", loc="left", fontsize=6)
    return fig


def plot_faithfulness(circuit: dict, ax=None):
    """Faithfulness (0 = corrupted, 1 = clean) against the number of edges in the circuit."""
    sizes = np.array(circuit["sizes"], dtype=float)
    faith = np.array([np.nan if f is None else f for f in circuit["faithfulness"]], dtype=float)
    with _style():
        fig, (ax,) = _panels(1, ax, None, (SINGLE, 2.3))
        ax.plot(np.maximum(sizes, 0.5), faith, marker="o", ms=2.5, color=TOP_C)
        ax.axhline(1, color=GREY, lw=0.6, ls="--")
        ax.axhline(0, color="#DDDDDD", lw=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("edges in the circuit (top by |score|; 0 plotted at 0.5)")
        ax.set_ylabel("faithfulness (0 corrupt, 1 clean)")
        ax.set_title(f"CPR {circuit['cpr']:.3f}, CMD {circuit['cmd']:.3f}  ({circuit['n_edges']} edges)", loc="left")
    return fig


def plot_edge_scatter(report: dict, direction: str, ax=None):
    """EAP score (x) vs exact edge patching (y) of the verified edges; flagged ones orange."""
    entries = [e for e in report["edges"] if e["direction"] == direction]
    xs = np.array([e["approx"] for e in entries], dtype=float)
    ys = np.array([np.nan if e["exact"] is None else e["exact"] for e in entries], dtype=float)
    colours = [FLAG_C if set(e["flags"]) & {"sign_flip", "large_error", "missed"} else
               (TOP_C if e["selected"] == "top" else CONTROL_C) for e in entries]
    a = report["agreement"][direction][report["metric"]]
    with _style():
        fig, (ax,) = _panels(1, ax, None, (SINGLE, SINGLE))
        if len(entries):
            _square_limits(ax, xs, ys)
        ax.axline((0, 0), slope=1, color=GREY, lw=0.6, ls="--", zorder=0)
        ax.scatter(xs, ys, s=9, c=colours, linewidths=0.3, edgecolors="white", zorder=2)
        ax.set_xlabel(f"edge score ({report['estimator']})")
        ax.set_ylabel("exact edge patching")
        pearson = "n/a" if a.get("pearson") is None else f"{a['pearson']:.2f}"
        ax.set_title(f"{direction}: {len(entries)} edges, r = {pearson}", loc="left")
    return fig


def draw_edges(run_dir: str | Path, formats: Sequence[str] = DEFAULT_FORMATS) -> list[Path]:
    """Every edge figure of the run in ``run_dir`` into run_dir/figures/."""
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    circuit = json.loads((run_dir / "circuit.json").read_text())
    out, written = run_dir / "figures", []
    written += save(plot_circuit(circuit, report), out / "circuit_graph", formats)
    written += save(plot_faithfulness(circuit), out / "faithfulness", formats)
    for d in report["directions"]:
        written += save(plot_edge_scatter(report, d), out / f"edges_scatter_{d}", formats)
    return written
