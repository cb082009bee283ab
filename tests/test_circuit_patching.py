"""The faithfulness curve's fast path (methods/edges/circuits.py) against the per-size computation it
replaced (tests/edge_reference.faithfulness_reference: one full forward per circuit through edge_patching)."""

import pytest
import torch

import attrpatch as ap
from attrpatch.analysis import circuits
from attrpatch.analysis.ranking import top_k
from attrpatch.edge_screening import EdgeConfig, faithfulness_curve
from attrpatch.methods.edges.circuits import outside_circuits, patch_circuits
from attrpatch.methods.edges.patching import patch_edges
from attrpatch.methods.edges.eap import attribute_edges
from conftest import random_pairs, tiny_model
from edge_reference import faithfulness_reference

FAMILIES = ("gpt2", "llama", "qwen3", "phi3")  # MHA fused c_attn, GQA separate q/k/v, per-head q/k norms, GQA fused


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_faithfulness_equals_the_per_size_reference(family):
    model = tiny_model(family, dtype=torch.float64)
    batch = ap.make_batch(random_pairs(3))
    scores = attribute_edges(model, batch)
    curve = faithfulness_curve(model, batch, scores, EdgeConfig(circuit_points=6))
    reference = faithfulness_reference(model, batch, scores, curve["sizes"])
    assert curve["faithfulness"] == pytest.approx(reference, abs=1e-9)


@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_masks_patched_together_equal_the_same_edge_sets_patched_one_by_one(copies, direction):
    """Random edge sets (sparse and dense, resumed at different blocks, into the logits too), several copies
    per pass, on prompts of different lengths (padding: the final MLP runs on every row)."""
    model = tiny_model("llama", dtype=torch.float64)
    for batch in (ap.make_batch(random_pairs(3)), ap.make_batch(random_pairs(3, lengths=[6, 8, 5]))):
        scores = attribute_edges(model, batch)
        graph, every = scores.graph, scores.graph.edges()
        g = torch.Generator().manual_seed(1)
        picks = [torch.rand(len(every), generator=g) < p for p in (0.02, 0.3, 0.9)] + [
            torch.tensor([e.receiver.startswith("L2") or e.receiver == "logits" for e in every])]
        masks = torch.zeros(len(picks), *graph.exists.shape, dtype=torch.bool)
        for i, pick in enumerate(picks):
            masks[i, graph.exists] = pick
        fast = patch_circuits(model, batch, masks, direction=direction, copies=copies)
        items = [tuple(e for e, keep in zip(every, pick) if keep) for pick in picks]
        slow = patch_edges(model, batch, items, direction=direction, copies=1, resume=False)
        assert fast.values[:, 0].tolist() == pytest.approx(slow.values[:, 0].tolist(), abs=1e-9)


def test_outside_circuits_marks_every_edge_but_the_top_n():
    model = tiny_model("gpt2")
    graph = attribute_edges(model, ap.make_batch(random_pairs(2))).graph
    scores = torch.randn(graph.n_edges, generator=torch.Generator().manual_seed(0))
    order = top_k(scores, None)
    sizes = circuits.circuit_sizes(graph.n_edges, 4)
    masks = outside_circuits(graph.exists, order, sizes)
    for n, mask in zip(sizes, masks):
        inside = set(order[:n])
        assert graph.flat(mask).tolist() == [j not in inside for j in range(graph.n_edges)]
        assert not mask[~graph.exists].any()


def test_masks_of_the_wrong_shape_are_refused_naming_the_shape():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"masks must be \[item, sender, receiver\]"):
        patch_circuits(model, ap.make_batch(random_pairs(2)), torch.ones(2, 3, 4, dtype=torch.bool))
