"""GIM reference: GPT-2, Llama and Gemma 2 forwards written out by hand, each of GIM's rules spelled as in
the paper, for relp_reference.py's scoring loop (``relp_reference(..., forwards=FORWARDS)``).

Rules (``rules``: a GimRules, or () for none):
    norm         LayerNorm (x - mu) / sigma.detach() * w + b; RMSNorm x / rms.detach() * w (Gemma: * (1 + w))
    temperature  softmax(s).detach() + T * (softmax(s / T) - softmax(s / T).detach())
                 (value softmax(s), gradient T * d softmax(s / T) / ds = the softmax Jacobian at softmax(s / T))
    q, k, v      f * x + (1 - f) * x.detach()   after rotary embeddings

Only the weights and the rotary tables are read from the HF model; the composition is written here.
"""

import math

import torch
import torch.nn.functional as F

from attrpatch.methods.estimators.gim import GimRules
from relp_reference import heads, rotate


def _rules(rules) -> GimRules:
    return GimRules.off() if rules == () else rules


def norm(x, weight, bias, eps, rules, centre):
    if centre:
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if rules.norm:
        scale = scale.detach()
    out = x / scale * weight
    return out if bias is None else out + bias


def gradient_times(x, factor):
    return factor * x + (1 - factor) * x.detach()


def attend(q, k, v, rules, *, scaling=None, cap=None, window=None):
    """q [batch, head, pos, d_head], k/v [batch, head, pos, d_head] -> z [batch, pos, head, d_head]."""
    q, k, v = gradient_times(q, rules.q), gradient_times(k, rules.k), gradient_times(v, rules.v)
    n_pos = q.shape[2]
    scores = q @ k.transpose(-1, -2) * (scaling or 1 / math.sqrt(q.shape[-1]))
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    i, j = torch.arange(n_pos)[:, None], torch.arange(n_pos)[None]
    allowed = (j <= i) if window is None else (j <= i) & (j > i - window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    t = rules.temperature
    soft = (scores / t).softmax(-1)
    pattern = scores.softmax(-1).detach() + t * (soft - soft.detach())
    return (pattern @ v).transpose(1, 2)


def gpt2(model, ids, rules, at):
    """Logits [batch, pos, vocab]; at(site, layer, tensor) -> tensor sees (and may replace) every site."""
    rules, t, n_heads = _rules(rules), model.transformer, model.config.n_head
    h = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))
    for i, block in enumerate(t.h):
        h = at("resid_pre", i, h)
        x = norm(h, block.ln_1.weight, block.ln_1.bias, block.ln_1.eps, rules, True)
        q, k, v = ((x @ block.attn.c_attn.weight + block.attn.c_attn.bias).chunk(3, -1))
        q, k, v = (at(s, i, a.unflatten(-1, (n_heads, -1))).transpose(1, 2) for s, a in zip("qkv", (q, k, v)))
        z = at("head", i, attend(q, k, v, rules))
        h = h + at("attn_out", i, z.flatten(-2) @ block.attn.c_proj.weight + block.attn.c_proj.bias)
        x = norm(h, block.ln_2.weight, block.ln_2.bias, block.ln_2.eps, rules, True)
        post = at("neuron", i, block.mlp.act(x @ block.mlp.c_fc.weight + block.mlp.c_fc.bias))
        h = h + at("mlp_out", i, post @ block.mlp.c_proj.weight + block.mlp.c_proj.bias)
    return model.lm_head(norm(h, t.ln_f.weight, t.ln_f.bias, t.ln_f.eps, rules, True))


def _qkv(a, c, x, i, at, cos, sin):
    """Llama-style projections, sites read per head before rotary: q, k, v [batch, head, pos, d_head]
    (keys and values repeated from their key-value heads)."""
    rep = c.num_attention_heads // c.num_key_value_heads
    q = at("q", i, a.q_proj(x).unflatten(-1, (c.num_attention_heads, -1))).transpose(1, 2)
    k = at("k", i, a.k_proj(x).unflatten(-1, (c.num_key_value_heads, -1))).transpose(1, 2)
    v = at("v", i, a.v_proj(x).unflatten(-1, (c.num_key_value_heads, -1))).transpose(1, 2)
    return rotate(q, cos, sin), rotate(k, cos, sin).repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)


def llama(model, ids, rules, at):
    rules, m, c = _rules(rules), model.model, model.config
    h = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(h, torch.arange(ids.shape[1])[None])
    for i, block in enumerate(m.layers):
        h = at("resid_pre", i, h)
        ln = block.input_layernorm
        x = norm(h, ln.weight, None, ln.variance_epsilon, rules, False)
        z = at("head", i, attend(*_qkv(block.self_attn, c, x, i, at, cos, sin), rules))
        h = h + at("attn_out", i, block.self_attn.o_proj(z.flatten(-2)))
        ln = block.post_attention_layernorm
        x = norm(h, ln.weight, None, ln.variance_epsilon, rules, False)
        product = F.silu(block.mlp.gate_proj(x)) * block.mlp.up_proj(x)
        h = h + at("mlp_out", i, block.mlp.down_proj(at("neuron", i, product)))
    return model.lm_head(norm(h, m.norm.weight, None, m.norm.variance_epsilon, rules, False))


def gemma2(model, ids, rules, at):
    """Gemma 2: scaled embeddings, RMSNorm with (1 + w), post-attention and post-MLP norms (attn_out and
    mlp_out are their outputs), soft-capped attention scores and logits, sliding-window layers."""
    rules, m, c = _rules(rules), model.model, model.config
    h = F.embedding(ids, m.embed_tokens.weight) * torch.tensor(c.hidden_size ** 0.5, dtype=m.embed_tokens.weight.dtype)
    cos, sin = m.rotary_emb(h, torch.arange(ids.shape[1])[None])

    def rms(x, ln):
        return norm(x, 1 + ln.weight, None, ln.eps, rules, False)
    for i, block in enumerate(m.layers):
        h = at("resid_pre", i, h)
        window = c.sliding_window if c.layer_types[i] == "sliding_attention" else None
        z = attend(*_qkv(block.self_attn, c, rms(h, block.input_layernorm), i, at, cos, sin), rules,
                   scaling=c.query_pre_attn_scalar ** -0.5, cap=c.attn_logit_softcapping, window=window)
        attn = block.self_attn.o_proj(at("head", i, z).flatten(-2))
        h = h + at("attn_out", i, rms(attn, block.post_attention_layernorm))
        x = rms(h, block.pre_feedforward_layernorm)
        product = F.gelu(block.mlp.gate_proj(x), approximate="tanh") * block.mlp.up_proj(x)
        h = h + at("mlp_out", i, rms(block.mlp.down_proj(at("neuron", i, product)), block.post_feedforward_layernorm))
    logits = model.lm_head(rms(h, m.norm))
    cap = c.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


FORWARDS = {"gpt2": gpt2, "llama": llama, "gemma2": gemma2}
