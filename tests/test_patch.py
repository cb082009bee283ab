"""Exact patching: invariants on every family, and equality with the naive reference."""

import random

import pytest
import torch

import attrpatch as ap
from attrpatch.methods.patching import exact as patching, passes
from attrpatch.model.sites import components
from conftest import N_POS, random_pairs, tiny_model
from reference import exact_reference

METRICS = list(ap.METRICS)


def sample_components(spec, n_pos, k=3, seed=0):
    """k random components of every site, half per position, half at all positions."""
    rng = random.Random(seed)
    chosen = []
    for site in ap.SITES:
        for per_position in (True, False):
            pool = components(site, spec.dims, n_pos, per_position=per_position)
            chosen += rng.sample(pool, min(k, len(pool)))
    return chosen


@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_resid_pre_layer0_restores_source_metric(family, direction):
    model = tiny_model(family)
    batch = ap.make_batch(random_pairs())
    eff = ap.patch(model, batch, [ap.Component("resid_pre", 0)], metrics=METRICS, direction=direction)
    scores = ap.attribute(model, batch, sites=["resid_pre"], metrics=METRICS, direction=direction)
    for m in METRICS:
        source = scores.clean_metric[m] if direction == "denoise" else scores.corrupt_metric[m]
        patched = eff.receiver_metric[m] + eff.effect(ap.Component("resid_pre", 0), m)
        assert patched == pytest.approx(source, abs=1e-5), m


def test_patching_own_value_changes_nothing(family):
    model = tiny_model(family)
    pair = random_pairs(n=2)
    for p in pair:
        p.corrupt_ids = list(p.clean_ids)
    batch = ap.make_batch(pair)
    spec = ap.model_spec(model)
    eff = ap.patch(model, batch, sample_components(spec, N_POS), metrics=METRICS)
    assert eff.values.abs().max() < 1e-5


@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_batched_resumed_equals_naive_reference(family, direction):
    model = tiny_model(family)
    batch = ap.make_batch(random_pairs(n=3))
    spec = ap.model_spec(model)
    comps = sample_components(spec, N_POS, k=2, seed=1)
    eff = ap.patch(model, batch, comps, metrics=["logit_diff"], direction=direction, copies=5)
    naive = torch.tensor([exact_reference(model, batch, c, direction) for c in comps])
    torch.testing.assert_close(eff.values[:, 0], naive, atol=1e-4, rtol=0)
    assert eff.passes["forward_equivalents"] - eff.passes["runs"] < len(comps)  # layers before the patch were reused


def test_batched_equals_one_at_a_time_all_metrics():
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(n=4))
    spec = ap.model_spec(model)
    comps = sample_components(spec, N_POS, k=2, seed=2)
    batched = ap.patch(model, batch, comps, metrics=METRICS, copies=7, batch_size=3)
    single = ap.patch(model, batch, comps, metrics=METRICS, copies=1, resume=False)
    torch.testing.assert_close(batched.values, single.values, atol=1e-5, rtol=0)
    assert batched.receiver_metric == pytest.approx(single.receiver_metric)


def test_per_prompt_effects_average_to_mean():
    model = tiny_model("gpt2")
    batch = ap.make_batch(random_pairs(n=4))
    comps = [ap.Component("head", 1, None, 2), ap.Component("mlp_out", 0, 3)]
    eff = ap.patch(model, batch, comps, per_prompt=True, batch_size=3)
    assert eff.per_prompt.shape == (2, 1, 4)
    torch.testing.assert_close(eff.per_prompt.mean(-1), eff.values)


def test_padded_prompts_equal_separate_runs():
    """All-position components on prompts of different lengths equal each prompt run alone."""
    model = tiny_model("gpt2")
    pairs = random_pairs(n=3, lengths=[7, 5, 6])
    comps = [ap.Component("head", 1, None, 0), ap.Component("neuron", 2, None, 5), ap.Component("resid_pre", 1)]
    together = ap.patch(model, ap.make_batch(pairs), comps, metrics=METRICS)
    alone = torch.stack([ap.patch(model, ap.make_batch([p]), comps, metrics=METRICS).values for p in pairs])
    torch.testing.assert_close(together.values, alone.mean(0), atol=1e-5, rtol=0)


def test_per_position_on_unequal_lengths_is_refused():
    model = tiny_model("gpt2")
    batch = ap.make_batch(random_pairs(n=2, lengths=[7, 5]))
    with pytest.raises(ValueError, match=r"one token length.*\[5, 7\]"):
        ap.patch(model, batch, [ap.Component("resid_pre", 1, 2)])


