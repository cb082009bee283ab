"""Measured causes: patching part of the way (alpha) and the verdicts built on it."""

import torch

import attrpatch as ap
from attrpatch.analysis.causes import NO_CAUSE, bend, measured_causes
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
    assert curved[0].startswith("bend near the receiver: slope at alpha=0 (AtP) +0.1 vs secant of the first half "
                                "2 e(1/2) +0.4 and of the second half +1.6 (33% of the AtP error lies in alpha 0..1/2)")
    assert curved[1].startswith("curvature along the patch: e(1) +1 vs 2 e(1/2) +0.4 (60% of e(1)")
    assert curved[2].startswith("non-linearity along the straight path: IG +0.97")
    assert measured_causes(1.0, 0.5, atp=2.0, ig=0.1, slope=False) == [
        "interaction with other components: IG +0.1 also off by 90%"]


def test_a_bend_near_the_receiver_is_named_where_the_half_patch_shows_no_curvature():
    """f steep at alpha = 0 (slope 3), nearly straight after: e(1) = 2 e(1/2) within 1%, the old test saw nothing."""
    exact, half, atp = 1.0, 0.495, 3.0  # secants 0.99 and 1.01: no curvature between the halves
    assert not any(c.startswith("curvature") for c in measured_causes(exact, half, atp))
    named = measured_causes(exact, half, atp)
    assert named[0].startswith("bend near the receiver: slope at alpha=0 (AtP) +3 vs secant of the first half 2 e(1/2) "
                               "+0.99 and of the second half +1.01 (100% of the AtP error")
    assert measured_causes(exact, half, atp, slope=False) == [NO_CAUSE]  # not AtP: the slope is unknown


def test_every_large_atp_error_has_a_measured_cause():
    """The decomposition a - e(1) = (a - 2 e(1/2)) + (2 e(1/2) - e(1)) is exact, so a large error (> 50% of
    max(|a|, |e|)) always leaves one part above its threshold: no large AtP error reads 'no cause found'."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for exact, half, atp in torch.randn(20000, 3, generator=g, dtype=torch.float64).tolist():
        b = bend(exact, half, atp)
        assert abs(b["near"] + b["between"] - (atp - exact)) < 1e-12
        if abs(atp - exact) > 0.5 * max(abs(atp), abs(exact)):
            checked += 1
            assert measured_causes(exact, half, atp) != [NO_CAUSE], (exact, half, atp)
    assert checked > 5000


def test_atp_is_the_slope_of_the_patch_at_the_receiver():
    """The premise of the bend: for one component AtP == f'(0) == lim e(alpha) / alpha."""
    model = tiny_model("gpt2", dtype=torch.float64)
    batch = ap.make_batch(random_pairs())
    comps = [c for s in ("resid_pre", "mlp_out", "head") for c in
             components(s, ap.model_spec(model).dims, N_POS, per_position=s != "head")]
    eps = 1e-5
    slope = ap.patch(model, batch, comps, alpha=eps).values[:, 0] / eps
    atp = ap.attribute(model, batch, sites=["resid_pre", "mlp_out", "head"])
    scores = torch.tensor([atp.score(c, "logit_diff") for c in comps], dtype=torch.float64)
    assert scores.abs().max() > 1e-2
    torch.testing.assert_close(slope, scores, atol=1e-4, rtol=1e-3)
