"""Integrated gradients on the edge of the linear approximation (EAP-IG, Hanna et al. 2024):

    score(c) = (a_c(source) - a_c(receiver)) . (1/k) sum_j d metric / d a_c  at run x_j
    x_j: the receiving run with its token embeddings moved to e_receiver + alpha_j (e_source - e_receiver),
         alpha_j = (j + 1/2) / k  (midpoint rule on [0, 1])

The deltas come from the plain source and receiver runs; only the gradient is integrated. It converges to
the exact effect of patching the embeddings, and is usually closer to the exact effect of any component
than AtP (docs/methods.md#integrated-gradients). Cost per chunk: 2 + k forwards, k backwards per metric.
"""

from torch import Tensor

from .gradients import Chunk, masked

EMBED = ("embed", 0)


def alphas(steps: int) -> list[float]:
    """The midpoints (j + 1/2) / steps, j < steps: where on the line from receiver to source the gradient is taken."""
    return [(j + 0.5) / steps for j in range(steps)]


def along(receiver: Tensor, source: Tensor, alpha: float, like: Tensor) -> Tensor:
    """receiver + alpha (source - receiver), in ``like``'s dtype: the embeddings of one interpolated run."""
    start = receiver.to(like.dtype)
    return start + alpha * (source.to(like.dtype) - start)


def score(chunk: Chunk, *, steps: int = 8) -> None:
    chunk.cache_source(lazy=False)  # every step reuses the deltas
    receiver, chunk.logits["receiver"] = chunk.cache(chunk.receiver_run, {**chunk.points, EMBED: chunk.embed})
    source_embed, receiver_embed = chunk.source[EMBED], receiver[EMBED]
    chunk.deltas = {key: masked(chunk.source[key] - receiver[key], chunk.mask) for key in chunk.points}
    del receiver
    for alpha in alphas(steps):
        def embed(raw, alpha=alpha):
            return along(receiver_embed, source_embed, alpha, raw)
        chunk.backward(lambda key, prod: chunk.add(*key, prod / steps), embed=embed)


def passes(n_layers: int, n_metrics: int, steps: int = 8) -> dict[str, int]:
    return {"forward": 2 + steps, "backward": n_metrics * steps}
