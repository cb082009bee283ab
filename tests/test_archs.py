"""Describing a family from outside Python: a JSON file of Arch fields, or binding an unknown model_type to a
known family's row; the errors say what was wrong and list the valid keys or families."""

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import transformers as tf

import attrpatch as ap
from attrpatch.model.archs import ARCH_JSON_EXAMPLE
from conftest import N_POS, random_pairs, tiny_model


@pytest.fixture
def archs():
    """ap.ARCHS, restored after the test (use_arch adds rows)."""
    before = dict(ap.ARCHS)
    yield ap.ARCHS
    ap.ARCHS.clear()
    ap.ARCHS.update(before)


def _renamed_llama(model_type="my_llama"):
    model = tiny_model("llama")
    model.config.model_type = model_type
    return model


def _as_json(arch: ap.Arch) -> dict:
    return {**asdict(arch), "final": list(arch.final)}


def test_every_table_row_round_trips_through_json(tmp_path):
    for family, arch in ap.ARCHS.items():
        path = tmp_path / f"{family}.json"
        path.write_text(json.dumps(_as_json(arch)))
        assert ap.arch_from_json(path) == arch, family
        assert ap.arch_from_json(_as_json(arch)) == arch, family


def test_the_examples_in_the_error_and_the_readme_are_the_plain_llama_like_row():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    in_readme = re.search(r"## Supported models\n.*?```json\n(.*?)```", readme, re.S).group(1)
    for example in (ARCH_JSON_EXAMPLE, in_readme):
        assert ap.arch_from_json(json.loads(example)) == ap.ARCHS["qwen2"]


@pytest.mark.parametrize("change, message", [
    ({"attn_output": "self_attn"}, r"unknown key\(s\) 'attn_output'; valid keys: required: layers, embed, final, "
                                   r"attn_out, .*optional: k, v, qkv_layout, unembed, attn_norm, mlp_norm, gated, notes"),
    ({"head": None}, r"'head' must be a string, got None"),
    ({"final": "model.norm"}, r"'final' must be a list of module paths, e.g. \[\"model.norm\"\], got 'model.norm'"),
    ({"qkv_layout": "fused"}, r"qkv_layout='fused'; expected one of \('separate', 'gpt2', 'neox', 'phi3'\)"),
])
def test_bad_arch_json_names_the_key_and_the_valid_ones(tmp_path, change, message):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({**_as_json(ap.ARCHS["llama"]), **change}))
    with pytest.raises(ValueError, match=f"{path}: " + message):
        ap.arch_from_json(path)


def test_missing_arch_json_keys_are_all_named():
    data = _as_json(ap.ARCHS["llama"])
    del data["neuron"], data["embed"]
    with pytest.raises(ValueError, match=r"missing key\(s\) 'embed', 'neuron'; required: layers, embed, final"):
        ap.arch_from_json(data)


def test_arch_json_that_is_not_json_or_not_an_object_is_refused(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text("layers: model.layers")
    with pytest.raises(ValueError, match=r"arch.json: not valid JSON .*expected an object like\n\{\"layers\""):
        ap.arch_from_json(path)
    path.write_text('["model.layers"]')
    with pytest.raises(ValueError, match=r"expected a JSON object of Arch fields, got list; required: layers"):
        ap.arch_from_json(path)


def test_unknown_model_type_is_refused_with_the_cli_flags_that_fix_it():
    with pytest.raises(KeyError, match=r"(?s)Unsupported model family 'my_llama' \(LlamaForCausalLM\); supported: "
                                       r"gemma2, .*llama.*--arch KNOWN_FAMILY.*use_arch\(\"my_llama\", \"llama\"\).*"
                                       r"--arch-file arch\.json"):
        ap.model_spec(_renamed_llama())


@pytest.mark.parametrize("how", ["family", "json"])
def test_renamed_llama_works_once_bound(archs, tmp_path, how):
    model = _renamed_llama()
    if how == "family":
        bound = ap.use_arch("my_llama", "llama")
    else:
        path = tmp_path / "arch.json"
        path.write_text(ARCH_JSON_EXAMPLE)
        bound = ap.use_arch("my_llama", ap.arch_from_json(path))
    assert archs["my_llama"] == bound
    batch = ap.make_batch(random_pairs())
    scores = ap.attribute(model, batch, sites=["head"])
    reference = ap.attribute(tiny_model("llama"), batch, sites=["head"])  # the same weights, its own name
    assert scores.values["logit_diff"]["head"].shape == (3, N_POS, 4)
    torch.testing.assert_close(scores.values["logit_diff"]["head"], reference.values["logit_diff"]["head"])


def test_use_arch_with_an_unknown_family_lists_the_known_ones(archs):
    with pytest.raises(ValueError, match=r"Unknown family 'lama' for model_type 'my_llama'; known: gemma2, "
                                         r"gemma3_text, gpt2, .*llama.*--arch-file arch\.json"):
        ap.use_arch("my_llama", "lama")
    assert "my_llama" not in archs


def test_llama3_rope_scaling_from_a_config_json_moves_the_rotary_frequencies(tmp_path):
    """Llama 3.x checkpoints are model_type llama with "rope_scaling" {"rope_type": "llama3"} in config.json:
    transformers reads it (its rotary frequencies differ from plain rope's) and the llama row serves it."""
    config = tiny_model("llama3").config.to_dict()
    config.pop("rope_parameters", None)  # transformers 5's form; a checkpoint's config.json has the two below
    config["rope_theta"] = 500_000.0
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16}

    def from_json(folder, values):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(values))
        return tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(folder))
    model = from_json(tmp_path / "llama3", config)
    plain = from_json(tmp_path / "plain", {**config, "rope_scaling": None})
    read = getattr(model.config, "rope_parameters", None) or model.config.rope_scaling  # 5.x, 4.x
    assert read["rope_type"] == "llama3"
    assert not torch.allclose(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    assert ap.model_spec(model).arch is ap.ARCHS["llama"]


def test_cli_arch_flags_describe_an_unknown_family(archs, tmp_path, capsys):
    """A family transformers loads but attrpatch has no row for (Mistral, its row removed): refused with the
    flags named, then screened with --arch or --arch-file."""
    from attrpatch.cli import main
    from conftest import write_task
    folder = tmp_path / "mistral"
    tiny_model("mistral").save_pretrained(folder)
    llama = archs["llama"]
    del archs["mistral"]
    task = write_task(tmp_path / "t.jsonl", random_pairs(n=2))
    base = ["screen", "--model", str(folder), "--task", str(task), "--sites", "head", "--top-k", "2",
            "--random-k", "1", "--quiet", "--no-figures"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "Unsupported model family 'mistral'" in err and "--arch KNOWN_FAMILY" in err and "Traceback" not in err
    assert main([*base, "--out", str(tmp_path / "b"), "--arch", "llama"]) == 0
    del archs["mistral"]
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(_as_json(llama)))
    assert main([*base, "--out", str(tmp_path / "c"), "--arch-file", str(path)]) == 0
    report = lambda d: json.loads((tmp_path / d / "report.json").read_text())["components"]  # noqa: E731
    assert [c["exact"] for c in report("b")] == [c["exact"] for c in report("c")]
    assert main([*base, "--out", str(tmp_path / "d"), "--arch", "nope"]) == 2
    assert "Unknown family 'nope'" in capsys.readouterr().err
