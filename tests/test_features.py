"""Dictionary latents as components (issue 26): loading, splicing with the error term, AtP of latents from
the same backward, exact patching against a naive reference, on tiny random models of two families."""

import json

import pytest
import torch
from safetensors.torch import save_file

import attrpatch as ap
from attrpatch.engine.hooks import hooked
from attrpatch.engine.splicing import splice
from attrpatch.model.dictionaries import Dictionary, load_dictionary, parse_hook, save_dictionary
from attrpatch.methods.patching.features import patch_features
from attrpatch.model.sites import Component
from conftest import N_POS, random_pairs, tiny_model
from feature_reference import encode, feature_effect_reference
from test_attribute import _linear_readout

FAMILIES = ("gpt2", "llama")
ARCHITECTURES = ("standard", "jumprelu", "topk")


def random_dictionary(site="resid_pre", layer=1, architecture="standard", d_model=32, d_sae=48,
                      dtype=torch.float32, seed=0, normalize="none") -> Dictionary:
    """A random dictionary with a negative encoder bias, so that roughly a third of its latents fire."""
    g = torch.Generator().manual_seed(seed)
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return Dictionary(W_enc=rand(d_model, d_sae, scale=0.3), b_enc=rand(d_sae, scale=0.3) - 0.5,
                      W_dec=rand(d_sae, d_model, scale=0.3), b_dec=rand(d_model, scale=0.1), site=site, layer=layer,
                      architecture=architecture, threshold=rand(d_sae, scale=0.1).abs() if architecture == "jumprelu" else None,
                      k=6 if architecture == "topk" else None, normalize=normalize, name=f"random-{architecture}")


def _logits(model, batch, hooks=()):
    spec = ap.model_spec(model)
    with torch.no_grad(), hooked(list(hooks)):
        return spec.model(input_ids=batch.clean, attention_mask=batch.mask).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("site", ("resid_pre", "attn_out", "mlp_out"))
