"""Attribution patching (AtP): every component of every requested site from one backward pass per metric.

For a component c with activation a_c, in a run that *receives* a patch from a *source* run:

    score(c) = (a_c(source) - a_c(receiver)) . d metric / d a_c  evaluated on the receiver

denoise: source = clean, receiver = corrupt (gradient on the corrupted run);
noise:   source = corrupt, receiver = clean.
The dot product runs over the component's own dimensions (d_model, d_head, or none for a neuron). Scores
are kept per position; a component at all positions scores the sum over positions.

Cost per chunk of prompts: one forward on the source (no grad), one on the receiver, and one backward
per metric that computes no parameter gradients. Scores are computed inside tensor hooks as each
gradient arrives and summed over prompts at once, so no gradient outlives its hook.
"""

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .batch import PromptBatch, check_direction
from .capture import batch_pos, eval_mode, forward_last, hooked
from .metrics import Target, check_metric, metric, wide
from .sites import SITES, Component, ModelSpec, check_site, model_spec, site_shape, unit_reduce


def as_spec(model: nn.Module | ModelSpec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else model_spec(model)


@dataclass
class Scores:
    """AtP scores. ``values[metric][site]``: float32 (float64 for float64 models) [layer, pos, (head | d_mlp)], mean over prompts, or
    [batch, layer, pos, (head | d_mlp)] with ``per_prompt``. ``clean_metric``/``corrupt_metric``: the
    metric's mean over prompts on each run."""

    values: dict[str, dict[str, Tensor]]
    direction: str
    clean_metric: dict[str, float]
    corrupt_metric: dict[str, float]
    n_prompts: int
    per_prompt: bool = False
    passes: dict[str, int] = field(default_factory=dict)  # forward/backward passes spent

    def score(self, component: Component, metric_name: str) -> float:
        """The (mean) score of one component; all-position components sum their positions."""
        values = self.values[metric_name][component.site]
        if self.per_prompt:
            values = values.mean(0)
        return float(values[component.index()].sum())


def attribute(model: nn.Module | ModelSpec, batch: PromptBatch, *, sites: Sequence[str] = SITES,
              metrics: Sequence[str] = ("logit_diff",), direction: str = "denoise", per_prompt: bool = False,
              batch_size: int | None = None, progress: bool = False) -> Scores:
    """AtP scores of every component of ``sites`` under each of ``metrics``, in ``direction``.

    batch: prompt pairs, processed in chunks of ``batch_size`` prompts (all at once for None).
    """
    spec = as_spec(model)
    sites, metrics = list(dict.fromkeys(sites)), list(dict.fromkeys(metrics))
    for s in sites:
        check_site(s, spec)
    for m in metrics:
        check_metric(m)
    check_direction(direction)
    d, device = spec.dims, spec.device
    batch = batch.to(device)
    lead = (batch.n,) if per_prompt else ()
    acc = wide(next(spec.model.parameters()).dtype)  # >= float32
    values = {m: {s: torch.zeros(*lead, *site_shape(s, d, batch.n_pos), device=device, dtype=acc)
                  for s in sites} for m in metrics}
    sums = {run: {m: 0.0 for m in metrics} for run in ("clean", "corrupt")}
    start = 0
    with eval_mode(spec.model):
        for chunk in tqdm(list(batch.chunks(batch_size)), desc="attribution", disable=not progress):
            rows = slice(start, start + chunk.n) if per_prompt else None
            chunk_sums = _attribute_chunk(spec, chunk, sites, metrics, direction, values, rows)
            for run in sums:
                for m in metrics:
                    sums[run][m] += chunk_sums[run][m]
            start += chunk.n
    if not per_prompt:
        for per_site in values.values():
            for t in per_site.values():
                t /= batch.n
    n_chunks = -(-batch.n // (batch_size or batch.n))
    return Scores(
        values=values, direction=direction, n_prompts=batch.n, per_prompt=per_prompt,
        clean_metric={m: sums["clean"][m] / batch.n for m in metrics},
        corrupt_metric={m: sums["corrupt"][m] / batch.n for m in metrics},
        passes={"forward": 2 * n_chunks, "backward": len(metrics) * n_chunks},
    )


def _attribute_chunk(spec: ModelSpec, batch: PromptBatch, sites: list[str], metrics: list[str],
                     direction: str, values: dict, rows: slice | None) -> dict[str, dict[str, float]]:
    """Add this chunk's scores into ``values`` (summed over prompts, or into ``rows`` per prompt);
    return the chunk's summed metric values on the clean and corrupt runs."""
    source_ids, receiver_ids = batch.runs(direction)
    points = {(s, layer): spec.hook_point(s, layer) for s in sites for layer in range(spec.dims.n_layers_of(s))}
    mask = batch.mask.bool()

    # 1. source run: cache every site's activation (normalised view, detached).
    source: dict[tuple[str, int], Tensor] = {}

    def keep(key):
        def callback(raw):
            source[key] = points[key].read(raw, *batch_pos(raw, batch.n_pos)).detach()
        return callback
    with torch.no_grad(), hooked([(p, keep(key)) for key, p in points.items()]):
        source_logits = forward_last(spec, source_ids, batch.mask, batch.last)

    # 2. receiver run with grad: a fresh leaf at the embeddings, so the backward computes no weight grads;
    #    each hook point keeps delta = source - receiver and scores it when its gradient arrives.
    current = {"metric": metrics[0]}
    root: list[Tensor] = []

    def make_root(raw):
        leaf = raw.detach().requires_grad_(True)
        root.append(leaf)
        return leaf

    def score_on_grad(key):
        site, layer = key

        def callback(raw):
            n, n_pos = batch_pos(raw, batch.n_pos)
            delta = source.pop(key) - points[key].read(raw, n, n_pos).detach()
            delta = delta * mask.view(n, n_pos, *([1] * (delta.ndim - 2))).to(delta.dtype)

            def on_grad(grad):
                acc = values[current["metric"]][site].dtype
                prod = delta.to(acc) * points[key].read(grad, n, n_pos).to(acc)
                per_prompt = unit_reduce(site, prod)  # [batch, pos, (unit)]
                target = values[current["metric"]][site]
                if rows is None:
                    target[layer] += per_prompt.sum(0)
                else:
                    target[rows, layer] += per_prompt
            raw.register_hook(on_grad)
        return callback

    embed = spec.hook_point("embed", 0)
    hooks = [(embed, make_root)] + [(p, score_on_grad(key)) for key, p in points.items()]
    with torch.enable_grad(), hooked(hooks):
        receiver_logits = forward_last(spec, receiver_ids, batch.mask, batch.last)
        clean_logits = source_logits if direction == "denoise" else receiver_logits.detach()
        target = Target.from_clean(batch.answer, batch.wrong, clean_logits)
        totals = [metric(m, receiver_logits, target).sum() for m in metrics]
        for i, (m, total) in enumerate(zip(metrics, totals)):
            current["metric"] = m
            torch.autograd.grad(total, root, retain_graph=i < len(metrics) - 1)

    corrupt_logits = receiver_logits if direction == "denoise" else source_logits
    with torch.no_grad():
        return {
            "clean": {m: float(metric(m, clean_logits, target).sum()) for m in metrics},
            "corrupt": {m: float(metric(m, corrupt_logits.detach(), target).sum()) for m in metrics},
        }