def test_joint_patch_of_all_qkv_equals_attn_out():
    """Patching q, k and v of every head of a layer together is patching the attention output."""
    for family in ("gpt2", "gpt_neox", "phi3", "llama", "gemma3_text", "qwen3", "olmo2"):
        model = tiny_model(family)
        batch = ap.make_batch(random_pairs())
        spec = ap.model_spec(model)
        qkv = tuple(c for s in "qkv" for c in components(s, spec.dims, N_POS, per_position=False) if c.layer == 1)
        eff = ap.patch(model, batch, [qkv, ap.Component("attn_out", 1)])
        assert eff.values[0, 0] == pytest.approx(float(eff.values[1, 0]), abs=1e-5), family


def test_bfloat16_model_runs_with_float32_results():
    model32 = tiny_model("llama")
    model16 = tiny_model("llama", dtype=torch.bfloat16)
    batch = ap.make_batch(random_pairs())
    comps = [ap.Component("head", 2, None, 1), ap.Component("resid_pre", 1, 3)]
    e32 = ap.patch(model32, batch, comps)
    e16 = ap.patch(model16, batch, comps)
    assert e16.values.dtype == torch.float32
    torch.testing.assert_close(e16.values, e32.values, atol=0.1, rtol=0.1)


def test_out_of_memory_halves_the_batch_and_gives_the_same_effects(monkeypatch):
    patch_module = patching
    model = tiny_model("gpt2")
    batch = ap.make_batch(random_pairs())
    comps = sample_components(ap.model_spec(model), N_POS, k=2)
    expected = ap.patch(model, batch, comps, copies=8)
    real = patch_module.run_blocks

    def fragile(spec, start, hidden, calls, n, *args):
        if n > 3:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(spec, start, hidden, calls, n, *args)
    monkeypatch.setattr(patch_module, "run_blocks", fragile)
    with pytest.warns(UserWarning, match=r"out of memory patching 8 copies.*retrying with 4"):
        got = ap.patch(model, batch, comps, copies=8)
    torch.testing.assert_close(got.values, expected.values)


def test_gaussian_noise_corruption_is_applied_everywhere_the_corrupt_run_is():
    """The noised corrupt run equals the model on inputs_embeds = embeddings + noise; restoring the whole
    stream at layer 0 gives back the clean run; and batched/resumed patching of the noised run still
    equals the naive loop."""
    from attrpatch.inputs.corruption import with_embedding_noise
    model = tiny_model("gpt2")
    batch = with_embedding_noise(ap.make_batch(random_pairs()), model.transformer.wte.weight.detach(), seed=1)
    assert torch.equal(batch.clean, batch.corrupt) and batch.noise.abs().sum() > 0
    assert (batch.noise[:, [0, 2, 4, 5, 6]] == 0).all()  # only the replaced (key) positions are noised
    scores = ap.attribute(model, batch, sites=["resid_pre"], metrics=["logit_diff"])
    with torch.no_grad():
        embeds = model.transformer.wte(batch.clean) + batch.noise
        logits = model(inputs_embeds=embeds, attention_mask=batch.mask).logits[torch.arange(batch.n), batch.last]
    expected = (logits.gather(1, batch.answer[:, None]) - logits.gather(1, batch.wrong[:, None])).mean()
    assert scores.corrupt_metric["logit_diff"] == pytest.approx(float(expected), abs=1e-5)
    comps = [ap.Component("resid_pre", 0), ap.Component("head", 1, 3, 2), ap.Component("mlp_out", 2, 6)]
    for direction in ap.DIRECTIONS:
        eff = ap.patch(model, batch, comps, direction=direction, copies=3)
        naive = ap.patch(model, batch, comps, direction=direction, copies=1, resume=False)
        torch.testing.assert_close(eff.values, naive.values, atol=1e-5, rtol=0)
    restored = ap.patch(model, batch, comps[:1]).values[0, 0] + scores.corrupt_metric["logit_diff"]
    assert float(restored) == pytest.approx(scores.clean_metric["logit_diff"], abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "gemma2", "phi", "gemma3_text", "olmo2"])
def test_per_position_sweep_of_after_attention_sites_equals_naive(family):
    """Head/neuron/attn_out/mlp_out patches at one position change only that row of their block, so the
    block computes only those rows; every layer but the last (where the trick does not apply)."""
    model = tiny_model(family)
    spec = ap.model_spec(model)
    batch = ap.make_batch(random_pairs(n=2))
    comps = [c for s in ("head", "attn_out", "mlp_out") for c in components(s, spec.dims, N_POS, per_position=True)
             if c.layer < spec.dims.n_layers - 1 and c.pos > 0]
    comps += [c for c in components("neuron", spec.dims, N_POS, per_position=True)[::17] if c.pos > 0]
    fast = ap.patch(model, batch, comps, copies=6)
    naive = ap.patch(model, batch, comps, copies=1, resume=False)
    torch.testing.assert_close(fast.values, naive.values, atol=1e-4, rtol=0)


