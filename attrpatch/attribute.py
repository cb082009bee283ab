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

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import qk
from .batch import PromptBatch, check_direction
from .capture import batch_pos, eval_mode, forward_last, hooked
from .metrics import Target, check_metric, metric, wide
from .sites import SITES, Component, ModelSpec, check_site, model_spec, site_shape, unit_reduce


ESTIMATORS = ("atp", "atp_star", "ig", "graddrop")
QK_SITES = ("q", "k")


def check_estimator(name: str) -> None:
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}.")


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
    estimator: str = "atp"

    def score(self, component: Component, metric_name: str) -> float:
        """The (mean) score of one component; all-position components sum their positions."""
        values = self.values[metric_name][component.site]
        if self.per_prompt:
            values = values.mean(0)
        return float(values[component.index()].sum())


def attribute(model: nn.Module | ModelSpec, batch: PromptBatch, *, sites: Sequence[str] = SITES,
              metrics: Sequence[str] = ("logit_diff",), direction: str = "denoise", per_prompt: bool = False,
              batch_size: int | None = None, estimator: str = "atp", ig_steps: int = 8,
              progress: bool = False) -> Scores:
    """Scores of every component of ``sites`` under each of ``metrics``, in ``direction``.

    batch: prompt pairs, processed in chunks of ``batch_size`` prompts (all at once for None).
    estimator: ``atp`` (plain), ``ig`` (integrated gradients: the gradient averaged over ``ig_steps``
        receiver runs whose embeddings move along the straight line to the source's, as EAP-IG), or
        ``graddrop`` (AtP*'s GradDrop: sign(AtP) * mean over layers l of |AtP_l|, AtP_l with the gradient
        through layer l's attention and MLP writes zeroed; one extra backward per layer), or
        ``atp_star`` (AtP*: the QK fix of qk.py for ``q`` and ``k``, GradDrop for every other site).
    """
    spec = as_spec(model)
    sites, metrics = list(dict.fromkeys(sites)), list(dict.fromkeys(metrics))
    for s in sites:
        check_site(s, spec)
    for m in metrics:
        check_metric(m)
    check_direction(direction)
    check_estimator(estimator)
    if estimator == "ig" and ig_steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
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
            chunk_sums = _attribute_chunk(spec, chunk, sites, metrics, direction, values, rows, estimator,
                                          ig_steps)
            for run in sums:
                for m in metrics:
                    sums[run][m] += chunk_sums[run][m]
            start += chunk.n
    if not per_prompt:
        for per_site in values.values():
            for t in per_site.values():
                t /= batch.n
    n_chunks = -(-batch.n // (batch_size or batch.n))
    grad_runs = ig_steps if estimator == "ig" else 1
    backward = len(metrics) * grad_runs * (1 + (d.n_layers if estimator in ("graddrop", "atp_star") else 0))
    return Scores(
        values=values, direction=direction, n_prompts=batch.n, per_prompt=per_prompt,
        clean_metric={m: sums["clean"][m] / batch.n for m in metrics},
        corrupt_metric={m: sums["corrupt"][m] / batch.n for m in metrics},
        passes={"forward": (2 + (ig_steps if estimator == "ig" else 0)) * n_chunks,
                "backward": backward * n_chunks},
        estimator=estimator,
    )


def _cache(spec: ModelSpec, points: dict, ids: Tensor, batch: PromptBatch) -> tuple[dict, Tensor]:
    """No-grad forward caching every hook point's normalised view: ({(site, layer): tensor}, last logits)."""
    cache: dict[tuple[str, int], Tensor] = {}

    def keep(key):
        def callback(raw):
            cache[key] = points[key].read(raw, *batch_pos(raw, batch.n_pos)).detach()
        return callback
    with torch.no_grad(), hooked([(p, keep(key)) for key, p in points.items()]):
        logits = forward_last(spec, ids, batch.mask, batch.last)
    return cache, logits


WRITES_IN_BLOCK = ("attn_out", "mlp_out", "head", "neuron", "q", "k", "v")


def _attribute_chunk(spec: ModelSpec, batch: PromptBatch, sites: list[str], metrics: list[str],
                     direction: str, values: dict, rows: slice | None, estimator: str,
                     ig_steps: int) -> dict[str, dict[str, float]]:
    """Add this chunk's scores into ``values`` (summed over prompts, or into ``rows`` per prompt);
    return the chunk's summed metric values on the clean and corrupt runs."""
    source_ids, receiver_ids = batch.runs(direction)
    n_layers = spec.dims.n_layers
    points = {(s, layer): spec.hook_point(s, layer) for s in sites for layer in range(spec.dims.n_layers_of(s))}
    embed = spec.hook_point("embed", 0)
    mask = batch.mask.bool()

    qk_fix = estimator == "atp_star"
    qk_sites = [s for s in sites if s in QK_SITES] if qk_fix else []
    if qk_sites:  # scored from the attention pattern, not through hooks on the projections
        points = {key: p for key, p in points.items() if key[0] not in QK_SITES}

    # 1. source run: cache every site's activation (normalised view, detached) and the embeddings.
    source_qk: dict[int, tuple[Tensor, Tensor]] = {}
    with (qk.recording(spec, lambda layer, q, k, *_: source_qk.__setitem__(layer, (q.detach(), k.detach())))
          if qk_sites else nullcontext()):
        source, source_logits = _cache(spec, {**points, ("embed", 0): embed}, source_ids, batch)
    source_embed = source[("embed", 0)]
    deltas: dict[tuple[str, int], Tensor] = {}
    if estimator == "ig":  # the deltas come from the plain receiver run; gradients from interpolated ones
        receiver, receiver_logits = _cache(spec, {**points, ("embed", 0): embed}, receiver_ids, batch)
        receiver_embed = receiver[("embed", 0)]
        deltas = {key: _masked(source[key] - receiver[key], mask) for key in points}
        del receiver
        alphas = [(j + 0.5) / ig_steps for j in range(ig_steps)]  # midpoint rule on [0, 1]
    else:
        alphas = [0.0]

    # 2. receiver runs with grad: a fresh leaf at the embeddings (interpolated towards the source for IG),
    #    so the backward computes no weight grads; each hook point scores delta . grad as its gradient arrives.
    state = {"metric": metrics[0], "drop": None}  # drop: the layer whose writes' gradient GradDrop zeroes
    graddrop = estimator in ("graddrop", "atp_star")
    plain: dict[tuple[str, int], Tensor] = {}  # GradDrop: plain AtP per prompt/position, for the sign
    dropped: dict[tuple[str, int], Tensor] = {}  # GradDrop: sum over passes of |AtP_l|

    def score_on_grad(key):
        site, layer = key

        def callback(raw):
            n, n_pos = batch_pos(raw, batch.n_pos)
            if key not in deltas:
                deltas[key] = _masked(source.pop(key) - points[key].read(raw, n, n_pos).detach(), mask)
            delta = deltas[key]

            def on_grad(grad):
                target = values[state["metric"]][site]
                prod = unit_reduce(site, delta.to(target.dtype) * points[key].read(grad, n, n_pos).to(target.dtype))
                if state["drop"] is not None:  # [batch, pos, (unit)]
                    if not (site in WRITES_IN_BLOCK and state["drop"] == layer):
                        dropped[key] = dropped.get(key, 0) + prod.abs()
                    return
                if graddrop:
                    plain[key] = prod
                    return
                prod = prod / len(alphas)
                if rows is None:  # .to: with device_map the layer may live on another device
                    target[layer] += prod.sum(0).to(target.device)
                else:
                    target[rows, layer] += prod.to(target.device)
            raw.register_hook(on_grad)
        return callback

    def drop_writes(layer):
        def callback(raw):
            raw.register_hook(lambda g: torch.zeros_like(g) if state["drop"] == layer else None)
        return callback

    def on_attention(layer, q, k, pattern, attn_mask, scaling, softcap):
        """QK fix: once d metric / d pattern arrives, score every q and k of this layer."""
        def on_grad(grad):
            if state["drop"] is not None:
                return
            rows = mask[:, :, None].to(torch.float32)  # [batch, pos, 1]
            found = {}
            if "q" in qk_sites:
                found["q"] = qk.q_scores(source_qk[layer][0], k, pattern, grad, attn_mask, scaling, softcap) * rows
            if "k" in qk_sites:
                found["k"] = qk.k_scores(q, k, source_qk[layer][1], grad, attn_mask, scaling, softcap) * rows
            for site, score in found.items():
                target = values[state["metric"]][site]
                if rows_out is None:
                    target[layer] += score.sum(0).to(target.dtype)
                else:
                    target[rows_out, layer] += score.to(target.dtype)
        if pattern.requires_grad:
            pattern.register_hook(on_grad)

    rows_out = rows
    drops = [(spec.hook_point(s, layer), drop_writes(layer))
             for layer in range(n_layers) for s in ("attn_out", "mlp_out")] if graddrop else []
    for alpha in alphas:
        root: list[Tensor] = []

        def make_root(raw, alpha=alpha):
            start = raw if alpha == 0 else receiver_embed.to(raw.dtype)
            moved = start + alpha * (source_embed.to(raw.dtype) - start) if alpha else start
            leaf = moved.detach().view_as(raw).requires_grad_(True)
            root.append(leaf)
            return leaf

        hooks = [(embed, make_root)] + [(p, score_on_grad(key)) for key, p in points.items()] + drops
        with torch.enable_grad(), hooked(hooks), (qk.recording(spec, on_attention) if qk_sites else nullcontext()):
            logits = forward_last(spec, receiver_ids, batch.mask, batch.last)
            if alpha == 0:
                receiver_logits = logits.detach()
            clean_logits = source_logits if direction == "denoise" else receiver_logits
            target = Target.from_clean(batch.answer, batch.wrong, clean_logits)
            totals = [metric(m, logits, target).sum() for m in metrics]
            passes = [None] + (list(range(n_layers)) if graddrop else [])
            for i, (m, total) in enumerate(zip(metrics, totals)):
                state["metric"] = m
                for j, drop in enumerate(passes):
                    state["drop"] = drop
                    last = i == len(metrics) - 1 and j == len(passes) - 1
                    torch.autograd.grad(total, root, retain_graph=not last)
                state["drop"] = None
                if graddrop:
                    _add_graddrop(values[m], plain, dropped, rows, n_layers)

    corrupt_logits = receiver_logits if direction == "denoise" else source_logits
    with torch.no_grad():
        return {
            "clean": {m: float(metric(m, clean_logits, target).sum()) for m in metrics},
            "corrupt": {m: float(metric(m, corrupt_logits, target).sum()) for m in metrics},
        }


def _masked(delta: Tensor, mask: Tensor) -> Tensor:
    """Zero the pad positions of [batch, pos, ...] (no copy when nothing is padded)."""
    if bool(mask.all()):
        return delta
    return delta * mask.view(*mask.shape, *([1] * (delta.ndim - 2))).to(delta.dtype)


def _add_graddrop(values: dict, plain: dict, dropped: dict, rows, n_layers: int) -> None:
    """GradDrop score per prompt and position: sign(AtP) * mean over passes l of |AtP_l| (passes that zero
    a component's own write are left out of its mean), added into ``values``; then the buffers clear."""
    for (site, layer), signed in plain.items():
        n_passes = n_layers - 1 if site in WRITES_IN_BLOCK else n_layers
        score = torch.sign(signed) * dropped.get((site, layer), 0) / max(n_passes, 1)
        if rows is None:
            values[site][layer] += score.sum(0)
        else:
            values[site][rows, layer] += score
    plain.clear()
    dropped.clear()
