"""Ablations (zero, mean over the prompts, resample) as sources: each equals a naive one-hook reference."""

import pytest
import torch

import attrpatch as ap
from conftest import random_pairs, tiny_model
from reference import ablation_reference

COMPONENTS = [ap.Component("resid_pre", 1, pos=3), ap.Component("mlp_out", 2), ap.Component("head", 1, unit=2),
              ap.Component("neuron", 0, pos=6, unit=7), ap.Component("v", 2, unit=1), ap.Component("embed", 0)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("ablation", ap.ABLATIONS)
def test_each_ablation_equals_a_naive_reference(family, ablation):
    model = tiny_model(family)
    batch = ap.make_batch(random_pairs(n=5))
    metrics = ["logit_diff", "kl", "rank"]
    eff = ap.patch(model, batch, COMPONENTS, metrics=metrics, direction="noise", ablation=ablation, batch_size=2)
    for i, c in enumerate(COMPONENTS):
        for j, m in enumerate(metrics):
            naive = ablation_reference(model, batch, c, ablation, m)
            assert float(eff.values[i, j]) == pytest.approx(naive, abs=1e-4), (c, m)
    joint = (ap.Component("mlp_out", 0, pos=2), ap.Component("head", 2, unit=0))  # ablated together
    eff = ap.patch(model, batch, [joint], direction="noise", ablation=ablation)
    assert float(eff.values[0, 0]) == pytest.approx(ablation_reference(model, batch, joint, ablation), abs=1e-4)

def test_zero_ablation_of_the_whole_stream_is_not_read_off_the_corrupt_run():
    model = tiny_model("gpt2")
    batch = ap.make_batch(random_pairs(n=3))
    noised = ap.patch(model, batch, [ap.Component("resid_pre", 1)], direction="noise")
    zeroed = ap.patch(model, batch, [ap.Component("resid_pre", 1)], direction="noise", ablation="zero")
    assert float(zeroed.values[0, 0]) == pytest.approx(
        ablation_reference(model, batch, ap.Component("resid_pre", 1), "zero"), abs=1e-4)
    assert not torch.allclose(noised.values, zeroed.values)


def test_ablation_errors_name_the_value_and_the_fix():
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs())
    comp = [ap.Component("mlp_out", 1)]
    with pytest.raises(ValueError, match="Unknown ablation 'means'; known: zero, mean, resample"):
        ap.patch(model, batch, comp, direction="noise", ablation="means")
    with pytest.raises(ValueError, match="noising direction; got direction='denoise': pass direction='noise'"):
        ap.patch(model, batch, comp, ablation="mean")
    ragged = ap.make_batch(random_pairs(lengths=[7, 5, 6]))
    with pytest.raises(ValueError, match="ablation 'resample' .* one token length; lengths here: \\[5, 6, 7\\]"):
        ap.patch(model, ragged, comp, direction="noise", ablation="resample")
