"""AtP*'s QK fix: the attention pattern change from patching a query or key, computed exactly.

Plain AtP linearises through the softmax, whose gradient vanishes when it saturates, so it misses queries
and keys that move a saturated pattern a lot. The QK fix recomputes the pattern with the patched query or
key and linearises only after it (Kramár et al. 2024):

    score(q of head h at position r) = sum_c (A'[h, r, c] - A[h, r, c]) * G[h, r, c]
        A'[h, r] = softmax(logits(q_source[h, r], K_receiver[h]) + mask)       (row r changes alone)
    score(k of kv-head j at position p) = sum_{h in group j} sum_r (A'_p[h, r] - A[h, r]) . G[h, r]
        A'_p = the pattern with only key p replaced by the source's

where A is the receiver's pattern and G = d metric / d A. Replacing one logit s_rp by s_rp + D in row r
moves its log-normaliser from L to L' = logaddexp(L_without_p, s_rp + D), scales the other keys by
exp(L - L') and sets key p to exp(s_rp + D - L'), so row r changes by
expm1(L - L') (sum_c A_rc G_rc - A_rp G_rp) + (exp(s_rp + D - L') - A_rp) G_rp: every key at once in
O(pos^2), in log space so that saturated rows (A_rp = 1) lose nothing to cancellation.

q and k arrive after rotary embeddings, through a custom attention function registered with transformers'
AttentionInterface (and the eager mask function under the same name, so the mask stays causal).
"""

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import torch
from torch import Tensor, nn

from ...engine.forward import softcap as _softcap
from ...model.sites import ModelSpec
from .gradients import Chunk

NAME = "attrpatch_eager"
_recording: ContextVar[dict | None] = ContextVar("attrpatch_attention", default=None)


def _w(x: Tensor) -> Tensor:
    """At least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None, **kwargs):
    """Eager attention that records post-rotary q, k and the pattern. query [batch, head, pos, d_head],
    key/value [batch, kv_head, pos, d_head] -> ([batch, pos, head, d_head], pattern [batch, head, pos, pos])."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    rep = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(rep, dim=1) if rep > 1 else key
    values = value.repeat_interleave(rep, dim=1) if rep > 1 else value
    logits = _softcap(query @ keys.transpose(-1, -2) * scaling, softcap)
    if attention_mask is not None:
        logits = logits + attention_mask[..., : keys.shape[-2]]
    pattern = torch.softmax(logits.float(), dim=-1).to(query.dtype)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    record = _recording.get()
    if record is not None:
        if record["fixed"]:  # RelP's attention rule: no gradient through the pattern
            pattern = pattern.detach()
        record["on_call"](module, query, key, pattern, attention_mask, scaling, softcap)
    return (pattern @ values).transpose(1, 2), pattern


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, eager_mask)


@contextmanager
def recording(spec: ModelSpec, on_call, *, fixed_pattern: bool = False) -> Iterator[None]:
    """Route every attention layer through ``_attention`` for the block, calling
    ``on_call(layer, query, key, pattern, mask, scaling, softcap)``; the model's own implementation is
    restored afterwards. fixed_pattern: detach the pattern (values unchanged, no gradient through it)."""
    _register()
    layer_of = {id(spec.module(spec.arch.head.rpartition(".")[0], layer)): layer
                for layer in range(spec.dims.n_layers)}
    model = spec.model
    before = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    token = _recording.set({"on_call": lambda module, *args: on_call(layer_of[id(module)], *args),
                            "fixed": fixed_pattern})
    try:
        yield
    finally:
        _recording.reset(token)
        model.set_attn_implementation(before)


def scorer(chunk: Chunk, source_qk: dict, sites: list[str]):
    """An ``on_call`` for :func:`recording` during the receiving run: once d metric / d pattern arrives in
    the plain backward pass, add the QK-fix score of every q and k of the layer into the chunk's values.
    source_qk: {layer: (q, k)} recorded on the source run."""
    def on_attention(layer, q, k, pattern, attn_mask, scaling, softcap):
        def on_grad(grad):
            if chunk.label is not None:  # GradDrop's extra passes
                return
            rows = chunk.mask[:, :, None].to(torch.float32)  # [batch, pos, 1]
            if "q" in sites:
                chunk.add("q", layer, q_scores(source_qk[layer][0], k, pattern, grad, attn_mask, scaling, softcap) * rows)
            if "k" in sites:
                chunk.add("k", layer, k_scores(q, k, source_qk[layer][1], grad, attn_mask, scaling, softcap) * rows)
        if pattern.requires_grad:
            pattern.register_hook(on_grad)
    return on_attention


