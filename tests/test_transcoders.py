"""Transcoders (issue 26): a dictionary reading one hook point (resid_mid, mlp_in) and writing another
(mlp_out), spliced as y = decode(encode(x_in)) + error, its latents scored and patched like an SAE's; and
several dictionaries per layer in one attribution, patch and screen. Tiny random models of two families."""

import json

import pytest
import torch
from safetensors.torch import save_file

import attrpatch as ap
from attrpatch.config import ScreenConfig
from attrpatch.engine.hooks import hooked
from attrpatch.engine.splicing import splice
from attrpatch.feature_screening import screen_features
from attrpatch.methods.patching.features import patch_features
from attrpatch.model.dictionaries import Dictionary, load_dictionary, save_dictionary
from attrpatch.model.sites import Component
from conftest import random_pairs, tiny_model
from feature_reference import feature_effect_reference
from test_features import (assert_exact_equals_reference, assert_joint_patch_equals_the_written_point,
                           assert_score_equals_exact_when_linear, random_dictionary)

FAMILIES = ("gpt2", "llama")
INPUTS = ("resid_mid", "mlp_in")


def random_transcoder(site="resid_mid", layer=1, architecture="standard", d_model=32, d_sae=48,
                      dtype=torch.float32, seed=0) -> Dictionary:
    """A random transcoder reading ``site`` and writing mlp_out at ``layer`` (no b_dec on its input)."""
    from dataclasses import replace
    d = random_dictionary("mlp_out", layer, architecture, d_model=d_model, d_sae=d_sae, dtype=dtype, seed=seed)
    return replace(d, site=site, out_site="mlp_out", apply_b_dec_to_input=False, name=f"transcoder-{site}")


def _logits(model, batch, hooks=()):
    with torch.no_grad(), hooked(list(hooks)):
        return model(input_ids=batch.clean, attention_mask=batch.mask).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", INPUTS)
@pytest.mark.parametrize("architecture", ("standard", "jumprelu", "topk"))
def test_splicing_a_transcoder_leaves_the_outputs_unchanged(family, site, architecture):
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs())
    d = random_transcoder(site, 1, architecture, dtype=torch.float64)
    hooks = splice(ap.model_spec(model), d, batch.n_pos)
    assert len(hooks) == 2  # reads x_in, writes mlp_out
    torch.testing.assert_close(_logits(model, batch, hooks), _logits(model, batch), atol=1e-10, rtol=1e-10)


