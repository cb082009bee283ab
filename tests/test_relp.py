"""RelP: each LRP rule against a hand-written reference forward, RelP == AtP where the rules change nothing."""

import pytest
import torch
from torch import nn

import attrpatch as ap
from attrpatch.methods.estimators import relp
from conftest import POST_NORM, random_pairs, tiny_model
from relp_reference import relp_reference

REFERENCE_SITES = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")
RULE_SETS = [("norm",), ("act",), ("half",), ("pattern",), relp.DEFAULT_RULES, relp.RULES]


@pytest.mark.parametrize("rules", RULE_SETS, ids="+".join)
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_relp_equals_hand_written_rules_reference(family, rules):
    # float64; Llama's RMSNorm and the pattern rule's eager softmax compute in float32 inside
    model = tiny_model(family, dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    for direction in ap.DIRECTIONS:
        scores = ap.attribute(model, batch, sites=REFERENCE_SITES, estimator="relp", relp_rules=rules,
                              direction=direction)
        atp = ap.attribute(model, batch, sites=REFERENCE_SITES, direction=direction)
        for site in REFERENCE_SITES:
            ref = relp_reference(model, batch, site, rules, direction)
            got = scores.values["logit_diff"][site]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"{direction} {site}")
        changed = max(float((scores.values["logit_diff"][s] - atp.values["logit_diff"][s]).abs().max())
                      for s in REFERENCE_SITES)
        # the rule does something wherever its non-linearity exists (GPT-2 and NeoX have no gated product)
        assert changed > 1e-3 or (rules == ("half",) and family != "llama"), changed


def test_relp_without_rules_is_atp(family):
    model = tiny_model(family, dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    plain = ap.attribute(model, batch, metrics=["logit_diff", "kl"])
    none = ap.attribute(model, batch, metrics=["logit_diff", "kl"], estimator="relp", relp_rules=())
    for m in ("logit_diff", "kl"):
        for site in ap.SITES:
            assert torch.equal(plain.values[m][site], none.values[m][site]), f"{m} {site}"


def _linear_gpt2():
    """GPT-2 whose every rule is the identity: no norms, a linear activation, uniform attention (q = k = 0)."""
    model = tiny_model("gpt2", dtype=torch.float64, activation_function="linear")
    t = model.transformer
    for block in t.h:
        block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
        with torch.no_grad():
            d = model.config.n_embd
            block.attn.c_attn.weight[:, : 2 * d] = 0
            block.attn.c_attn.bias[: 2 * d] = 0
    t.ln_f = nn.Identity()
    return model


def test_relp_equals_atp_on_a_linear_toy():
    model = _linear_gpt2()
    batch = ap.make_batch(random_pairs())
    plain = ap.attribute(model, batch, sites=REFERENCE_SITES)
    rel = ap.attribute(model, batch, sites=REFERENCE_SITES, estimator="relp", relp_rules=relp.RULES)
    for site in REFERENCE_SITES:
        assert plain.values["logit_diff"][site].abs().max() > 1e-2
        torch.testing.assert_close(rel.values["logit_diff"][site], plain.values["logit_diff"][site],
                                   atol=1e-6, rtol=1e-6, msg=site)


def test_relp_scores_every_site_of_every_family(family):
    """Rule hooks run before site hooks on the same module (Gemma 2's attn_out is a norm's output; a
    gated MLP's product is the neuron site): every site still receives its gradient, and neurons still
    add up to the MLP output where the projection is linear."""
    model = tiny_model(family, dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    v = ap.attribute(model, batch, estimator="relp").values["logit_diff"]
    for site in ap.SITES:
        assert v[site].abs().max() > 1e-4, site
    fixed = ap.attribute(model, batch, sites=["q", "k", "v"], estimator="relp", relp_rules=relp.RULES)
    assert all(fixed.values["logit_diff"][s].abs().max() == 0 for s in ("q", "k"))  # they act via the pattern
    assert fixed.values["logit_diff"]["v"].abs().max() > 1e-4
    if family not in (*POST_NORM, "opt"):  # post-norm after the MLP; OPT's fc2 is both sites
        torch.testing.assert_close(v["neuron"].sum(-1), v["mlp_out"], atol=1e-9, rtol=1e-7)


def test_relp_leaves_the_model_as_it_was():
    model = tiny_model("llama")
    before = model.config._attn_implementation
    ap.attribute(model, ap.make_batch(random_pairs()), estimator="relp", relp_rules=relp.RULES)
    assert model.config._attn_implementation == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_unknown_rule_names_the_valid_rules():
    with pytest.raises(ValueError, match=r"Unknown RelP rule\(s\) \['ln'\]; known: norm, act, half, pattern"):
        ap.attribute(tiny_model("gpt2"), ap.make_batch(random_pairs()), estimator="relp", relp_rules=("ln",))
