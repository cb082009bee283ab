"""Property-based: the core invariants on randomly drawn tiny configurations of several families."""

import torch
import transformers as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attrpatch as ap
from attrpatch.model.sites import components
from conftest import Pair

FAMILIES = {
    "gpt2": lambda d, L, h, kv: tf.GPT2Config(n_embd=d, n_layer=L, n_head=h, n_inner=2 * d, vocab_size=30,
                                              n_positions=32, initializer_range=0.3),
    "llama": lambda d, L, h, kv: tf.LlamaConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=h,
                                                num_key_value_heads=kv, intermediate_size=2 * d, vocab_size=30,
                                                initializer_range=0.3),
    "gpt_neox": lambda d, L, h, kv: tf.GPTNeoXConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=h,
                                                     intermediate_size=2 * d, vocab_size=30, initializer_range=0.3),
    "opt": lambda d, L, h, kv: tf.OPTConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=h,
                                            ffn_dim=2 * d, vocab_size=30, word_embed_proj_dim=d, init_std=0.3),
}


@st.composite
def setups(draw):
    family = draw(st.sampled_from(sorted(FAMILIES)))
    heads = draw(st.sampled_from([2, 4]))
    kv = draw(st.sampled_from([h for h in (1, 2, heads) if heads % h == 0]))
    d_head = draw(st.sampled_from([4, 8]))
    layers = draw(st.integers(1, 3))
    n_pos = draw(st.integers(2, 6))
    n = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 10_000))
    return family, heads * d_head, layers, heads, kv, n_pos, n, seed


def _build(family, d, layers, heads, kv, n_pos, n, seed):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(FAMILIES[family](d, layers, heads, kv)).eval()
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        clean = torch.randint(0, 30, (n_pos,), generator=g).tolist()
        corrupt = torch.randint(0, 30, (n_pos,), generator=g).tolist()
        a, w = torch.randperm(30, generator=g)[:2].tolist()
        pairs.append(Pair(clean, corrupt, a, w))
    return model, ap.make_batch(pairs)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setups())
def test_invariants_hold_on_random_configurations(setup):
    family, d, layers, heads, kv, n_pos, n, seed = setup
    model, batch = _build(family, d, layers, heads, kv, n_pos, n, seed)
    spec = ap.model_spec(model)
    metrics = ["logit_diff", "kl"]
    # patching the whole residual stream at layer 0 restores the clean run
    scores = ap.attribute(model, batch, sites=["head", "resid_pre"], metrics=metrics)
    eff = ap.patch(model, batch, [ap.Component("resid_pre", 0)], metrics=metrics)
    for j, m in enumerate(metrics):
        assert abs(eff.receiver_metric[m] + float(eff.values[0, j]) - scores.clean_metric[m]) < 1e-4
    # batched + layer-resumed patching equals one full forward per component
    comps = components("head", spec.dims, n_pos, per_position=True)[::3] + components("neuron", spec.dims, n_pos,
                                                                                          per_position=False)[::7]
    fast = ap.patch(model, batch, comps, metrics=metrics, copies=4)
    slow = ap.patch(model, batch, comps, metrics=metrics, copies=1, resume=False)
    torch.testing.assert_close(fast.values, slow.values, atol=1e-4, rtol=0)
    # head scores add up to the attention output's
    attn = ap.attribute(model, batch, sites=["head", "attn_out"])
    torch.testing.assert_close(attn.values["logit_diff"]["head"].sum(-1), attn.values["logit_diff"]["attn_out"],
                               atol=1e-4, rtol=1e-4)
