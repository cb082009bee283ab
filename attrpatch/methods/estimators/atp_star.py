"""AtP* (Kramár et al. 2024): the QK fix (qk_fix.py) for queries and keys, GradDrop (graddrop.py) for every
other site. Cost per chunk: 2 forwards, 1 + L backwards per metric.
"""

from ...model.sites import QK_SITES
from . import graddrop, qk_fix
from .gradients import Chunk


def score(chunk: Chunk) -> None:
    qk_sites = [s for s in chunk.sites if s in QK_SITES]
    if not qk_sites:
        return graddrop.score(chunk)
    # q and k are scored from the attention pattern, not through hooks on the projections
    chunk.points = {key: p for key, p in chunk.points.items() if key[0] not in QK_SITES}
    source_qk = {}
    with qk_fix.recording(chunk.spec, lambda layer, q, k, *_: source_qk.__setitem__(layer, (q.detach(), k.detach()))):
        chunk.cache_source(lazy=False)  # the QK fix reads source q, k of every layer
    on_attention = qk_fix.scorer(chunk, source_qk, qk_sites)
    graddrop.score(chunk, context=lambda: qk_fix.recording(chunk.spec, on_attention), source_cached=True)


passes = graddrop.passes
