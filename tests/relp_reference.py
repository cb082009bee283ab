"""RelP reference: GPT-2, Llama and GPT-NeoX forwards written out by hand, each non-linearity with its
LRP rule spelled as in the paper, and RelP scores from one autograd call per (site, layer).

Rules (``rules`` is a subset of norm, act, half, pattern):
    norm     LayerNorm (x - mu) / sigma.detach() * w + b; RMSNorm x / rms.detach() * w
    act      x * (act(x) / x).detach()
    half     0.5 * (a * u.detach() + a.detach() * u)     for the gated product a = act(gate), u = up
    pattern  softmax(...).detach()

Only the weights and the rotary tables are read from the HF model; the composition is written here.
"""

import math

import torch
import torch.nn.functional as F

from attrpatch.engine.metrics import Target, metric


def norm(x, weight, bias, eps, rules, centre):
    if centre:
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    if "norm" in rules:
        scale = scale.detach()
    out = x / scale * weight
    return out if bias is None else out + bias


def act(fn, x, rules):
    if "act" in rules:
        return x * (fn(x) / x).detach()
    return fn(x)


def attend(q, k, v, rules):
    """q [batch, head, pos, d_head], k/v [batch, head, pos, d_head] -> z [batch, pos, head, d_head]."""
    n_pos = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
    pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    if "pattern" in rules:
        pattern = pattern.detach()
    return (pattern @ v).transpose(1, 2)


