"""Attribution patching: equality with a plain autograd reference, exactness where the metric is linear."""

import pytest
import torch
from torch import nn

import attrpatch as ap
from attrpatch.model.sites import components
from conftest import N_POS, POST_NORM, random_pairs, tiny_model
from reference import atp_reference

METRICS = list(ap.METRICS)


@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_scores_equal_plain_autograd_reference(family, direction):
    # float64, but RMSNorm (Llama-like families) computes in float32 inside: float32-level tolerance.
    model = tiny_model(family, dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    scores = ap.attribute(model, batch, metrics=["logit_diff", "prob"], direction=direction)
    for m in ("logit_diff", "prob"):
        for site in ap.SITES:
            ref = atp_reference(model, batch, site, direction, m)
            torch.testing.assert_close(scores.values[m][site], ref, atol=1e-5, rtol=1e-5, msg=f"{m} {site}")


def _linear_readout(model):
    """Replace the final norm(s) by the identity (and drop logit soft-capping): the logits are then linear
    in everything the last block adds to the residual stream after its last non-linearity."""
    spec = ap.model_spec(model)
    for path in spec.arch.final:
        parent, _, name = path.rpartition(".")
        if getattr(model.get_submodule(parent), name, None) is not None:
            setattr(model.get_submodule(parent), name, nn.Identity())
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        model.config.final_logit_softcapping = None
    return ap.model_spec(model)


@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_atp_equals_exact_where_metric_is_linear(family, direction):
    model = tiny_model(family)
    spec = _linear_readout(model)
    last = spec.dims.n_layers - 1
    batch = ap.make_batch(random_pairs())
    # Post-norm families normalise the MLP's output (post-feedforward norm): only that output is linear in
    # the logits.
    linear_sites = ["mlp_out"] if family in POST_NORM else ["mlp_out", "neuron"]
    if family in ("gpt_neox", "phi"):  # parallel blocks: nothing after attention in the last block
        linear_sites += ["attn_out", "head"]
    comps = [c for s in linear_sites for per_pos in (True, False)
             for c in components(s, spec.dims, N_POS, per_position=per_pos) if c.layer == last]
    scores = ap.attribute(model, batch, sites=linear_sites, direction=direction)
    eff = ap.patch(model, batch, comps, direction=direction)
    approx = torch.tensor([scores.score(c, "logit_diff") for c in comps])
    assert eff.values[:, 0].abs().max() > 1e-2  # the test has something to compare
    torch.testing.assert_close(approx, eff.values[:, 0], atol=1e-4, rtol=1e-4)


def test_unit_scores_sum_to_their_site():
    """Head scores add up to attn_out's, neuron scores to mlp_out's (the projections are linear)."""
    for family in ("gpt2", "llama", "opt", "phi3", "qwen3"):  # not the post-norm families
        model = tiny_model(family, dtype=torch.float64)
        scores = ap.attribute(model, ap.make_batch(random_pairs()), metrics=METRICS)
        for m in METRICS:
            v = scores.values[m]
            torch.testing.assert_close(v["head"].sum(-1), v["attn_out"], atol=1e-9, rtol=1e-7)
            torch.testing.assert_close(v["neuron"].sum(-1), v["mlp_out"], atol=1e-9, rtol=1e-7)


def test_identical_prompts_give_zero_scores(family):
    model = tiny_model(family)
    pairs = random_pairs()
    for p in pairs:
        p.corrupt_ids = list(p.clean_ids)
    scores = ap.attribute(model, ap.make_batch(pairs), metrics=METRICS)
    for per_site in scores.values.values():
        for t in per_site.values():
            assert t.abs().max() == 0


def test_per_prompt_scores_average_to_mean_and_chunks_agree():
    model = tiny_model("qwen2", dtype=torch.float64)
    batch = ap.make_batch(random_pairs(n=5))
    whole = ap.attribute(model, batch, metrics=["logit_diff", "kl"])
    chunked = ap.attribute(model, batch, metrics=["logit_diff", "kl"], per_prompt=True, batch_size=2)
    for m in ("logit_diff", "kl"):
        for site in ap.SITES:
            torch.testing.assert_close(chunked.values[m][site].mean(0), whole.values[m][site])
    assert chunked.clean_metric == pytest.approx(whole.clean_metric)


def test_backward_computes_no_parameter_gradients():
    model = tiny_model("gpt2")
    ap.attribute(model, ap.make_batch(random_pairs()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scores_accumulate_in_float32(dtype):
    model16 = tiny_model("llama", dtype=dtype)
    model32 = tiny_model("llama")
    batch = ap.make_batch(random_pairs())
    s16 = ap.attribute(model16, batch, sites=["head", "resid_pre"])
    s32 = ap.attribute(model32, batch, sites=["head", "resid_pre"])
    for site in ("head", "resid_pre"):
        assert s16.values["logit_diff"][site].dtype == torch.float32
        pair = torch.stack([s16.values["logit_diff"][site].flatten(), s32.values["logit_diff"][site].flatten()])
        assert torch.corrcoef(pair)[0, 1] > 0.98  # bf16 rounds activations: close, not equal


def test_hooks_are_removed_after_an_error():
    model = tiny_model("gpt2")
    batch = ap.make_batch(random_pairs())
    bad = ap.make_batch(random_pairs())
    object.__setattr__(bad, "answer", torch.tensor([10_000] * bad.n))  # index error inside the metric
    with pytest.raises(Exception):
        ap.attribute(model, bad)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    ap.attribute(model, batch)  # still usable


@pytest.mark.parametrize("family", ["gpt2", "llama", "llama3", "gemma3_text", "qwen3", "olmo2"])
@pytest.mark.parametrize("estimator", ["ig", "graddrop"])
def test_estimators_equal_plain_autograd_reference(family, estimator):
    from reference import graddrop_reference, ig_reference
    model = tiny_model(family, dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    scores = ap.attribute(model, batch, metrics=["logit_diff", "logprob"], estimator=estimator, ig_steps=4)
    for m in ("logit_diff", "logprob"):
        for site in ap.SITES:
            ref = (ig_reference(model, batch, site, metric_name=m, steps=4) if estimator == "ig"
                   else graddrop_reference(model, batch, site, metric_name=m))
            torch.testing.assert_close(scores.values[m][site], ref, atol=1e-5, rtol=1e-5, msg=f"{m} {site}")


def test_ig_converges_to_the_exact_effect():
    """Patching every embedding is running the source: IG's completeness makes its embed score equal that
    effect in the limit; the midpoint rule's error shrinks ~1/k^2."""
    model = tiny_model("gpt2", dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    exact = ap.patch(model, batch, [ap.Component("embed", 0)]).values[0, 0].item()
    errors = []
    for k in (1, 2, 4, 16):
        ig = ap.attribute(model, batch, sites=["embed"], estimator="ig", ig_steps=k)
        errors.append(abs(ig.score(ap.Component("embed", 0), "logit_diff") - exact))
    assert errors[-1] < 1e-2 * abs(exact) and errors[-1] < errors[0] / 10
    assert all(a >= b for a, b in zip(errors, errors[1:]))


def _qk_fix_and_reference(family, every=5):
    """AtP*'s q and k scores and the recomputed-pattern reference, for every ``every``-th component."""
    from reference import qk_fix_reference
    model = tiny_model(family, dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    spec = ap.model_spec(model)
    scores = ap.attribute(model, batch, sites=["q", "k"], estimator="atp_star")
    comps = [c for site in ("q", "k") for c in components(site, spec.dims, N_POS, per_position=True)[::every]]
    return comps, torch.tensor([scores.score(c, "logit_diff") for c in comps]), \
        torch.tensor([qk_fix_reference(model, batch, c) for c in comps])


# Gemma 3's sliding layers, per-kind rope and one KV head; Qwen3's per-head q/k norms; Llama 3's rope scaling
@pytest.mark.parametrize("family", ["gpt2", "llama", "llama3", "gemma2", "gemma3_text", "qwen3"])
def test_qk_fix_equals_recomputed_pattern_reference(family):
    comps, fix, ref = _qk_fix_and_reference(family)
    for c, got, want in zip(comps, fix, ref):
        assert float(got) == pytest.approx(float(want), abs=1e-5), str(c)


def test_qk_fix_only_approximates_olmo2_whose_qk_norms_span_all_heads():
    """OLMo 2 normalises all heads' q_proj (k_proj) output together: patching one head's query also
    rescales the other heads' queries at that position, which the per-head QK fix leaves out. Measured:
    close (correlation > 0.95), not equal."""
    comps, fix, ref = _qk_fix_and_reference("olmo2", every=3)
    assert (fix - ref).abs().max() > 1e-2
    assert torch.corrcoef(torch.stack([fix, ref]))[0, 1] > 0.95


def _saturated_gpt2():
    """Layer 0's queries and keys scaled 25x: every layer-0 softmax is one-hot (max probability ~1)."""
    model = tiny_model("gpt2")
    with torch.no_grad():
        d = model.config.n_embd
        model.transformer.h[0].attn.c_attn.weight[:, : 2 * d] *= 25.0
    return model


def test_atp_star_ranks_a_saturated_key_that_plain_atp_misses():
    model = _saturated_gpt2()
    batch = ap.make_batch(random_pairs(n=4, changed=(2,)))
    spec = ap.model_spec(model)
    keys = [c for c in components("k", spec.dims, N_POS, per_position=False) if c.layer == 0]
    exact = ap.patch(model, batch, keys).values[:, 0]
    plain = ap.attribute(model, batch, sites=["k"])
    star = ap.attribute(model, batch, sites=["k"], estimator="atp_star")
    best = int(exact.abs().argmax())
    assert abs(exact[best]) > 0.1  # patching this key matters ...
    assert abs(plain.score(keys[best], "logit_diff")) < 1e-3  # ... and plain AtP sees nothing
    star_scores = torch.tensor([star.score(c, "logit_diff") for c in keys])
    assert torch.isfinite(star_scores).all()
    assert int(star_scores.abs().argmax()) == best  # AtP* ranks it first, with the right sign
    assert star_scores[best] * exact[best] > 0
