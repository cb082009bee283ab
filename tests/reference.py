"""Straightforward reference implementations, written for clarity, not speed.

Exact patching: one full ``model(...)`` forward per component, one hook that overwrites the activation.
AtP: for each layer separately, the receiver's activation is swapped for a leaf tensor and
``torch.autograd.grad`` gives the gradient; score = sum over own dims of (source - receiver) * grad.
They share only the module table (which module, input or output, which slice) with attrpatch.
"""

import torch

from attrpatch.engine.metrics import Target, metric
from attrpatch.model.sites import model_spec


def _runs(batch, direction):
    return (batch.clean, batch.corrupt) if direction == "denoise" else (batch.corrupt, batch.clean)


def _last_logits(model, ids, batch):
    logits = model(input_ids=ids, attention_mask=batch.mask).logits
    return logits[torch.arange(ids.shape[0]), batch.last]


def _activation(model, point, ids, batch):
    """The site's normalised activation [batch, pos, ...] on a plain forward."""
    found = {}

    def grab(raw):
        rows = raw.shape[0] if raw.ndim == 3 else raw.shape[0] // batch.n_pos
        found["a"] = point.read(raw, rows, batch.n_pos).detach().clone()

    handle = _hook(point, grab)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=batch.mask)
    finally:
        handle.remove()
    return found["a"]


