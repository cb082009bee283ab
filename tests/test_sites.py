"""Sites: the family tables find the right tensors, and bad input gets errors that say how to fix it."""

import pytest
import torch
import transformers as tf

import attrpatch as ap
from attrpatch.engine.hooks import hooked
from conftest import KV_HEADS, N_POS, random_pairs, tiny_model


def test_dims_of_every_family(family):
    spec = ap.model_spec(tiny_model(family))
    assert (spec.dims.n_layers, spec.dims.n_heads, spec.dims.d_head, spec.dims.d_model, spec.dims.d_mlp) == (3, 4, 8, 32, 48)
    assert spec.dims.n_kv_heads == KV_HEADS.get(family, 4)


def test_views_have_the_documented_shapes(family):
    model = tiny_model(family)
    spec = ap.model_spec(model)
    batch = ap.make_batch(random_pairs(n=2))
    expect = {"embed": (2, N_POS, 32), "resid_pre": (2, N_POS, 32), "attn_out": (2, N_POS, 32),
              "mlp_out": (2, N_POS, 32), "head": (2, N_POS, 4, 8), "neuron": (2, N_POS, 48),
              "q": (2, N_POS, 4, 8), "k": (2, N_POS, spec.dims.n_kv_heads, 8), "v": (2, N_POS, spec.dims.n_kv_heads, 8)}
    seen = {}

    def grab(site, point):
        def callback(raw):
            rows = raw.shape[0] if raw.ndim == 3 else raw.shape[0] // N_POS
            seen[site] = point.read(raw, rows, N_POS).shape
        return callback
    points = {s: spec.hook_point(s, 0) for s in ap.SITES}
    with torch.no_grad(), hooked([(p, grab(s, p)) for s, p in points.items()]):
        model(input_ids=batch.clean, attention_mask=batch.mask)
    assert {s: tuple(v) for s, v in seen.items()} == expect


def test_head_view_is_the_output_projection_input():
    model = tiny_model("llama")
    spec = ap.model_spec(model)
    found = {}
    o_proj = model.model.layers[1].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda m, args: found.update(raw=args[0].clone()))
    point = spec.hook_point("head", 1)
    with torch.no_grad(), hooked([(point, lambda raw: found.update(view=point.read(raw, 2, N_POS).clone()))]):
        model(input_ids=ap.make_batch(random_pairs(n=2)).clean)
    handle.remove()
    torch.testing.assert_close(found["view"], found["raw"].view(2, N_POS, 4, 8))


def test_queries_and_keys_are_told_apart_by_causality(family):
    """In the last layer, a query at position 0 only shapes position 0's output, which the metric never
    reads; a key at position 0 is read by the last query. If q and k were swapped, this would fail."""
    # Gemma's sliding-window layers would hide position 0 from the last query: widen the window.
    model = tiny_model(family, **({"sliding_window": 64} if family.startswith("gemma") else {}))
    spec = ap.model_spec(model)
    last = spec.dims.n_layers - 1
    batch = ap.make_batch(random_pairs(changed=(0, 2)))
    comps = [ap.Component(s, last, 0, 0) for s in ("q", "k", "v")]
    eff = ap.patch(model, batch, comps, metrics=["logit_diff"])
    assert abs(eff.values[0, 0]) < 1e-6
    assert abs(eff.values[1, 0]) > 1e-4 and abs(eff.values[2, 0]) > 1e-4


