"""The screen's statistics (issue 13): bootstrap intervals on every agreement statistic and exact effect,
measured causes of every flagged component, the joint-subset false-negative bound, and report.md's words."""

import math

import pytest
import torch

import attrpatch as ap
from attrpatch.analysis.causes import NO_CAUSE, frozen_causes, measured_causes
from attrpatch.config import ScreenConfig
from attrpatch.output import report_md
from attrpatch.output.report import report_dict
from attrpatch.screening import screen
from conftest import random_pairs, tiny_model
from test_attribute import _saturated_gpt2

STATS = ("pearson", "spearman", "sign_agreement", "recall_at_k")


@pytest.fixture(scope="module")
def result():
    config = ScreenConfig(sites=("head", "mlp_out", "resid_pre"), top_k=3, random_k=3, estimator="all",
                          direction="both", progress=False)
    return screen(tiny_model("gpt2"), ap.make_batch(random_pairs(n=6)), config)


def _inside(value, ci):
    return not math.isfinite(value) or ci[0] - 1e-7 <= value <= ci[1] + 1e-7  # float32 means vs per-prompt


def test_every_agreement_statistic_has_an_interval_around_it(result):
    for direction, per_site in result.agreement.items():
        for site, per_metric in per_site.items():
            for m, a in per_metric.items():
                for name in STATS:
                    assert _inside(a[name], a[f"{name}_ci"]), (direction, site, m, name, a)
    for per_est in result.estimators.values():
        for est, e in per_est.items():
            for site, a in e["sites"].items():
                for name in STATS:
                    assert _inside(a[name], a[f"{name}_ci"]), (est, site, name, a)


def test_every_verified_effect_has_an_interval_around_it(result):
    assert result.components
    for c in result.components:
        low, high = c["exact_ci"]
        assert low <= c["exact"] <= high, c["name"]
    assert any(c["exact_ci"][1] > c["exact_ci"][0] for c in result.components)  # prompts do differ


def test_every_flagged_component_has_a_measured_half_patch(result):
    flagged = [c for c in result.components if set(c["flags"]) & {"sign_flip", "large_error", "missed",
                                                                    "overestimated"}]
    assert flagged
    for c in flagged:
        assert math.isfinite(c["evidence"]["half_effect"])
        measured = measured_causes(c["exact"], c["evidence"]["half_effect"], c["approx"],
                                   c["approx_estimators"]["ig"])
        if "frozen" in c["evidence"]:  # which non-linearity carries it comes first (a large AtP error)
            frozen = frozen_causes(c["exact"], c["approx"], c["evidence"]["frozen"])
            assert "large_error" in c["flags"] and frozen and c["causes"][:len(frozen)] == frozen
            measured = frozen + [m for m in measured if m != NO_CAUSE]
        if measured == [NO_CAUSE]:  # nothing measured: the evidence-based causes, or NO_CAUSE, lead
            assert c["causes"] and NO_CAUSE not in c["causes"][1:]
        else:  # the measured causes lead, each with its number
            assert c["causes"][:len(measured)] == measured and NO_CAUSE not in c["causes"]
    assert any(c["causes"][0].startswith(("curvature", "bend", "non-linearity", "interaction")) for c in flagged)
    assert any("frozen" in c["evidence"] for c in flagged)


def test_report_states_intervals_causes_and_a_recommendation(result):
    text = report_md.render(report_dict(result, model="tiny", task="random"))
    a = result.agreement["denoise"]["head"]["logit_diff"]
    assert f"{a['pearson']:+.2f} [{a['pearson_ci'][0]:+.2f}, {a['pearson_ci'][1]:+.2f}]" in text
    assert "large errors" in text and "have no cause found" in text
    assert "## Which estimator to trust here" in text
    assert text.count("the best is **") + text.count(", the cheapest whose Pearson lower bound is >= 0.9") >= 6


def _planted(**options):
    """A saturated layer-0 key that plain AtP scores ~0 but whose patch matters (test_attribute)."""
    config = ScreenConfig(sites=("k",), top_k=3, direction="denoise", progress=False, **options)
    return screen(_saturated_gpt2(), ap.make_batch(random_pairs(n=4, changed=(2,))), config)


def test_a_component_atp_misses_gets_a_measured_cause():
    found = _planted(random_k=100)  # every key verified: the planted one is missed by AtP's ranking
    planted = max(found.components, key=lambda c: abs(c["exact"]))
    assert abs(planted["approx"]) < 1e-3 and abs(planted["exact"]) > 0.1
    assert "missed" in planted["flags"] or "large_error" in planted["flags"]
    # a key acts only through the attention pattern: freezing the patterns removes AtP's whole error
    assert planted["causes"][0].startswith("attention pattern change: with the attention patterns frozen")
    assert "(100% removed)" in planted["causes"][0]
    assert list(planted["evidence"]["frozen"]) == ["pattern"]  # explained: no norm-frozen run spent on it
    assert any(word in c for c in planted["causes"][1:] for word in ("bend near the receiver", "curvature"))


def test_subset_bound_does_not_call_a_missed_component_absent():
    found = _planted(random_k=0, fn_subsets=48, verify_budget=0)  # the top-k only: the planted key unverified
    everything = _planted(random_k=100)
    verified = {c["name"] for c in found.components}
    unverified = [c for c in everything.components if c["name"] not in verified]
    planted = max(unverified, key=lambda c: abs(c["exact"]))
    assert abs(planted["exact"]) > 0.1
    bound = found.false_negatives["denoise"]["k"]["subsets"]
    assert bound["bound"] >= abs(planted["exact"]) and bound["n_subsets"] == 48
    assert bound["plain_bound"] >= abs(planted["exact"])  # the plain diagnostic's X, reported beside it
    assert planted["name"] in bound["detected"]
    text = report_md.render(report_dict(found, model="tiny", task="random"))
    assert "- k: with 95% confidence no unverified component's effect exceeds" in text and "(49 forwards" in text  # 48 subsets + all jointly


def test_fn_subsets_needs_four_or_more():
    with pytest.raises(ValueError, match=r"fn_subsets must be 0 \(off\) or >= 4 .* got 2"):
        ScreenConfig(fn_subsets=2)


def test_a_joint_patch_reaching_the_final_layer_matches_the_naive_one():
    """The final block's MLP runs on the last row only when nothing in it is patched; a joint patch that
    starts earlier and reaches it (the subset bound's patches) must run it on every row."""
    from attrpatch.model.sites import Component
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs(n=3))
    joint = [(Component("mlp_out", 1), Component("mlp_out", 2)), (Component("mlp_out", 1),)]
    fast = ap.patch(model, batch, joint).values
    naive = ap.patch(model, batch, joint, resume=False, copies=1).values
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-5)
