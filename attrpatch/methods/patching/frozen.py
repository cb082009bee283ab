"""Patching with part of the model frozen at the receiver's values: which non-linearity carries AtP's error.

For a component c and f(alpha) = metric(receiver with c moved alpha of the way to its source value), AtP's
error f'(0) - (f(1) - f(0)) is the bend of f. Freeze one non-linearity at its operating point on the
receiver and call the result g:

    pattern   every attention pattern A = softmax(q k / sqrt(d)) held at the receiver's (values still move)
    norm      every norm's scale held at the receiver's: y = y_r + (y_r - b) / x_r . (x - x_r), x centred
              for LayerNorm (RelP's LN rule, methods/estimators/relp.py, as a forward)

g(0) = f(0) (the receiver is its own operating point) and g'(0) is RelP's gradient with that one rule
(``attribute(..., estimator="relp", relp_rules=(freeze,))``), so the frozen error g'(0) - (g(1) - g(0))
against AtP's says how much of the bend that non-linearity carries (analysis/causes.py frozen_causes).

Cost, per chunk of prompts and direction (frozen_measurements): one RelP attribution per freeze (a receiving
forward with grad and a backward each) sharing one source run; the patches' source values read from that
run or from exact patching's shared runs (a source run of their own only where neither holds them); one
eager receiving run recording what both freezes hold (receiving_run); then one patched copy per component
and freeze, joining the pass at the component's block (engine/partial.py), ``copies`` per pass, counted in
``passes`` like ``patch``'s (runs only where made); the pattern freeze also starts at the first position the
patch or the prompts change (passes.same_prefix). Both freezes: 1 + 2 attribution forwards, 2 backwards, 1
run and the copies (4 + 2 + 4 before issue 27).
"""

from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ...engine.forward import block_calls, forward_last
from ...engine.hooks import call_input, eval_mode, hooked, installed, record
from ...engine.metrics import Target, metric
from ...engine.partial import run_blocks
from ...inputs.batch import PromptBatch, fingerprint
from ...inputs.directions import check_direction, clean_and_corrupt
from ...model.sites import Component, ModelSpec, as_spec, check_component
from ..estimators import qk_fix
from ..estimators.attribution import attribute
from .passes import (block_share, copy_entries, default_rows, equivalents, first_position, group_passes, no_op,
                     same_prefix)  # exact patching's grouping and count
from ..estimators.relp import is_layer_norm, is_norm, ratio
from .exact import patcher  # the exact patcher, alpha = 1

FREEZES = ("pattern", "norm")
NAME = "attrpatch_frozen"
_patterns: ContextVar[dict | None] = ContextVar("attrpatch_frozen_patterns", default=None)


def check_freeze(freeze: str) -> None:
    if freeze not in FREEZES:
        raise ValueError(f"Unknown freeze {freeze!r}; known: {', '.join(FREEZES)}.")


def fit(recorded: Tensor, x: Tensor, last: Tensor) -> Tensor:
    """The receiver's ``recorded`` [batch, pos, ..] for an input ``x`` of n copies [n*batch, pos, ..], or of
    the last positions only [n*batch, ..] (the unembedding's final norm): copy-major repeats."""
    if recorded.ndim == x.ndim + 1:
        recorded = recorded[torch.arange(recorded.shape[0], device=recorded.device), last]  # [batch, ..]
    if recorded.shape[1:] != x.shape[1:] or x.shape[0] % recorded.shape[0]:
        raise ValueError(f"frozen value of shape {tuple(recorded.shape)} does not fit an input of shape {tuple(x.shape)}")
    n = x.shape[0] // recorded.shape[0]
    return recorded.repeat(n, *([1] * (recorded.ndim - 1))) if n > 1 else recorded


