"""scripts/edges_real.py: its per-prompt edge scores average to the batched scores, its verified set is the
union of the estimators' tops plus controls outside it, and docs/edges_estimators.md's section between the
markers is exactly what the script writes from docs/edges_estimators.json."""

import json
from pathlib import Path

import pytest
import torch

import attrpatch as ap
from attrpatch.inputs.batch import make_batch
from attrpatch.methods.edges.eap import attribute_edges
from attrpatch.prompts import pad_token, prepare_pairs
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("scripts/edges_real.py")


@pytest.fixture(scope="module")
def toy():
    model, tokenizer = ap.load(None)
    pairs, _ = prepare_pairs(model, tokenizer, task="ioi", n_prompts=3, seed=0)
    return ap.model_spec(model), make_batch(pairs, pad_id=pad_token(tokenizer))


def test_per_prompt_scores_average_to_the_batched_scores(toy):
    spec, batch = toy
    script = _script()
    per_prompt, cost = script.per_prompt_scores(spec, batch, "denoise", {"estimator": "atp"})
    batched = attribute_edges(spec, batch, direction="denoise").flat("logit_diff").double()
    assert per_prompt.shape == (len(batched), batch.n)
    torch.testing.assert_close(per_prompt.mean(1), batched, rtol=1e-4, atol=1e-5)
    assert (cost["forward"], cost["backward"]) == (2, 1)


def test_the_verified_set_is_the_union_of_the_tops_and_controls_outside_it():
    script = _script()
    means = {"a": torch.tensor([5.0, 0, 0, 4, 0, 0, 0, 0]), "b": torch.tensor([0.0, 0, 3, 4, 0, 0, 0, 0])}
    script.TOP, script.RANDOM = 2, 3
    union, control, tops = script.verified_set(means)
    assert tops == {"a": [0, 3], "b": [3, 2]} and union == [0, 3, 2]
    assert len(control) == 3 and not set(control) & set(union)


def test_the_measured_directions_are_analysed_on_the_toy_model(toy, tmp_path):
    spec, batch = toy
    script = _script()
    script.ESTIMATORS = {"atp": {"estimator": "atp"}, "gim": {"estimator": "gim"}}
    script.TOP, script.RANDOM = 5, 3  # few edges to patch: seconds
    raw = script.measure(spec, batch, "denoise", script.ESTIMATORS)
    found = {"meta": {"model": "toy", "pairs": batch.n, "n_pos": batch.n_pos, "example": "x", "forward_s": 0.01,
                      "load_start": 0.0, "load_end": 0.0, "wall_s": 1.0}, "denoise": raw}
    text = script.section(found, n_boot=50)
    assert "| atp | " in text and "| gim | " in text and "recall@5" in text
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{script.BEGIN}\nold\n{script.END}\nafter\n")
    script.write_section(doc, text)
    assert doc.read_text().startswith("intro\n") and doc.read_text().endswith("after\n")


def test_the_committed_tables_are_the_scripts_output():
    script = _script()
    json_path = ROOT / "docs" / "edges_estimators.json"
    if not json_path.exists():
        pytest.skip("no measured run committed yet")
    text = (ROOT / "docs" / "edges_estimators.md").read_text()
    committed = text.split(script.BEGIN, 1)[1].split(script.END, 1)[0].strip("\n")
    assert committed == script.section(json.loads(json_path.read_text()), 1000)