def q_scores(q_source: Tensor, k: Tensor, pattern: Tensor, grad: Tensor, mask: Tensor | None, scaling: float,
             softcap: float | None) -> Tensor:
    """QK-fix scores of every query head at every position: [batch, pos, head].

    q_source [batch, head, pos, d_head]; k [batch, kv_head, pos, d_head] (receiver); pattern, grad, mask
    [batch, head, pos, pos] (mask additive, broadcastable)."""
    rep = q_source.shape[1] // k.shape[1]
    keys = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    logits = _softcap(_w(q_source) @ _w(keys).transpose(-1, -2) * scaling, softcap)
    if mask is not None:
        logits = logits + _w(mask[..., : keys.shape[-2]])
    patched = torch.softmax(logits, dim=-1)
    return ((patched - _w(pattern)) * _w(grad)).sum(-1).transpose(1, 2)  # [batch, pos, head]


def k_scores(q: Tensor, k_receiver: Tensor, k_source: Tensor, grad: Tensor, mask: Tensor | None,
             scaling: float, softcap: float | None) -> Tensor:
    """QK-fix scores of every key-value head at every key position: [batch, pos, kv_head].

    q [batch, head, pos, d_head] (receiver); k_* [batch, kv_head, pos, d_head]; grad [batch, head, query,
    key]; mask additive, broadcastable. The pattern is recomputed in log space from the logits, so a key
    whose probability underflows to 0 but whose patched logit wins the row still counts."""
    rep = q.shape[1] // k_receiver.shape[1]
    expand = (lambda t: t.repeat_interleave(rep, dim=1)) if rep > 1 else (lambda t: t)
    qf = _w(q)
    logits = _softcap(qf @ _w(expand(k_receiver)).transpose(-1, -2) * scaling, softcap)  # [b, h, query, key]
    shift = _softcap(qf @ _w(expand(k_source)).transpose(-1, -2) * scaling, softcap) - logits
    if mask is not None:
        logits = logits + _w(mask[..., : logits.shape[-1]])
    valid = logits > -1e30  # masks are -inf or the dtype's minimum
    logits = logits.masked_fill(~valid, float("-inf"))
    lse = logits.logsumexp(-1, keepdim=True)  # [batch, head, query, 1]
    a, g = (logits - lse).exp(), _w(grad)
    row = (a * g).sum(-1, keepdim=True)  # sum_c A_rc G_rc
    # The row's log-normaliser without key p: for non-top keys (probability <= 1/2) lse + log1p(-A) is
    # exact enough; for the row's top key it is computed directly, with the rest of the row's softmax.
    top = logits.argmax(-1, keepdim=True)
    rest = logits.scatter(-1, top, float("-inf"))
    lse_rest = rest.logsumexp(-1, keepdim=True)
    rest_g = ((rest - lse_rest).exp().nan_to_num() * g).sum(-1, keepdim=True)  # softmax without top . G
    is_top = torch.zeros_like(valid).scatter(-1, top, True)
    without = torch.where(is_top, lse_rest, lse + torch.log1p(-a.clamp(max=0.5)))
    new_lse = torch.logaddexp(without, logits + shift)  # the row's normaliser with key p patched
    moved = (logits + shift - new_lse).exp() - a  # key p's own probability change
    others = torch.where(is_top, (lse_rest - new_lse).exp() * rest_g - (row - a * g),
                         torch.expm1(lse - new_lse) * (row - a * g))  # every other key's change . G
    change = torch.where(valid, others + moved * g, 0.0)
    per_head = change.sum(2)  # over query rows: [batch, head, key]
    per_kv = per_head.unflatten(1, (k_receiver.shape[1], rep)).sum(2)  # [batch, kv_head, key]
    return per_kv.transpose(1, 2)  # [batch, pos, kv_head]
