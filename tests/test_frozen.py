"""Patching with attention patterns or norm scales frozen at the receiver's (methods/patching/frozen.py), and the causes
named from it (analysis/causes.py frozen_causes): planted models whose only non-linearity is known."""

import pytest
import torch
from torch import nn

import attrpatch as ap
from attrpatch.analysis.causes import frozen_causes
from attrpatch.methods.patching.frozen import frozen_effects
from attrpatch.methods.patching.passes import same_prefix
from attrpatch.model.sites import components
from conftest import N_POS, random_pairs, tiny_model

SITES = ("resid_pre", "attn_out", "mlp_out", "head")


def _gpt2(norms: bool, attention: bool):
    """float64 GPT-2 with a linear MLP; norms kept or removed; attention sharp (q, k x4) or uniform (q = k = 0)."""
    model = tiny_model("gpt2", dtype=torch.float64, activation_function="linear")
    d = model.config.n_embd
    for block in model.transformer.h:
        if not norms:
            block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
        with torch.no_grad():
            block.attn.c_attn.weight[:, : 2 * d] *= 4.0 if attention else 0.0
            block.attn.c_attn.bias[: 2 * d] *= 4.0 if attention else 0.0
    if not norms:
        model.transformer.ln_f = nn.Identity()
    return model


def _comps(model):
    dims = ap.model_spec(model).dims
    return [c for s in SITES for c in components(s, dims, N_POS, per_position=s != "head")]


def _measure(model, comps, freeze, direction="denoise"):
    """(AtP, exact, frozen slope, frozen effect) per component, [component] each."""
    batch = ap.make_batch(random_pairs(n=3))
    atp = ap.attribute(model, batch, sites=SITES, direction=direction)
    frozen_slope = ap.attribute(model, batch, sites=SITES, direction=direction, estimator="relp",
                                relp_rules=(freeze,))
    exact = ap.patch(model, batch, comps, direction=direction).values[:, 0].double()
    effect, passes = frozen_effects(model, batch, comps, freeze=freeze, direction=direction, copies=5)
    same = same_prefix(batch) if freeze == "pattern" else 0  # patches there change nothing: no copy
    assert same == (1 if freeze == "pattern" else 0)
    assert passes["patched_rows"] == sum(c.pos is None or c.pos >= same for c in comps)
    take = lambda s: torch.tensor([s.score(c, "logit_diff") for c in comps], dtype=torch.float64)  # noqa: E731
    return take(atp), exact, take(frozen_slope), effect


@pytest.mark.parametrize("freeze, norms, attention", [("pattern", False, True), ("norm", True, False)])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_freezing_the_only_non_linearity_makes_the_patch_exactly_linear(freeze, norms, attention, direction):
    """With the model's one non-linearity frozen, g is linear: g(1) - g(0) == g'(0) (RelP with that rule)."""
    model = _gpt2(norms=norms, attention=attention)
    comps = _comps(model)
    atp, exact, slope, effect = _measure(model, comps, freeze, direction)
    assert (atp - exact).abs().max() > 1e-2  # the planted non-linearity bends the plain patch
    torch.testing.assert_close(effect, slope, atol=1e-6, rtol=1e-5)  # ratio y/x: rounding where x ~ 0


def test_freezing_what_does_not_move_changes_nothing():
    """Uniform attention (q = k = 0) never changes: the frozen-pattern patch is the plain patch."""
    model = tiny_model("gpt2", dtype=torch.float64)
    d = model.config.n_embd
    for block in model.transformer.h:
        with torch.no_grad():
            block.attn.c_attn.weight[:, : 2 * d] = 0
            block.attn.c_attn.bias[: 2 * d] = 0
    comps, batch = _comps(model), ap.make_batch(random_pairs(n=3))
    exact = ap.patch(model, batch, comps).values[:, 0].double()
    effect, _ = frozen_effects(model, batch, comps, freeze="pattern")
    torch.testing.assert_close(effect, exact, atol=1e-6, rtol=1e-5)  # the eager softmax runs in float32


def test_the_frozen_measurement_names_the_planted_non_linearity():
    """Attention is the only non-linearity: freezing it removes AtP's whole error, freezing norms (none
    here) removes nothing; the cause names attention with both errors."""
    model = _gpt2(norms=False, attention=True)
    comps = _comps(model)
    atp, exact, slope_p, effect_p = _measure(model, comps, "pattern")
    _, _, slope_n, effect_n = _measure(model, comps, "norm")
    worst = int((atp - exact).abs().argmax())
    frozen = {"pattern": (float(slope_p[worst]), float(effect_p[worst])),
              "norm": (float(slope_n[worst]), float(effect_n[worst]))}
    causes = frozen_causes(float(exact[worst]), float(atp[worst]), frozen)
    assert len(causes) == 1 and causes[0].startswith("attention pattern change: with the attention patterns frozen")
    assert "(100% removed)" in causes[0]
    none = frozen_causes(float(exact[worst]), float(atp[worst]), {"norm": frozen["norm"]})
    assert none[0].startswith("neither frozen non-linearity carries it")


def test_frozen_patching_runs_on_every_family(family):
    """Rotary, GQA, RMSNorm, q/k norms, post-norms, soft-capping: finite effects; a pattern-frozen patch of the
    last layer's MLP output equals the plain one (no attention after it)."""
    model = tiny_model(family, dtype=torch.float64)
    batch, dims = ap.make_batch(random_pairs(n=3)), ap.model_spec(model).dims
    comps = [c for c in components("mlp_out", dims, N_POS, per_position=True) if c.layer == dims.n_layers - 1]
    plain = ap.patch(model, batch, comps).values[:, 0].double()
    for freeze in ("pattern", "norm"):
        effect, _ = frozen_effects(model, batch, comps + _comps(model)[:5], freeze=freeze)
        assert torch.isfinite(effect).all()
        if freeze == "pattern":
            torch.testing.assert_close(effect[:len(comps)], plain, atol=1e-6, rtol=1e-5)  # the eager softmax runs in float32


def test_unknown_freeze_is_refused():
    with pytest.raises(ValueError, match="Unknown freeze 'mlp'; known: pattern, norm"):
        frozen_effects(tiny_model("gpt2"), ap.make_batch(random_pairs()), [], freeze="mlp")


def test_chunks_of_prompts_give_the_same_frozen_effects():
    model = tiny_model("gpt2", dtype=torch.float64)
    batch, comps = ap.make_batch(random_pairs(n=5)), _comps(model)[::4]
    for freeze in ("pattern", "norm"):
        whole, _ = frozen_effects(model, batch, comps, freeze=freeze)
        chunked, passes = frozen_effects(model, batch, comps, freeze=freeze, batch_size=2, copies=3)
        torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=1e-10)
        assert passes["runs"] == 6  # source and receiver per chunk of 2, 2, 1 prompts