def _hook(point, fn):
    """fn(raw) -> None or replacement, on the module's first input or its (first) output."""
    if point.io == "input":
        def pre(module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return point.module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(module, args, out):
        raw = out[0] if isinstance(out, tuple) else out
        new = fn(raw)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new
    return point.module.register_forward_hook(post)


def _target(model, batch, direction):
    with torch.no_grad():
        clean = _last_logits(model, batch.clean, batch)
    return Target.from_clean(batch.answer, batch.wrong, clean)


def exact_reference(model, batch, component, direction="denoise", metric_name="logit_diff"):
    """metric(receiver with the component set to its source value) - metric(receiver), mean over prompts."""
    target = _target(model, batch, direction)
    receiver, patched = patched_logits_reference(model, batch, component, direction)
    return float((metric(metric_name, patched, target) - metric(metric_name, receiver, target)).mean())


def patched_logits_reference(model, batch, components, direction="denoise", transform=None):
    """Last-token logits [batch, vocab] of the receiver run, and of the receiver run with every one of
    ``components`` (a Component or a tuple, patched jointly) set to its source value: one plain hook per
    hook point, one full forward. ``transform``: the source value is transform(the clean run's
    activation [batch, pos, ...]) instead (ablations)."""
    spec = model_spec(model)
    components = components if isinstance(components, tuple) else (components,)
    source_ids, receiver_ids = _runs(batch, direction)
    handles = []

    def overwrite(point, source, where):
        def fn(raw):
            new = raw.clone()
            rows = new.shape[0] if new.ndim == 3 else new.shape[0] // batch.n_pos
            point.read(new, rows, batch.n_pos)[(slice(None), *where)] = source[(slice(None), *where)]
            return new
        return fn

    with torch.no_grad():
        receiver = _last_logits(model, receiver_ids, batch)
        points = [spec.hook_point(c.site, c.layer) for c in components]
        sources = [_activation(model, point, source_ids, batch) if transform is None  # all from unpatched runs
                   else transform(_activation(model, point, batch.clean, batch)) for point in points]
        try:
            for c, point, source in zip(components, points, sources):
                handles.append(_hook(point, overwrite(point, source, c.index()[1:])))
            patched = _last_logits(model, receiver_ids, batch)
        finally:
            for h in handles:
                h.remove()
    return receiver, patched


def atp_reference(model, batch, site, direction="denoise", metric_name="logit_diff", *, alpha=0.0,
                  drop_layer=None, per_prompt=False):
    """Per-position AtP scores [layer, pos, (unit)] of ``site``, mean over prompts ([batch, layer, ...] with
    ``per_prompt``), one layer at a time. ``alpha``: the receiver's embeddings are moved that far towards
    the source's (passed as inputs_embeds). ``drop_layer``: that block's attention and MLP outputs are
    detached, so no gradient flows back through them (GradDrop)."""
    spec = model_spec(model)
    source_ids, receiver_ids = _runs(batch, direction)
    target = _target(model, batch, direction)
    embed = spec.module(spec.arch.embed)
    with torch.no_grad():
        start, end = embed(receiver_ids), embed(source_ids)
        inputs = start + alpha * (end - start)
    out = []
    for layer in range(spec.dims.n_layers_of(site)):
        point = spec.hook_point(site, layer)
        source = _activation(model, point, source_ids, batch)
        receiver = _activation(model, point, receiver_ids, batch)
        leaf = {}

        def swap(raw):
            leaf["t"] = raw.detach().clone().requires_grad_(True)
            return leaf["t"]

        embeds = inputs
        if site == "embed":  # inputs_embeds bypass the embedding module: the inputs are the leaf
            embeds = leaf["t"] = inputs.clone().requires_grad_(True)
        handles = [] if site == "embed" else [_hook(point, swap)]
        if drop_layer is not None:
            for s in ("attn_out", "mlp_out"):
                handles.append(_hook(spec.hook_point(s, drop_layer), lambda raw: raw.detach()))
        try:
            logits = model(inputs_embeds=embeds, attention_mask=batch.mask).logits[torch.arange(batch.n), batch.last]
            value = metric(metric_name, logits, target).sum()
        finally:
            for h in handles:
                h.remove()
        (grad,) = torch.autograd.grad(value, leaf["t"], allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(leaf["t"])
        rows = grad.shape[0] if grad.ndim == 3 else grad.shape[0] // batch.n_pos
        g = point.read(grad, rows, batch.n_pos)
        prod = (source - receiver) * g * batch.mask.view(rows, batch.n_pos, *([1] * (g.ndim - 2)))
        out.append(prod if site == "neuron" else prod.sum(-1))  # [batch, pos, (unit)]
    per = torch.stack(out, 1)  # [batch, layer, pos, (unit)]
    return per if per_prompt else per.mean(0)


def ig_reference(model, batch, site, direction="denoise", metric_name="logit_diff", steps=8):
    """Integrated gradients: the mean of AtP over receivers at embeddings alpha = (j + 1/2) / steps."""
    return sum(atp_reference(model, batch, site, direction, metric_name, alpha=(j + 0.5) / steps)
               for j in range(steps)) / steps


def graddrop_reference(model, batch, site, direction="denoise", metric_name="logit_diff"):
    """sign(AtP) * mean over layers l (without l = own layer for in-block sites) of |AtP_l|, per prompt and
    position, then the mean over prompts."""
    spec = model_spec(model)
    n_layers = spec.dims.n_layers
    plain = atp_reference(model, batch, site, direction, metric_name, per_prompt=True)
    total = torch.zeros_like(plain)
    for drop in range(n_layers):
        per = atp_reference(model, batch, site, direction, metric_name, drop_layer=drop, per_prompt=True).abs()
        if site not in ("embed", "resid_pre"):
            per[:, drop] = 0  # dropping a component's own write is left out
        total += per
    n_passes = n_layers if site in ("embed", "resid_pre") else n_layers - 1
    return (torch.sign(plain) * total / n_passes).mean(0)


def qk_fix_reference(model, batch, component, direction="denoise", metric_name="logit_diff"):
    """AtP*'s QK fix for one q or k component, from HF's own eager attention: the receiver's pattern A and
    G = d metric / d A at the component's layer (output_attentions), the pattern A' of a receiver run
    with the component's projection output set to its source value; score = sum (A' - A) * G, mean over
    prompts. Only the component's layer's pattern changes, so A' is the exactly recomputed softmax."""
    spec = model_spec(model)
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        point = spec.hook_point(component.site, component.layer)
        source_ids, receiver_ids = _runs(batch, direction)
        source = _activation(model, point, source_ids, batch)
        target = _target(model, batch, direction)
        out = model(input_ids=receiver_ids, attention_mask=batch.mask, output_attentions=True)
        pattern = out.attentions[component.layer]
        value = metric(metric_name, out.logits[torch.arange(batch.n), batch.last], target).mean()
        (grad,) = torch.autograd.grad(value, pattern)
        where = component.index()[1:]

        def overwrite(raw):
            new = raw.clone()
            rows = new.shape[0] if new.ndim == 3 else new.shape[0] // batch.n_pos
            point.read(new, rows, batch.n_pos)[(slice(None), *where)] = source[(slice(None), *where)]
            return new

        handle = _hook(point, overwrite)
        try:
            with torch.no_grad():
                patched = model(input_ids=receiver_ids, attention_mask=batch.mask, output_attentions=True)
        finally:
            handle.remove()
        change = patched.attentions[component.layer] - pattern.detach()
        return float((change * grad).sum())  # grad is of the mean over prompts
    finally:
        model.set_attn_implementation(before)


ABLATED = {"zero": lambda a: torch.zeros_like(a),  # the source value of each ablation, from the clean run's
           "mean": lambda a: a.mean(0, keepdim=True).expand_as(a).clone(),
           "resample": lambda a: torch.cat([a[1:], a[:1]])}  # prompt i takes prompt i + 1's


def ablation_reference(model, batch, component, ablation, metric_name="logit_diff"):
    """metric(clean run with the component ablated) - metric(clean run), mean over prompts."""
    target = _target(model, batch, "noise")
    receiver, patched = patched_logits_reference(model, batch, component, "noise", transform=ABLATED[ablation])
    return float((metric(metric_name, patched, target) - metric(metric_name, receiver, target)).mean())
