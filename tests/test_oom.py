"""Out of memory in attribution (methods/halving.py): a chunk of prompts that runs out of memory mid-run is retried
as two halves, down to one prompt, for node and edge attribution alike; the scores equal an uninterrupted run's, the
smaller batch is reported, and one prompt that still does not fit stops with a clear error."""

import pytest
import torch

import attrpatch as ap
from attrpatch.methods.edges import eap
from attrpatch.methods.estimators import gradients
from conftest import random_pairs, tiny_model


def fragile(monkeypatch, cls, at_most: int | None = None, calls: list | None = None, when=None):
    """``cls.add`` (every score a chunk adds) raises a simulated CUDA out-of-memory error AFTER adding, whenever
    the chunk has more than ``at_most`` prompts (or ``when(chunk)``): the failed chunk has already written part
    of its sums."""
    real = cls.add
    when = when or (lambda chunk: chunk.batch.n > at_most)

    def add(self, *args):
        real(self, *args)
        if calls is not None:
            calls.append(self.batch.n)
        if when(self):
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
    monkeypatch.setattr(cls, "add", add)


def _assert_scores_equal(got, expected):
    for m, per_site in expected.values.items():
        for s, t in per_site.items():
            torch.testing.assert_close(got.values[m][s], t, rtol=1e-5, atol=1e-5)
    for m, per_site in (expected.prompts or {}).items():
        for s, t in per_site.items():
            torch.testing.assert_close(got.prompts[m][s], t, rtol=1e-5, atol=1e-5)
    assert got.clean_metric == pytest.approx(expected.clean_metric, rel=1e-5)
    assert got.corrupt_metric == pytest.approx(expected.corrupt_metric, rel=1e-5)


@pytest.mark.parametrize("estimator, batch_size, keep", [("atp", None, "positions"), ("ig", 3, "positions"),
                                                          ("atp", 4, "per_prompt"), ("graddrop", None, None)])
def test_out_of_memory_in_node_attribution_halves_the_batch_and_gives_the_same_scores(monkeypatch, estimator,
                                                                                      batch_size, keep):
    """6 prompts; chunks of more than 1 prompt fail after part of their scores were added: the retry's scores,
    per-prompt scores and metrics equal the uninterrupted run's, and the warning and ``passes`` name batch 1."""
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(6, changed=(0, 3)))
    options = dict(sites=("resid_pre", "head", "neuron"), metrics=("logit_diff", "kl"), estimator=estimator,
                   ig_steps=2, batch_size=batch_size, per_prompt=keep == "per_prompt",
                   prompt_positions={"head": False} if keep == "positions" else None)
    expected = ap.attribute(model, batch, **options)
    fragile(monkeypatch, gradients.Chunk, at_most=1)
    with pytest.warns(UserWarning, match=rf"out of memory attributing \({estimator}\) \d prompts at once; "
                                         r"retrying with \d prompts per batch \(pass batch_size=\d"):
        got = ap.attribute(model, batch, **options)
    _assert_scores_equal(got, expected)
    assert got.passes["batch_size"] == 1 and "batch_size" not in expected.passes
    assert got.passes["forward"] == expected.passes["forward"] // -(-6 // (batch_size or 6)) * 6  # 6 chunks ran


def test_out_of_memory_in_edge_attribution_halves_the_batch_and_gives_the_same_scores(monkeypatch):
    """EAP and EAP-IG on 5 prompts, chunks of more than 2 failing after part of their products were added."""
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(5, changed=(0, 3)))
    for estimator in ("atp", "ig"):
        expected = ap.attribute_edges(model, batch, metrics=("logit_diff", "kl"), estimator=estimator, ig_steps=2)
        with monkeypatch.context() as m:
            fragile(m, eap._Scorer, at_most=2)
            with pytest.warns(UserWarning, match=r"out of memory attributing edges \(\w+\) 5 prompts at once; "
                                                 r"retrying with 2 prompts per batch"):
                got = ap.attribute_edges(model, batch, metrics=("logit_diff", "kl"), estimator=estimator, ig_steps=2)
        for metric, t in expected.values.items():
            torch.testing.assert_close(got.values[metric], t, rtol=1e-5, atol=1e-5)
        assert got.clean_metric == pytest.approx(expected.clean_metric, rel=1e-5)
        assert got.passes["batch_size"] == 2 and "batch_size" not in expected.passes


def test_out_of_memory_at_one_prompt_stops_with_a_clear_error(monkeypatch):
    model = tiny_model("gpt2")
    batch = ap.make_batch(random_pairs(4))
    calls: list[int] = []
    fragile(monkeypatch, gradients.Chunk, at_most=0, calls=calls)
    with pytest.warns(UserWarning, match="retrying with 2 prompts"), \
            pytest.raises(torch.OutOfMemoryError, match=r"out of memory attributing \(atp\) even one prompt at a "
                                                         r"time .*--low-memory.*--resume"):
        ap.attribute(model, batch, sites=("head",))
    assert calls[0] == 4 and 2 in calls and calls[-1] == 1  # halved down to one prompt before giving up


def test_a_retried_chunk_counts_its_dictionary_features_once(monkeypatch):
    """The feature scores (a dictionary spliced in, estimators/features.py) of a run whose first chunk of 4
    prompts runs out of memory after scoring part of itself equal an uninterrupted run's."""
    from test_features import random_dictionary

    model, batch = tiny_model("llama", dtype=torch.float64), ap.make_batch(random_pairs(n=4))
    d = random_dictionary("resid_pre", 1, "topk", d_sae=256, dtype=torch.float64)
    expected = ap.attribute(model, batch, sites=["mlp_out"], dictionaries=[d]).features
    from attrpatch.methods.estimators import features

    real = features.Splices._add

    def add(self, *args):  # out of memory right after a chunk of 4 added its first feature scores
        real(self, *args)
        if self.chunk.batch.n > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
    monkeypatch.setattr(features.Splices, "_add", add)
    got = ap.attribute(model, batch, sites=["mlp_out"], dictionaries=[d])
    assert got.passes["batch_size"] == 2
    for layer, ids in expected.ids["logit_diff"].items():
        assert torch.equal(got.features.ids["logit_diff"][layer], ids)
        torch.testing.assert_close(got.features.values["logit_diff"][layer], expected.values["logit_diff"][layer])
        torch.testing.assert_close(got.features.error["logit_diff"][layer], expected.error["logit_diff"][layer])
