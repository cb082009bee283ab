"""The circuit of a per-position edge screen (``attrpatch edges --positions each``) on a grid of token
positions (x) and layers (y), drawn from circuit.json and report.json alone:

    column     a token position holding a node of the circuit, headed by its token or IOI role (report.json
               ``tokens``) and its index; inside a column, one slot per head of the circuit, the MLP right
    row        a layer holding a node (embed at the bottom, logits at the top), skipped layers shaded
    edge       A@p -> B@p joins two nodes of one column (a sender's write at p is read at p only):
               orange positive, blue negative, width |exact effect| (the score where unverified)
    attention  a head whose k or v input at key position p is in the circuit and whose write at a later
               query position q is too: a dashed grey line from H@p to H@q, the path the edges leave implicit
               (queries at q attend to the key and value at p)

A q receiver's node sits at the query position, a k/v receiver's at the key position, letters beside it.
"""

import re

from .circuit_layout import NEG_C, POS_C, ROW_H, _circuit_title, _short_node, _target, circuit_edges, circuit_rows
from .style import GREY, SINGLE, _panels, _style

SLOT_W = 0.23  # inches per slot (a head or the MLP) of a column
MAX_WIDTH = 11.0


def _head(name: str) -> int | None:
    m = re.match(r"L\d+H(\d+)$", name)
    return int(m.group(1)) if m else None


def position_label(pos: int, tokens: list | None) -> str:
    """A column's header: the token (or role) at ``pos`` and the index, e.g. 'S2 @9'."""
    token = tokens[pos] if tokens and pos < len(tokens) else None
    return f"{token.strip() or repr(token)} @{pos}" if token is not None else f"@{pos}"


def position_layout(edges: list[dict]) -> tuple[list[int], list[int], dict[int, int]]:
    """(columns: the positions holding a node, ascending; slots: the head indices of the circuit, ascending;
    rows: {layer: row} as in circuit.circuit_rows)."""
    names = {e["sender"] for e in edges} | {_target(e["receiver"]) for e in edges}
    slots = sorted({h for x in names if (h := _head(x)) is not None})
    return sorted({e["pos"] for e in edges}), slots, circuit_rows(edges)


def _xy(name: str, pos: int, columns: list[int], slots: list[int], rows: dict[int, int]) -> tuple[float, float]:
    """A node's place: its column's offset, then its head's slot (the MLP after the last slot; embed and logits
    centred)."""
    width = len(slots) + 1.6
    x0 = columns.index(pos) * width
    layer = -1 if name == "embed" else max(rows) if name == "logits" else int(re.match(r"L(\d+)", name).group(1))
    if name in ("embed", "logits"):
        return x0 + (len(slots) - 0.7) / 2, float(rows[layer])
    if ".mlp" in name:
        return x0 + len(slots) + 0.2, rows[layer] + 0.3
    return x0 + slots.index(_head(name)), float(rows[layer])


def attention_links(edges: list[dict]) -> list[tuple[str, int, int]]:
    """(head, key position p, query position q > p) for each head whose k/v input at p and whose write at q are
    both in ``edges``."""
    kv = {(_target(e["receiver"]), e["pos"]) for e in edges if re.search(r"H\d+\.[kv]$", e["receiver"])}
    writes = {(e["sender"], e["pos"]) for e in edges if _head(e["sender"]) is not None}
    return sorted({(h, p, q) for h, p in kv for g, q in writes if g == h and q > p})


