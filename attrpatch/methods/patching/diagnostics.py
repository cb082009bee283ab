"""Measured causes of disagreement between AtP and exact patching (docs/methods.md#diagnostics).

    attention saturation   per layer and head of the receiving run: the mean over prompts and real query
                           rows of the largest attention probability, and of the row entropy (nats).
                           A saturated softmax (max prob ~1, entropy ~0) has ~zero gradient: AtP misses
                           what patching its queries/keys does.
    activation change      per component: ||a_source - a_receiver|| / max(||a_source||, ||a_receiver||)
                           over the component's own dimensions, mean over prompts; at most 2 (opposite
                           vectors). Large changes leave the linear regime.
"""

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor

from ...engine.forward import forward_last
from ...engine.hooks import hooked, noised, record
from ...inputs.batch import PromptBatch, RunInput, fingerprint
from ...model.sites import Component, ModelSpec
from ..ablation import ablated_values

SATURATED_MAX_PROB = 0.95  # a head whose rows put more than this on one token is called saturated
LARGE_CHANGE = 0.75  # relative activation change above which linearisation is doubtful


@contextmanager
def _eager_attention(spec: ModelSpec) -> Iterator[None]:
    model = spec.model
    before = model.config._attn_implementation
    switch = before != "eager" and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


def attention_stats(spec: ModelSpec, run: RunInput, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(max probability, entropy), each [layer, head], over prompts and real query rows of ``run``."""
    with torch.no_grad(), _eager_attention(spec), noised(spec, run.noise):
        out = spec.model(input_ids=run.ids, attention_mask=mask, output_attentions=True, use_cache=False)
    if not out.attentions:
        raise RuntimeError(f"{spec.name} returned no attention patterns; cannot measure saturation")
    rows = mask.bool()[:, None, :]  # [batch, 1, pos]
    max_prob, entropy = [], []
    for pattern in out.attentions:  # [batch, head, query, key]
        p = pattern.float()
        m = p.amax(-1)  # [batch, head, query]
        h = -(p * p.clamp_min(1e-30).log()).sum(-1)
        weight = rows.float().expand_as(m)
        max_prob.append((m * weight).sum((0, 2)) / weight.sum((0, 2)))
        entropy.append((h * weight).sum((0, 2)) / weight.sum((0, 2)))
    return torch.stack(max_prob).cpu(), torch.stack(entropy).cpu()


def activation_change(spec: ModelSpec, batch: PromptBatch, direction: str,
                      comps: Sequence[Component], ablation: str | None = None,
                      shared: dict | None = None) -> list[float]:
    """||a_source - a_receiver|| / max(||a_source||, ||a_receiver||) of each component, mean over prompts.
    ablation: the source is that ablation of the clean run (ablation.ablated_values), not a run; shared: the runs
    exact patching shared (``patch(runs=...)``); read from there when they hold these prompts, direction and
    sites (and no ablation replaces the source), else run."""
    keys = sorted({(c.site, c.layer) for c in comps})
    found = None if ablation is not None else (shared or {}).get((direction, fingerprint(batch)))
    if found is not None and set(keys) <= set(found["source"]):
        runs = [{k: found[run][k].float() for k in keys} for run in ("source", "receiver")]
    else:
        runs = _site_values(spec, batch, direction, comps, ablation)
    return _relative_change(runs, batch.mask.bool(), comps)


def _site_values(spec: ModelSpec, batch: PromptBatch, direction: str, comps: Sequence[Component],
                 ablation: str | None = None) -> list[dict]:
    """[source, receiver] values {(site, layer): [batch, pos, ...]} at each hook point of ``comps``; the
    source is ``ablation``'s values when given."""
    keys = sorted({(c.site, c.layer) for c in comps})
    source_ids, receiver_ids = batch.runs(direction)
    points = {k: spec.hook_point(*k) for k in keys}
    runs: list[dict] = []
    if ablation is not None:
        values = ablated_values(spec, batch, list(comps), ablation, direction, None)
        runs.append({k: t.float() for k, t in values.items()})
    for ids in (source_ids, receiver_ids)[len(runs):]:
        found: dict = {}
        with torch.no_grad(), hooked(record(points, found, batch.n_pos, lambda t: t.detach().float())):
            forward_last(spec, ids, batch.mask, batch.last)
        runs.append(found)
    return runs


def _relative_change(runs: list[dict], mask: Tensor, comps: Sequence[Component]) -> list[float]:
    """Each component's relative change between the [source, receiver] values; mask: [batch, pos] real tokens."""
    out = []
    for c in comps:
        where = (slice(None), *c.index()[1:])
        src, rec = runs[0][(c.site, c.layer)][where], runs[1][(c.site, c.layer)][where]
        if c.pos is None:  # [batch, pos, ...]: pad positions out, positions into the norm
            keep_pos = mask.view(mask.shape[0], mask.shape[1], *([1] * (src.ndim - 2)))
            src, rec = src * keep_pos, rec * keep_pos
        src, rec = src.reshape(src.shape[0], -1), rec.reshape(rec.shape[0], -1)  # [batch, own dims] (a neuron
        diff = (src - rec).norm(dim=1)                                           # at one position: [batch, 1])
        base = torch.maximum(src.norm(dim=1), rec.norm(dim=1)).clamp_min(1e-12)
        out.append(float((diff / base).mean()))
    return out
