"""MIB's circuit scores (Mueller et al. 2025, MIB circuit track; ``evaluation.evaluate_area_under_curve`` and
EAP-IG's ``Graph.apply_topn`` / ``Graph.prune``), computed from edge scores as MIB computes them. Pure: masks
and numbers in, masks and numbers out; the patching that measures each circuit is in edge_mib.py.

    shares           SHARES = 0.1%, 0.2%, 0.5%, 1%, 2%, 5%, 10%, 20%, 50%, 100% of the E edges
    circuit(p)       the n = int(p * E) edges with the largest score (CPR: signed score, descending; CMD:
                     |score|), then pruned: repeatedly drop the nodes with no edge in or no edge out (the
                     input counts as having one in; logits always stay), and the edges from or into dropped
                     nodes, until nothing changes (so a circuit may hold fewer than n edges)
    f(p)             (m(circuit) - m(empty)) / (m(full) - m(empty)): m(circuit) the clean run with every
                     edge outside the circuit patched to its corrupted value, m(empty) with every edge patched,
                     m(full) the clean run
    CPR              sum over consecutive shares of (p2 - p1) (f1 + f2) / 2, circuits ranked by signed score
    CMD              sum over consecutive shares of (p2 - p1) (|1 - f1| + |1 - f2|) / 2, ranked by |score|

The area starts at the first share (0.1%), not at 0, and its x axis is the share asked for, not the edges
left after pruning (as MIB's). Scores follow MIB's sign: positive when the edge supports the clean behaviour
(edge_mib.py derives them). A node is a sender; its receivers (a head's q, k and v; an MLP's input) are
where its incoming edges end (``owners``).
"""

import math
from typing import Sequence

import torch
from torch import Tensor

SHARES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def circuit_sizes(n_edges: int, shares: Sequence[float] = SHARES) -> list[int]:
    """The edges asked for at each share: int(share * E), truncated as MIB truncates."""
    return [int(p * n_edges) for p in shares]


def top_edges(scores: Tensor, exists: Tensor, n: int, absolute: bool) -> Tensor:
    """[sender, receiver] bool: the n edges (``exists``) with the largest score, or |score| if ``absolute``."""
    if n > int(exists.sum()):
        raise ValueError(f"asked for the top {n} edges of a graph with {int(exists.sum())}")
    ranked = scores.abs() if absolute else scores.clone()
    ranked = ranked.float().masked_fill(~exists, -math.inf)
    order = torch.argsort(ranked.flatten(), descending=True)
    mask = torch.zeros(exists.numel(), dtype=torch.bool)
    mask[order[:n]] = True
    return mask.view(exists.shape)


def owners(senders: Sequence, receivers: Sequence) -> Tensor:
    """[receiver] long: the sender index of the node each receiver belongs to (a head's q/k/v -> the head,
    an MLP's input -> the MLP), -1 for the logits. ``senders``/``receivers``: graph.py Nodes."""
    index = {(s.kind, s.layer, s.unit): i for i, s in enumerate(senders)}
    out = []
    for r in receivers:
        key = ("head", r.layer, r.unit) if r.kind in ("q", "k", "v") else (r.kind, r.layer, r.unit)
        out.append(index.get(key, -1))
    return torch.tensor(out, dtype=torch.long)


def prune(in_graph: Tensor, owner: Tensor) -> Tensor:
    """MIB's prune of a [sender, receiver] bool circuit: drop nodes without an edge in (sender 0, the input,
    always has one) or out, and the edges that touch them, until nothing changes."""
    edges = in_graph.clone()
    n_senders = edges.shape[0]
    owned = owner >= 0
    while True:
        has_out = edges.any(1)  # [sender]
        into = edges.any(0)[owned].float()  # [owned receiver]
        has_in = torch.zeros(n_senders).index_add_(0, owner[owned], into) > 0  # [sender]
        has_in[0] = True
        nodes = has_out & has_in
        alive = torch.ones(edges.shape[1], dtype=torch.bool)  # the logits always
        alive[owned] = nodes[owner[owned]]
        pruned = edges & nodes[:, None] & alive[None, :]
        if torch.equal(pruned, edges):
            return pruned
        edges = pruned


def area(faith: Sequence[float], shares: Sequence[float] = SHARES) -> tuple[float, float]:
    """(area under f, area under |1 - f|) by the trapezoid rule over ``shares``, from the first share."""
    under = from_one = 0.0
    for (x1, f1), (x2, f2) in zip(zip(shares, faith), zip(shares[1:], faith[1:])):
        under += (x2 - x1) * (f1 + f2) / 2
        from_one += (x2 - x1) * (abs(1 - f1) + abs(1 - f2)) / 2
    return under, from_one


def faithfulness(circuit_metric: Sequence[float], full: float, empty: float) -> list[float]:
    """(m(circuit) - m(empty)) / (m(full) - m(empty)) per circuit; NaN when full == empty."""
    gap = full - empty
    return [(m - empty) / gap if gap != 0 else math.nan for m in circuit_metric]


def circuits(scores: Tensor, exists: Tensor, owner: Tensor, absolute: bool,
             shares: Sequence[float] = SHARES) -> Tensor:
    """[share, sender, receiver] bool: MIB's pruned circuit at each share."""
    n_edges = int(exists.sum())
    return torch.stack([prune(top_edges(scores, exists, n, absolute), owner) for n in circuit_sizes(n_edges, shares)])


def summary(signed: Sequence[float], absolute: Sequence[float], shares: Sequence[float] = SHARES) -> dict:
    """CPR (area under f, circuits by signed score) and CMD (area under |1 - f|, by |score|)."""
    return {"cpr": area(signed, shares)[0], "cmd": area(absolute, shares)[1]}
