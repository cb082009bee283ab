"""GradDrop, AtP*'s remedy for cancellation (Kramár et al. 2024): L extra backward passes, pass l with the
gradient that flows back through layer l's writes into the residual stream (attention and MLP outputs)
set to zero.

    score(c) = sign(AtP(c)) * mean over l of |AtP_l(c)|

where AtP_l is AtP with layer l's writes' gradient dropped; the passes that drop a component's own write
(c inside block l) are left out of its mean. Cost per chunk: 2 forwards, 1 + L backwards per metric.
"""

from contextlib import nullcontext

import torch

from ...model.sites import WRITES_IN_BLOCK
from .gradients import Chunk


def drop_hooks(chunk: Chunk) -> list:
    """Hooks that zero the gradient through layer l's attention and MLP writes during pass l."""
    def drop(layer):
        def callback(raw):
            if raw.requires_grad and torch.is_grad_enabled():  # not in blockwise.py's forward without grad
                raw.register_hook(lambda g: torch.zeros_like(g) if chunk.label == layer else None)
        return callback
    return [(chunk.spec.hook_point(s, layer), drop(layer))
            for layer in range(chunk.spec.dims.n_layers) for s in ("attn_out", "mlp_out")]


def score(chunk: Chunk, *, context=nullcontext, source_cached: bool = False) -> None:
    """GradDrop scores of every component hooked by the chunk; ``context``: extra context during the
    receiving forward (atp_star's QK fix)."""
    if not source_cached:
        chunk.cache_source()
    n_layers = chunk.spec.dims.n_layers
    # by (metric, key): AtP per prompt/position (for the sign); sum over passes of |AtP_l| (blockwise.py
    # runs every metric's passes before the first combine)
    plain, dropped = {}, {}

    def on_product(key, prod):
        site, layer = key
        if chunk.label is None:
            plain[chunk.metric, key] = prod
        elif not (site in WRITES_IN_BLOCK and chunk.label == layer):
            dropped[chunk.metric, key] = dropped.get((chunk.metric, key), 0) + prod.abs()

    def combine(metric):
        for (m, (site, layer)), signed in list(plain.items()):
            if m == metric:
                n_passes = n_layers - 1 if site in WRITES_IN_BLOCK else n_layers
                dropped_sum = dropped.pop((m, (site, layer)), 0)
                chunk.add(site, layer, torch.sign(signed) * dropped_sum / max(n_passes, 1))
                del plain[m, (site, layer)]
    chunk.backward(on_product, hooks=drop_hooks(chunk), context=context, labels=[None, *range(n_layers)],
                   after_metric=combine)


def passes(n_layers: int, n_metrics: int) -> dict[str, int]:
    return {"forward": 2, "backward": n_metrics * (1 + n_layers)}
