"""Metrics against hand computations, and normalisation."""

import math

import pytest
import torch

import attrpatch as ap
from attrpatch.engine.metrics import DISCRETE_METRICS, METRICS, Target, metric, normalise


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


def _hand_discrete(logits, answer, wrong):
    """rank, accuracy and top1 of one prompt's logits, by a loop over the vocabulary."""
    row = logits.tolist()
    above = sum(1 for v in row if v > row[answer])
    return {"rank": 1.0 + above, "accuracy": float(row[answer] > row[wrong]), "top1": float(above == 0)}


def test_discrete_metrics_match_hand_computation():
    logits, _, target = _setup()
    logits[1, 4] = logits[1].max() + 1  # prompt 1: the answer is top-1
    for b in range(3):
        hand = _hand_discrete(logits[b], int(target.answer[b]), int(target.wrong[b]))
        for m in DISCRETE_METRICS:
            assert float(metric(m, logits, target)[b]) == hand[m], (m, b)
    assert float(metric("rank", logits, target)[1]) == 1.0


def test_attribution_refuses_a_discrete_metric_and_says_why():
    from conftest import random_pairs, tiny_model
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs())
    with pytest.raises(ValueError, match="'rank' is discrete and has no gradient.*logit_diff"):
        ap.attribute(model, batch, sites=["resid_pre"], metrics=["logit_diff", "rank"])
    with pytest.raises(ValueError, match="'accuracy' is discrete"):
        ap.ScreenConfig(metric="accuracy")
    with pytest.raises(ValueError, match="Unknown metric 'ranks'; known: .*rank, accuracy, top1"):
        ap.patch(model, batch, [ap.Component("resid_pre", 1)], metrics=["ranks"])


@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_patched_rank_and_accuracy_equal_hand_values_on_a_tiny_model(direction):
    from conftest import random_pairs, tiny_model
    from reference import patched_logits_reference
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(n=4))
    comps = [ap.Component("resid_pre", 1, pos=3), ap.Component("mlp_out", 0), ap.Component("head", 1, unit=2)]
    eff = ap.patch(model, batch, comps, metrics=["logit_diff", *DISCRETE_METRICS], direction=direction)
    for c in comps:
        receiver, patched = patched_logits_reference(model, batch, c, direction)
        for m in DISCRETE_METRICS:
            hand = [_hand_discrete(logits[b], int(batch.answer[b]), int(batch.wrong[b]))[m]
                    for logits in (patched, receiver) for b in range(batch.n)]
            expected = (sum(hand[:batch.n]) - sum(hand[batch.n:])) / batch.n
            assert eff.effect(c, m) == pytest.approx(expected, abs=1e-6), (c, m)


def test_metric_values_of_stacked_copies_equal_each_copy_alone():
    """Patched passes stack copies of the batch (copy-major); every metric of the stack, computed together
    with one log-softmax, equals the metric of each copy on its own, gradients included."""
    from attrpatch.engine.metrics import metric_values
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 11, generator=g, dtype=torch.float64)
    target = ap.Target.from_clean(torch.tensor([1, 4, 7]), torch.tensor([2, 0, 9]), clean)
    stack = torch.randn(4 * 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    values = metric_values(ap.ALL_METRICS, stack, target)
    for name in ap.ALL_METRICS:
        alone = torch.cat([ap.metric(name, stack[3 * c:3 * c + 3], target) for c in range(4)])
        torch.testing.assert_close(values[name], alone, rtol=0, atol=1e-12)
    grad, = torch.autograd.grad(values["kl"].sum(), stack)
    expected, = torch.autograd.grad(sum(ap.metric("kl", stack[3 * c:3 * c + 3], target).sum() for c in range(4)), stack)
    torch.testing.assert_close(grad, expected)
    with pytest.raises(ValueError, match="not copies"):
        metric_values(["kl"], stack[:5], target)
