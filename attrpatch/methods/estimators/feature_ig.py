"""Integrated gradients of one dictionary's latents along its own line (Marks et al. 2024, sparse feature
circuits): the dictionary's latents and error term move together from the receiver's values to the
source's, the rest of the run follows.

    f(a)       = f(receiver) + a (f(source) - f(receiver))          [batch, pos, k]    a = (j + 1/2) / steps
    error(a)   = error(receiver) + a (error(source) - error(receiver))
    y'(a)      = decode(f(a)) + error(a)                            the dictionary's written point
    score(i, p) = delta f_i[p] . (1/steps) sum_j (W_dec[i] * scale) . d metric / d y'[p] at a_j
    score(error, p) = delta error[p] . (1/steps) sum_j d metric / d y'[p] at a_j

Completeness: with no input normalisation, y'(a) = y(receiver) + a (y(source) - y(receiver)) (decode is
affine in f), so the scores of every latent and the error at every position add up to the exact effect of
patching the dictionary's written point, up to the midpoint rule's O(1/steps^2); for a metric linear in
y' every score is exact. Unlike ig.py (the embeddings' line, shared with the sites), each dictionary has its
own line: cost per dictionary 2 + steps forwards and steps backwards per metric, on the whole batch.
"""

from typing import Sequence

import torch
from torch import Tensor, nn

from ...engine.forward import forward_last
from ...engine.hooks import eval_mode, frozen_weights, hooked
from ...engine.metrics import Target, check_metric, metric
from ...engine.splicing import active, recording, splice, union
from ...inputs.batch import PromptBatch
from ...inputs.directions import check_direction, clean_and_corrupt
from ...model.dictionaries import Dictionary
from ...model.sites import ModelSpec, as_spec
from .features import FeatureScores, by_hook
from .gradients import masked
from .ig import alphas


def _along(source: tuple[Tensor, Tensor], receiver: tuple[Tensor, Tensor], ids: Tensor, a: float, leaf: list):
    """Edit writing f(a) on ``ids`` and error(a) as a leaf that requires grad (appended to ``leaf``)."""
    def edit(f: Tensor, error: Tensor, stats: tuple):
        f_a = receiver[0][..., ids] + a * (source[0][..., ids] - receiver[0][..., ids])  # [batch, pos, k]
        error_a = (receiver[1] + a * (source[1] - receiver[1])).detach().requires_grad_(True)
        leaf.append(error_a)
        return f_a, ids, error_a
    return edit


def feature_ig(model: nn.Module | ModelSpec, batch: PromptBatch, dictionaries: Sequence[Dictionary], *,
               metrics: Sequence[str] = ("logit_diff",), direction: str = "denoise", steps: int = 8) -> FeatureScores:
    """IG of every latent active in either run and of the error term, per dictionary along its own line
    (module docstring), mean over prompts; FeatureScores with estimator ``ig_latent``."""
    spec = as_spec(model)
    found, metrics = by_hook(spec, dictionaries), list(dict.fromkeys(metrics))
    check_direction(direction)
    for m in metrics:
        check_metric(m, gradient=True)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for d in found.values():
        if d.normalize != "none":
            raise ValueError(f"{d.name}: feature_ig needs a dictionary without input normalisation (got "
                             f"normalize={d.normalize!r}); use attribute(..., estimator='ig') for it")
    batch, dtype = batch.to(spec.device), next(spec.model.parameters()).dtype
    found = {hook: d.to(spec.device, dtype) for hook, d in found.items()}
    scores = FeatureScores.of(found, "ig_latent")
    runs: dict[str, dict] = {"source": {}, "receiver": {}}
    with eval_mode(spec.model), frozen_weights(spec.model):
        logits = {}
        for name, ids in zip(("source", "receiver"), batch.runs(direction)):
            with torch.no_grad(), hooked([h for hook, d in found.items()
                                          for h in splice(spec, d, batch.n_pos, recording(runs[name], hook))]):
                logits[name] = forward_last(spec, ids, batch.mask, batch.last)
        clean, _ = clean_and_corrupt(direction, logits["source"], logits["receiver"])
        target = Target.from_clean(batch.answer, batch.wrong, clean)
        receiver_ids = batch.runs(direction)[1]
        for hook, d in found.items():
            source, receiver = runs["source"][hook], runs["receiver"][hook]
            ids = union(active(source[0]), active(receiver[0]))  # [k]
            delta = masked(source[0][..., ids] - receiver[0][..., ids], batch.mask.bool())  # [batch, pos, k]
            error_delta = masked(source[1] - receiver[1], batch.mask.bool())  # [batch, pos, d_model]
            grads = {m: torch.zeros_like(error_delta) for m in metrics}
            for a in alphas(steps):
                leaf: list[Tensor] = []
                line = _along(source, receiver, ids, a, leaf)
                with torch.enable_grad(), hooked(splice(spec, d, batch.n_pos, line)):
                    out = forward_last(spec, receiver_ids, batch.mask, batch.last)
                    for j, m in enumerate(metrics):
                        total = metric(m, out, target).sum()
                        g, = torch.autograd.grad(total, leaf, retain_graph=j < len(metrics) - 1)
                        grads[m] += g / steps  # [batch, pos, d_model]
            for m in metrics:
                latent_grad = grads[m] @ d.W_dec[ids].T  # scale 1: a transcoder or an unnormalised SAE
                scores.ids.setdefault(m, {})[hook] = ids
                scores.values.setdefault(m, {})[hook] = (latent_grad * delta).sum(0).detach()  # [pos, k]
                scores.error.setdefault(m, {})[hook] = (grads[m] * error_delta).sum((0, -1)).detach()  # [pos]
    scores.mean(batch.n)
    return scores