def _frozen_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                      dropout: float = 0.0, softcap=None, **kwargs):
    """Attention with the receiver's pattern: query [rows, head, pos, d_head], value [rows, kv_head, pos,
    d_head] -> ([rows, pos, head, d_head], pattern [rows, head, pos, pos])."""
    state = _patterns.get()
    recorded = state["patterns"][state["layer_of"][id(module)]]  # [batch, head, pos, pos]
    rep = query.shape[1] // value.shape[1]
    values = value.repeat_interleave(rep, dim=1) if rep > 1 else value
    n_query, n_key = query.shape[2], value.shape[2]  # a resumed pass: queries from a later position on
    recorded = recorded[:, :, n_key - n_query:n_key, :n_key]
    pattern = recorded.repeat(values.shape[0] // recorded.shape[0], 1, 1, 1).to(values.dtype)
    return (pattern @ values).transpose(1, 2), pattern


@contextmanager
def frozen_patterns(spec: ModelSpec, patterns: dict[int, Tensor]) -> Iterator[None]:
    """Every attention layer uses ``patterns[layer]`` [batch, head, pos, pos] (repeated for copies)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, _frozen_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    layer_of = {id(spec.module(spec.arch.head.rpartition(".")[0], layer)): layer for layer in range(spec.dims.n_layers)}
    before = spec.model.config._attn_implementation
    spec.model.set_attn_implementation(NAME)
    token = _patterns.set({"patterns": patterns, "layer_of": layer_of})
    try:
        yield
    finally:
        _patterns.reset(token)
        spec.model.set_attn_implementation(before)


def _norms(spec: ModelSpec) -> list[nn.Module]:
    return [m for m in spec.model.modules() if is_norm(m)]


def _centred(module: nn.Module, x: Tensor) -> Tensor:
    return x - x.mean(-1, keepdim=True) if is_layer_norm(module) else x


def recording_norms(spec: ModelSpec, store: dict) -> list:
    """Hooks storing each norm's (centred input, output) on a run: {id(module): (x, y)}."""
    def hook(mod, args, kwargs, output):
        store[id(mod)] = (_centred(mod, call_input(args, kwargs)[0]).detach(), output.detach())
    return [lambda m=m: m.register_forward_hook(hook, with_kwargs=True) for m in _norms(spec)]


def frozen_norms(spec: ModelSpec, store: dict, last: Tensor) -> list:
    """Hooks making each norm linear at the receiver's operating point (``store``): y_r + c (x - x_r),
    c = (y_r - b) / x_r, x centred for LayerNorm."""
    def hook(mod, args, kwargs, output):
        x_r, y_r = store[id(mod)]
        bias = mod.bias if is_layer_norm(mod) and getattr(mod, "bias", None) is not None else 0
        x = _centred(mod, call_input(args, kwargs)[0])
        x_r, y_r = fit(x_r, x, last), fit(y_r, x, last)
        return y_r + ratio(y_r - bias, x_r) * (x - x_r)
    return [lambda m=m: m.register_forward_hook(hook, with_kwargs=True) for m in _norms(spec)]


def frozen_effects(model: nn.Module | ModelSpec, batch: PromptBatch, components: Sequence[Component], *,
                   freeze: str, metric_name: str = "logit_diff", direction: str = "denoise", copies: int = 16,
                   batch_size: int | None = None, runs: dict | None = None, sources: dict | None = None,
                   receivers: dict | None = None) -> tuple[Tensor, dict]:
    """g(1) - g(0) of each component (mean over prompts, [component] float64) with ``freeze`` (FREEZES) held
    at the receiver's values, and the passes spent {"runs", "patched_rows", "forward_equivalents"}; prompts
    in chunks of ``batch_size`` (all at once for None): a chunk holds every layer's pattern, [batch, head,
    pos, pos] each.

    runs, sources: exact patching's shared runs (``patch(runs=...)``) and attribution's (``attribute(sources=
    ...)``): the source values are read from there when they hold these prompts, direction and hook points (the
    same no-grad forward, recorded the same way), else a source run is made. receivers: a dict shared by the
    calls of every freeze on the same prompts: the receiving run (receiving_run) is made once for all of
    them. ``passes["runs"]`` counts only the runs made."""
    spec, components = as_spec(model), list(components)
    check_freeze(freeze)
    check_direction(direction)
    for c in components:
        check_component(c, spec, batch.n_pos)
        if c.site == "embed":
            raise ValueError(f"{c}: frozen patching resumes at a block; the embeddings are not supported")
    batch = batch.to(spec.device)
    total = torch.zeros(len(components), dtype=torch.float64)
    passes = {"runs": 0.0, "patched_rows": 0.0, "forward_equivalents": 0.0}
    receivers = {} if receivers is None else receivers
    with eval_mode(spec.model), torch.no_grad():
        for chunk in batch.chunks(batch_size):
            source = _source(spec, chunk, direction, components, runs, sources, passes)
            total += _frozen_chunk(spec, chunk, components, freeze, metric_name, direction, copies, passes, source,
                                   _receiver(spec, chunk, direction, receivers, passes))
    return total / batch.n, passes


def _source(spec: ModelSpec, batch: PromptBatch, direction: str, components: list[Component], runs: dict | None,
            sources: dict | None, passes: dict) -> tuple[dict, Tensor]:
    """The source run's values at the components' hook points ({(site, layer): [batch, pos, ..]}) and its
    last-token logits [batch, vocab]: from exact patching's shared ``runs`` or attribution's ``sources`` when
    one covers them for these prompts and direction, else a run made here (counted in ``passes``)."""
    points = {key: spec.hook_point(*key) for key in {(c.site, c.layer) for c in components}}
    key, found = (direction, fingerprint(batch)), []
    if runs and key in runs:
        found.append((runs[key]["source"], runs[key]["source_logits"]))
    if sources and key in sources:
        found.append(sources[key])
    for values, logits in found:
        if set(points) <= set(values):
            return values, logits
    values = {}
    with hooked(record(points, values, batch.n_pos, Tensor.clone)):
        logits = forward_last(spec, batch.runs(direction)[0], batch.mask, batch.last)
    _count_runs(passes, 1)
    return values, logits


def receiving_run(spec: ModelSpec, batch: PromptBatch, direction: str) -> dict:
    """The receiving run with eager attention, recording what every freeze needs: "patterns" {layer: [batch,
    head, pos, pos]}, "norms" {id(norm): (centred input, output)}, "calls" (every block's call), "cache" (its
    key/value cache where the prompts share a prefix: the pattern freeze resumes after it; else None) and
    "logits" [batch, vocab]. Recording changes no value, so one run serves both freezes."""
    patterns, norms, kept = {}, {}, {}
    keep = batch.aligned and same_prefix(batch) > 0
    with ExitStack() as stack:
        stack.enter_context(qk_fix.recording(spec, lambda layer, q, k, pattern, *rest: patterns.__setitem__(
            layer, pattern.detach())))
        stack.enter_context(installed(recording_norms(spec, norms)))
        calls = stack.enter_context(block_calls(spec, 0))
        logits = forward_last(spec, batch.runs(direction)[1], batch.mask, batch.last, kept if keep else None)
    return {"patterns": patterns, "norms": norms, "calls": calls, "cache": kept.get("cache"), "logits": logits}


def _receiver(spec: ModelSpec, batch: PromptBatch, direction: str, receivers: dict, passes: dict) -> dict:
    """``receivers``' receiving run of these prompts and direction, made (and counted) if missing."""
    key = (direction, fingerprint(batch))
    if key not in receivers:
        receivers[key] = receiving_run(spec, batch, direction)
        _count_runs(passes, 1)
    return receivers[key]


def _count_runs(passes: dict, n: int) -> None:
    passes["runs"] += n
    passes["forward_equivalents"] += n  # a whole forward each


def _frozen_chunk(spec: ModelSpec, batch: PromptBatch, components: list[Component], freeze: str, metric_name: str,
                  direction: str, copies: int, passes: dict, source: tuple[dict, Tensor], receiver: dict) -> Tensor:
    """Sum over the chunk's prompts of each component's frozen effect, from its source run (values, logits)
    and its receiving run (receiving_run): [component] float64."""
    points = {key: spec.hook_point(*key) for key in {(c.site, c.layer) for c in components}}
    (source, source_logits), calls, receiver_logits = source, receiver["calls"], receiver["logits"]
    # the pattern freeze reuses the shared prefix like exact patching (passes.same_prefix): frozen patterns
    # keep the model causal; the norm freeze's recorded values cover every position, so it computes them all
    same = same_prefix(batch) if freeze == "pattern" and batch.aligned else 0
    target = Target.from_clean(batch.answer, batch.wrong, clean_and_corrupt(direction, source_logits, receiver_logits)[0])
    base = metric(metric_name, receiver_logits, target)  # [batch]
    out = torch.zeros(len(components), dtype=torch.float64)
    share, n_layers = block_share(spec, batch.n_pos), spec.dims.n_layers
    todo = [i for i, c in enumerate(components) if not no_op(c, same)]  # the others change nothing: 0
    for group in group_passes(components, todo, lambda first: copies, batch.n_pos if same else None, True, same):
        n, starts = len(group), [components[i].layer for i in group]  # ascending: copies join at their block
        first_pos = min(first_position(components[i], same) for i in group) if same else 0
        entries = copy_entries(components, group)
        with ExitStack() as stack:
            stack.enter_context(hooked([(points[key], patcher(points[key], source[key], found, batch.n,
                                                              batch.n_pos - first_pos, first_pos))
                                        for key, found in entries.items()]))
            if freeze == "pattern":
                stack.enter_context(frozen_patterns(spec, receiver["patterns"]))
            else:
                stack.enter_context(qk_fix.recording(spec, lambda *args: None))  # the receiver's eager masks
                stack.enter_context(installed(frozen_norms(spec, receiver["norms"], batch.last)))
            hidden = call_input(*calls[starts[0]])[0][:, first_pos:]
            logits = run_blocks(spec, starts[0], hidden.repeat(starts.count(starts[0]), 1, 1), calls, n, batch.n,
                                batch.last, first_pos, receiver["cache"], final_patched=True, starts=starts)
        patched = metric(metric_name, logits, target.repeat(n)).view(n, batch.n)  # [copy, batch]
        out[group] = (patched - base).double().sum(-1).cpu()
        passes["patched_rows"] += n
        passes["forward_equivalents"] += equivalents(share, starts, first_pos, n_layers, batch.n_pos)
    return out


def frozen_measurements(model: nn.Module | ModelSpec, batch: PromptBatch, components: Sequence[Component], *,
                        direction: str, metric_name: str = "logit_diff", freezes: Sequence[str] = FREEZES,
                        copies: int | None = None, batch_size: int | None = None, explained=None,
                        reduce=lambda t: t, runs: dict | None = None
                        ) -> tuple[dict[str, dict[str, tuple[float, float]]], dict]:
    """Per component (by name), per freeze, (g'(0), g(1) - g(0)) (mean over prompts): RelP's gradient with
    that one rule, and the frozen patched run. ``freezes`` run in order; ``explained(component, freeze,
    slope, effect)`` True leaves the component out of the later freezes (None: every freeze measures every
    component). reduce: the mean over ranks of a local [component] mean. runs: exact patching's shared runs,
    the patches' source (frozen_effects); one receiving run serves every freeze. Also the passes spent:
    {"forward", "backward"} of the attributions and {"runs", "patched_rows", "forward_equivalents"} of the
    patches ("runs": those made)."""
    spec = as_spec(model)
    rows = copies or max(1, default_rows(spec.device, batch.n_pos) // (batch_size or batch.n))
    out: dict = {str(c): {} for c in components}
    passes = {"forward": 0, "backward": 0, "runs": 0.0, "patched_rows": 0.0, "forward_equivalents": 0.0}
    todo, receivers, sources = list(components), {}, {}  # one receiving run, one attribution source run
    for freeze in freezes:
        if not todo:
            break
        scores = attribute(spec, batch, sites=sorted({c.site for c in todo}), metrics=(metric_name,),
                           direction=direction, estimator="relp", relp_rules=(freeze,), batch_size=batch_size,
                           sources=sources)
        slopes = reduce(torch.tensor([scores.score(c, metric_name) for c in todo], dtype=torch.float64))
        effects, spent = frozen_effects(spec, batch, todo, freeze=freeze, metric_name=metric_name,
                                        direction=direction, copies=rows, batch_size=batch_size, runs=runs,
                                        sources=sources, receivers=receivers)
        effects = reduce(effects)
        for key, value in (*scores.passes.items(), *spent.items()):
            passes[key] = passes.get(key, 0) + value
        for i, c in enumerate(todo):
            out[str(c)][freeze] = (float(slopes[i]), float(effects[i]))
        todo = [c for i, c in enumerate(todo) if not (explained and explained(c, freeze, *out[str(c)][freeze]))]
    return out, passes