def test_a_saved_transcoder_loads_back_in_sae_lens_format(tmp_path):
    d = random_transcoder("resid_mid", 2, "jumprelu")
    save_dictionary(d, tmp_path / "tc")
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_transcoder" and cfg["hook_name_out"] == "blocks.2.hook_mlp_out"
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_mid" and cfg["d_out"] == 32
    back = load_dictionary(tmp_path / "tc")
    assert (back.site, back.out_site, back.layer, back.architecture, back.hook) == \
        ("resid_mid", "mlp_out", 2, "jumprelu", "L2.resid_mid>mlp_out")
    assert not back.apply_b_dec_to_input
    cfg["hook_name"] = "blocks.2.ln2.hook_normalized"  # sae-lens <= 5: hook_name at the top level
    cfg["architecture"] = "transcoder"
    (tmp_path / "tc" / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "metadata"}))
    assert load_dictionary(tmp_path / "tc").hook == "L2.mlp_in>mlp_out"
    save_file({k: getattr(d, k) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, str(tmp_path / "t.safetensors"))
    plain = load_dictionary(f"{tmp_path / 't.safetensors'}@blocks.1.hook_mlp_in>blocks.1.hook_mlp_out")
    assert plain.hook == "L1.resid_mid>mlp_out"


def test_bad_transcoders_are_refused_with_the_fix(tmp_path):
    d = random_transcoder()
    weights = {k: getattr(d, k) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    save_file(weights, str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError, match="only transcoders within one layer"):
        load_dictionary(f"{tmp_path / 't.safetensors'}@L1.resid_mid>L2.mlp_out")
    save_file({**weights, "W_skip": torch.zeros(32, 32)}, str(tmp_path / "skip.safetensors"))
    with pytest.raises(ValueError, match=r"skip transcoder \(W_skip\) is not supported"):
        load_dictionary(f"{tmp_path / 'skip.safetensors'}@L1.resid_mid>L1.mlp_out")
    with pytest.raises(ValueError, match="an SAE reads one of resid_pre, attn_out, mlp_out, not 'resid_mid'"):
        load_dictionary(f"{tmp_path / 't.safetensors'}@L1.resid_mid")
    with pytest.raises(ValueError, match="neither subtracts b_dec from its input nor normalises it"):
        random_transcoder().__class__(**{**random_transcoder().__dict__, "apply_b_dec_to_input": True})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", INPUTS)
@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_exact_effect_of_a_transcoder_latent_equals_the_naive_reference(family, site, direction):
    assert_exact_equals_reference(family, random_transcoder(site, 1, "topk", dtype=torch.float64), direction,
                                  n=24, copies=5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_atp_equals_exact_where_the_metric_is_linear_in_a_transcoder_latent(family, direction):
    # no final norm: logit_diff is linear in the last block's MLP output, which the transcoder replaces
    assert_score_equals_exact_when_linear(family, random_transcoder("resid_mid", 2, dtype=torch.float64), direction)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", INPUTS)
def test_every_transcoder_latent_and_its_error_together_equal_patching_mlp_out(family, site):
    assert_joint_patch_equals_the_written_point(family, random_transcoder(site, 1, "topk", dtype=torch.float64))


@pytest.mark.parametrize("family", FAMILIES)
def test_transcoder_latent_and_error_scores_add_up_to_mlp_outs_score(family):
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs())
    d = random_transcoder("mlp_in", 1, dtype=torch.float64)
    f = ap.attribute(model, batch, sites=[], dictionaries=[d]).features
    plain = ap.attribute(model, batch, sites=["mlp_out"])
    torch.testing.assert_close(f.values["logit_diff"][d.hook].sum(1) + f.error["logit_diff"][d.hook],
                               plain.values["logit_diff"]["mlp_out"][1], atol=1e-10, rtol=1e-8)


def _several():
    """Two SAEs and a transcoder at layer 1, an SAE at layer 0 and one at layer 2."""
    return [random_dictionary("resid_pre", 1, "topk", dtype=torch.float64, seed=1),
            random_dictionary("mlp_out", 1, "standard", dtype=torch.float64, seed=2),
            random_transcoder("resid_mid", 1, "topk", dtype=torch.float64, seed=3),
            random_dictionary("attn_out", 0, "jumprelu", dtype=torch.float64, seed=4),
            random_dictionary("resid_pre", 2, "topk", dtype=torch.float64, seed=5)]


@pytest.mark.parametrize("family", FAMILIES)
def test_several_dictionaries_per_layer_score_like_each_alone(family):
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs())
    together = ap.attribute(model, batch, sites=[], dictionaries=_several()).features
    assert sorted(together.layers) == ["L0.attn_out", "L1.mlp_out", "L1.resid_mid>mlp_out", "L1.resid_pre",
                                       "L2.resid_pre"]
    for d in _several():  # every splice is transparent, so each dictionary's scores are those it has alone
        alone = ap.attribute(model, batch, sites=[], dictionaries=[d]).features
        torch.testing.assert_close(together.error["logit_diff"][d.hook], alone.error["logit_diff"][d.hook])
        torch.testing.assert_close(together.ids["logit_diff"][d.hook], alone.ids["logit_diff"][d.hook])
        torch.testing.assert_close(together.values["logit_diff"][d.hook], alone.values["logit_diff"][d.hook])
    names = [str(c) for c in together.components("logit_diff")]
    assert len(names) == len(set(names))  # each names its dictionary where its layer has several
    assert "L1.resid_mid>mlp_out:sae_error@0" in names and "L0.sae_error@0" in names
    with pytest.raises(KeyError, match=r"layer 1 has 3 dictionaries .*dictionary="):
        together.score(Component("sae_error", 1, 0), "logit_diff")


@pytest.mark.parametrize("family", FAMILIES)
def test_several_dictionaries_per_layer_patch_like_each_alone(family):
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs())
    dictionaries = _several()
    scores = ap.attribute(model, batch, sites=[], dictionaries=dictionaries).features
    by_hook = {d.hook: d for d in dictionaries}
    comps = [c for hook in by_hook for c in sorted(scores.components("logit_diff", hook=hook),
                                                   key=lambda c: -abs(scores.score(c, "logit_diff")))[:4]]
    eff = patch_features(model, batch, dictionaries, comps, copies=6)
    ref = torch.tensor([feature_effect_reference(model, by_hook[scores.hook(c)], batch, c) for c in comps],
                       dtype=torch.float64)
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(eff.values[:, 0], ref, atol=1e-9, rtol=1e-7)
    joint = tuple(comps[:3]) + tuple(comps[-3:])  # across dictionaries and layers: runs without error
    assert torch.isfinite(patch_features(model, batch, dictionaries, [joint]).values).all()


def test_feature_screen_of_several_dictionaries_per_layer():
    model, batch = tiny_model("llama"), ap.make_batch(random_pairs())
    dictionaries = [random_dictionary("resid_pre", 1, "topk", seed=1), random_transcoder("mlp_in", 1, seed=2),
                    random_dictionary("mlp_out", 2, seed=3)]
    found = screen_features(model, batch, dictionaries, ScreenConfig(top_k=3, random_k=2, sites=("resid_pre",)))
    assert list(found.agreement["denoise"]) == ["L1.mlp_in>mlp_out", "L1.resid_pre", "L2.mlp_out"]
    per_hook = {h: [r for r in found.rows if r["hook"] == h] for h in found.hooks}
    assert all(len(rows) == 5 for rows in per_hook.values())
    assert all(r["name"].startswith("L1.mlp_in>mlp_out:") for r in per_hook["L1.mlp_in>mlp_out"])
    assert all(r["name"].startswith(("L2F", "L2.sae_error")) for r in per_hook["L2.mlp_out"])
