"""The block-wise backward (``attribute(..., recompute=True)``, methods/estimators/blockwise.py): the same scores as the
plain backward for every gradient estimator and family, with one block's autograd state alive at a time;
and the per-prompt scores the screen keeps (``prompt_positions``)."""

import weakref

import pytest
import torch

import attrpatch as ap
from attrpatch.methods.estimators.attribution import ESTIMATORS
from conftest import random_pairs, tiny_model


def _close(a, b):
    for m in a.values:
        for site in a.values[m]:
            torch.testing.assert_close(b.values[m][site], a.values[m][site], atol=1e-5, rtol=1e-5,
                                       msg=f"{m} {site}")


@pytest.mark.parametrize("estimator", sorted(ESTIMATORS))
def test_recompute_gives_the_plain_backwards_scores(family, estimator):
    model = tiny_model(family)
    batch = ap.make_batch(random_pairs(n=3, lengths=[7, 5, 6]))  # padded prompts too
    kw = dict(sites=ap.SITES, metrics=["logit_diff", "kl"], estimator=estimator, ig_steps=2, direction="noise")
    plain = ap.attribute(model, batch, **kw)
    _close(plain, ap.attribute(model, batch, recompute=True, **kw))


def test_recompute_chunks_and_per_prompt_agree_with_plain():
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(n=4))
    kw = dict(metrics=["logit_diff"], per_prompt=True, batch_size=3)
    _close(ap.attribute(model, batch, **kw), ap.attribute(model, batch, recompute=True, **kw))


@pytest.mark.parametrize("ablation", ["zero", "mean", "resample"])
def test_recompute_scores_an_ablation_as_the_plain_backward_does(ablation):
    """An ablation's source values are no run's, so recompute keeps them (the source is not rerun lazily)."""
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(n=4))
    kw = dict(sites=ap.SITES, metrics=["logit_diff"], direction="noise", ablation=ablation, batch_size=3)
    plain = ap.attribute(model, batch, **kw)
    _close(plain, ap.attribute(model, batch, recompute=True, **kw))
    corrupt = ap.attribute(model, batch, sites=ap.SITES, metrics=["logit_diff"], direction="noise")
    assert not torch.allclose(plain.values["logit_diff"]["neuron"], corrupt.values["logit_diff"]["neuron"])


def _peak_saved_bytes(fn) -> int:
    """The peak bytes of tensors autograd holds for backward passes at once while ``fn`` runs."""
    live = [0, 0]  # now, peak

    class Held:
        def __init__(self, t):
            self.t = t

    def pack(t):
        held, n = Held(t), t.numel() * t.element_size()
        live[0] += n
        live[1] = max(live[1], live[0])
        weakref.finalize(held, lambda: live.__setitem__(0, live[0] - n))
        return held

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda held: held.t):
        fn()
    return live[1]


def test_recompute_holds_one_blocks_autograd_state_at_a_time():
    model = tiny_model("gpt2", n_layer=8).requires_grad_(False)
    batch = ap.make_batch(random_pairs(n=4))
    plain = _peak_saved_bytes(lambda: ap.attribute(model, batch))
    blockwise = _peak_saved_bytes(lambda: ap.attribute(model, batch, recompute=True))
    assert blockwise < 0.3 * plain, (blockwise, plain)


def test_weights_keep_requires_grad_and_get_no_gradient():
    model = tiny_model("gpt2")
    assert all(p.requires_grad for p in model.parameters())
    ap.attribute(model, ap.make_batch(random_pairs()), recompute=True)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_prompt_scores_equal_per_prompt_values_summed_where_asked():
    model = tiny_model("qwen2", dtype=torch.float64)
    batch = ap.make_batch(random_pairs(n=5))
    metrics = ["logit_diff", "kl"]
    full = ap.attribute(model, batch, metrics=metrics, per_prompt=True, batch_size=2)
    positions = {"neuron": False, "head": False}
    kept = ap.attribute(model, batch, metrics=metrics, prompt_positions=positions, batch_size=2)
    assert not kept.per_prompt
    for m in metrics:
        for site in ap.SITES:
            want = full.values[m][site]  # [batch, layer, pos, (unit)]
            torch.testing.assert_close(kept.values[m][site], want.mean(0))
            want = want if positions.get(site, True) else want.sum(2, keepdim=True)
            torch.testing.assert_close(kept.prompts[m][site], want)
    assert kept.prompts["kl"]["neuron"].shape[2] == 1


def test_prompt_positions_and_per_prompt_together_are_refused():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="pass one of them"):
        ap.attribute(model, ap.make_batch(random_pairs()), per_prompt=True, prompt_positions={})


def test_recompute_holds_one_blocks_deltas_at_a_time(monkeypatch):
    from attrpatch.methods.estimators import blockwise

    seen = []
    through = blockwise._through

    def spy(chunk, out, x, grads, passes):
        seen.append({key[1] for key in chunk.deltas if key != blockwise.EMBED} | {key[1] for key in chunk.source})
        return through(chunk, out, x, grads, passes)
    monkeypatch.setattr(blockwise, "_through", spy)
    model = tiny_model("llama", num_hidden_layers=4)
    ap.attribute(model, ap.make_batch(random_pairs()), sites=ap.SITES, recompute=True)
    assert seen == [{3}, {2}, {1}, {0}, set()]  # the blocks top down, then the embeddings


@pytest.mark.parametrize("estimator, extra", [("atp", 2), ("ig", 2), ("graddrop", 2)])
def test_recompute_counts_its_reruns_as_forward_passes(estimator, extra):
    model = tiny_model("gpt2")
    batch = ap.make_batch(random_pairs())
    plain = ap.attribute(model, batch, estimator=estimator, ig_steps=2)
    blockwise = ap.attribute(model, batch, estimator=estimator, ig_steps=2, recompute=True)
    assert blockwise.passes["forward"] == plain.passes["forward"] + extra
    assert blockwise.passes["backward"] == plain.passes["backward"]


def test_low_memory_screen_gives_the_same_rows_and_intervals():
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(n=4))
    runs = {low: ap.screen(model, batch, ap.ScreenConfig(direction="both", top_k=5, random_k=3, progress=False,
                                                         low_memory=low)) for low in (False, True)}
    plain, low = runs[False].rows, runs[True].rows
    assert len(plain) == len(low) > 0
    for a, b in zip(plain, low):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert b[key] == _approx(value), key
    assert runs[True].agreement == _approx(runs[False].agreement)  # correlations and their bootstrap intervals


def _approx(x):
    if isinstance(x, dict):
        return {k: _approx(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_approx(v) for v in x)
    return pytest.approx(x, rel=1e-5, abs=1e-6, nan_ok=True) if isinstance(x, float) else x
