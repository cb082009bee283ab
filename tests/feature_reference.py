"""Naive reference for dictionary latents: the dictionary written out densely in a plain hook, one full
``model(...)`` forward per patched component. Shares with attrpatch only the hook-point table and the
Dictionary's weights; encode and decode are written here from the formulas. A transcoder reads its input in
a second plain hook (the MLP norm's input for resid_mid, the MLP's input for mlp_in), found here from the
family's Arch row."""

import torch

from attrpatch.engine.metrics import Target, metric
from attrpatch.model.dictionaries import Dictionary
from attrpatch.model.sites import model_spec
from reference import _hook, _last_logits, _runs


def encode(d: Dictionary, x):
    """ReLU / JumpReLU / TopK latents of x [batch, pos, d_model], no input normalisation: [batch, pos, d_sae]."""
    pre = (x - d.b_dec * d.apply_b_dec_to_input) @ d.W_enc + d.b_enc
    if d.architecture == "topk":
        kth = pre.topk(d.k, dim=-1).values[..., -1:]
        return torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre))
    if d.architecture == "jumprelu":
        return torch.where(pre > d.threshold, pre.relu(), torch.zeros_like(pre))
    return pre.relu()


def decode(d: Dictionary, f):
    return f @ d.W_dec + d.b_dec


def _input_module(spec, d):
    """The module whose input a transcoder reads (None for an SAE: it reads what it writes)."""
    if d.out_site is None:
        return None
    return spec.module(spec.arch.mlp_norm if d.site == "resid_mid" else spec.arch.mlp_out, d.layer)


def _dictionary_run(model, d, ids, batch, edit=None):
    """Last-token logits with ``d`` spliced in at its (written) hook point; edit(f, error) -> (f, error)
    changes the latents and error before decoding. Returns (logits, f, error) of the run."""
    spec = model_spec(model)
    point = spec.hook_point(d.out_site or d.site, d.layer)
    seen = {}

    def read_input(module, args, kwargs):
        raw = args[0] if args else kwargs["hidden_states"]
        seen["x_in"] = raw.view(batch.n, batch.n_pos, -1) if raw.ndim == 2 else raw

    def fn(raw):
        y = raw.view(batch.n, batch.n_pos, -1) if raw.ndim == 2 else raw  # [batch, pos, d_model]
        f = encode(d, seen.get("x_in", y))
        error = y - decode(d, f)
        seen["f"], seen["error"] = f, error
        if edit is not None:
            f, error = edit(f.clone(), error.clone())
        return (decode(d, f) + error).view(raw.shape)

    reader = _input_module(spec, d)
    handles = [] if reader is None else [reader.register_forward_pre_hook(read_input, with_kwargs=True)]
    handles.append(_hook(point, fn))
    try:
        with torch.no_grad():
            logits = _last_logits(model, ids, batch)
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen["f"], seen["error"]


def feature_effect_reference(model, d, batch, component, direction="denoise", metric_name="logit_diff"):
    """metric(receiver with the latent / error at (pos) set to the source run's) - metric(receiver)."""
    source_ids, receiver_ids = _runs(batch, direction)
    with torch.no_grad():
        clean = _last_logits(model, batch.clean, batch)
    target = Target.from_clean(batch.answer, batch.wrong, clean)
    _, source_f, source_error = _dictionary_run(model, d, source_ids, batch)
    pos = slice(None) if component.pos is None else component.pos

    def edit(f, error):
        if component.site == "feature":
            f[:, pos, component.unit] = source_f[:, pos, component.unit]
        else:
            error[:, pos] = source_error[:, pos]
        return f, error
    with torch.no_grad():
        receiver = _last_logits(model, receiver_ids, batch)
    patched, _, _ = _dictionary_run(model, d, receiver_ids, batch, edit)
    return float((metric(metric_name, patched, target) - metric(metric_name, receiver, target)).mean())
