"""Edge ablations (methods/edges/sources.py): with a zero or mean ablation as the senders' source, the edge
identities hold against the node ablations (methods/ablation.py, tested against a naive reference in
test_ablation.py), circuits measure the same as joint edge patches, and the CLI labels the run."""

import json

import pytest
import torch

import attrpatch as ap
from attrpatch.config import EdgeConfig
from attrpatch.methods.edges.circuits import patch_circuits
from attrpatch.methods.edges.eap import attribute_edges
from attrpatch.methods.edges.graph import Graph
from attrpatch.methods.edges.patching import patch_edges
from conftest import random_pairs, tiny_model

NODES = {"embed": ap.Component("resid_pre", 0), "L0H1": ap.Component("head", 0, None, 1),
         "L1.mlp": ap.Component("mlp_out", 1), "L2H3": ap.Component("head", 2, None, 3)}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request):
    return tiny_model(request.param, dtype=torch.float64), ap.make_batch(random_pairs(3))


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_ablating_every_edge_out_of_a_sender_equals_the_node_ablation(setup, ablation):
    model, batch = setup
    graph = Graph(3, 4, ap.model_spec(model).dims.n_kv_heads)
    items = [tuple(e for e in graph.edges() if e.sender == s) for s in NODES]
    edges = patch_edges(model, batch, items, direction="noise", ablation=ablation, batch_size=2)
    node = ap.patch(model, batch, list(NODES.values()), direction="noise", ablation=ablation)
    assert torch.allclose(edges.values, node.values.to(edges.values.dtype), atol=1e-9)
    corrupt = patch_edges(model, batch, items[:1], direction="noise")
    assert not torch.allclose(edges.values[:1], corrupt.values, atol=1e-6)  # not read off the corrupt run


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_eap_scores_out_of_a_sender_sum_to_its_node_atp_score_under_the_ablation(setup, ablation):
    model, batch = setup
    scores = attribute_edges(model, batch, direction="noise", ablation=ablation, batch_size=2)
    node = ap.attribute(model, batch, sites=["resid_pre", "head", "mlp_out"], direction="noise",
                        ablation=ablation).values["logit_diff"]
    table, graph = scores.values["logit_diff"], scores.graph
    assert table[0].sum().item() == pytest.approx(node["resid_pre"][0].sum().item(), abs=1e-6)
    for layer in range(3):
        heads = table[[graph.sender_index[f"L{layer}H{h}"] for h in range(4)]].sum(1)
        assert torch.allclose(heads, node["head"][layer].sum(0).to(heads.dtype), atol=1e-6)
        assert table[graph.sender_index[f"L{layer}.mlp"]].sum().item() == pytest.approx(
            node["mlp_out"][layer].sum().item(), abs=1e-6)


def test_a_circuit_under_mean_ablation_equals_the_joint_edge_ablation(setup):
    model, batch = setup
    graph = Graph(3, 4, ap.model_spec(model).dims.n_kv_heads)
    every = graph.edges()
    mask = torch.zeros(1, *graph.exists.shape, dtype=torch.bool)
    mask[0, graph.exists] = torch.arange(len(every)) % 3 != 0
    outside = tuple(e for e, m in zip(every, mask[0][graph.exists]) if m)
    fast = patch_circuits(model, batch, mask, direction="noise", ablation="mean").values[0, 0]
    joint = patch_edges(model, batch, [outside], direction="noise", ablation="mean").values[0, 0]
    assert float(fast) == pytest.approx(float(joint), abs=1e-9)


def test_edge_ablation_errors_name_the_value_and_the_fix():
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs(2))
    with pytest.raises(ValueError, match="Unknown edge ablation 'resample'; edges offer zero, mean"):
        attribute_edges(model, batch, direction="noise", ablation="resample")
    with pytest.raises(ValueError, match="use direction 'noise'"):
        patch_edges(model, batch, [], direction="denoise", ablation="zero")
    with pytest.raises(ValueError, match="ablations are scored by AtP only"):
        EdgeConfig(direction="noise", ablation="mean", estimator="ig")


def test_cli_edges_ablation_labels_the_run_and_its_curves_start_at_every_edge_ablated(tmp_path):
    from test_mib import run_edges_cli

    out = run_edges_cli(tmp_path, "gpt2", "--ablation", "mean")
    report = json.loads((out / "report.json").read_text())
    assert report["ablation"] == "mean_ablation" and report["directions"] == ["noise"]
    assert report["circuit"]["faithfulness"][0] == pytest.approx(0.0, abs=1e-6)
    assert report["circuit"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-6)
    assert report["mib"]["intervention"] == "mean-positional"
    assert report["mib"]["curve"]["faithfulness_signed"][-1] == pytest.approx(1.0, abs=1e-6)
    assert "against mean ablation of the clean run" in (out / "report.md").read_text()
