"""What attrpatch relies on in transformers beyond its model API (model/hf_compat.py), checked against the
installed version: CI runs this at both ends of pyproject's range."""

import json
import shutil

import pytest
import torch
from torch import nn

import attrpatch as ap
from attrpatch.model import hf_compat
from attrpatch.model.loading import DEFAULT_MODEL
from conftest import FAMILIES, random_pairs, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_takes_a_cache_under_a_known_name_and_returns_one(family):
    """The names the resumed pass uses exist on this transformers: the blocks and the base model take a cache,
    a recording forward returns it, and it holds every position of every layer."""
    model = tiny_model(family)
    spec = ap.model_spec(model)
    for block in spec.blocks:
        assert hf_compat.cache_name(block.forward, type(block).__name__) in hf_compat.CACHE_NAMES
    base = hf_compat.base_model(model)
    ids = torch.tensor(random_pairs(n=1)[0].clean_ids)[None]
    with torch.no_grad():
        out = base(input_ids=ids, **hf_compat.recording(base))
    keys, values = hf_compat.layer_keys_values(hf_compat.recorded(out), spec.dims.n_layers - 1)
    assert keys.shape[2] == values.shape[2] == ids.shape[1]


def test_a_block_that_takes_no_cache_is_refused_with_the_fix():
    """Passing no cache would attend over the resumed positions only, silently: refuse instead."""
    class Block(nn.Module):
        def forward(self, hidden_states, attention_mask=None, kv_state=None):
            return hidden_states
    with pytest.raises(TypeError, match=r"Block\.forward takes no key/value cache.*kv_state.*CACHE_NAMES"):
        hf_compat.cache_name(Block().forward, "Block")


def test_a_tokenizer_class_this_version_lacks_is_read_from_tokenizer_json(tmp_path):
    folder = tmp_path / "toy"
    shutil.copytree(DEFAULT_MODEL, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "AFutureTokenizer"}))
    reference = hf_compat.load_tokenizer(str(DEFAULT_MODEL))
    tokenizer = hf_compat.load_tokenizer(str(folder))
    text = "When Mary and John went to the store, John gave a drink to"
    assert tokenizer(text).input_ids == reference(text).input_ids
    assert tokenizer.eos_token == reference.eos_token and tokenizer.pad_token == reference.pad_token


def test_a_folder_without_tokenizer_files_has_no_tokenizer(tmp_path):
    tiny_model("gpt2").save_pretrained(tmp_path)
    assert hf_compat.load_tokenizer(str(tmp_path)) is None


def test_portable_tokenizer_names_the_class_every_tested_version_reads(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "TokenizersBackend", "x": 1}))
    hf_compat.portable_tokenizer(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {
        "tokenizer_class": "PreTrainedTokenizerFast", "x": 1}
    assert json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"


def test_a_config_saved_by_transformers_5_loads_with_its_rope_theta_in_every_version(tmp_path):
    """5.x writes rope_parameters only; 4.x would silently build the model with its default theta (10000)."""
    folder = tmp_path / "llama"
    tiny_model("llama").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_theta": 12345.0, "rope_type": "default"}
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = ap.load(folder)
    rotary = model.model.rotary_emb
    d_half = rotary.inv_freq.shape[0]
    expected = 1.0 / 12345.0 ** (torch.arange(d_half, dtype=torch.float32) * 2 / (2 * d_half))
    torch.testing.assert_close(rotary.inv_freq, expected)
    hf_compat.portable_config(folder)  # both forms written: the file alone now says the same to 4.x
    assert json.loads((folder / "config.json").read_text())["rope_theta"] == 12345.0
