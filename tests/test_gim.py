"""GIM: each rule against a hand-written reference forward (GPT-2, Llama, Gemma 2), the forward unchanged to
the bit, GIM with every rule off == AtP, and the RelP combination."""

import pytest
import torch

import attrpatch as ap
from attrpatch.methods.estimators import gim, relp
from attrpatch.methods.edges.eap import attribute_edges
from attrpatch.model.sites import as_spec
from conftest import FAMILIES, random_pairs, tiny_model
from gim_reference import FORWARDS
from relp_reference import relp_reference

SITES = ("resid_pre", "attn_out", "mlp_out", "head", "neuron", "q", "k", "v")
OFF = gim.GimRules.off()
RULE_SETS = {"norm": gim.GimRules(norm=True, temperature=1.0, q=1.0, k=1.0, v=1.0),
             "temperature": gim.GimRules(norm=False, temperature=2.0, q=1.0, k=1.0, v=1.0),
             "qkv": gim.GimRules(norm=False, temperature=1.0, q=0.25, k=0.25, v=0.5),
             "all": gim.GimRules(), "T=0.5": gim.GimRules(temperature=0.5, q=0.3, k=2.0, v=1.0)}


@pytest.mark.parametrize("rules", RULE_SETS.values(), ids=RULE_SETS.keys())
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_gim_equals_the_hand_written_rules_reference(family, rules):
    # float64; Llama's RMSNorm and Gemma's eager softmax compute in float32 inside
    model = tiny_model(family, dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    for direction in ap.DIRECTIONS:
        scores = ap.attribute(model, batch, sites=SITES, estimator="gim", gim_rules=rules, direction=direction)
        atp = ap.attribute(model, batch, sites=SITES, direction=direction)
        for site in SITES:
            ref = relp_reference(model, batch, site, rules, direction, forwards=FORWARDS)
            got = scores.values["logit_diff"][site]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"{direction} {site}")
        changed = max(float((scores.values["logit_diff"][s] - atp.values["logit_diff"][s]).abs().max()) for s in SITES)
        assert changed > 1e-3, changed  # each rule does something


def test_the_reference_without_rules_is_the_model():
    """gim_reference's forwards are the models' own (so the rule tests above test the rules)."""
    for family in FORWARDS:
        model = tiny_model(family, dtype=torch.float64)
        ids = torch.tensor([p.clean_ids for p in random_pairs()])
        with torch.no_grad():
            own = model(ids).logits
            hand = FORWARDS[family](model, ids, (), lambda s, i, t: t)
        torch.testing.assert_close(hand, own, atol=1e-5, rtol=1e-5, msg=family)  # float32 norms inside


