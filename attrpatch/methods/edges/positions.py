"""Per-position edges (``attrpatch edges --positions each``): every edge A -> B split by the position p at
which B reads A's write (definitions of senders, receivers and whole edges: eap.py).

    edge A@p -> B@p   A's write at position p, as receiver B reads it at position p. A receiver reads the
                      residual stream at its own position, and a sender's write at p is in the residual
                      stream at p only, so a direct edge joins one position to itself (pos = pos'):
                        LlHh.q@p      head h's query at p (the query position)
                        LlHk.k@p, .v  key-value head k's key / value at the KEY position p; through the
                                      attention pattern and the values it reaches every query p' >= p, as
                                      B's changed output, downstream of the edge
                        Ll.mlp@p      the MLP at p
                        logits@p      the logits at p: only each prompt's last position enters the metric,
                                      so logits@p elsewhere scores 0 and patches to 0
    exact(E)          as for whole edges, with receiver B at position p computed from
                      input_B[p] + sum over A with (A@p -> B@p) in E of a_A(source)[p] - a_A(this run)[p]
                      (patching.py; a whole edge is the set of its n_pos positions)
    score(A@p -> B@p) = sum over d_model of delta_A[:, p] * d metric / d input_B[:, p], mean over prompts:
                      the same backward as whole edges, the sum over pos left undone (``position_products``)

Identities (tests/test_position_edges.py): the positions of an edge patched jointly = the whole edge;
every edge out of A@p jointly = the node patch of A at p; scores summed over p = the whole-edge score.

Memory: the score table [sender, receiver, pos] per metric, float32 (float64 for float64 models), beside
eap.py's deltas: S x R x n_pos x 4 B (GPT-2 small at 64 positions: 157 x 445 x 64 x 4 B = 18 MB;
SmolLM2-135M at 20: 301 x 481 x 20 x 4 B = 12 MB; Llama-3-8B at 128: 1057 x 1569 x 128 x 4 B = 0.85 GB).
Never [pos, pos]: edges join one position to itself. Above ``MAX_TABLE_BYTES`` (or with ``keep``) only the
top-K by |score| and a uniform pool are kept (position_top.py). The faithfulness curve's masks are
[size, sender, receiver, pos] bools (one size at a time when only the top is kept).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .graph import Edge, Graph

MAX_TABLE_BYTES = 2 ** 30  # per-position score tables above this keep their top-K only (position_top.py)
POSITIONS = ("all", "each")  # --positions: whole edges (summed over positions) or per-position edges


@dataclass(frozen=True, order=True)
class PositionEdge:
    """sender@pos -> receiver@pos, by name: PositionEdge("L0H3", "L2H1.k", 4) is ``L0H3@4->L2H1.k@4``."""

    sender: str
    receiver: str
    pos: int

    def __str__(self) -> str:
        return f"{self.sender}@{self.pos}->{self.receiver}@{self.pos}"

    @property
    def edge(self) -> Edge:
        """The whole edge this is one position of."""
        return Edge(self.sender, self.receiver)


def check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise ValueError(f"Unknown positions {positions!r}; known: {', '.join(POSITIONS)} (all: whole edges, "
                         "summed over positions; each: one edge per position, sender@p->receiver@p)")


def position_edges(graph: Graph, n_pos: int) -> list[PositionEdge]:
    """Every per-position edge, edge-major (``graph.edges()`` order), then position: the order of
    ``flat_positions``."""
    return [PositionEdge(e.sender, e.receiver, p) for e in graph.edges() for p in range(n_pos)]


def flat_positions(graph: Graph, table: Tensor) -> Tensor:
    """[sender, receiver, pos] -> [edge * pos], in ``position_edges`` order."""
    return table[graph.exists].flatten()


def position_exists(graph: Graph, n_pos: int) -> Tensor:
    """[sender, receiver, pos] bool: ``graph.exists`` at every position."""
    return graph.exists[..., None].expand(*graph.exists.shape, n_pos)


def position_index(graph: Graph, edge: PositionEdge, n_pos: int) -> tuple[int, int, int]:
    """(sender, receiver, pos) indices; the errors of ``graph.index``, and a ValueError for a position outside
    the prompts."""
    i, j = graph.index(edge.edge)
    if isinstance(edge.pos, bool) or not isinstance(edge.pos, int) or not 0 <= edge.pos < n_pos:
        raise ValueError(f"position {edge.pos!r} of {edge} is outside these prompts' positions 0..{n_pos - 1}; "
                         "give an integer position of the padded batch (0 is the first token, BOS included)")
    return i, j, edge.pos


def position_products(delta: Tensor, grad: Tensor) -> Tensor:
    """score[A, B, p] = sum over batch, d_model of delta[A, batch, p] * grad[B, batch, p]:
    delta [sender, batch, pos, d_model], grad [unit, batch, pos, d_model] -> [sender, unit, pos]
    (one batched product over positions; summed over pos it is eap.py's [sender, unit] product)."""
    d = delta.permute(2, 0, 1, 3).flatten(2)  # [pos, sender, batch * d_model]
    g = grad.permute(2, 1, 3, 0).flatten(1, 2)  # [pos, batch * d_model, unit]
    return torch.bmm(d, g).permute(1, 2, 0)  # [sender, unit, pos]


def table_bytes(graph: Graph, n_pos: int, n_metrics: int, dtype: torch.dtype) -> int:
    return len(graph.senders) * len(graph.receivers) * n_pos * n_metrics * torch.tensor([], dtype=dtype).element_size()

