"""``attrpatch plan --sae``: the memory plan of a feature screen (feature_planning.py), traced on meta weights
and meta dictionaries, is at least what the same screen measures on real ones (every latent planned as
active), grows with the dictionaries' width, and prints its phases."""

import json

import torch

from attrpatch.cli import main
from attrpatch.config import ScreenConfig
from attrpatch.feature_planning import trace_features
from attrpatch.model.dictionaries import load_dictionary, save_dictionary
from attrpatch.planning import meta_model, synthetic_batch
from conftest import tiny_model
from test_features import random_dictionary
from test_transcoders import random_transcoder

CONFIG = ScreenConfig(sites=("resid_pre",), top_k=4, random_k=2, copies=3, metrics=("logit_diff",))


def _saved(tmp_path, d_sae: int) -> list:
    """Two SAEs and a transcoder of width ``d_sae``, saved and loaded back with meta weights."""
    found = []
    for i, d in enumerate([random_dictionary("resid_pre", 1, "topk", d_sae=d_sae),
                           random_dictionary("mlp_out", 1, "standard", d_sae=d_sae),
                           random_transcoder("mlp_in", 2, "topk", d_sae=d_sae)]):
        found.append(save_dictionary(d, tmp_path / f"d{d_sae}-{i}"))
    return found


def test_the_feature_plan_is_at_least_what_a_real_run_measures(tmp_path):
    model = tiny_model("llama")
    folders = _saved(tmp_path, 256)
    batch = synthetic_batch(4, 6, device="cpu")
    measured = trace_features(model, batch, [load_dictionary(f) for f in folders], CONFIG)
    planned = trace_features(meta_model(model.config), synthetic_batch(4, 6), [load_dictionary(f, meta=True)
                                                                               for f in folders], CONFIG)
    for phase in ("features", "feature_patching"):
        assert planned["phases"][phase]["peak_bytes"] >= measured["phases"][phase]["peak_bytes"] > 0
    wide = trace_features(meta_model(model.config), synthetic_batch(4, 6),
                          [load_dictionary(f, meta=True) for f in _saved(tmp_path, 4096)], CONFIG)
    assert wide["phases"]["features"]["peak_bytes"] > 4 * planned["phases"]["features"]["peak_bytes"]


def test_plan_with_sae_prints_the_feature_phases(tmp_path, capsys):
    folders = _saved(tmp_path, 128)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**tiny_model("gpt2").config.to_dict(), "model_type": "gpt2"}))
    args = ["plan", "--config", str(config), "--seq-len", "6", "--n-prompts", "4", "--device", "cpu",
            "--sites", "resid_pre", "--sae", str(folders[0]), "--sae", str(folders[2])]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "features " in text and "feature_patching" in text
    assert "dictionaries: L1.resid_pre (128 latents), L2.mlp_in>mlp_out (128 latents)" in text
    assert main(args + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["peak_bytes"] >= plan["phases"]["feature_patching"]["peak_bytes"] > plan["weights_bytes"]
    assert load_dictionary(folders[0], meta=True).W_enc.is_meta  # only the header is read
    assert not torch.equal(load_dictionary(folders[0]).W_enc, torch.zeros(32, 128))
