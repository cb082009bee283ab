"""Edges on the parallel-block and post-norm families, and OPT (methods/edges/graph.py, writes.py): exact edge patching
and EAP against the naive references (tests/edge_reference.py), the identities that hold exactly for each
kind of block, and the post-norm gaps measured where a head's write is not its own (writes.py)."""

import pytest
import torch

import attrpatch as ap
from attrpatch.methods.edges.eap import attribute_edges
from attrpatch.methods.edges.graph import Edge, EdgeModel
from attrpatch.methods.edges.patching import patch_edges
from conftest import random_pairs, tiny_model
from edge_reference import (eap_reference, edge_patch_reference, input_delta, patch_input_reference,
                            receiver_grad)

PARALLEL = ("gpt_neox", "phi")  # attention and MLP read the same residual stream
POST_NORM = ("gemma2", "gemma3_text", "olmo2")  # each write normalised before the add
SEQUENTIAL_NEOX = "gpt_neox_sequential"  # GPT-NeoX with use_parallel_residual=False
FAMILIES = (*PARALLEL, *POST_NORM, SEQUENTIAL_NEOX, "opt")  # OPT: pre-norm, its MLP on flattened rows
TOL = {"gemma2": 1e-6, "gemma3_text": 1e-6, "olmo2": 1e-6}  # their RMSNorms compute in float32 in a float64
# model; the others run float64 throughout (1e-9)
GAP = 1e-4  # a measured post-norm gap counts as one above this

def _model(family: str):
    if family == SEQUENTIAL_NEOX:
        return tiny_model("gpt_neox", dtype=torch.float64, use_parallel_residual=False)
    return tiny_model(family, dtype=torch.float64)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    model = _model(request.param)
    return request.param, model, ap.make_batch(random_pairs(3)), TOL.get(request.param, 1e-9)


def sample_edges(graph) -> list[Edge]:
    """Edges into every kind of receiver from every kind of sender (into an MLP from a head of its own layer
    only in a sequential block)."""
    kv = graph.n_kv - 1
    same_layer = Edge("L1H0", "L1.mlp") if not graph.parallel else Edge("L0H0", "L1.mlp")
    return [Edge("embed", "L0H1.q"), Edge("embed", f"L0H{kv}.k"), Edge("L0H2", f"L1H{kv}.v"),
            Edge("L0.mlp", "L2H3.q"), same_layer, Edge("L0H3", "L2.mlp"), Edge("embed", "logits"),
            Edge("L2H1", "logits"), Edge("L2.mlp", "logits"), Edge("L1.mlp", f"L2H{kv}.k"), Edge("embed", "L0.mlp")]


def _graph(model):
    return EdgeModel(ap.model_spec(model)).graph


def test_parallel_blocks_have_no_edge_from_a_head_into_its_own_layers_mlp(setup):
    family, model, _, _ = setup
    graph = _graph(model)
    assert graph.parallel == (family in PARALLEL)
    into = graph.n_before[graph.receiver_index["L1.mlp"]]
    assert into == 1 + (graph.n_heads + 1) + (0 if graph.parallel else graph.n_heads)
    if graph.parallel:
        with pytest.raises(ValueError, match=r"no edge L1H0->L1.mlp: L1H0 is computed after L1.mlp reads"):
            graph.index(Edge("L1H0", "L1.mlp"))


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_batched_resumed_edge_patching_equals_one_naive_forward_per_edge(setup, direction):
    _, model, batch, tol = setup
    edges = sample_edges(_graph(model))
    fast = patch_edges(model, batch, edges, direction=direction, copies=4)
    for i, e in enumerate(edges):
        assert fast.values[i, 0].item() == pytest.approx(edge_patch_reference(model, batch, e, direction), abs=tol), e
    assert fast.values.abs().max() > 1e-3  # the comparison is not between zeros


def test_eap_scores_equal_the_reference_gradient_products(setup):
    _, model, batch, tol = setup
    scores = attribute_edges(model, batch)
    for e in sample_edges(scores.graph):
        assert scores.score(e, "logit_diff") == pytest.approx(eap_reference(model, batch, e), abs=tol), e


def test_patching_every_edge_out_of_the_embeddings_or_an_mlp_equals_the_node_patch(setup):
    _, model, batch, tol = setup
    graph = _graph(model)
    nodes = {"embed": ap.Component("resid_pre", 0), "L0.mlp": ap.Component("mlp_out", 0),
             "L1.mlp": ap.Component("mlp_out", 1)}
    items = [tuple(e for e in graph.edges() if e.sender == s) for s in nodes]
    edges = patch_edges(model, batch, items, direction="noise")
    node = ap.patch(model, batch, list(nodes.values()), direction="noise")
    assert torch.allclose(edges.values, node.values.to(edges.values.dtype), atol=tol)


