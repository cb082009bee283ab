"""What the two circuit graphs share (circuit.py's layer rows, position_circuit.py's position grid): the
circuit's edges with their values, node names, the rows of the layers holding a node, colours, the title."""

import re

from .run import report_title

POS_C, NEG_C = "#D55E00", "#0072B2"  # positive / negative effect (Okabe-Ito vermillion / blue)
MAX_CIRCUIT_EDGES = 40
ROW_H = 0.34  # inches per layer that holds a node of the circuit


def _layer(name: str, n_layers: int) -> int:
    """embed -1, logits n_layers, else the layer in the name."""
    if name in ("embed", "logits"):
        return -1 if name == "embed" else n_layers
    return int(re.match(r"L(\d+)", name).group(1))


def _short_node(name: str) -> str:
    """A node's name without its layer (its row says it): 'H3', 'MLP'."""
    head = re.match(r"L\d+(H\d+)", name)
    return "MLP" if ".mlp" in name else head.group(1) if head else name


def circuit_edges(circuit: dict, report: dict | None = None, n: int | None = None) -> list[dict]:
    """The circuit's top-n edges with ``value``: the exact effect (first direction) where verified, else the
    score, and ``exact`` saying which. Per-position edges match on their ``pos`` too."""
    n = n or circuit.get("smallest_faithful") or 20
    edges = circuit["edges"][:min(n, MAX_CIRCUIT_EDGES)]
    exact = {}
    if report is not None:
        first = report["directions"][0]
        exact = {_key(e): e["exact"] for e in report["edges"] if e["direction"] == first}
    return [{**e, "value": exact.get(_key(e), e["score"]), "exact": _key(e) in exact} for e in edges]


def _key(e: dict) -> tuple:
    """An edge's identity in report.json and circuit.json: sender, receiver and (per-position edges) pos."""
    return e["sender"], e["receiver"], e.get("pos")


def _target(receiver: str) -> str:
    """The node an edge enters: a head's q/k/v input is drawn at the head."""
    return receiver.rsplit(".", 1)[0] if re.search(r"H\d+\.[qkv]$", receiver) else receiver


def circuit_rows(edges: list[dict], n_layers: int | None = None) -> dict[int, int]:
    """{layer: row} of the layers that hold a node of ``edges`` (embed -1, logits ``n_layers``), bottom up."""
    names = {e["sender"] for e in edges} | {_target(e["receiver"]) for e in edges}
    top = n_layers if n_layers is not None else max((_layer(x, 0) for x in names if x not in ("embed", "logits")),
                                                     default=0) + 1
    return {layer: row for row, layer in enumerate(sorted({_layer(x, top) for x in names}))}


def _circuit_title(circuit: dict, report: dict | None, shown: int, skipped: bool) -> str:
    kind = "per-position edges" if circuit.get("positions") == "each" else "edges"
    head = f"top {shown} of {circuit['n_edges']} {kind}; width |exact| (EAP score where unverified)" + (
        "; grey: layers skipped" if skipped else "")
    if report is None:
        return head
    return f"{report_title(report, report['directions'][0], report.get('metric'))}\n{head}"
