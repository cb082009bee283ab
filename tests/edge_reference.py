"""Naive edge references, written for clarity, not speed: one full ``model(...)`` per edge (or per receiver),
a plain hook that changes one receiver's input only. Shares nothing with attrpatch's edge code but the
family table (module paths) and the Edge names.

    sender values  embed: block 0's input; LlHh: z[..., h, :] @ W_O[h] (columns of the projection's weight,
                   by hand per family), post-norm families: times N(o) / o, the post-attention norm's output over
                   its input o in the same run; Ll.mlp: the MLP module's output (post-norm: the post-feedforward
                   norm's output, what the block adds)
    receiver B     q/k/v of head h: the projection recomputed on norm(x + delta), head h's columns written
                   back (no norm: OLMo 2); an MLP: its own input (OPT: fc1's) replaced by norm(x + delta), x its
                   norm's input (Phi's norm also feeds the attention); the logits: the final norm's input + delta
"""

import re

import torch

from attrpatch.model.sites import model_spec
from reference import _last_logits, _runs, _target

from attrpatch.engine.metrics import metric


def _weight_out_in(mod):
    """The weight as [out, in] for nn.Linear and GPT-2's Conv1D alike."""
    return mod.weight if isinstance(mod, torch.nn.Linear) else mod.weight.T


def sender_values(model, ids, batch):
    """{sender name: [batch, pos, d_model]} of one plain forward."""
    spec = model_spec(model)
    d = spec.dims
    found, handles = {}, []
    handles.append(spec.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: found.__setitem__("embed", (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True))
    for layer in range(d.n_layers):
        o_proj = spec.module(spec.arch.head, layer)
        w = _weight_out_in(o_proj)  # [d_model, head * d_head]

        def grab_z(m, args, layer=layer, w=w):
            z = args[0]
            for h in range(d.n_heads):
                cols = slice(h * d.d_head, (h + 1) * d.d_head)
                found[f"L{layer}H{h}"] = z[..., cols] @ w[:, cols].T
        handles.append(o_proj.register_forward_pre_hook(grab_z))
        if spec.arch.post_norm:  # the head's part of o through the post-attention norm at this run's scale
            def rescale(m, args, out, layer=layer):
                for h in range(d.n_heads):
                    found[f"L{layer}H{h}"] = found[f"L{layer}H{h}"] * (out / args[0])
            handles.append(spec.module(spec.arch.attn_out, layer).register_forward_hook(rescale))
        handles.append(spec.module(spec.arch.mlp_out, layer).register_forward_hook(
            lambda m, args, out, layer=layer: found.__setitem__(f"L{layer}.mlp", out.reshape(*ids.shape, -1).clone())))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=batch.mask)
    finally:
        for h in handles:
            h.remove()
    return found


def _qkv_columns(spec, site, head):
    """Output columns of head ``head``'s q, k or v in the projection module, by hand per family."""
    d = spec.dims
    if spec.arch.qkv_layout == "gpt2":
        start = "qkv".index(site) * d.n_heads * d.d_head + head * d.d_head
    elif spec.arch.qkv_layout == "neox":  # per head [q | k | v]
        start = head * 3 * d.d_head + "qkv".index(site) * d.d_head
    elif spec.arch.qkv_layout == "phi3":
        start = {"q": 0, "k": d.n_heads * d.d_head, "v": (d.n_heads + d.n_kv_heads) * d.d_head}[site] + head * d.d_head
    else:
        start = head * d.d_head
    return slice(start, start + d.d_head)


def receiver_hooks(model, receiver: str, delta):
    """Register hooks making receiver ``receiver`` read its input + ``delta`` [batch, pos, d_model]; returns the
    handles."""
    spec = model_spec(model)
    if receiver == "logits":
        norm = spec.final_modules()[0]
        return [norm.register_forward_pre_hook(lambda m, args: (args[0] + delta,))]
    layer, kind = re.match(r"L(\d+)(?:H\d+)?\.?(\w+)$", receiver).groups()
    layer = int(layer)
    seen = {}

    def keep(m, args):
        seen["x"] = args[0]
    reader = _reader(spec, receiver)  # the module whose input is input_B
    path = spec.arch.mlp_norm if kind == "mlp" else spec.arch.attn_norm
    norm = spec.module(path, layer) if path is not None else torch.nn.Identity()
    if kind == "mlp":
        mlp = spec.module(spec.arch.mlp_in or spec.arch.neuron.rpartition(".")[0], layer)  # OPT: fc1, flattened rows
        return [reader.register_forward_pre_hook(keep),
                mlp.register_forward_pre_hook(lambda m, args: (norm.forward(seen["x"] + delta.reshape(seen["x"].shape)),))]
    head = int(re.match(r"L\d+H(\d+)", receiver).group(1))
    proj = spec.module(getattr(spec.arch, kind) or spec.arch.q, layer)

    def replace(m, args, out):
        cols = _qkv_columns(spec, kind, head)
        out = out.clone()
        out[..., cols] = proj.forward(norm.forward(seen["x"] + delta))[..., cols]
        return out
    return [reader.register_forward_pre_hook(keep), proj.register_forward_hook(replace)]


