"""The senders' writes into the residual stream, a_A(run) [.., d_model]: what the block adds for A.

    embed     block 0's input (token embeddings, plus GPT-2's position embeddings)
    Ll.mlp    the MLP's contribution to the residual add: the MLP module's output (pre-norm, parallel), the
              post-feedforward norm's output (post-norm: Gemma 2 and 3, OLMo 2); the ``mlp_out`` site either way
    LlHh      pre-norm and parallel blocks: z_h W_O[h], linear in z (the projection's bias belongs to no head)
              post-norm blocks, whose attention write is N(o), o = sum_h z_h W_O[h], N the post-attention
              RMSNorm: head h's part of o through N at the run's own scale,

                  a_h(run) = s(o(run)) * z_h(run) W_O[h],      s(o) = N(o) / o = gamma / rms(o)   (elementwise)

Why this head sender (post-norm): N mixes the heads through rms(o), so no write of head h alone adds up with
the others'. With each run's own scale, sum_h a_h(run) = N(o(run)) exactly, in every run: every head of a
layer patched jointly (all their edges) is the attention's node patch (``attn_out``), and the embeddings,
MLPs and receivers keep their pre-norm identities. (The receiving run's scale for both runs, s(o(receiver)) *
(z_h(source) - z_h(receiver)) W_O[h], would be linear in z but would not add up: its sum over heads,
s(o(receiver)) * (o(source) - o(receiver)), is not N(o(source)) - N(o(receiver)).) What does NOT hold: one head's edges patched jointly are
not the node patch of that head's z (that patch also moves rms(o), hence every head's write), and its EAP
scores do not sum to the head's node AtP score (which differentiates through rms(o)); tests/test_family_edges.py
measures both gaps. A receiver still reads the residual stream at its input, before its own pre-norm
(input_layernorm, pre_feedforward_layernorm; OLMo 2 has none).

Cost (post-norm): one more [batch, pos, d_model] tensor per layer and run (o), and N re-applied to it.
"""

import torch
from torch import Tensor

from ..estimators.relp import ratio
from .graph import EdgeModel


def post_scale(em: EdgeModel, layer: int, o: Tensor) -> Tensor:
    """s(o) = N(o) / o [.., d_model] of layer ``layer``'s post-attention norm N, at o [.., d_model]
    (0 where o is exactly 0)."""
    norm = em.spec.module(em.spec.arch.attn_out, layer)
    return ratio(norm.forward(o), o)


def head_writes(em: EdgeModel, layer: int, z: Tensor, o: Tensor | None = None) -> Tensor:
    """Each head's write: z [.., head, d_head] -> [head, .., d_model]; scaled by s(o) when ``o`` [.., d_model]
    (post-norm) is given."""
    d = em.spec.dims
    w_o = em.out_matrix(layer).view(d.n_heads, d.d_head, d.d_model).to(z.dtype)  # [head, d_head, d_model]
    writes = torch.einsum("...he,hed->h...d", z, w_o)
    return writes if o is None else writes * post_scale(em, layer, o).to(writes.dtype)


def weighted_write(em: EdgeModel, layer: int, z: Tensor, weights: Tensor, o: Tensor | None = None) -> Tensor:
    """sum_h weights[.., h] * a_h: z [copy, batch, pos, head, d_head], weights [copy, batch | 1, pos | 1, head]
    (per copy, and per prompt or position where they differ) -> [copy, batch, pos, d_model] (the weights folded
    in before W_O: one product)."""
    w_o = em.out_matrix(layer).to(z.dtype)  # [head * d_head, d_model]
    write = (z * weights[..., None]).flatten(-2) @ w_o
    return write if o is None else write * post_scale(em, layer, o).to(write.dtype)


def head_deltas(em: EdgeModel, layer: int, source: dict, now: dict) -> Tensor:
    """a_h(source) - a_h(now) of layer ``layer``'s heads [head, .., d_model]; source, now: sender activations
    keyed as EdgeModel.sender_points (("z", l), and ("o", l) for post-norm families)."""
    z = ("z", layer)
    if not em.post_norm:
        return head_writes(em, layer, source[z] - now[z])  # linear in z: one product
    o = ("o", layer)
    return head_writes(em, layer, source[z], source[o]) - head_writes(em, layer, now[z], now[o])


def weighted_delta(em: EdgeModel, layer: int, source: dict, now: dict, weights: Tensor) -> Tensor:
    """sum_h weights[.., h] (a_h(source) - a_h(now)) [copy, batch, pos, d_model] (weighted_write's shapes)."""
    z = ("z", layer)
    if not em.post_norm:
        return weighted_write(em, layer, source[z] - now[z], weights)
    o = ("o", layer)
    return weighted_write(em, layer, source[z], weights, source[o]) - weighted_write(em, layer, now[z], weights, now[o])