def test_gemma3_sliding_layer_hides_keys_outside_its_window_from_every_method():
    """Gemma 3's last tiny layer is sliding (window 4): the last query (position 6) sees keys 3..6 only, so
    keys at 0..2 have no effect, and neither exact patching (resumed from the cache, with the layer's own
    mask) nor AtP nor AtP*'s recomputed pattern may score them; key 3 inside the window does matter."""
    model = tiny_model("gemma3_text")
    assert model.config.layer_types[2] == "sliding_attention" and model.config.sliding_window == 4
    batch = ap.make_batch(random_pairs(changed=(0, 2)))
    comps = [ap.Component("k", 2, pos, 0) for pos in (0, 2, 3)]
    exact = ap.patch(model, batch, comps).values[:, 0]
    for estimator in ("atp", "atp_star"):
        scores = ap.attribute(model, batch, sites=["k"], estimator=estimator)
        assert [scores.score(c, "logit_diff") for c in comps[:2]] == [0.0, 0.0], estimator
        assert abs(scores.score(comps[2], "logit_diff")) > 1e-4, estimator
    # AtP's zeros are exact (a masked softmax's gradient is 0 * ...); the patched pass is a different float32
    # computation of the same logits (a resumed pass, other shapes, other summation order), equal up to a few
    # ulps of logits of order 1: 9.9e-9 was seen on one CPU, so allow 1e-6, far below the 1e-4 of key 3.
    assert exact[:2].abs().max() < 1e-6 and abs(exact[2]) > 1e-4


def test_unknown_family_names_the_supported_ones_and_how_to_add_one():
    config = tf.BloomConfig(vocab_size=40, hidden_size=32, n_layer=2, n_head=4)
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(KeyError, match=r"(?s)Unsupported model family 'bloom'.*gpt2.*llama.*\n.*register_arch"):
        ap.model_spec(model)


def test_register_arch_makes_a_new_family_work():
    config = tf.LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    model.config.model_type = "my_llama"
    ap.register_arch("my_llama", ap.ARCHS["llama"])
    try:
        scores = ap.attribute(model, ap.make_batch(random_pairs()), sites=["head"])
        assert scores.values["logit_diff"]["head"].shape == (2, N_POS, 4)
    finally:
        del ap.ARCHS["my_llama"]


@pytest.mark.parametrize("component, message", [
    (ap.Component("attn_ouput", 0), r"Unknown site 'attn_ouput' for GPT2LMHeadModel; known: embed, resid_pre"),
    (ap.Component("head", 3, None, 0), r"layer 3 out of range for site 'head'.*valid 0\.\.2"),
    (ap.Component("head", 1, None, 4), r"unit 4 out of range for site 'head'.*valid 0\.\.3"),
    (ap.Component("neuron", 1), r"takes a unit index \(0\.\.47\)"),
    (ap.Component("resid_pre", 1, None, 2), r"takes no unit"),
    (ap.Component("resid_pre", 1, N_POS), r"position 7 out of range; the prompts have 7 tokens"),
])
def test_bad_components_are_named(component, message):
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match=message):
        ap.patch(model, ap.make_batch(random_pairs()), [component])


def test_bad_metric_direction_and_site_list_the_valid_ones():
    model = tiny_model("gpt2")
    batch = ap.make_batch(random_pairs())
    with pytest.raises(ValueError, match=r"Unknown metric 'logitdiff'; known: logit_diff, logprob, prob, kl"):
        ap.attribute(model, batch, metrics=["logitdiff"])
    with pytest.raises(ValueError, match=r"Unknown direction 'denoising'; known: denoise, noise"):
        ap.patch(model, batch, [ap.Component("resid_pre", 0)], direction="denoising")
    with pytest.raises(ValueError, match=r"Unknown site 'neurons'.*known: embed"):
        ap.attribute(model, batch, sites=["neurons"])
    with pytest.raises(ValueError, match=r"Unknown estimator 'atp\*'; known: atp, atp_star, ig, graddrop"):
        ap.attribute(model, batch, estimator="atp*")


def test_clean_and_corrupt_of_different_lengths_show_both():
    pair = random_pairs(n=1)[0]
    pair.corrupt_ids = pair.corrupt_ids[:-1]
    with pytest.raises(ValueError, match=r"clean has 7 tokens \[.*\], corrupt has 6"):
        ap.make_batch([pair])