def test_forward_equivalents_count_the_runs_and_every_copys_unembedding():
    model = tiny_model("gpt2")
    spec = ap.model_spec(model)
    batch = ap.make_batch(random_pairs(n=2))
    assert ap.patch(model, batch, []).passes == {"patched_rows": 0.0, "forward_equivalents": 2.0, "runs": 2.0}
    last = spec.dims.n_layers - 1
    eff = ap.patch(model, batch, [ap.Component("mlp_out", last, None)], copies=1)
    share = passes.block_share(spec, batch.n_pos)
    assert 0 < share < 1
    same = passes.same_prefix(batch)  # positions where the two runs agree are not computed
    assert 0 < same < batch.n_pos
    computed = (batch.n_pos - same) / batch.n_pos
    assert eff.passes["forward_equivalents"] == pytest.approx(2 + share / spec.dims.n_layers * computed + 1 - share)


def _joined_passes(monkeypatch) -> list:
    """Record the ``starts`` of every resumed pass (copies joining at their own block)."""
    seen, run = [], patching.run_blocks

    def spy(*args, **kwargs):
        seen.append(list(args[-1]))
        return run(*args, **kwargs)
    monkeypatch.setattr(patching, "run_blocks", spy)
    return seen


@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_copies_joining_at_their_own_block_equal_naive(family, direction, monkeypatch):
    """One pass serves patches at several layers, each copy entering at its own block with the receiver's
    input there (per position: from its first position on, earlier keys/values from the receiver's cache)."""
    model = tiny_model(family)
    spec = ap.model_spec(model)
    batch = ap.make_batch(random_pairs(n=2))
    last = spec.dims.n_layers - 1
    comps = [ap.Component("resid_pre", layer, 3) for layer in range(1, last + 1)]
    comps += [ap.Component("mlp_out", layer, 4) for layer in range(last + 1)]
    comps += [ap.Component("head", layer, None, layer % spec.dims.n_heads) for layer in range(last + 1)]
    comps += [(ap.Component("attn_out", 0, 5), ap.Component("neuron", last, None, 1))]
    seen = _joined_passes(monkeypatch)
    fast = ap.patch(model, batch, comps, metrics=METRICS, direction=direction, copies=8)
    naive = torch.tensor([[exact_reference(model, batch, c, direction, m) for m in METRICS] for c in comps[:4]])
    single = ap.patch(model, batch, comps, metrics=METRICS, direction=direction, copies=1, resume=False)
    torch.testing.assert_close(fast.values, single.values, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.values[:4], naive.float(), atol=1e-4, rtol=0)
    assert any(len(set(starts)) > 1 for starts in seen)  # some pass did join copies at several blocks


def test_joining_on_padded_prompts_equals_separate_runs(monkeypatch):
    """All-position patches at several layers in one pass, prompts of different lengths (right padding)."""
    model = tiny_model("llama")
    pairs = random_pairs(n=3, lengths=[7, 5, 6])
    comps = [ap.Component("head", 2, None, 1), ap.Component("neuron", 0, None, 5), ap.Component("attn_out", 1),
             ap.Component("mlp_out", 2)]
    seen = _joined_passes(monkeypatch)
    together = ap.patch(model, ap.make_batch(pairs), comps, metrics=METRICS, copies=4)
    assert seen == [[0, 1, 2, 2]]
    alone = torch.stack([ap.patch(model, ap.make_batch([p]), comps, metrics=METRICS, copies=1).values for p in pairs])
    torch.testing.assert_close(together.values, alone.mean(0), atol=1e-5, rtol=0)


def test_shared_runs_give_the_same_effects_and_are_not_counted_again():
    """A second patch call on the same prompts and direction takes the source and receiving runs from
    ``runs`` (no new forward), and its effects equal a call that makes its own."""
    model = tiny_model("llama")
    spec = ap.model_spec(model)
    batch = ap.make_batch(random_pairs(n=3))
    comps = sample_components(spec, N_POS, k=2, seed=3)
    shared: dict = {}
    first = ap.patch(model, batch, comps, metrics=METRICS, direction="noise", runs=shared)
    again = ap.patch(model, batch, comps[::2], metrics=METRICS, direction="noise", alpha=0.5, runs=shared)
    alone = ap.patch(model, batch, comps[::2], metrics=METRICS, direction="noise", alpha=0.5)
    assert first.passes["runs"] == 2 and again.passes["runs"] == 0 and alone.passes["runs"] == 2
    torch.testing.assert_close(again.values, alone.values, atol=1e-6, rtol=0)
    other = ap.make_batch(random_pairs(n=3, seed=1))  # other prompts: runs of their own
    assert ap.patch(model, other, comps[:2], direction="noise", runs=shared).passes["runs"] == 2