def test_gim_with_every_rule_off_is_atp(family):
    model = tiny_model(family, dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    plain = ap.attribute(model, batch, metrics=["logit_diff", "kl"])
    off = ap.attribute(model, batch, metrics=["logit_diff", "kl"], estimator="gim", gim_rules=OFF)
    for m in ("logit_diff", "kl"):
        for site in ap.SITES:
            assert torch.equal(plain.values[m][site], off.values[m][site]), f"{m} {site}"


def test_the_attention_route_with_identity_rules_has_the_plain_gradient(family):
    """With temperature 1 and factors 1 forced through the routed attention, the gradient is the model's
    (padded prompts: the masks of eager and sdpa both reach the rules' eager re-computation)."""
    model = tiny_model(family, dtype=torch.float64)
    spec = as_spec(model)
    batch = ap.make_batch(random_pairs(lengths=[7, 5, 6]))

    def grad():
        embeds = model.get_input_embeddings()(batch.clean).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=batch.mask).logits
        return torch.autograd.grad(logits[torch.arange(batch.n), batch.last, :5].sum(), embeds)[0]
    plain = grad()
    with gim.attention_rules(spec, OFF):
        routed = grad()
    torch.testing.assert_close(routed, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lengths", [None, [7, 5, 6]], ids=["full", "padded"])
def test_gim_leaves_every_forward_value_unchanged_to_the_bit(family, lengths):
    model = tiny_model(family)
    batch = ap.make_batch(random_pairs(lengths=lengths))
    spec = as_spec(model)
    with torch.no_grad():
        plain = model(batch.clean, attention_mask=batch.mask).logits
    for extra in ((), ("act", "half")):
        with torch.enable_grad(), gim.modifying(spec, gim.GimRules(), extra):
            ruled = model(batch.clean, attention_mask=batch.mask).logits
        assert ruled.requires_grad and torch.equal(ruled, plain), extra
    atp = ap.attribute(model, batch, sites=["resid_pre"])
    ruled = ap.attribute(model, batch, sites=["resid_pre"], estimator="gim")
    assert (ruled.clean_metric, ruled.corrupt_metric) == (atp.clean_metric, atp.corrupt_metric)


def test_gim_scores_every_site_of_every_family_and_leaves_the_model_as_it_was(family):
    model = tiny_model(family, dtype=torch.float64)
    before = model.config._attn_implementation
    batch = ap.make_batch(random_pairs())
    for estimator in ("gim", "relp_gim"):
        v = ap.attribute(model, batch, estimator=estimator).values["logit_diff"]
        for site in ap.SITES:
            assert v[site].abs().max() > 1e-4, f"{estimator} {site}"
    assert model.config._attn_implementation == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_relp_gim_is_relp_plus_the_attention_rules():
    model = tiny_model("llama", dtype=torch.float64)
    batch = ap.make_batch(random_pairs())

    def run(estimator, **kw):
        return ap.attribute(model, batch, estimator=estimator, **kw).values["logit_diff"]
    both, only_norm, plain_gim = run("relp_gim"), run("relp_gim", relp_rules=("norm",)), run("gim")
    as_relp, plain_relp = run("relp_gim", gim_rules=OFF), run("relp")
    for site in ap.SITES:
        assert torch.equal(only_norm[site], plain_gim[site]), site  # GIM's norm rule is RelP's
        assert torch.equal(as_relp[site], plain_relp[site]), site
    assert max(float((both[s] - plain_gim[s]).abs().max()) for s in ap.SITES) > 1e-3


def test_relp_t4_is_relp_with_the_temperature_rule_at_4_alone():
    """The named variant is exactly the graded combination "relp + gim temperature 4" (docs/estimators.md)."""
    model = tiny_model("llama", dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    named = ap.attribute(model, batch, estimator="relp_t4").values["logit_diff"]
    graded = ap.attribute(model, batch, estimator="relp_gim",
                          gim_rules=gim.GimRules(temperature=4, q=1, k=1, v=1)).values["logit_diff"]
    other = ap.attribute(model, batch, estimator="relp_gim").values["logit_diff"]
    for site in ap.SITES:
        assert torch.equal(named[site], graded[site]), site
    assert max(float((named[s] - other[s]).abs().max()) for s in ap.SITES) > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_gim_edge_scores_out_of_a_sender_sum_to_its_node_score(family):
    model = tiny_model(family, dtype=torch.float64)
    batch = ap.make_batch(random_pairs(3))
    for estimator in ("gim", "relp_gim", "relp_t4"):
        edges = attribute_edges(model, batch, estimator=estimator)
        scores, graph = edges.values["logit_diff"], edges.graph
        node = ap.attribute(model, batch, sites=["resid_pre", "head", "mlp_out"],
                            estimator=estimator).values["logit_diff"]
        assert scores[0].sum().item() == pytest.approx(node["resid_pre"][0].sum().item(), abs=1e-6)  # embed
        for layer in range(3):
            heads = scores[[graph.sender_index[f"L{layer}H{h}"] for h in range(4)]].sum(1)
            torch.testing.assert_close(heads, node["head"][layer].sum(0).to(heads.dtype), atol=1e-6, rtol=1e-6)
            mlp = scores[graph.sender_index[f"L{layer}.mlp"]].sum().item()
            assert mlp == pytest.approx(node["mlp_out"][layer].sum().item(), abs=1e-6)
        assert not torch.equal(scores, attribute_edges(model, batch).values["logit_diff"])


def test_bad_rules_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"GIM temperature must be a finite number > 0 \(1: the plain softmax "
                                         r"gradient\), got 0"):
        gim.GimRules(temperature=0)
    with pytest.raises(ValueError, match=r"GIM gradient factor q must be finite \(1: off\), got nan"):
        gim.GimRules(q=float("nan"))
    with pytest.raises(TypeError, match=r"takes 1 positional argument"):
        gim.GimRules(True)  # keyword-only
    with pytest.raises(ValueError, match="RelP's pattern rule detaches the attention pattern"):
        ap.attribute(tiny_model("gpt2"), ap.make_batch(random_pairs()), estimator="relp_gim",
                     relp_rules=relp.RULES)
