"""TransformerLens on the same weights (GPT-2 family only), for comparison: naive hook patching and hook AtP.
Optional: never a dependency of attrpatch."""

from __future__ import annotations

import sys

import torch

from .common import CLOCKS, Bench, fmt, med


def bench_transformer_lens(b: Bench, pos_comps: list, n_naive: int, repeats: int) -> dict | None:
    """TransformerLens on the same weights (GPT-2 family only): naive hook patching of the per-position head
    subset, and hook-based AtP (cache fwd + bwd). Optional: never a dependency of attrpatch."""
    try:
        import transformer_lens as tl
    except ImportError:
        b.log("TransformerLens not installed: skipped")
        return None
    if b.model.config.model_type != "gpt2":
        print("TransformerLens comparison only wired for the GPT-2 family: skipped", file=sys.stderr)
        return None
    try:
        return _tl_run(tl, b, pos_comps[:n_naive], repeats)
    except Exception as e:  # an optional comparison must never sink the benchmark
        print(f"TransformerLens comparison failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {"error": f"{type(e).__name__}: {e}"}


def _tl_run(tl, b: Bench, comps: list, repeats: int) -> dict:
    try:
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    except ImportError:
        from transformer_lens.loading_from_pretrained import convert_gpt2_weights
    c = b.model.config
    cfg = tl.HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
        normalization_type="LN", eps=c.layer_norm_epsilon, device=str(b.device),
        dtype=next(b.model.parameters()).dtype, default_prepend_bos=False)
    htm = tl.HookedTransformer(cfg)
    htm.load_state_dict(convert_gpt2_weights(b.model, cfg), strict=False)
    htm.eval()
    batch = b.batch.to(b.device)
    rows = torch.arange(batch.n, device=b.device)

    def logit_diff(logits):
        last = logits[rows, batch.last]
        return last[rows, batch.answer] - last[rows, batch.wrong]

    z = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]

    def patch_sweep():
        with torch.no_grad():
            _, clean = htm.run_with_cache(batch.clean, names_filter=lambda n: n.endswith("hook_z"))
            base = logit_diff(htm(batch.corrupt)).mean()
            out = []
            for comp in comps:
                def hook(act, hook, comp=comp):
                    act[:, comp.pos, comp.unit] = clean[hook.name][:, comp.pos, comp.unit]
                    return act
                out.append(float(logit_diff(htm.run_with_hooks(
                    batch.corrupt, fwd_hooks=[(z[comp.layer], hook)])).mean() - base))
        return out

    names = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_z", "mlp.hook_post")
    filt = lambda n: n.endswith(names)  # noqa: E731

    def attribution():  # the usual TransformerLens AtP recipe: clean cache, corrupt cache + grad cache
        with torch.no_grad():
            _, clean = htm.run_with_cache(batch.clean, names_filter=filt)
        acts, grads = {}, {}
        htm.reset_hooks()
        htm.add_hook(filt, lambda t, hook: acts.__setitem__(hook.name, t.detach()), "fwd")
        htm.add_hook(filt, lambda g, hook: grads.__setitem__(hook.name, g.detach()), "bwd")
        htm.requires_grad_(True)
        try:
            with torch.enable_grad():
                logit_diff(htm(batch.corrupt)).sum().backward()
        finally:
            htm.reset_hooks()
            htm.requires_grad_(False)
            htm.zero_grad(set_to_none=True)
        return {k: ((clean[k] - acts[k]) * grads[k]).sum(0) for k in grads}

    res = {"n_patch": len(comps), "patch_seconds": [], "atp_seconds": []}
    for _ in range(repeats):
        b.forward()
        res["patch_seconds"].append(b.timed(patch_sweep)[0])
        b.forward()
        res["atp_seconds"].append(b.timed(attribution)[0])
        b.log(f"  TransformerLens: patch {fmt(res['patch_seconds'][-1])}; AtP {fmt(res['atp_seconds'][-1])}")
    for clock in CLOCKS:
        res[f"patch_per_component_fwd_{clock}"] = med(res["patch_seconds"], clock) / len(comps) / b.unit(clock)
        res[f"atp_fwd_{clock}"] = med(res["atp_seconds"], clock) / b.unit(clock)
    return res
