"""Exact patching of dictionary latents and error terms: the ground truth for their AtP scores
(estimators/features.py).

With dictionary D spliced into the receiving run (y' = decode(f) + error, engine/splicing.py),

    effect(D, i, p)     = metric(receiver, f_i[p] := f_i[p](source)) - metric(receiver)
    effect(D, error, p) = metric(receiver, error[p] := error[p](source)) - metric(receiver)

mean over prompts; pos None patches every position; a tuple of components is patched jointly. Patching
every latent and the error of a position together writes decode(f(source)) * scale(receiver) + shift +
error(source), which is y(source) when the dictionary does not normalise its input: the patch of the
written hook point (an SAE's own point; a transcoder's ``mlp_out``). Copies of the prompt batch carry one patched item each, ``copies`` items per full forward pass.
"""

from typing import Sequence

import torch
from torch import Tensor, nn

from ...engine.forward import forward_last
from ...engine.hooks import eval_mode, hooked
from ...engine.metrics import Target, check_metric, metric_values, wide
from ...engine.splicing import active, recording, splice
from ...inputs.batch import PromptBatch
from ...inputs.directions import check_direction, clean_and_corrupt
from ...model.dictionaries import Dictionary
from ...model.sites import FEATURE_SITES, Component, ModelSpec, as_spec
from ..estimators.features import by_hook, hook_of
from .exact import Effects
from .passes import Item, members_of


def check_feature(c: Component, found: dict[str, Dictionary], n_pos: int) -> str:
    """The hook of ``c``'s dictionary; a ValueError naming what in ``c`` does not match the dictionaries or
    the prompts."""
    if c.site not in FEATURE_SITES:
        raise ValueError(f"{c}: site {c.site!r} is not a dictionary's; feature components have site "
                         f"{' or '.join(FEATURE_SITES)}")
    try:
        hook = hook_of(c, {h: d.layer for h, d in found.items()}, {h: d.slot for h, d in found.items()})
    except KeyError as e:
        raise ValueError(e.args[0]) from None
    if c.pos is not None and not 0 <= c.pos < n_pos:
        raise ValueError(f"{c}: position {c.pos} out of range; the prompts have {n_pos} tokens (0..{n_pos - 1})")
    d_sae = found[hook].d_sae
    if c.site == "feature" and not (isinstance(c.unit, int) and 0 <= c.unit < d_sae):
        raise ValueError(f"{c}: latent {c.unit!r} out of range for {found[hook].name}: valid 0..{d_sae - 1}")
    if c.site == "sae_error" and c.unit is not None:
        raise ValueError(f"{c}: an sae_error component takes no unit, got unit={c.unit!r}")
    return hook


def _patcher(hook: str, items: list[tuple[Item, list[str]]], source: tuple[Tensor, Tensor], alpha: float = 1.0):
    """Edit moving each copy's patched latents and error terms of dictionary ``hook`` ``alpha`` of the way to
    ``source`` (f, error); ``items``: each copy's item with the hook of each of its members."""
    source_f, source_error = source  # [batch, pos, d_sae], [batch, pos, d_model]
    n = source_f.shape[0]

    def edit(f: Tensor, error: Tensor, stats: tuple):
        f, error = f.clone(), error.clone()  # [copy * batch, pos, ...]
        for copy, (item, hooks) in enumerate(items):
            rows = slice(copy * n, (copy + 1) * n)
            for c, h in zip(members_of(item), hooks):
                if h != hook:
                    continue
                pos = slice(None) if c.pos is None else c.pos
                if c.site == "feature":
                    f[rows, pos, c.unit] += alpha * (source_f[:, pos, c.unit] - f[rows, pos, c.unit])
                else:
                    error[rows, pos] += alpha * (source_error[:, pos] - error[rows, pos])
        ids = active(f)
        return f[..., ids], ids, error
    return edit


def patch_features(model: nn.Module | ModelSpec, batch: PromptBatch, dictionaries: Sequence[Dictionary],
                   components: Sequence[Item], *, metrics: Sequence[str] = ("logit_diff",),
                   direction: str = "denoise", copies: int = 8, per_prompt: bool = False,
                   alpha: float = 1.0) -> Effects:
    """Exact effect of patching each of ``components`` (``feature``/``sae_error`` Components, or tuples of
    them patched jointly) with the dictionaries spliced into the runs (module docstring). per_prompt: also
    ``Effects.per_prompt`` [component, metric, batch]; alpha: move each patched value that share of the way
    from the receiver's to the source's (0.5: the half patch of analysis/causes.py)."""
    spec = as_spec(model)
    found, components, metrics = by_hook(spec, dictionaries), list(components), list(dict.fromkeys(metrics))
    check_direction(direction)
    for m in metrics:
        check_metric(m)
    hooks_of = [[check_feature(c, found, batch.n_pos) for c in members_of(item)] for item in components]
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    batch, dtype = batch.to(spec.device), next(spec.model.parameters()).dtype
    found = {hook: d.to(spec.device, dtype) for hook, d in found.items()}
    source_ids, receiver_ids = batch.runs(direction)
    source: dict[str, tuple[Tensor, Tensor]] = {}
    with eval_mode(spec.model), torch.no_grad():
        with hooked([h for hook, d in found.items() for h in splice(spec, d, batch.n_pos, recording(source, hook))]):
            source_logits = forward_last(spec, source_ids, batch.mask, batch.last)
        receiver_logits = forward_last(spec, receiver_ids, batch.mask, batch.last)
        clean, _ = clean_and_corrupt(direction, source_logits, receiver_logits)
        target = Target.from_clean(batch.answer, batch.wrong, clean)
        base = metric_values(metrics, receiver_logits, target)  # {metric: [batch]}
        values = torch.zeros(len(components), len(metrics), dtype=wide(dtype))
        prompts = torch.zeros(len(components), len(metrics), batch.n, dtype=wide(dtype)) if per_prompt else None
        for start in range(0, len(components), copies):
            group = list(zip(components[start:start + copies], hooks_of[start:start + copies]))
            n = len(group)
            involved = sorted({h for _, hooks in group for h in hooks})
            hooks = [h for hook in involved for h in splice(spec, found[hook], batch.n_pos,
                                                              _patcher(hook, group, source[hook], alpha))]
            with hooked(hooks):
                logits = forward_last(spec, receiver_ids.repeat(n), batch.mask.repeat(n, 1), batch.last.repeat(n))
            patched = metric_values(metrics, logits, target)
            for j, m in enumerate(metrics):
                effect = patched[m].view(n, batch.n) - base[m]  # [copy, batch]
                values[start:start + n, j] = effect.mean(1).cpu().to(values.dtype)
                if prompts is not None:
                    prompts[start:start + n, j] = effect.cpu().to(prompts.dtype)
    return Effects(components=components, metrics=metrics, values=values, direction=direction, per_prompt=prompts,
                   receiver_metric={m: float(base[m].mean()) for m in metrics}, passes={"runs": 2.0})
