"""The feature report's intervals, flags and measured causes (issue 26), as the node report has them:
per-prompt latent scores and effects, bootstrap intervals over prompt pairs, flags for disagreements and,
for each large error or sign flip, the half patch and its measured cause. Tiny random models."""

import pytest
import torch

import attrpatch as ap
from attrpatch.analysis.causes import NO_CAUSE
from attrpatch.config import ScreenConfig
from attrpatch.feature_screening import screen_features
from attrpatch.methods.patching.features import patch_features
from attrpatch.output.features import features_markdown
from conftest import random_pairs, tiny_model
from test_attribute import _linear_readout
from test_features import random_dictionary
from test_transcoders import random_transcoder


@pytest.mark.parametrize("estimator", ("atp", "ig"))
def test_per_prompt_feature_scores_average_to_the_scores(estimator):
    model, batch = tiny_model("gpt2", dtype=torch.float64), ap.make_batch(random_pairs(n=5))
    ds = [random_dictionary("resid_pre", 1, "topk", dtype=torch.float64),
          random_transcoder("mlp_in", 1, dtype=torch.float64)]
    f = ap.attribute(model, batch, sites=[], dictionaries=ds, estimator=estimator, ig_steps=2, batch_size=2,
                     metrics=["logit_diff", "prob"], feature_prompts=True).features
    for m in ("logit_diff", "prob"):
        comps = [c for per_pos in (True, False) for c in f.components(m, per_position=per_pos)][::5]
        per = torch.stack([f.per_prompt(c, m) for c in comps])  # [component, batch]
        assert per.shape == (len(comps), 5) and per.abs().max() > 1e-4
        torch.testing.assert_close(per.mean(1), torch.tensor([f.score(c, m) for c in comps], dtype=torch.float64))
    with pytest.raises(ValueError, match="feature_prompts=True"):
        ap.attribute(model, batch, sites=[], dictionaries=ds[:1]).features.per_prompt(comps[0], "logit_diff")


def test_half_patches_and_per_prompt_effects_of_latents():
    model = tiny_model("llama", dtype=torch.float64)
    _linear_readout(model)  # the metric is linear in the last MLP's latents: half the patch, half the effect
    batch, d = ap.make_batch(random_pairs()), random_dictionary("mlp_out", 2, dtype=torch.float64)
    comps = ap.attribute(model, batch, sites=[], dictionaries=[d]).features.components("logit_diff")[-12:]
    full = patch_features(model, batch, [d], comps, per_prompt=True, copies=5)
    half = patch_features(model, batch, [d], comps, alpha=0.5)
    assert full.per_prompt.shape == (len(comps), 1, batch.n) and full.values.abs().max() > 1e-2
    torch.testing.assert_close(full.per_prompt.mean(-1), full.values)
    torch.testing.assert_close(half.values, full.values / 2, atol=1e-10, rtol=1e-8)
    assert patch_features(model, batch, [d], comps, alpha=0.0).values.abs().max() < 1e-12


def test_feature_screen_rows_carry_intervals_flags_and_measured_causes():
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs(n=6))
    ds = [random_dictionary("resid_pre", 1, "topk"), random_transcoder("resid_mid", 1, "topk")]
    found = screen_features(model, batch, ds, ScreenConfig(top_k=6, random_k=3, sites=("resid_pre",),
                                                           direction="both", estimator="all", ig_steps=2)).to_dict()
    rows = found["rows"]
    assert all(r["exact_ci"][0] <= r["exact_logit_diff"] <= r["exact_ci"][1] for r in rows)
    assert all(isinstance(r["flags"], list) and r["rank_exact"] >= 1 for r in rows)
    flagged = [r for r in rows if {"large_error", "sign_flip"} & set(r["flags"])]
    assert flagged, "random dictionaries on a random model: some latents' scores are far off"
    for r in flagged:  # one half patch each; a large AtP error always has a cause (analysis/causes.py)
        assert r["causes"] and "exact_half" in r
        if "large_error" in r["flags"]:
            assert r["causes"] != [NO_CAUSE]
    for per_hook in found["agreement"].values():
        for a in per_hook.values():
            assert a["pearson_ci"][0] <= a["pearson_ci"][1] and a["n_flagged"] >= 0
    text = features_markdown(found)
    assert "Pearson [95% CI]" in text and "exact [95% CI]" in text and "ranked by AtP" in text
    assert any(f"- {r['name']}: " in text for r in flagged)
