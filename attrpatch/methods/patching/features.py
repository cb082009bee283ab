"""Exact patching of dictionary latents and error terms: the ground truth for their AtP scores
(estimators/features.py).

With the dictionary at layer L spliced into the receiving run (x' = decode(f) + error, engine/splicing.py),

    effect(L, i, p)     = metric(receiver, f_i[p] := f_i[p](source)) - metric(receiver)
    effect(L, error, p) = metric(receiver, error[p] := error[p](source)) - metric(receiver)

mean over prompts; pos None patches every position; a tuple of components is patched jointly. Patching
every latent and the error of a position together writes decode(f(source)) * scale(receiver) + shift +
error(source), which is x(source) when the dictionary does not normalise its input: the hook point's own
patch. Copies of the prompt batch carry one patched item each, ``copies`` items per full forward pass.
"""

from typing import Sequence

import torch
from torch import Tensor, nn

from ...engine.forward import forward_last
from ...engine.hooks import eval_mode, hooked
from ...engine.metrics import Target, check_metric, metric_values, wide
from ...engine.splicing import active, splice
from ...inputs.batch import PromptBatch
from ...inputs.directions import check_direction, clean_and_corrupt
from ...model.dictionaries import Dictionary
from ...model.sites import FEATURE_SITES, Component, ModelSpec, as_spec
from ..estimators.features import by_layer
from .exact import Effects
from .passes import Item, members_of


def check_feature(c: Component, layers: dict[int, Dictionary], n_pos: int) -> None:
    """Raise a ValueError naming what in ``c`` does not match the dictionaries or the prompts."""
    if c.site not in FEATURE_SITES:
        raise ValueError(f"{c}: site {c.site!r} is not a dictionary's; feature components have site "
                         f"{' or '.join(FEATURE_SITES)}")
    if c.layer not in layers:
        raise ValueError(f"{c}: no dictionary at layer {c.layer}; dictionaries at layers {sorted(layers)}")
    if c.pos is not None and not 0 <= c.pos < n_pos:
        raise ValueError(f"{c}: position {c.pos} out of range; the prompts have {n_pos} tokens (0..{n_pos - 1})")
    d_sae = layers[c.layer].d_sae
    if c.site == "feature" and not (isinstance(c.unit, int) and 0 <= c.unit < d_sae):
        raise ValueError(f"{c}: latent {c.unit!r} out of range for {layers[c.layer].name}: valid 0..{d_sae - 1}")
    if c.site == "sae_error" and c.unit is not None:
        raise ValueError(f"{c}: an sae_error component takes no unit, got unit={c.unit!r}")


def _record(store: dict, layer: int):
    def edit(f: Tensor, error: Tensor, stats: tuple):
        store[layer] = (f, error)
        ids = active(f)
        return f[..., ids], ids, error
    return edit


def _patcher(layer: int, items: list[Item], source: tuple[Tensor, Tensor]):
    """Edit writing each copy's patched latents and error terms at ``layer`` from ``source`` (f, error)."""
    source_f, source_error = source  # [batch, pos, d_sae], [batch, pos, d_model]
    n = source_f.shape[0]

    def edit(f: Tensor, error: Tensor, stats: tuple):
        f, error = f.clone(), error.clone()  # [copy * batch, pos, ...]
        for copy, item in enumerate(items):
            rows = slice(copy * n, (copy + 1) * n)
            for c in members_of(item):
                if c.layer != layer:
                    continue
                pos = slice(None) if c.pos is None else c.pos
                if c.site == "feature":
                    f[rows, pos, c.unit] = source_f[:, pos, c.unit]
                else:
                    error[rows, pos] = source_error[:, pos]
        ids = active(f)
        return f[..., ids], ids, error
    return edit


def patch_features(model: nn.Module | ModelSpec, batch: PromptBatch, dictionaries: Sequence[Dictionary],
                   components: Sequence[Item], *, metrics: Sequence[str] = ("logit_diff",),
                   direction: str = "denoise", copies: int = 8) -> Effects:
    """Exact effect of patching each of ``components`` (``feature``/``sae_error`` Components, or tuples of
    them patched jointly) with the dictionaries spliced into the runs (module docstring)."""
    spec = as_spec(model)
    layers, components, metrics = by_layer(spec, dictionaries), list(components), list(dict.fromkeys(metrics))
    check_direction(direction)
    for m in metrics:
        check_metric(m)
    for c in (c for item in components for c in members_of(item)):
        check_feature(c, layers, batch.n_pos)
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    batch, dtype = batch.to(spec.device), next(spec.model.parameters()).dtype
    layers = {layer: d.to(spec.device, dtype) for layer, d in layers.items()}
    points = {layer: spec.hook_point(d.site, layer) for layer, d in layers.items()}
    source_ids, receiver_ids = batch.runs(direction)
    source: dict[int, tuple[Tensor, Tensor]] = {}
    with eval_mode(spec.model), torch.no_grad():
        with hooked([(points[layer], splice(points[layer], d, batch.n_pos, _record(source, layer)))
                     for layer, d in layers.items()]):
            source_logits = forward_last(spec, source_ids, batch.mask, batch.last)
        receiver_logits = forward_last(spec, receiver_ids, batch.mask, batch.last)
        clean, _ = clean_and_corrupt(direction, source_logits, receiver_logits)
        target = Target.from_clean(batch.answer, batch.wrong, clean)
        base = metric_values(metrics, receiver_logits, target)  # {metric: [batch]}
        values = torch.zeros(len(components), len(metrics), dtype=wide(dtype))
        for start in range(0, len(components), copies):
            group = components[start:start + copies]
            n = len(group)
            involved = sorted({c.layer for item in group for c in members_of(item)})
            hooks = [(points[layer], splice(points[layer], layers[layer], batch.n_pos,
                                            _patcher(layer, group, source[layer]))) for layer in involved]
            with hooked(hooks):
                logits = forward_last(spec, receiver_ids.repeat(n), batch.mask.repeat(n, 1), batch.last.repeat(n))
            patched = metric_values(metrics, logits, target)
            for j, m in enumerate(metrics):
                effect = patched[m].view(n, batch.n) - base[m]  # [copy, batch]
                values[start:start + n, j] = effect.mean(1).cpu().to(values.dtype)
    return Effects(components=components, metrics=metrics, values=values, direction=direction,
                   receiver_metric={m: float(base[m].mean()) for m in metrics}, passes={"runs": 2.0})