def rotate(x, cos, sin):
    """Rotary embedding on the first cos.shape[-1] dims of x [batch, head, pos, d_head]."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    half = torch.cat([-rot[..., n // 2:], rot[..., : n // 2]], -1)
    return torch.cat([rot * cos[:, None] + half * sin[:, None], rest], -1)


def heads(x, n):
    return x.unflatten(-1, (n, -1)).transpose(1, 2)  # [batch, pos, n*d] -> [batch, n, pos, d]


def gpt2(model, ids, rules, at):
    """Logits [batch, pos, vocab]; at(site, layer, tensor) -> tensor sees (and may replace) every site."""
    t = model.transformer
    n_heads = model.config.n_head
    h = t.wte(ids) + t.wpe(torch.arange(ids.shape[1]))
    for i, block in enumerate(t.h):
        h = at("resid_pre", i, h)
        x = norm(h, block.ln_1.weight, block.ln_1.bias, block.ln_1.eps, rules, True)
        q, k, v = (x @ block.attn.c_attn.weight + block.attn.c_attn.bias).chunk(3, -1)
        z = at("head", i, attend(heads(q, n_heads), heads(k, n_heads), heads(v, n_heads), rules))
        h = h + at("attn_out", i, z.flatten(-2) @ block.attn.c_proj.weight + block.attn.c_proj.bias)
        x = norm(h, block.ln_2.weight, block.ln_2.bias, block.ln_2.eps, rules, True)
        post = at("neuron", i, act(block.mlp.act, x @ block.mlp.c_fc.weight + block.mlp.c_fc.bias, rules))
        h = h + at("mlp_out", i, post @ block.mlp.c_proj.weight + block.mlp.c_proj.bias)
    return model.lm_head(norm(h, t.ln_f.weight, t.ln_f.bias, t.ln_f.eps, rules, True))


def llama(model, ids, rules, at):
    m, c = model.model, model.config
    h = m.embed_tokens(ids)
    cos, sin = m.rotary_emb(h, torch.arange(ids.shape[1])[None])
    rep = c.num_attention_heads // c.num_key_value_heads
    for i, block in enumerate(m.layers):
        h = at("resid_pre", i, h)
        ln = block.input_layernorm
        x = norm(h, ln.weight, None, ln.variance_epsilon, rules, False)
        a = block.self_attn
        q = rotate(heads(a.q_proj(x), c.num_attention_heads), cos, sin)
        k = rotate(heads(a.k_proj(x), c.num_key_value_heads), cos, sin).repeat_interleave(rep, 1)
        v = heads(a.v_proj(x), c.num_key_value_heads).repeat_interleave(rep, 1)
        z = at("head", i, attend(q, k, v, rules))
        h = h + at("attn_out", i, a.o_proj(z.flatten(-2)))
        ln = block.post_attention_layernorm
        x = norm(h, ln.weight, None, ln.variance_epsilon, rules, False)
        gate, up = act(F.silu, block.mlp.gate_proj(x), rules), block.mlp.up_proj(x)
        product = 0.5 * (gate * up.detach() + gate.detach() * up) if "half" in rules else gate * up
        h = h + at("mlp_out", i, block.mlp.down_proj(at("neuron", i, product)))
    return model.lm_head(norm(h, m.norm.weight, None, m.norm.variance_epsilon, rules, False))


def neox(model, ids, rules, at):
    m, c = model.gpt_neox, model.config
    h = m.embed_in(ids)
    cos, sin = m.rotary_emb(h, torch.arange(ids.shape[1])[None])
    for i, block in enumerate(m.layers):
        h = at("resid_pre", i, h)
        ln = block.input_layernorm
        x = norm(h, ln.weight, ln.bias, ln.eps, rules, True)
        qkv = block.attention.query_key_value(x).unflatten(-1, (c.num_attention_heads, -1)).transpose(1, 2)
        q, k, v = qkv.chunk(3, -1)  # each head's slice is [q | k | v]
        z = at("head", i, attend(rotate(q, cos, sin), rotate(k, cos, sin), v, rules))
        attn_out = at("attn_out", i, block.attention.dense(z.flatten(-2)))
        ln = block.post_attention_layernorm
        x = norm(h, ln.weight, ln.bias, ln.eps, rules, True)  # parallel residual: reads the block input
        post = at("neuron", i, act(block.mlp.act, block.mlp.dense_h_to_4h(x), rules))
        h = h + attn_out + at("mlp_out", i, block.mlp.dense_4h_to_h(post))
    ln = m.final_layer_norm
    return model.get_output_embeddings()(norm(h, ln.weight, ln.bias, ln.eps, rules, True))


FORWARDS = {"gpt2": gpt2, "llama": llama, "gpt_neox": neox}


def relp_reference(model, batch, site, rules, direction="denoise", metric_name="logit_diff", forwards=FORWARDS):
    """RelP scores [layer, pos, (unit)] of ``site``, mean over prompts: for each layer, the receiver's
    activation is a leaf, and the gradient of the metric under ``rules`` multiplies (source - receiver).
    forwards: {model_type: forward(model, ids, rules, at)}, rules () meaning none (gim_reference.py's too)."""
    forward = forwards[model.config.model_type]
    source_ids, receiver_ids = (batch.clean, batch.corrupt) if direction == "denoise" else (batch.corrupt, batch.clean)
    last = torch.arange(batch.n), batch.last

    def record(ids):
        found = {}
        with torch.no_grad():
            logits = forward(model, ids, (), lambda s, i, t: found.setdefault((s, i), t))
        return found, logits[last]
    source, source_logits = record(source_ids)
    receiver, receiver_logits = record(receiver_ids)
    clean = source_logits if direction == "denoise" else receiver_logits
    target = Target.from_clean(batch.answer, batch.wrong, clean)
    out = []
    for layer in range(model.config.num_hidden_layers):
        leaf = receiver[(site, layer)].clone().requires_grad_(True)
        logits = forward(model, receiver_ids, rules, lambda s, i, t: leaf if (s, i) == (site, layer) else t)
        (grad,) = torch.autograd.grad(metric(metric_name, logits[last], target).mean(), leaf)
        prod = (source[(site, layer)] - leaf.detach()) * grad
        out.append(prod if site == "neuron" else prod.sum(-1))  # [batch, pos, (head)]
    return torch.stack(out).sum(1)  # [layer, pos, (head)]; the gradient was of the mean