def plot_position_circuit(circuit: dict, report: dict | None = None, n: int | None = None, ax=None):
    """The top-n per-position edges (default: the smallest circuit reaching the threshold) on a position x layer
    grid (module docstring)."""
    edges = circuit_edges(circuit, report, n)
    columns, slots, rows = position_layout(edges)
    tokens = (report or {}).get("tokens")
    from matplotlib.lines import Line2D
    width = min(MAX_WIDTH, max(SINGLE * 1.4, SLOT_W * len(columns) * (len(slots) + 1.6) + 1.2))
    with _style():
        fig, (ax,) = _panels(1, ax, None, (width, ROW_H * len(rows) + 1.2))
        top = max((abs(e["value"]) for e in edges), default=1.0) or 1.0
        nodes, inputs = set(), {}
        for e in edges:
            target = _target(e["receiver"])
            nodes |= {(e["sender"], e["pos"]), (target, e["pos"])}
            ax.annotate("", _xy(target, e["pos"], columns, slots, rows), _xy(e["sender"], e["pos"], columns, slots, rows),
                        arrowprops=dict(arrowstyle="-|>", lw=0.4 + 2.5 * abs(e["value"]) / top, alpha=0.75,
                                        color=POS_C if e["value"] > 0 else NEG_C, shrinkA=4, shrinkB=4,
                                        connectionstyle="arc3,rad=0.08"))
            if target != e["receiver"]:
                inputs.setdefault((target, e["pos"]), set()).add(e["receiver"][-1])
        for head, p, q in attention_links(edges):
            ax.annotate("", _xy(head, q, columns, slots, rows), _xy(head, p, columns, slots, rows), arrowprops=dict(
                arrowstyle="-|>", lw=0.6, ls="--", color=GREY, alpha=0.8, shrinkA=4, shrinkB=4,
                connectionstyle="arc3,rad=-0.15"))
        for (target, pos), letters in inputs.items():
            x, y = _xy(target, pos, columns, slots, rows)
            ax.text(x + 0.18, y - 0.12, "".join(sorted(letters)), fontsize=5, ha="left", va="top", color=GREY)
        for name, pos in sorted(nodes):
            x, y = _xy(name, pos, columns, slots, rows)
            ax.scatter([x], [y], s=36, c="white", edgecolors="#333333", linewidths=0.6, zorder=3)
            ax.text(x, y + 0.13, _short_node(name), fontsize=5, ha="center", va="bottom", zorder=4)
        _axes(ax, columns, slots, rows, tokens, any(name == "logits" for name, _ in nodes))
        what = "exact effect" if any(e["exact"] for e in edges) else "edge score"
        handles = [Line2D([], [], color=POS_C, lw=1.5, label=f"positive {what}"),
                   Line2D([], [], color=NEG_C, lw=1.5, label=f"negative {what}"),
                   Line2D([], [], color=GREY, lw=0.8, ls="--", label="attention: key/value at p read at q")]
        if fig.get_layout_engine() is not None and len(fig.axes) == 1:
            fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=6, handlelength=1.8)
        else:
            ax.legend(handles=handles, loc="lower right", fontsize=6, handlelength=1.8)
        layers = sorted(rows)
        skipped = any(b - a > 1 for a, b in zip(layers, layers[1:]) if a >= 0 and b < max(layers))
        ax.set_title(_circuit_title(circuit, report, len(edges), skipped), loc="left", fontsize=6.5)
    return fig


def _axes(ax, columns: list[int], slots: list[int], rows: dict[int, int], tokens: list | None, logits: bool) -> None:
    """Layer ticks (left), the columns' token headers (top), column separators, skipped layers shaded."""
    layers = sorted(rows)
    ax.set_yticks(range(len(layers)), [{-1: "embed"}.get(la, "logits" if logits and la == layers[-1] else f"L{la}")
                                       for la in layers])
    width = len(slots) + 1.6
    for i in range(1, len(columns)):
        ax.axvline(i * width - 0.8, color="#DDDDDD", lw=0.6, zorder=0)
    for below, above in zip(layers, layers[1:]):
        if above - below > 1 and below >= 0:
            ax.axhspan(rows[below] + 0.4, rows[above] - 0.4, color="#F2F2F2", lw=0, zorder=0)
    ax.set_ylim(-0.6, len(layers) - 0.4)
    ax.set_xlim(-0.8, len(columns) * width - 0.8)
    ax.set_xticks([i * width + (len(slots) - 0.7) / 2 for i in range(len(columns))],
                  [position_label(p, tokens) for p in columns], fontsize=6)
    ax.xaxis.set_ticks_position("top")
    ax.tick_params(axis="x", length=0)