def test_splicing_a_dictionary_leaves_the_outputs_unchanged(family, architecture, site):
    model = tiny_model(family, dtype=torch.float64)
    spec, batch = ap.model_spec(model), ap.make_batch(random_pairs())
    for normalize in ("none", "constant_norm_rescale", "layer_norm"):
        d = random_dictionary(site, 1, architecture, dtype=torch.float64, normalize=normalize)
        spliced = _logits(model, batch, splice(spec, d, batch.n_pos))
        torch.testing.assert_close(spliced, _logits(model, batch), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_encode_matches_the_written_out_formulas(architecture):
    d = random_dictionary(architecture=architecture, dtype=torch.float64)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    f = d.encode(x)
    torch.testing.assert_close(f, encode(d, x))
    assert 0 < f.ne(0).float().mean() < 1  # sparse, not empty
    if architecture == "topk":
        assert f.ne(0).sum(-1).max() <= d.k


def test_a_saved_sae_lens_folder_loads_back_with_its_hook(tmp_path):
    d = random_dictionary("mlp_out", 2, "jumprelu")
    save_dictionary(d, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_mlp_out" and cfg["architecture"] == "jumprelu"
    back = load_dictionary(tmp_path / "sae")
    assert (back.site, back.layer, back.architecture) == ("mlp_out", 2, "jumprelu")
    for key in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(back, key), getattr(d, key))
    cfg.pop("metadata")  # sae-lens <= 5: hook_name at the top level; @hook overrides it
    cfg["hook_name"] = "blocks.0.hook_resid_post"
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    assert load_dictionary(tmp_path / "sae").hook == "L1.resid_pre"
    assert load_dictionary(f"{tmp_path / 'sae'}@L2.attn_out").hook == "L2.attn_out"


def test_a_plain_safetensors_file_needs_its_hook(tmp_path):
    d = random_dictionary()
    save_file({k: getattr(d, k) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, str(tmp_path / "d.safetensors"))
    back = load_dictionary(f"{tmp_path / 'd.safetensors'}@blocks.1.hook_resid_pre")
    assert back.hook == "L1.resid_pre" and not back.apply_b_dec_to_input
    with pytest.raises(ValueError, match=r"no hook point .*@blocks.L.hook_resid_pre"):
        load_dictionary(tmp_path / "d.safetensors")


def test_bad_dictionaries_are_refused_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dictionary at .*sae-lens folder"):
        load_dictionary(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "cfg.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="lacks sae_weights.safetensors"):
        load_dictionary(tmp_path / "half")
    with pytest.raises(ValueError, match=r"unknown hook 'blocks.1.hook_z'.*hook_resid_pre"):
        parse_hook("blocks.1.hook_z")
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs())
    with pytest.raises(ValueError, match="d_in=16 but GPT2LMHeadModel has d_model=32"):
        ap.attribute(model, batch, sites=[], dictionaries=[random_dictionary(d_model=16)])
    with pytest.raises(ValueError, match=r"hook L5.resid_pre out of range.*0..2"):
        ap.attribute(model, batch, sites=[], dictionaries=[random_dictionary(layer=5)])
    with pytest.raises(ValueError, match="two dictionaries at L1.resid_pre"):
        ap.attribute(model, batch, sites=[], dictionaries=[random_dictionary(), random_dictionary(seed=1)])
    with pytest.raises(ValueError, match=r"estimator atp \| ig .*got estimator='graddrop'"):
        ap.attribute(model, batch, sites=[], dictionaries=[random_dictionary()], estimator="graddrop")
    with pytest.raises(ValueError, match=r"latent 48 out of range .*0..47"):
        patch_features(model, batch, [random_dictionary()], [Component("feature", 1, 0, 48)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", ("resid_pre", "mlp_out"))
def test_latent_and_error_scores_add_up_to_the_hook_points_score(family, site):
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs())
    d = random_dictionary(site, 1, "topk", d_sae=256, dtype=torch.float64)  # 6 of 256 per token: some never fire
    scores = ap.attribute(model, batch, sites=[site], dictionaries=[d], metrics=["logit_diff", "prob"], batch_size=2)
    plain = ap.attribute(model, batch, sites=[site], metrics=["logit_diff", "prob"])
    f = scores.features
    for m in ("logit_diff", "prob"):
        torch.testing.assert_close(scores.values[m][site], plain.values[m][site])  # splicing changes no site score
        assert 0 < len(f.ids[m][d.hook]) < d.d_sae  # only latents active in either run are kept
        total = f.values[m][d.hook].sum(1) + f.error[m][d.hook]  # [pos]
        torch.testing.assert_close(total, plain.values[m][site][1], atol=1e-10, rtol=1e-8)


def test_equal_runs_give_zero_feature_scores():
    model, pairs = tiny_model("gpt2"), random_pairs(changed=())
    scores = ap.attribute(model, ap.make_batch(pairs), sites=[], dictionaries=[random_dictionary()])
    assert scores.features.values["logit_diff"]["L1.resid_pre"].abs().max() == 0
    assert scores.features.error["logit_diff"]["L1.resid_pre"].abs().max() == 0


def assert_exact_equals_reference(family: str, d: Dictionary, direction: str, n: int = 40, copies: int = 7) -> None:
    """patch_features of ``d``'s first ``n`` scored components and two all-position ones == the naive reference."""
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs())
    scores = ap.attribute(model, batch, sites=[], dictionaries=[d], direction=direction)
    comps = scores.features.components("logit_diff")[:n] + [Component("feature", d.layer, None, 3),
                                                             Component("sae_error", d.layer, None)]
    eff = patch_features(model, batch, [d], comps, direction=direction, copies=copies)
    ref = torch.tensor([feature_effect_reference(model, d, batch, c, direction) for c in comps], dtype=torch.float64)
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(eff.values[:, 0], ref, atol=1e-9, rtol=1e-7)


def assert_score_equals_exact_when_linear(family: str, d: Dictionary, direction: str, **options) -> None:
    """With no final norm, logit_diff is linear in the last block's MLP output, so in the latents of ``d``
    (writing it): every score (attribute's ``options``: estimator, ig_steps) equals the exact effect."""
    model = tiny_model(family, dtype=torch.float64)
    _linear_readout(model)
    batch = ap.make_batch(random_pairs())
    scores = ap.attribute(model, batch, sites=[], dictionaries=[d], direction=direction, **options).features
    comps = [c for per_pos in (True, False) for c in scores.components("logit_diff", per_position=per_pos)]
    eff = patch_features(model, batch, [d], comps, direction=direction, copies=16)
    approx = torch.tensor([scores.score(c, "logit_diff") for c in comps], dtype=torch.float64)
    assert eff.values[:, 0].abs().max() > 1e-2
    torch.testing.assert_close(approx, eff.values[:, 0], atol=1e-9, rtol=1e-7)


def assert_joint_patch_equals_the_written_point(family: str, d: Dictionary) -> None:
    """Every latent and the error of ``d`` patched together == patching the site it writes, per position."""
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs())
    joint = [tuple(Component("feature", d.layer, pos, i) for i in range(d.d_sae))
             + (Component("sae_error", d.layer, pos),) for pos in (*range(N_POS), None)]
    eff = patch_features(model, batch, [d], joint)
    plain = ap.patch(model, batch, [Component(d.writes, d.layer, pos) for pos in (*range(N_POS), None)])
    assert plain.values.abs().max() > 1e-2
    torch.testing.assert_close(eff.values, plain.values, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_exact_effect_of_a_latent_equals_the_naive_reference(family, architecture, direction):
    d = random_dictionary("resid_pre", 1, architecture, dtype=torch.float64)
    assert_exact_equals_reference(family, d, direction)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("direction", ap.DIRECTIONS)
def test_atp_equals_exact_where_the_metric_is_linear_in_the_latent(family, direction):
    assert_score_equals_exact_when_linear(family, random_dictionary("mlp_out", 2, dtype=torch.float64), direction)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site", ("resid_pre", "attn_out", "mlp_out"))
def test_every_latent_and_the_error_patched_together_equal_patching_the_hook_point(family, site):
    assert_joint_patch_equals_the_written_point(family, random_dictionary(site, 1, "topk", dtype=torch.float64))
