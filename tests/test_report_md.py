"""report.md as a researcher reads it (issue 23): grouped rows, per-site tables, one disagreement table, the
false-negative statement that says when it cannot bound, and the cost from whole phases."""

import pytest
import torch

from attrpatch.analysis.agreement import false_negatives, upper_hits
from attrpatch.analysis.groups import group_components
from attrpatch.output import findings, report_md


def _comp(site, layer, exact, approx, pos=9, direction="denoise", flags=(), head=None):
    name = f"L{layer}H{head}" if site == "head" else f"L{layer}.{site}@{pos}"
    return {"direction": direction, "site": site, "layer": layer, "head": head, "neuron": None,
            "pos": None if site == "head" else pos, "name": name, "selected": "top", "approx": approx,
            "exact": exact, "exact_ci": [exact - 0.1, exact + 0.1], "approx_estimators": {"atp": approx},
            "approx_metrics": {"logit_diff": approx}, "exact_metrics": {"logit_diff": exact},
            "exact_norm": {"logit_diff": exact / 10}, "rank_approx": layer + 1, "rank_exact": layer + 1,
            "flags": list(flags), "evidence": {"activation_change": 0.5}, "causes": []}


def _report(comps, fn=None):
    sites = sorted({c["site"] for c in comps})
    agree = {"pearson": 0.9, "spearman": 0.9, "sign_agreement": 1.0, "recall_at_k": 1.0, "k": 3, "n": 5}
    fn = fn or false_negatives(torch.tensor([0.01] * 5), torch.tensor([10.0]), 3).to_dict()
    return {"model": "m", "task": "t", "n_prompts": 4, "n_pos": 12, "tokens": ["w"] * 9 + ["S2", "a", "b"],
            "direction": "denoise", "directions": ["denoise"], "metric": "logit_diff", "metrics": ["logit_diff"],
            "positions": {s: "each" for s in sites}, "top_k": 3, "random_k": 5,
            "clean_metric": {"logit_diff": 5.0}, "corrupt_metric": {"logit_diff": -5.0}, "components": comps,
            "agreement": {"denoise": {s: {"logit_diff": agree} for s in sites}},
            "false_negatives": {"denoise": {s: fn for s in sites}},
            "timing": {"attribution_s": 1.0, "verification_s": 4.0, "diagnostics_s": 0.5, "forward_passes": 100,
                       "forward_equivalents_verification": 40.0, "forward_s": 0.3}}


def test_a_large_unverified_effect_among_too_few_controls_cannot_be_bounded():
    """20 controls, all tiny, while 1000 components stay unverified: a large effect may hide among them
    (one planted there), and the statement says it cannot bound rather than printing a vacuous share."""
    exact = torch.full((1020,), 0.001)
    exact[700] = 5.0  # the planted large effect, never drawn
    controls = exact[:20]
    fn = false_negatives(controls, torch.tensor([10.0, 8.0, 6.0]), n_unverified=1000).to_dict()
    assert fn["verdict"] == "cannot_bound" and fn["threshold"] == pytest.approx(1.0)
    assert fn["count_upper"] > fn["n_verified_above"] == 3
    words = findings.fn_words(fn)
    assert words.startswith("cannot bound: 20 controls are too few for 1000 unverified")
    assert f"about {fn['controls_needed']} controls would bound it" in words


def test_enough_controls_bound_the_unverified_with_the_threshold_named():
    fn = false_negatives(torch.full((20,), 0.001), torch.tensor([10.0, 8.0, 6.0]), n_unverified=6).to_dict()
    assert fn["verdict"] == "bounded" and fn["count_upper"] == 1  # hypergeometric: 26 outside, 20 drawn
    assert findings.fn_words(fn) == "0 of 20 random controls exceed 1; with 95% confidence at most 1 of the 6 " \
                                    "unverified do"


def test_every_component_verified_needs_no_bound_and_no_zero_threshold_is_printed():
    fn = false_negatives(torch.zeros(2), torch.tensor([3.0, 1.0]), n_unverified=0).to_dict()
    assert fn["verdict"] == "all_verified" and findings.fn_words(fn) == "none: every component was verified"
    assert "|0|" not in findings.fn_words(fn)


def test_a_control_above_the_threshold_is_named_a_miss():
    fn = false_negatives(torch.tensor([2.0] + [0.0] * 19), torch.tensor([10.0]), n_unverified=200).to_dict()
    assert fn["n_control_above"] == 1 and fn["verdict"] == "cannot_bound"
    assert findings.fn_words(fn).startswith("cannot bound: 1 of 20 random controls exceed 1, so AtP missed some")


