"""Dictionary latents on the real model: SmolLM2-135M-Instruct with the small TopK SAE of
scripts/train_sae.py at layer 6's resid_pre (trained here when not cached, minutes on a CPU)."""

import json
import sys
from pathlib import Path

import pytest
import torch

import attrpatch as ap
from attrpatch.config import ScreenConfig
from attrpatch.engine.hooks import hooked
from attrpatch.engine.splicing import splice
from attrpatch.model.dictionaries import load_dictionary
from attrpatch.model.fetch import default_cache_dir, fetch
from attrpatch.model.sites import Component
from attrpatch.pipeline import run_screen
from feature_reference import feature_effect_reference
from test_real_model import _batch

pytestmark = pytest.mark.real_model
SAE = default_cache_dir() / "sae-smollm2-135m-L6-topk32-2048"


@pytest.fixture(scope="module")
def smollm2_sae():
    torch.set_num_threads(1)
    if not (SAE / "cfg.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
        import train_sae
        train_sae.main([])
    model, tokenizer = ap.load(fetch("smollm2"))
    return model, tokenizer, load_dictionary(SAE)


@pytest.fixture(scope="module")
def feature_run(smollm2_sae, tmp_path_factory):
    model, tok, d = smollm2_sae
    out = tmp_path_factory.mktemp("smollm2-features")
    config = ScreenConfig(sites=("resid_pre",), top_k=4, random_k=2, progress=False, direction="denoise")
    run_screen(model, tok, task="ioi", config=config, out=out, model_name="smollm2", n_prompts=6, figures=False,
               dictionaries=(d,))
    return out, json.loads((out / "manifest.json").read_text())


def test_the_trained_sae_reconstructs_well_enough_to_be_useful():
    stats = json.loads((SAE / "training.json").read_text())
    assert stats["fraction_variance_explained"] > 0.6 and stats["l0"] <= 32


def assert_splice_is_transparent(model, d, batch) -> None:
    """SmolLM2's logits with ``d`` spliced in equal its own (float32 tolerance)."""
    with torch.no_grad():
        plain = model(input_ids=batch.clean, attention_mask=batch.mask).logits
        with hooked(splice(ap.model_spec(model), d, batch.n_pos)):
            spliced = model(input_ids=batch.clean, attention_mask=batch.mask).logits
    torch.testing.assert_close(spliced, plain, atol=2e-4, rtol=1e-4)


def test_splicing_the_sae_leaves_smollm2s_logits_unchanged(smollm2_sae, feature_run):
    model, _, d = smollm2_sae
    assert_splice_is_transparent(model, d, _batch(feature_run[1]))


def test_feature_screen_exact_effects_equal_the_naive_reference(smollm2_sae, feature_run):
    model, _, d = smollm2_sae
    out, manifest = feature_run
    found = json.loads((out / "features.json").read_text())
    assert found["agreement"]["denoise"]["L6.resid_pre"]["n_latents_scored"] > 0
    batch = _batch(manifest)
    for r in found["rows"][:3]:
        c = Component("feature" if r["feature"] is not None else "sae_error", 6, r["pos"], r["feature"])
        assert r["exact_logit_diff"] == pytest.approx(feature_effect_reference(model, d, batch, c), abs=1e-3)


def test_latent_and_error_scores_add_up_to_resid_pre_on_smollm2(smollm2_sae, feature_run):
    model, _, d = smollm2_sae
    batch = _batch(feature_run[1])
    scores = ap.attribute(model, batch, sites=["resid_pre"], dictionaries=[d])
    f = scores.features
    total = f.values["logit_diff"][d.hook].sum(1) + f.error["logit_diff"][d.hook]
    torch.testing.assert_close(total, scores.values["logit_diff"]["resid_pre"][6], atol=1e-3, rtol=1e-3)


TRANSCODER = default_cache_dir() / "transcoder-smollm2-135m-L6-topk32-2048"


def test_the_trained_transcoder_splices_transparently_and_its_scores_add_up_to_mlp_out(smollm2_sae, feature_run):
    # scripts/train_sae.py --transcoder (not trained here when missing: ~30 min)
    if not (TRANSCODER / "cfg.json").is_file():
        pytest.skip(f"no transcoder at {TRANSCODER}; train it with scripts/train_sae.py --transcoder")
    model, _, sae = smollm2_sae
    t = load_dictionary(TRANSCODER)
    assert t.hook == "L6.mlp_in>mlp_out"
    batch = _batch(feature_run[1])
    assert_splice_is_transparent(model, t, batch)
    scores = ap.attribute(model, batch, sites=["mlp_out"], dictionaries=[sae, t])
    f = scores.features
    total = f.values["logit_diff"][t.hook].sum(1) + f.error["logit_diff"][t.hook]
    torch.testing.assert_close(total, scores.values["logit_diff"]["mlp_out"][6], atol=1e-3, rtol=1e-3)
