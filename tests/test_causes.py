"""Measured causes: patching part of the way (alpha) and the verdicts built on it."""

import torch

import attrpatch as ap
from attrpatch.analysis.causes import measured_causes
from attrpatch.model.sites import components
from conftest import N_POS, random_pairs, tiny_model
from test_relp import _linear_gpt2


def test_half_patch_is_half_the_effect_where_the_model_is_linear():
    model = _linear_gpt2()
    batch = ap.make_batch(random_pairs())
    comps = components("resid_pre", ap.model_spec(model).dims, N_POS, per_position=True)
    full = ap.patch(model, batch, comps).values[:, 0]
    half = ap.patch(model, batch, comps, alpha=0.5).values[:, 0]
    assert full.abs().max() > 1e-2
    torch.testing.assert_close(half, full / 2, atol=1e-9, rtol=1e-7)


def test_half_patch_measures_curvature_in_a_real_non_linearity():
    model = tiny_model("gpt2", dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    comps = components("resid_pre", ap.model_spec(model).dims, N_POS, per_position=True)
    full = ap.patch(model, batch, comps).values[:, 0]
    half = ap.patch(model, batch, comps, alpha=0.5).values[:, 0]
    assert (full - 2 * half).abs().max() > 1e-2  # not linear: the half patch is not half the effect
    zero = ap.patch(model, batch, comps[:3], alpha=0.0).values[:, 0]
    assert zero.abs().max() < 1e-12


def test_causes_name_their_number_and_no_cause_only_when_all_small():
    assert measured_causes(1.0, 0.5, atp=0.9, ig=0.3) == ["no cause found: every measurement below its threshold"]
    curved = measured_causes(1.0, 0.2, atp=0.1, ig=0.97)
    assert curved[0].startswith("curvature along the patch: e(1) +1 vs 2 e(1/2) +0.4 (60% of e(1))")
    assert curved[1].startswith("non-linearity along the straight path: IG +0.97")
    assert measured_causes(1.0, 0.5, atp=2.0, ig=0.1) == ["interaction with other components: IG +0.1 also off by 90%"]
