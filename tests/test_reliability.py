"""Faults: non-finite numbers are named, never ranked; degenerate baselines are refused up front."""

import math
import sys

import pytest
import torch

import attrpatch as ap
from attrpatch.screen import ScreenConfig, screen
from conftest import random_pairs, tiny_model

CONFIG = ScreenConfig(sites=("head", "resid_pre"), top_k=3, random_k=2, progress=False)


def test_injected_nan_scores_are_named_and_never_ranked(monkeypatch):
    screen_module = sys.modules["attrpatch.screen"]
    real = screen_module.attribute

    def poisoned(*args, **kwargs):
        scores = real(*args, **kwargs)
        scores.values["logit_diff"]["head"][1, :, 2] = float("nan")  # L1H2 at every position
        return scores
    monkeypatch.setattr(screen_module, "attribute", poisoned)
    model = tiny_model("gpt2")
    result = screen(model, ap.make_batch(random_pairs()), CONFIG)
    found = [s for s in result.numerical["scores"] if s["site"] == "head" and s["metric"] == "logit_diff"]
    assert found and found[0]["components"] == ["L1H2"]
    tops = [c["name"] for c in result.components if c["site"] == "head" and c["selected"] == "top"]
    assert "L1H2" not in tops
    assert all(math.isfinite(a["pearson"]) for a in result.agreement["denoise"]["head"].values())


def test_injected_nan_effects_are_flagged(monkeypatch):
    screen_module = sys.modules["attrpatch.screen"]
    real = screen_module.patch

    def poisoned(*args, **kwargs):
        effects = real(*args, **kwargs)
        effects.values[0, 1] = float("inf")
        return effects
    monkeypatch.setattr(screen_module, "patch", poisoned)
    result = screen(tiny_model("gpt2"), ap.make_batch(random_pairs()), CONFIG)
    flagged = [c for c in result.components if "non_finite" in c["flags"]]
    assert len(flagged) == 1 and result.numerical["effects"][0]["metrics"] == ["logprob"]


def test_non_finite_baseline_is_refused_before_any_work():
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[:, 5] = float("nan")
    with pytest.raises(FloatingPointError, match=r"clean run's logits are not finite for prompts \[0, 1, 2\].*bfloat16"):
        screen(model, ap.make_batch(random_pairs()), CONFIG)


def test_zero_gap_is_refused_with_the_reason():
    pairs = random_pairs()
    for p in pairs:
        p.corrupt_ids = list(p.clean_ids)
    with pytest.raises(ValueError, match=r"same logit_diff .*cannot be\s+normalised"):
        screen(tiny_model("gpt2"), ap.make_batch(pairs), CONFIG)