def _reader(spec, receiver):
    """The module whose input is input_B: the receiver's norm, or without one (OLMo 2) the projection or the
    MLP itself."""
    if receiver == "logits":
        return spec.final_modules()[0]
    layer, kind = re.match(r"L(\d+)(?:H\d+)?\.?(\w+)$", receiver).groups()
    path = spec.arch.mlp_norm if kind == "mlp" else spec.arch.attn_norm
    if path is None:
        path = (spec.arch.mlp_in or spec.arch.neuron.rpartition(".")[0]) if kind == "mlp" else \
            getattr(spec.arch, kind) or spec.arch.q
    return spec.module(path, int(layer))


def input_delta(model, batch, receiver, direction="denoise"):
    """input_B(source) - input_B(receiver): the change of B's whole input (its norm's input) [batch, pos, d_model]."""
    norm = _reader(model_spec(model), receiver)
    values = []
    for ids in _runs(batch, direction):
        found = {}
        handle = norm.register_forward_pre_hook(lambda m, args: found.__setitem__("x", args[0].clone()))
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=batch.mask)
        finally:
            handle.remove()
        values.append(found["x"].reshape(*ids.shape, -1))  # OPT's MLP norm sees flattened rows
    return values[0] - values[1]


def sender_delta(model, batch, sender, direction="denoise"):
    """a_A(source) - a_A(receiver) [batch, pos, d_model]."""
    source_ids, receiver_ids = _runs(batch, direction)
    return sender_values(model, source_ids, batch)[sender] - sender_values(model, receiver_ids, batch)[sender]


def patch_input_reference(model, batch, receiver, delta, direction="denoise", metric_name="logit_diff"):
    """One full forward with ``receiver``'s input + ``delta``: the metric change, mean over prompts."""
    _, receiver_ids = _runs(batch, direction)
    target = _target(model, batch, direction)
    with torch.no_grad():
        base = metric(metric_name, _last_logits(model, receiver_ids, batch), target)
        handles = receiver_hooks(model, receiver, delta)
        try:
            patched = metric(metric_name, _last_logits(model, receiver_ids, batch), target)
        finally:
            for h in handles:
                h.remove()
    return float((patched - base).mean())


def edge_patch_reference(model, batch, edge, direction="denoise", metric_name="logit_diff"):
    """One full forward with receiver input + a_A(source) - a_A(receiver)."""
    delta = sender_delta(model, batch, edge.sender, direction)
    return patch_input_reference(model, batch, edge.receiver, delta, direction, metric_name)


def receiver_grad(model, batch, receiver, direction="denoise", metric_name="logit_diff"):
    """d metric / d input_B [batch, pos, d_model] on the receiving run (metric mean over prompts), from a zero
    leaf added to B's input."""
    _, receiver_ids = _runs(batch, direction)
    target = _target(model, batch, direction)
    leaf = torch.zeros(*batch.clean.shape, model.config.hidden_size, dtype=next(model.parameters()).dtype,
                       requires_grad=True)
    handles = receiver_hooks(model, receiver, leaf)
    try:
        value = metric(metric_name, _last_logits(model, receiver_ids, batch), target).mean()
    finally:
        for h in handles:
            h.remove()
    (grad,) = torch.autograd.grad(value, leaf)
    return grad * batch.mask[..., None]


def eap_reference(model, batch, edge, direction="denoise", metric_name="logit_diff"):
    """(a_A(source) - a_A(receiver)) . d metric / d input_B."""
    delta = sender_delta(model, batch, edge.sender, direction)
    return float((delta * receiver_grad(model, batch, edge.receiver, direction, metric_name)).sum())


def faithfulness_reference(model, batch, scores, sizes, metric_name="logit_diff"):
    """The faithfulness curve as it was computed before methods/edges/circuits.py: per circuit size n, one full
    forward (copies=1, resume=False) patching every edge outside the top n by |score| (ties in edge order)
    jointly, through edge_patching's per-receiver writer; normalised 0 = corrupt, 1 = clean."""
    from attrpatch.methods.edges.patching import patch_edges

    every = scores.graph.edges()
    flat = scores.flat(metric_name).tolist()
    order = sorted(range(len(every)), key=lambda j: (-abs(flat[j]), j))
    clean, corrupt = scores.clean_metric[metric_name], scores.corrupt_metric[metric_name]
    out = []
    for n in sizes:
        outside = tuple(every[j] for j in sorted(order[n:]))
        effect = patch_edges(model, batch, [outside], metrics=[metric_name], direction="noise", copies=1,
                             resume=False).values[0, 0].item()
        out.append((clean + effect - corrupt) / (clean - corrupt))
    return out


def _at(delta, pos):
    """``delta`` [batch, pos, d_model] kept at position ``pos`` only."""
    kept = torch.zeros_like(delta)
    kept[:, pos] = delta[:, pos]
    return kept


def position_edge_patch_reference(model, batch, edge, direction="denoise", metric_name="logit_diff"):
    """One full forward with receiver input + (a_A(source) - a_A(receiver)) at the edge's position only."""
    delta = _at(sender_delta(model, batch, edge.sender, direction), edge.pos)
    return patch_input_reference(model, batch, edge.receiver, delta, direction, metric_name)


def position_eap_reference(model, batch, edge, direction="denoise", metric_name="logit_diff"):
    """(a_A(source) - a_A(receiver)) . d metric / d input_B, at the edge's position only."""
    delta = sender_delta(model, batch, edge.sender, direction)
    grad = receiver_grad(model, batch, edge.receiver, direction, metric_name)
    return float((delta * grad)[:, edge.pos].sum())