def test_activation_change_from_shared_runs_equals_its_own_runs():
    from attrpatch.methods.patching.diagnostics import activation_change

    model = tiny_model("gpt2")
    spec = ap.model_spec(model)
    batch = ap.make_batch(random_pairs(n=3))
    comps = sample_components(spec, N_POS, k=2, seed=4)
    shared: dict = {}
    ap.patch(model, batch, comps, direction="denoise", runs=shared)
    assert activation_change(spec, batch, "denoise", comps, shared=shared) == pytest.approx(
        activation_change(spec, batch, "denoise", comps), abs=1e-6)


def test_activation_change_under_an_ablation_never_reads_the_shared_corrupt_run():
    """Shared runs hold the corrupt run as the source; an ablation's source is its own values."""
    from attrpatch.methods.patching.diagnostics import activation_change

    model = tiny_model("llama")
    spec = ap.model_spec(model)
    batch = ap.make_batch(random_pairs(n=3))
    comps = [c for c in sample_components(spec, N_POS, k=2, seed=4) if c.site != "embed"]
    shared: dict = {}
    ap.patch(model, batch, comps, direction="noise", runs=shared, ablation="zero")
    zero = activation_change(spec, batch, "noise", comps, ablation="zero", shared=shared)
    assert zero == pytest.approx(activation_change(spec, batch, "noise", comps, ablation="zero"), abs=1e-6)
    assert zero == pytest.approx([1.0] * len(comps), abs=1e-6)  # |0 - a| / max(|0|, |a|)
    assert zero != pytest.approx(activation_change(spec, batch, "noise", comps, shared=shared), abs=1e-3)


@pytest.mark.parametrize("noised", [False, True])
def test_the_prompts_shared_prefix_is_not_recomputed_and_changes_no_effect(family, noised, monkeypatch):
    """Clean and corrupt prompts that agree on their first positions (same tokens, no noise) give the same
    activations there in a causal model: every resumed pass starts at the first differing position, all-
    position heads and neurons included, patches inside the prefix are 0 with no pass, and every effect
    equals the naive one-full-forward sweep. Noise counts as a difference (else the noised run's prefix
    would be skipped and the head/neuron effects would miss it)."""
    from attrpatch.inputs.corruption import with_embedding_noise
    model = tiny_model(family)
    spec = ap.model_spec(model)
    batch = ap.make_batch(random_pairs(n=3, changed=(4, 6)))
    if noised:  # noise at the replaced positions 4 and 6, ids made equal
        batch = with_embedding_noise(batch, spec.module(spec.arch.embed).weight.detach(), seed=1)
        assert torch.equal(batch.clean, batch.corrupt)
    assert passes.same_prefix(batch) == 4
    last = spec.dims.n_layers - 1
    comps = [ap.Component("head", last, None, 0), ap.Component("neuron", 0, None, 5), ap.Component("attn_out", 0, 2),
             ap.Component("resid_pre", last, 5), ap.Component("mlp_out", 0, 4), ap.Component("resid_pre", 1, None)]
    first_positions, run = [], patching.run_blocks
    monkeypatch.setattr(patching, "run_blocks", lambda *a, **k: first_positions.append(a[7]) or run(*a, **k))
    for direction in ap.DIRECTIONS:
        fast = ap.patch(model, batch, comps, metrics=METRICS, direction=direction, copies=2)
        naive = ap.patch(model, batch, comps, metrics=METRICS, direction=direction, copies=1, resume=False)
        torch.testing.assert_close(fast.values, naive.values, atol=1e-5, rtol=1e-4)
        assert (fast.values[2] == 0).all()  # attn_out@2: inside the prefix, no pass
    assert first_positions and min(first_positions) == 4
    assert passes.same_prefix(ap.make_batch(random_pairs(n=2, changed=()))) == N_POS - 1  # clean into clean


def test_an_ablation_has_no_shared_prefix(monkeypatch):
    """An ablation's values differ from the clean run's at every position: its passes start at position 0."""
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(n=3, changed=(4, 6)))
    first_positions, run = [], patching.run_blocks
    monkeypatch.setattr(patching, "run_blocks", lambda *a, **k: first_positions.append(a[7]) or run(*a, **k))
    comps = [ap.Component("head", 1, None, 0), ap.Component("attn_out", 0, 2)]
    fast = ap.patch(model, batch, comps, direction="noise", ablation="mean", copies=2)
    naive = ap.patch(model, batch, comps, direction="noise", ablation="mean", copies=1, resume=False)
    torch.testing.assert_close(fast.values, naive.values, atol=1e-5, rtol=1e-4)
    assert float(fast.values[1, 0].abs()) > 1e-4 and sorted(first_positions) == [0, 2]  # the head from 0, not 4