def test_patching_every_edge_out_of_a_layers_heads_equals_the_attention_node_patch(setup):
    _, model, batch, tol = setup
    graph = _graph(model)
    items = [tuple(e for e in graph.edges() if e.sender.startswith(f"L{layer}H")) for layer in (0, 1)]
    edges = patch_edges(model, batch, items, direction="noise")
    node = ap.patch(model, batch, [ap.Component("attn_out", 0), ap.Component("attn_out", 1)], direction="noise")
    assert torch.allclose(edges.values, node.values.to(edges.values.dtype), atol=tol)


def test_patching_every_edge_out_of_one_head_equals_its_node_patch_where_writes_are_linear(setup):
    """Parallel and sequential pre-norm blocks: a head's write is z_h W_O[h], so its edges jointly are the
    node patch of its z. Post-norm: the node patch of z_h also moves the norm's scale, hence every head's
    write; the two differ (measured here, not claimed equal)."""
    family, model, batch, tol = setup
    graph = _graph(model)
    heads = {"L0H1": ap.Component("head", 0, None, 1), "L1H3": ap.Component("head", 1, None, 3)}
    items = [tuple(e for e in graph.edges() if e.sender == s) for s in heads]
    edges = patch_edges(model, batch, items, direction="noise").values
    node = ap.patch(model, batch, list(heads.values()), direction="noise").values.to(edges.dtype)
    if family in POST_NORM:
        gap = (edges - node).abs().max().item()
        assert gap > GAP, "the post-norm head gap vanished: update writes.py's docstring"
    else:
        assert torch.allclose(edges, node, atol=tol)


def test_patching_every_edge_into_a_receiver_equals_patching_its_input(setup):
    _, model, batch, tol = setup
    graph = _graph(model)
    for receiver in ("L1H2.q", "L2H0.v", "L1.mlp", "logits"):
        joint = tuple(e for e in graph.edges() if e.receiver == receiver)
        effect = patch_edges(model, batch, [joint]).values[0, 0].item()
        whole = patch_input_reference(model, batch, receiver, input_delta(model, batch, receiver))
        assert effect == pytest.approx(whole, abs=tol), receiver


def test_patching_every_edge_turns_the_receiving_run_into_the_source_run(setup):
    _, model, batch, tol = setup
    scores = attribute_edges(model, batch)
    effects = patch_edges(model, batch, [tuple(scores.graph.edges()), ()])
    gap = scores.clean_metric["logit_diff"] - scores.corrupt_metric["logit_diff"]
    assert effects.values[0, 0].item() == pytest.approx(gap, abs=tol)
    assert effects.values[1, 0].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("estimator", ["atp", "ig"])
def test_scores_out_of_a_sender_sum_to_its_node_score(setup, estimator):
    """Exact for the embeddings, each MLP and each layer's heads together (attn_out) in every family, and for
    each head alone where its write is linear in z; post-norm heads alone are measured, not claimed. EAP-IG
    against node IG likewise."""
    family, model, batch, tol = setup
    scores = attribute_edges(model, batch, estimator=estimator, ig_steps=3).values["logit_diff"]
    node = ap.attribute(model, batch, sites=["resid_pre", "head", "attn_out", "mlp_out"], estimator=estimator,
                        ig_steps=3).values["logit_diff"]
    graph = _graph(model)
    assert scores[0].sum().item() == pytest.approx(node["resid_pre"][0].sum().item(), abs=tol)  # embed
    for layer in range(3):
        rows = [graph.sender_index[f"L{layer}H{h}"] for h in range(graph.n_heads)]
        heads = scores[rows].sum(1)
        assert heads.sum().item() == pytest.approx(node["attn_out"][layer].sum().item(), abs=tol)
        per_head = node["head"][layer].sum(0).to(heads.dtype)
        if family in POST_NORM:
            assert (heads - per_head).abs().max().item() > GAP  # the norm's Jacobian: not the same sum
        else:
            assert torch.allclose(heads, per_head, atol=tol)
        mlp = scores[graph.sender_index[f"L{layer}.mlp"]].sum().item()
        assert mlp == pytest.approx(node["mlp_out"][layer].sum().item(), abs=tol)


def test_scores_into_a_receiver_sum_to_its_input_score(setup):
    _, model, batch, tol = setup
    scores = attribute_edges(model, batch)
    for receiver in ("L1H2.q", "L2H0.k", "L1.mlp", "logits"):
        j = scores.graph.receiver_index[receiver]
        whole = (input_delta(model, batch, receiver) * receiver_grad(model, batch, receiver)).sum().item()
        assert scores.values["logit_diff"][:, j].sum().item() == pytest.approx(whole, abs=tol), receiver


def test_faithfulness_is_zero_for_the_empty_circuit_and_one_for_the_full_graph(setup):
    from attrpatch.config import EdgeConfig
    from attrpatch.edge_screening import faithfulness_curve

    _, model, batch, tol = setup
    scores = attribute_edges(model, batch)
    curve = faithfulness_curve(model, batch, scores, EdgeConfig(circuit_points=4))
    assert curve["faithfulness"][0] == pytest.approx(0.0, abs=tol)
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=tol)


