"""--no-causes (ScreenConfig.measure_causes False): the same verified components, exact effects and flags as a screen
that measures the causes, without the half and frozen patches; each flagged component's causes open with
NOT_MEASURED, and the report says so."""

import json
from dataclasses import replace

import pytest

import attrpatch as ap
from attrpatch.analysis.causes import NOT_MEASURED
from attrpatch.analysis.flags import APPROX_FLAGS
from attrpatch.cli import main
from attrpatch.config import ScreenConfig
from conftest import random_pairs, tiny_model

CONFIG = ScreenConfig(sites=("resid_pre", "attn_out", "head", "neuron"), top_k=4, random_k=2, direction="both",
                      progress=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_no_causes_keeps_the_findings_and_skips_only_the_causes(family):
    model, batch = tiny_model(family), ap.make_batch(random_pairs(4))
    measured = ap.screen(model, batch, CONFIG)
    skipped = ap.screen(model, batch, replace(CONFIG, measure_causes=False))
    assert [c["name"] for c in skipped.components] == [c["name"] for c in measured.components]
    flagged = 0
    for a, b in zip(measured.components, skipped.components):
        assert (b["direction"], b["flags"]) == (a["direction"], a["flags"])
        assert b["exact"] == pytest.approx(a["exact"], rel=1e-6, abs=1e-7)
        if set(a["flags"]) & set(APPROX_FLAGS):
            flagged += 1
            assert "half_effect" in a["evidence"] and NOT_MEASURED not in a["causes"]
            assert b["causes"][0] == NOT_MEASURED and "half_effect" not in b["evidence"]
            assert "frozen" not in b["evidence"]
        else:
            assert b["causes"] == a["causes"]
    assert flagged > 0  # the comparison covers flagged components
    assert skipped.timing["forward_passes"] < measured.timing["forward_passes"]  # the causes' copies are gone


def test_cli_no_causes_says_so_in_report_md_and_json(tmp_path):
    out = tmp_path / "run"
    assert main(["screen", "--task", "ioi", "--n-prompts", "6", "--top-k", "5", "--random-k", "3",
                 "--direction", "both", "--no-causes", "--no-figures", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["measure_causes"] is False
    flagged = [c for c in report["components"] if set(c["flags"]) & set(APPROX_FLAGS)]
    assert flagged and all(c["causes"][0] == NOT_MEASURED for c in flagged)
    text = (out / "report.md").read_text()
    large = [c for c in flagged if "large_error" in c["flags"]]
    if large:
        assert "their causes were not measured (--no-causes" in text
    assert "not measured" in text  # the disagreement table's cause column


def test_feature_screen_without_causes_marks_the_flagged_latents_and_patches_no_half():
    from attrpatch.feature_screening import screen_features
    from test_features import random_dictionary

    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs(n=6))
    ds = [random_dictionary("resid_pre", 1, "topk")]
    config = ScreenConfig(top_k=6, random_k=3, sites=("resid_pre",), direction="both", progress=False)
    measured = screen_features(model, batch, ds, config).to_dict()["rows"]
    skipped = screen_features(model, batch, ds, replace(config, measure_causes=False)).to_dict()["rows"]
    assert [(r["name"], r["flags"]) for r in skipped] == [(r["name"], r["flags"]) for r in measured]
    flagged = [r for r in skipped if {"large_error", "sign_flip"} & set(r["flags"])]
    assert flagged, "random dictionaries on a random model: some latents' scores are far off"
    assert all(r["causes"][0] == NOT_MEASURED and "exact_half" not in r for r in flagged)
    assert all("exact_half" in r for r in measured if {"large_error", "sign_flip"} & set(r["flags"]))
