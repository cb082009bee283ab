"""Per-position edge scores without the full table: the top ``keep`` by |score| and a seeded uniform pool, kept
while the backward runs (``attribute_edges(..., positions=True, keep=K)``; the default when the table would be
larger than positions.MAX_TABLE_BYTES).

    top            the K per-position edges with the largest |score| under the FIRST metric (the primary,
                   in a screen), as flat indices into [sender, receiver, pos] (row-major): after each receiver
                   group's products [sender, unit, pos] arrive, top := topk_|.|(top ++ products); the other
                   metrics' scores are gathered at those K (their backwards run after the first's)
    pool           ``pool_size`` per-position edges drawn uniformly (seeded) from all that exist, before the
                   backward, and their scores gathered as the products arrive: the control sample's source
    values         the whole-edge sums [sender, receiver], as without ``keep`` (eap.py)

The top of a sum is not the sum of tops, so this needs every prompt's products in one backward: one chunk
(no --batch-size below the prompt count) and one backward per metric (EAP or EAP under GIM's rules; not
EAP-IG, whose steps add up). Memory: (K + pool) x (8 + 4) B per metric, plus one receiver group's products
[sender, unit, pos] at a time, instead of S x R x n_pos x 4 B.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .graph import Graph
from .positions import PositionEdge

DEFAULT_KEEP = 2 ** 16  # per-position edges kept per metric when the table is too large: the circuit's range


@dataclass
class PositionTop:
    """``index`` [K] flat indices into [sender, receiver, pos] of the top-K |score| under the first metric,
    by |score| descending, ``value[metric]`` [K] their scores (mean over prompts); ``pool`` [N] flat indices
    of a uniform sample of every per-position edge and ``pool_value[metric]`` [N] their scores; ``n_pos``
    positions."""

    index: Tensor
    value: dict[str, Tensor]
    pool: Tensor
    pool_value: dict[str, Tensor]
    n_pos: int

    def edges(self, graph: Graph, flat: Tensor) -> list[PositionEdge]:
        """The PositionEdges of flat indices ``flat`` [n]."""
        n_r, p = len(graph.receivers), self.n_pos
        return [PositionEdge(graph.senders[i // (n_r * p)].name, graph.receivers[i // p % n_r].name, i % p)
                for i in flat.tolist()]


def draw_pool(graph: Graph, n_pos: int, size: int, seed: int) -> Tensor:
    """``size`` flat [sender, receiver, pos] indices drawn uniformly, without replacement, from every per-position
    edge (seeded), sorted."""
    existing = graph.exists.flatten().nonzero().flatten()  # [edge] flat [sender, receiver] indices
    total = len(existing) * n_pos
    g = torch.Generator().manual_seed(seed)
    picks = torch.randperm(total, generator=g)[:size] if total <= 2 ** 24 else \
        torch.unique(torch.randint(total, (size,), generator=g))  # large graphs: with rare repeats dropped
    return (existing[picks // n_pos] * n_pos + picks % n_pos).sort().values


class TopKeeper:
    """The running top-K and pool of one attribution run (module docstring); ``add`` takes the products of
    the senders 0..n-1 into receivers j0..j0+unit-1, the first metric's before any other's."""

    def __init__(self, graph: Graph, n_pos: int, metrics: list[str], keep: int, pool: Tensor, dtype: torch.dtype):
        self.n_r, self.n_pos, self.keep, self.first = len(graph.receivers), n_pos, keep, metrics[0]
        self.index = torch.zeros(0, dtype=torch.long)
        self.value = {m: torch.zeros(0, dtype=dtype) for m in metrics}
        self.pool = pool
        self.pool_value = {m: torch.zeros(len(pool), dtype=dtype) for m in metrics}

    def add(self, metric: str, prod: Tensor, j0: int) -> None:
        """prod [sender, unit, pos]: the scores (summed over prompts) of senders 0.. into receivers j0.."""
        self._gather(self.pool, self.pool_value[metric], prod, j0)
        if metric != self.first:  # the first metric's top is final: its backward came first
            if len(self.value[metric]) == 0:
                self.value[metric] = torch.zeros(len(self.index), dtype=self.value[metric].dtype)
            self._gather(self.index, self.value[metric], prod, j0)
            return
        units, p = prod.shape[1:]
        local = prod.flatten().abs().topk(min(self.keep, prod.numel())).indices  # this block's own top first
        s, u, q = local // (units * p), local // p % units, local % p
        flat = ((s * self.n_r + j0 + u) * self.n_pos + q).cpu()  # -> flat [S, R, P] index
        values = torch.cat([self.value[metric], prod.flatten()[local].cpu()])
        index = torch.cat([self.index, flat])
        keep = values.abs().topk(min(self.keep, len(values))).indices  # descending |score|
        self.index, self.value[metric] = index[keep], values[keep]

    def _gather(self, flat: Tensor, into: Tensor, prod: Tensor, j0: int) -> None:
        """into[i] += prod at flat[i] for the flat [S, R, P] indices inside this block of receivers."""
        sender, receiver, pos = flat // (self.n_r * self.n_pos), flat // self.n_pos % self.n_r, flat % self.n_pos
        here = (receiver >= j0) & (receiver < j0 + prod.shape[1]) & (sender < prod.shape[0])
        if bool(here.any()):
            into[here] += prod[sender[here], receiver[here] - j0, pos[here]].cpu().to(into.dtype)

    def result(self, n_prompts: int) -> PositionTop:
        """The kept scores divided by the prompt count (the products arrive summed over prompts)."""
        return PositionTop(index=self.index, value={m: v / n_prompts for m, v in self.value.items()}, pool=self.pool,
                           pool_value={m: v / n_prompts for m, v in self.pool_value.items()}, n_pos=self.n_pos)


def check_keep(estimator: str, batch_size: int | None, n_prompts: int, keep: int | None = None) -> None:
    """The top-K needs one backward over every prompt (module docstring): a ValueError naming the fix."""
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep takes a positive integer (how many per-position edges to keep), got {keep!r}")
    if estimator == "ig":
        raise ValueError("per-position edges above the table limit keep a running top-k, which needs one backward "
                         "(EAP-IG sums several); use --estimator atp, shorter prompts, or whole edges (--positions all)")
    if batch_size is not None and batch_size < n_prompts:
        raise ValueError(f"per-position edges above the table limit keep a running top-k over one backward of every "
                         f"prompt; --batch-size {batch_size} < {n_prompts} prompts splits it (an out-of-memory retry "
                         "does too): drop --batch-size, use fewer prompts, or whole edges (--positions all)")
