"""Metrics against hand computations, and normalisation."""

import math

import pytest
import torch

from attrpatch.engine.metrics import METRICS, Target, metric, normalise


def _setup():
    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    clean = torch.randn(3, 11)
    target = Target.from_clean(torch.tensor([1, 4, 7]), torch.tensor([2, 5, 0]), clean)
    return logits, clean, target


def test_metrics_match_hand_computation():
    logits, clean, target = _setup()
    p = torch.softmax(logits, -1)
    pc = torch.softmax(clean, -1)
    for b in range(3):
        a, w = int(target.answer[b]), int(target.wrong[b])
        assert metric("logit_diff", logits, target)[b] == pytest.approx(float(logits[b, a] - logits[b, w]), abs=1e-6)
        assert metric("logprob", logits, target)[b] == pytest.approx(math.log(p[b, a]), abs=1e-6)
        assert metric("prob", logits, target)[b] == pytest.approx(float(p[b, a]), abs=1e-6)
        kl = sum(float(pc[b, v]) * math.log(pc[b, v] / p[b, v]) for v in range(11))
        assert metric("kl", logits, target)[b] == pytest.approx(kl, abs=1e-6)


def test_kl_is_zero_on_the_clean_run_and_every_metric_is_float32_for_half_logits():
    _, clean, target = _setup()
    assert metric("kl", clean, target).abs().max() < 1e-6
    for m in METRICS:
        assert metric(m, clean.to(torch.bfloat16), target).dtype == torch.float32


def test_normalise_maps_corrupt_to_0_and_clean_to_1_and_refuses_a_zero_gap():
    assert normalise(2.0, clean=2.0, corrupt=-1.0, offset=True) == pytest.approx(1.0)
    assert normalise(-1.0, clean=2.0, corrupt=-1.0, offset=True) == pytest.approx(0.0)
    assert normalise(1.5, clean=2.0, corrupt=-1.0, offset=False) == pytest.approx(0.5)
    assert math.isnan(normalise(1.0, clean=0.3, corrupt=0.3, offset=True))


def test_target_repeat_is_copy_major():
    _, _, target = _setup()
    rep = target.repeat(2)
    assert rep.answer.tolist() == target.answer.tolist() * 2
    torch.testing.assert_close(rep.clean_logprobs[3:], target.clean_logprobs)
