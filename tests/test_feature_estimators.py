"""Estimators other than AtP for dictionary latents (issue 26): IG (the gradient averaged over ig.py's
interpolated runs, as Marks et al. 2024 score latents and error terms), RelP and GIM (their modified
backward); GradDrop and AtP* refused. Tiny random models of two families."""

import pytest
import torch

import attrpatch as ap
from attrpatch.config import ScreenConfig
from attrpatch.feature_screening import feature_estimators, screen_features
from attrpatch.methods.estimators.features import FEATURE_ESTIMATORS
from conftest import random_pairs, tiny_model
from test_features import assert_score_equals_exact_when_linear, random_dictionary
from test_transcoders import random_transcoder

FAMILIES = ("gpt2", "llama")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("direction", ap.DIRECTIONS)
@pytest.mark.parametrize("kind", ("sae", "transcoder"))
def test_ig_of_latents_equals_atp_and_exact_where_the_metric_is_linear(family, direction, kind):
    # the gradient at a latent of the last MLP's output is one constant on every interpolated run
    d = (random_dictionary("mlp_out", 2, dtype=torch.float64) if kind == "sae"
         else random_transcoder("mlp_in", 2, dtype=torch.float64))
    assert_score_equals_exact_when_linear(family, d, direction, estimator="ig", ig_steps=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_ig_of_every_latent_and_error_converges_to_patching_the_embeddings(family):
    # an SAE at resid_pre 0 reads the embeddings ig.py interpolates: its latents' and error's IG scores, all
    # positions, add up to IG of the embeddings, which converges to the exact effect of patching every
    # position of resid_pre 0, on a metric that is not linear in them (not monotonically: the tiny llama's
    # path has a sharp turn that 32 midpoints miss, 128 do not)
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs())
    d = random_dictionary("resid_pre", 0, "topk", dtype=torch.float64)
    exact = float(ap.patch(model, batch, [ap.Component("resid_pre", 0, None)]).values[0, 0])
    errors = []
    for steps in (1, 128):
        scores = ap.attribute(model, batch, sites=["embed"], dictionaries=[d], estimator="ig", ig_steps=steps)
        f = scores.features
        total = f.values["logit_diff"][d.hook].sum() + f.error["logit_diff"][d.hook].sum()
        torch.testing.assert_close(total, scores.values["logit_diff"]["embed"].sum(), atol=1e-10, rtol=1e-8)
        errors.append(abs(float(total) - exact))
    assert abs(exact) > 0.1 and errors[0] > 0.1 * abs(exact) and errors[1] < 1e-3 * abs(exact)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("estimator", [e for e in FEATURE_ESTIMATORS if e != "atp"])
@pytest.mark.parametrize("site", ("resid_pre", "mlp_out"))
def test_latent_and_error_scores_add_up_to_the_sites_score_under_each_estimator(family, estimator, site):
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs())
    d = random_dictionary(site, 1, "topk", dtype=torch.float64)
    scores = ap.attribute(model, batch, sites=[site], dictionaries=[d], estimator=estimator, ig_steps=3)
    f = scores.features
    total = f.values["logit_diff"][d.hook].sum(1) + f.error["logit_diff"][d.hook]  # [pos]
    assert f.estimator == estimator and total.abs().max() > 1e-3
    torch.testing.assert_close(total, scores.values["logit_diff"][site][1], atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("estimator", ("graddrop", "atp_star"))
def test_estimators_of_several_labelled_passes_are_refused_for_latents(estimator):
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs())
    with pytest.raises(ValueError, match=rf"estimator atp \| ig \| relp .*got estimator='{estimator}'"):
        ap.attribute(model, batch, sites=[], dictionaries=[random_dictionary()], estimator=estimator)


def test_the_feature_screen_ranks_by_the_screens_estimator():
    assert feature_estimators(ScreenConfig(estimator="graddrop")) == ["atp"]
    assert feature_estimators(ScreenConfig(estimator="ig")) == ["ig", "atp"]
    model, batch = tiny_model("llama"), ap.make_batch(random_pairs())
    found = screen_features(model, batch, [random_dictionary("resid_pre", 1, "topk")],
                            ScreenConfig(top_k=4, random_k=2, sites=("resid_pre",), estimator="ig", ig_steps=2))
    assert found.estimator == "ig" and all(r["approx"] == r["ig"] and "atp" in r for r in found.rows)
    assert [r["rank_approx"] for r in found.rows[:4]] == [1, 2, 3, 4]
    assert set(found.agreement["denoise"]["L1.resid_pre"]["pearson_by_estimator"]) == {"ig", "atp"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ("sae", "transcoder"))
def test_ig_along_a_dictionarys_own_line_adds_up_to_patching_its_written_point(family, kind):
    # Marks et al.'s IG: the dictionary's latents and error move together, so their scores add up to the
    # exact effect of patching the point it writes (midpoint rule: O(1/steps^2)), on a non-linear metric
    from attrpatch.methods.estimators.feature_ig import feature_ig
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs())
    d = (random_dictionary("resid_pre", 1, "topk", dtype=torch.float64) if kind == "sae"
         else random_transcoder("resid_mid", 1, "topk", dtype=torch.float64))
    exact = float(ap.patch(model, batch, [ap.Component(d.writes, 1, None)]).values[0, 0])
    errors = []
    for steps in (1, 64):
        f = feature_ig(model, batch, [d], steps=steps)
        total = f.values["logit_diff"][d.hook].sum() + f.error["logit_diff"][d.hook].sum()
        errors.append(abs(float(total) - exact))
    assert abs(exact) > 0.05 and errors[1] < 1e-3 * abs(exact) and errors[1] < errors[0]


@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_ig_along_a_dictionarys_own_line_is_exact_where_the_metric_is_linear(direction):
    from attrpatch.methods.estimators.feature_ig import feature_ig
    from attrpatch.methods.patching.features import patch_features
    from test_attribute import _linear_readout
    model = tiny_model("llama", dtype=torch.float64)
    _linear_readout(model)
    batch, d = ap.make_batch(random_pairs()), random_transcoder("mlp_in", 2, dtype=torch.float64)
    f = feature_ig(model, batch, [d], direction=direction, steps=2)
    comps = f.components("logit_diff")
    eff = patch_features(model, batch, [d], comps, direction=direction, copies=16)
    approx = torch.tensor([f.score(c, "logit_diff") for c in comps], dtype=torch.float64)
    assert eff.values[:, 0].abs().max() > 1e-2
    torch.testing.assert_close(approx, eff.values[:, 0], atol=1e-9, rtol=1e-7)
