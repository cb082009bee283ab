"""AtP, attribution patching (Nanda 2023): the first-order Taylor expansion around the receiving run.

    score(c) = (a_c(source) - a_c(receiver)) . d metric / d a_c   at the receiver

Cost per chunk of prompts: 2 forwards (source without grad, receiver with) + 1 backward per metric.
"""

from .gradients import Chunk


def score(chunk: Chunk) -> None:
    """Add the AtP score of every component of the chunk's sites into its values."""
    chunk.cache_source()
    chunk.backward(lambda key, prod: chunk.add(*key, prod))


def passes(n_layers: int, n_metrics: int) -> dict[str, int]:
    return {"forward": 2, "backward": n_metrics}