def test_upper_hits_is_the_exact_hypergeometric_bound():
    assert upper_hits(0, 26, 20) == 1  # P(no hit | 2 marked of 26, 20 drawn) = 0.046 < 0.05
    assert upper_hits(0, 1000, 1000) == 0 and upper_hits(3, 50, 50) == 3


def test_consecutive_layers_with_the_same_effect_form_one_group_listing_every_member():
    comps = [_comp("resid_pre", layer, 10.0 + 0.1 * (layer % 2), 2.0, flags=["large_error"]) for layer in range(20)]
    comps += [_comp("resid_pre", 20, 4.0, 1.0), _comp("resid_pre", 22, 4.0, 1.0)]  # smaller; then a gap
    comps += [_comp("head", 3, 3.0, 2.9, head=1), _comp("head", 4, 3.0, 2.9, head=1)]  # heads never group
    groups = group_components(comps)
    assert len(groups) == 1
    g = groups[0]
    assert g["members"] == [f"L{layer}.resid_pre@9" for layer in range(20)] and g["layers"] == [0, 19]
    text = report_md.render(_report(comps))
    assert "L0-L19.resid_pre@9 (S2), 20 layers" in text
    assert text.count("L5.resid_pre@9") == 0  # no member repeated on its own
    row = next(line for line in text.splitlines() if line.startswith("| L0-L19.resid_pre@9"))
    assert "+2.00" in row and "+10.00 to +10.10" in row and "1-20 / 1-20" in row


def test_report_reads_in_order_with_one_table_per_site_and_terms_at_the_end():
    comps = [_comp("resid_pre", layer, 10.0, 2.0, flags=["large_error"]) for layer in range(3)]
    comps += [_comp("head", 3, 3.0, 0.5, head=1, flags=["large_error"]), _comp("head", 2, 1.0, 0.9, head=0)]
    text = report_md.render(_report(comps))
    order = ["## Clean-run check" if "## Clean-run check" in text else "# attrpatch screen", "### What was found",
             "#### head: top", "#### resid_pre: top", "## Where AtP and exact patching disagree", "## Cost",
             "## Terms"]
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)
    assert "| component | AtP | exact [95% CI] | share of gap | rank in head: AtP / exact | flags |" in text
    assert text.count("| component | flags | AtP | exact | likely cause |") == 1  # one disagreement table
    assert "**alpha" not in text and "- **bend in alpha 0..1/2**:" in text


def test_cost_comes_from_the_phase_clocks_not_one_timed_forward():
    text = report_md.render(_report([_comp("resid_pre", 0, 1.0, 1.0)]))
    cost = text[text.index("## Cost"):text.index("## Terms")]
    assert "4.00 s for 40.0 counted full-forward equivalents; 100.0 ms per counted forward equivalent" in cost
    assert "5.50 s in all" in cost and "by the clock it took" not in cost


def test_disagreements_are_one_table_for_both_directions_with_flagged_layers_merged():
    comps = []
    for direction, sign in (("denoise", 1), ("noise", -1)):
        for layer in range(4):
            c = _comp("resid_pre", layer, sign * (10.0 - layer), sign * 2.0, direction=direction,
                      flags=["large_error"])
            c["causes"] = ["attention pattern change: with the attention patterns frozen ...", "bend near the receiver"]
            c["evidence"]["frozen"] = {"pattern": [sign * (10.0 - layer), sign * (10.0 - layer)]}
            comps.append(c)
    comps.append(_comp("head", 3, 3.0, 0.5, head=1, flags=["large_error"]))
    r = _report(comps)
    r["directions"], r["direction"] = ["denoise", "noise"], "both"
    for key in ("agreement", "false_negatives"):
        r[key]["noise"] = r[key]["denoise"]
    text = report_md.render(r)
    table = text[text.index("| component | flags | AtP (denoise / noise)"):]
    rows = [line for line in table.splitlines() if line.startswith("| L")]
    assert len(rows) == 2 and text.count("| component | flags |") == 1
    assert rows[0].startswith("| L0-L3.resid_pre@9 (S2), 4 layers | large_error | +2.00 each / -2.00 each | "
                              "+7.00 to +10.00 / -10.00 to -7.00 | attention patterns, bend in alpha 0..1/2 | "
                              "patterns 100% |")
    assert rows[1].startswith("| L3H1 | large_error | +0.500 / - | +3.000 / - |")
