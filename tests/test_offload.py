"""Offloading with accelerate (--device-map with "disk" entries, --offload-folder): a screen's scores and effects,
--low-memory included, equal the single-device run's; edges refuse with the reason (model/hf_compat.py)."""

import json

import pytest
import torch

import attrpatch as ap
from attrpatch.cli import main
from attrpatch.model.loading import load, parse_device_map
from conftest import random_pairs, tiny_model

pytest.importorskip("accelerate")
SITES = ["resid_pre", "attn_out", "mlp_out", "head", "neuron"]
# half the blocks and the LM head on disk: their weights are meta tensors outside their forward
DISK = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "disk"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(the single-device model, the same weights loaded with half of them offloaded to disk)."""
    folder = tmp_path_factory.mktemp("offload")
    model = tiny_model("llama")
    model.save_pretrained(folder / "model")
    offloaded, _ = load(folder / "model", device_map=DISK, offload_folder=folder / "disk", progress=False)
    assert {p.device.type for p in offloaded.parameters()} == {"cpu", "meta"}  # some weights are on disk
    return model, offloaded, folder


@pytest.mark.parametrize("low_memory", [False, True])
def test_disk_offload_gives_the_single_device_scores_and_effects(models, low_memory):
    model, offloaded, _ = models
    batch = ap.make_batch(random_pairs(4))
    comps = [ap.Component("head", 1, None, 2), ap.Component("mlp_out", 1, 3), ap.Component("resid_pre", 2, 3),
             ap.Component("attn_out", 0, 1), ap.Component("neuron", 2, None, 5), ap.Component("embed", 0)]
    runs = [(ap.attribute(m, batch, sites=SITES, metrics=["logit_diff", "kl"], recompute=low_memory),
             ap.patch(m, batch, comps, metrics=["logit_diff", "kl"], copies=3)) for m in (model, offloaded)]
    (scores, effects), (off_scores, off_effects) = runs
    for m in ("logit_diff", "kl"):
        for s in SITES:
            torch.testing.assert_close(off_scores.values[m][s], scores.values[m][s], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(off_effects.values, effects.values, rtol=1e-5, atol=1e-6)
    assert effects.values.abs().max() > 1e-3


def test_edges_refuse_an_offloaded_model_and_say_why(models):
    from attrpatch.methods.edges.eap import attribute_edges

    _, offloaded, _ = models
    with pytest.raises(ValueError, match="edges read weights outside the model's forward.*meta device"):
        attribute_edges(offloaded, ap.make_batch(random_pairs(2)))


def test_cli_screen_with_disk_offload_writes_the_single_device_effects(models, tmp_path):
    _, _, folder = models
    task = tmp_path / "pairs.jsonl"
    task.write_text("".join(json.dumps({"clean_ids": p.clean_ids, "corrupt_ids": p.corrupt_ids, "answer_id": p.answer_id,
                                        "wrong_id": p.wrong_id}) + "\n" for p in random_pairs(4, changed=(3,))))
    common = ["screen", "--model", str(folder / "model"), "--task", str(task), "--sites", "head,mlp_out", "--top-k",
              "3", "--random-k", "1", "--metrics", "logit_diff", "--no-figures", "--quiet", "--low-memory"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--out", str(tmp_path / "off"), "--device-map", json.dumps(DISK), "--offload-folder",
                          str(tmp_path / "disk")]) == 0
    one, off = (json.loads((tmp_path / d / "report.json").read_text())["components"] for d in ("one", "off"))
    assert [c["name"] for c in one] == [c["name"] for c in off]
    assert [c["exact"] for c in off] == pytest.approx([c["exact"] for c in one], rel=1e-5, abs=1e-6)


def test_device_maps_parse_and_a_bad_one_is_refused_with_an_example():
    assert parse_device_map("auto") == "auto" and parse_device_map('{"": "cpu"}') == {"": "cpu"}
    with pytest.raises(ValueError, match="not a JSON object.*give 'auto'"):
        parse_device_map("{model.layers: disk}")
    with pytest.raises(ValueError, match="--offload-folder needs --device-map"):
        load(None, offload_folder="somewhere")
