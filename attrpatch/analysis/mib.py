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

Per position (``--positions each``, methods/edges/positions.py; attrpatch's rule, MIB has none): the E edges
are the per-position edges A@p -> B@p (graph edges x positions), ranked and cut as above, and the prune acts on
nodes (component, position), ``prune_positions``:

    node A@p        the embeddings, a head or an MLP at position p (a head at its query position p)
    edge out        some circuit edge A@p -> B@p (any receiver B; logits@p included)
    edge in         embed@p: always (the input). Ll.mlp@p: some edge into Ll.mlp@p. LlHh@q: some edge into
                    LlHh.q@q, or into LlHh.k@p' or LlHh.v@p' at a key position p' <= q (keys and values
                    reach every later query, so a head at q reads them through its attention)
    dropped node    its edges out go; the edges into its q@q (a head) or input@p (an MLP) go; the edges into
                    a head's k@p' / v@p' go once the head is dropped at every query q >= p' (no query left
                    that reads them). logits@p always stay
    until nothing changes. On a one-position graph this is ``prune``.
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


def key_value(receivers: Sequence) -> Tensor:
    """[receiver] bool: a head's k or v receiver (per position: read at key positions, by later queries)."""
    return torch.tensor([r.kind in ("k", "v") for r in receivers], dtype=torch.bool)


def prune_positions(in_graph: Tensor, owner: Tensor, kv: Tensor) -> Tensor:
    """The per-position prune (module docstring) of a [sender, receiver, pos] bool circuit; ``owner``:
    ``owners``, ``kv``: ``key_value``."""
    edges = in_graph.clone()
    owned = owner >= 0
    while True:
        has_out = edges.any(1)  # [sender, pos]
        into = edges.any(0)  # [receiver, pos]
        into = torch.where(kv[:, None], into.int().cummax(1).values.bool(), into)  # k/v: any key p' <= q
        has_in = torch.zeros(has_out.shape).index_add_(0, owner[owned], into[owned].float()) > 0  # [sender, pos]
        has_in[0] = True  # the input
        nodes = has_out & has_in  # [sender, pos]
        alive = torch.ones(into.shape, dtype=torch.bool)  # [receiver, pos]: the logits always
        at = nodes[owner[owned]]  # [owned receiver, pos]: the owner at that position
        later = at.flip(1).int().cummax(1).values.bool().flip(1)  # some query q >= p alive
        alive[owned] = torch.where(kv[owned][:, None], later, at)
        pruned = edges & nodes[:, None, :] & alive[None]
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
             shares: Sequence[float] = SHARES, kv: Tensor | None = None) -> Tensor:
    """[share, sender, receiver(, pos)] bool: MIB's pruned circuit at each share; per position (3-d
    ``scores``, ``kv``: ``key_value``) pruned by ``prune_positions``."""
    n_edges = int(exists.sum())
    cut = (lambda m: prune(m, owner)) if scores.ndim == 2 else (lambda m: prune_positions(m, owner, kv))
    return torch.stack([cut(top_edges(scores, exists, n, absolute)) for n in circuit_sizes(n_edges, shares)])


def kept_top(index: Tensor, value: Tensor, n: int, absolute: bool, n_total: int) -> Tensor | None:
    """The flat indices of the top-n edges when only the top-K by |score| were kept (``index`` [K] flat,
    ``value`` [K] their scores, by |score| descending; ``n_total`` edges in all), or None when the kept K
    do not decide them: by |score|, n > K; by signed score, when the n-th largest kept score is below the
    K-th |score| (an edge not kept could rank above it). Every edge kept (K = n_total): always decided."""
    if absolute or len(index) >= n_total:
        order = torch.arange(len(index)) if absolute else torch.argsort(value, descending=True)
        return index[order[:n]] if n <= len(index) else None
    order = torch.argsort(value, descending=True)
    if n > len(index) or n > 0 and float(value[order[n - 1]]) <= float(value.abs().min()):
        return None
    return index[order[:n]]


def summary(signed: Sequence[float], absolute: Sequence[float], shares: Sequence[float] = SHARES) -> dict:
    """CPR (area under f, circuits by signed score) and CMD (area under |1 - f|, by |score|)."""
    return {"cpr": area(signed, shares)[0], "cmd": area(absolute, shares)[1]}
