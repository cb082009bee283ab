"""Ungrouped grouped-query attention: a view of a model with one key-value head per query head, computing the
same function, so that each query head has its own k and v inputs (TransformerLens's
``ungroup_grouped_query_attention``, which MIB's circuit evaluation sets).

A grouped-query model with H query heads and KV key-value heads (group size G = H / KV) computes, for query
head h, keys k_g = norm(x) @ W_K[g] with g = h // G (HF's ``repeat_kv`` shares them across the group). The
ungrouped model gives head h its own projection W_K'[h] = W_K[h // G] (likewise W_V, and the biases):

    k'_h = norm(x) @ W_K'[h] = k_{h // G}        the same keys, values and outputs for every input

but now an intervention on k'_h (an edge into head h's k) changes head h's keys alone, and a gradient at k'_h
is the part of the gradient at k_g that flows through query head h. Summing the H receivers of a group gives
the grouped receiver's gradient, and its scores: sum_{h in g} score(A -> h.k) = score(A -> g.k).

The copy shares every parameter with the original except the k and v projections (H / KV times their size:
on Llama-3-8B, 2 x 32 layers x 4096 x 4096 x 2 B = 2.1 GB in bf16 instead of 0.5 GB); the original is untouched.
Multi-head models come back as they are.
"""

import copy

import torch
from torch import nn

from .archs import UnsupportedModel

SEPARATE = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")  # k_proj and v_proj modules (Qwen3
# and Gemma 3 normalise keys per head, so a repeated head keeps its norm; OLMo 2 normalises all heads together)
FUSED = ("phi3",)  # one qkv_proj: [q (H d_head) | k (KV d_head) | v (KV d_head)] rows


WHY_NOT = {"olmo2": "its k_norm normalises all key-value heads' keys together (one RMSNorm over n_kv * d_head), "
                    "so a copy with one key head per query head would not compute the same function"}


def check_ungroupable(model: nn.Module) -> tuple[int, int]:
    """(query heads, key-value heads) of ``model``; an UnsupportedModel, before any work, when it is
    grouped and cannot be ungrouped (MIB's graph needs one k and v receiver per query head)."""
    config = model.config
    n_heads = config.num_attention_heads if hasattr(config, "num_attention_heads") else config.n_head
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    if n_kv != n_heads and config.model_type not in SEPARATE + FUSED:
        why = WHY_NOT.get(config.model_type, "not implemented")
        raise UnsupportedModel(f"ungrouping grouped-query attention (MIB's graph, --mib) for {config.model_type!r} "
                               f"({n_heads} query heads, {n_kv} key-value heads): {why}; implemented: "
                               f"{', '.join(SEPARATE + FUSED)}")
    return n_heads, n_kv


def ungrouped(model: nn.Module) -> nn.Module:
    """``model`` itself when it has one key-value head per query head; else a copy (sharing all but the k/v
    weights) with ``num_key_value_heads`` = ``num_attention_heads`` and the k/v projections repeated per head."""
    config = model.config
    n_heads, n_kv = check_ungroupable(model)
    if n_kv == n_heads:
        return model
    group = n_heads // n_kv
    memo = {id(p): p for p in model.parameters()}  # shared: every weight but the ones replaced below
    copied = copy.deepcopy(model, memo)
    copied.config.num_key_value_heads = n_heads
    for attn in (m for m in copied.modules() if hasattr(m, "num_key_value_groups")):
        d_head = attn.head_dim
        if config.model_type in FUSED:
            attn.qkv_proj = _fused(attn.qkv_proj, n_heads, n_kv, d_head, group)
        else:
            attn.k_proj = _repeated(attn.k_proj, d_head, group)
            attn.v_proj = _repeated(attn.v_proj, d_head, group)
        attn.num_key_value_groups = 1
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = n_heads
    return copied


def _repeat_rows(t: torch.Tensor, d_head: int, group: int) -> torch.Tensor:
    """[KV * d_head, ...] -> [KV * G * d_head, ...]: each head's rows G times, in place of the head."""
    heads = t.unflatten(0, (-1, d_head))  # [KV, d_head, ...]
    return heads.repeat_interleave(group, 0).flatten(0, 1)  # [KV * G * d_head, ...]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    out.requires_grad_(weight.requires_grad)
    return out


def _repeated(proj: nn.Linear, d_head: int, group: int) -> nn.Linear:
    """A k or v projection [KV * d_head, d_model] with each head's rows repeated G times."""
    bias = None if proj.bias is None else _repeat_rows(proj.bias.detach(), d_head, group)
    return _linear(_repeat_rows(proj.weight.detach(), d_head, group), bias)


def _fused(proj: nn.Linear, n_heads: int, n_kv: int, d_head: int, group: int) -> nn.Linear:
    """phi3's qkv_proj [(H + 2 KV) d_head, d_model] -> [3 H d_head, d_model], k and v rows repeated per head."""
    sizes = [n_heads * d_head, n_kv * d_head, n_kv * d_head]

    def expand(t):
        q, k, v = t.split(sizes, 0)
        return torch.cat([q, _repeat_rows(k, d_head, group), _repeat_rows(v, d_head, group)])
    return _linear(expand(proj.weight.detach()), None if proj.bias is None else expand(proj.bias.detach()))