def test_circuits_equal_one_patch_edges_pass_per_circuit(setup):
    """methods/edges/circuits.py (post-norm: a layer's heads filled once its o arrives) against patch_edges."""
    from attrpatch.methods.edges.circuits import patch_circuits

    _, model, batch, tol = setup
    graph = _graph(model)
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, *graph.exists.shape, generator=g) < 0.5) & graph.exists
    items = [tuple(graph.edges()[k] for k in m[graph.exists].nonzero().flatten().tolist()) for m in masks]
    fast = patch_circuits(model, batch, masks, direction="noise").values
    slow = patch_edges(model, batch, items, direction="noise", copies=1, resume=False).values
    assert torch.allclose(fast, slow, atol=tol)


@pytest.mark.parametrize("family", POST_NORM)
def test_post_norm_edges_take_zero_ablation_and_refuse_mean(family):
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs(3))
    graph = _graph(model)
    heads = tuple(e for e in graph.edges() if e.sender.startswith("L1H"))
    effect = patch_edges(model, batch, [heads], direction="noise", ablation="zero").values[0, 0].item()
    node = ap.patch(model, batch, [ap.Component("attn_out", 1)], direction="noise", ablation="zero").values[0, 0].item()
    assert effect == pytest.approx(node, abs=TOL[family])
    with pytest.raises(ValueError, match=r"--ablation mean is not offered for edges of post-norm models"):
        attribute_edges(model, batch, direction="noise", ablation="mean")


def test_the_graph_of_a_parallel_model_exports_to_mib_as_parallel():
    from attrpatch.output.mib import mib_graph

    graph = _graph(tiny_model("gpt_neox"))
    exported = mib_graph(graph, torch.zeros(graph.exists.shape), d_model=32)
    assert exported["cfg"]["parallel_attn_mlp"] is True
    assert "a1.h0->m1" not in exported["edges"] and "a0.h0->m1" in exported["edges"]


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_grouped_gemma_models_ungroup_to_the_same_function_for_mib(family):
    from attrpatch.model.ungroup import ungrouped

    model = tiny_model(family, dtype=torch.float64)
    copy = ungrouped(model)
    ids = torch.tensor([p.clean_ids for p in random_pairs(2)])
    assert copy.config.num_key_value_heads == 4 and model.config.num_key_value_heads < 4
    with torch.no_grad():
        assert torch.allclose(copy(ids).logits, model(ids).logits, atol=1e-12)


def test_mib_for_olmo2_is_refused_before_the_screen_saying_why():
    from attrpatch.config import EdgeConfig
    from attrpatch.edge_screening import screen_edges
    from attrpatch.model.archs import UnsupportedModel

    model, batch = tiny_model("olmo2"), ap.make_batch(random_pairs(2))
    with pytest.raises(UnsupportedModel, match=r"--mib\) for 'olmo2'.*k_norm normalises all key-value heads"):
        screen_edges(model, batch, EdgeConfig(mib=True))


@pytest.mark.parametrize("family", ["gemma2", "phi"])
def test_cli_edges_with_mib_and_the_edge_plan_run_on_the_new_families(tmp_path, family):
    import json

    from attrpatch.cli import main
    from conftest import saved_model, write_task

    _, folder = saved_model(tmp_path / "model", family)
    task = write_task(tmp_path / "task.jsonl", random_pairs(3))
    out = tmp_path / "run"
    assert main(["edges", "--model", str(folder), "--task", str(task), "--top-k", "3", "--random-k", "2",
                 "--direction", "noise", "--circuit-points", "3", "--no-figures", "--mib", str(out / "mib.json"),
                 "--out", str(out)]) == 0
    assert json.loads((out / "circuit.json").read_text())["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)
    exported = json.loads((out / "mib.json").read_text())
    assert exported["cfg"]["parallel_attn_mlp"] is (family == "phi")
    assert len(exported["edges"]) == json.loads((out / "report.json").read_text())["mib"]["n_edges"]
    assert main(["plan", "--model", str(folder), "--edges", "--n-prompts", "2", "--seq-len", "8"]) == 0


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_per_position_edges_add_up_to_whole_edges_on_the_new_families(setup, direction):
    """Per-position edges (--positions each) on parallel, post-norm and OPT blocks: every position of an edge
    patched jointly = the whole edge, and the position scores sum to the whole-edge scores (same backward)."""
    from attrpatch.methods.edges.positions import PositionEdge
    family, model, batch, tol = setup
    graph = attribute_edges(model, batch).graph
    edges = sample_edges(graph)
    whole = patch_edges(model, batch, edges, direction=direction, copies=3)
    joint = patch_edges(model, batch, [tuple(PositionEdge(e.sender, e.receiver, p) for p in range(batch.n_pos))
                                       for e in edges], direction=direction, copies=3)
    assert torch.allclose(joint.values, whole.values, atol=tol)
    assert whole.values.abs().max() > 1e-3
    per = attribute_edges(model, batch, direction=direction, positions=True)
    scores = attribute_edges(model, batch, direction=direction)
    assert torch.allclose(per.by_position["logit_diff"].sum(-1), scores.values["logit_diff"], atol=tol)
