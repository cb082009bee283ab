"""MIB's CPR and CMD on per-position edges (``attrpatch edges --positions each --mib``, edge_mib.py): the
per-position prune (analysis/mib.py ``prune_positions``) on hand examples, and the curve's ends and one
circuit against a naive joint patch of the per-position edges outside it, on tiny random models."""

import json
import math

import pytest
import torch

import attrpatch as ap
from attrpatch.analysis import mib
from attrpatch.config import EdgeConfig
from attrpatch.edge_mib import evaluate_mib
from attrpatch.methods.edges.eap import attribute_edges
from attrpatch.methods.edges.graph import EdgeModel, Graph
from attrpatch.methods.edges.patching import patch_edges
from attrpatch.methods.edges.positions import PositionEdge, position_exists
from attrpatch.model.sites import as_spec
from attrpatch.model.ungroup import ungrouped
from conftest import N_POS, random_pairs, tiny_model

GRAPH = Graph(2, 1, 1)
OWNER, KV = mib.owners(GRAPH.senders, GRAPH.receivers), mib.key_value(GRAPH.receivers)


def circuit(*names: str, n_pos: int = 3) -> torch.Tensor:
    """[sender, receiver, pos] bool of edges named ``sender@p->receiver@p``."""
    mask = torch.zeros(*GRAPH.exists.shape, n_pos, dtype=torch.bool)
    for name in names:
        left, right = name.split("->")
        sender, pos = left.split("@")
        i, j = GRAPH.index(PositionEdge(sender, right.split("@")[0], int(pos)).edge)
        mask[i, j, int(pos)] = True
    return mask


def prune(mask: torch.Tensor) -> torch.Tensor:
    return mib.prune_positions(mask, OWNER, KV)


def test_a_head_at_query_q_reads_keys_and_values_at_key_positions_up_to_q():
    kept = circuit("embed@0->L1H0.k@0", "L1H0@2->logits@2")  # a key at 0 reaches the query at 2
    assert torch.equal(prune(kept), kept)
    assert torch.equal(prune(circuit("embed@1->L1H0.v@1", "L1H0@1->logits@1")),
                       circuit("embed@1->L1H0.v@1", "L1H0@1->logits@1"))  # p' = q
    assert not prune(circuit("embed@2->L1H0.k@2", "L1H0@1->logits@1")).any()  # a later key: no edge in at 1


def test_a_head_or_mlp_reads_its_query_or_input_at_its_own_position_only():
    assert not prune(circuit("embed@1->L1H0.q@1", "L1H0@2->logits@2")).any()
    assert not prune(circuit("embed@0->L1.mlp@0", "L1.mlp@1->logits@1")).any()
    chain = circuit("embed@1->L0.mlp@1", "L0.mlp@1->L1H0.q@1", "L1H0@1->logits@1")
    assert torch.equal(prune(chain), chain)


def test_nodes_without_an_edge_out_go_with_the_edges_into_them():
    kept = circuit("embed@0->L1H0.k@0", "L1H0@2->logits@2")
    assert torch.equal(prune(kept | circuit("embed@1->L0.mlp@1")), kept)  # L0.mlp@1: in, no out
    assert torch.equal(prune(kept | circuit("L0H0@1->logits@1")), kept)  # L0H0@1: out, no in
    # a key read by no query that survives: L1H0 survives at 1 only, so its key at 2 goes
    early = circuit("embed@0->L1H0.k@0", "L1H0@1->logits@1")
    assert torch.equal(prune(early | circuit("embed@2->L1H0.k@2")), early)
    # ... but a key at 0 stays while the head survives at some later query
    assert torch.equal(prune(kept | circuit("embed@0->L1H0.v@0")), kept | circuit("embed@0->L1H0.v@0"))


def test_on_one_position_the_per_position_prune_is_mibs_prune():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = (torch.rand(GRAPH.exists.shape, generator=g) < 0.3) & GRAPH.exists
        assert torch.equal(mib.prune_positions(mask[..., None], OWNER, KV)[..., 0], mib.prune(mask, OWNER))


@pytest.fixture(scope="module")
def llama():
    model, batch = tiny_model("llama", dtype=torch.float64), ap.make_batch(random_pairs(3))
    config = EdgeConfig(direction="noise", positions="each", mib=True)
    scores = attribute_edges(model, batch, direction="noise", positions=True)
    report, export = evaluate_mib(as_spec(model), batch, {"noise": scores}, config)
    return model, batch, report, export


def test_the_per_position_curve_runs_from_the_empty_circuit_to_the_full_model(llama):
    model, batch, report, export = llama
    curve = report["curve"]
    assert export is None and report["positions"] == "each"
    n_edges = Graph(3, 4, 4).n_edges * N_POS  # tiny llama ungrouped: 4 query heads, each its own k and v
    assert report["n_edges"] == n_edges and curve["edges_asked"] == mib.circuit_sizes(n_edges)
    assert curve["empty_metric"] == pytest.approx(curve["corrupt_metric"], abs=1e-9)  # every edge patched
    assert curve["faithfulness_signed"][-1] == curve["faithfulness_absolute"][-1] == pytest.approx(1.0, abs=1e-9)
    assert curve["edges_signed"][-1] == n_edges
    assert report["cpr"] == pytest.approx(mib.area(curve["faithfulness_signed"])[0])


def test_a_per_position_circuit_is_measured_as_the_joint_patch_of_the_edges_outside_it(llama):
    model, batch, report, _ = llama
    curve, k = report["curve"], 7  # 20%
    spec = as_spec(ungrouped(model))
    signed = -attribute_edges(spec, batch, direction="noise", positions=True).by_position["logit_diff"]
    graph = EdgeModel(spec).graph
    exists = position_exists(graph, N_POS)
    inside = mib.prune_positions(mib.top_edges(signed, exists, curve["edges_asked"][k], False),
                                 mib.owners(graph.senders, graph.receivers), mib.key_value(graph.receivers))
    outside = tuple(PositionEdge(graph.senders[i].name, graph.receivers[j].name, p)
                    for i, j, p in (exists & ~inside).nonzero().tolist())
    effect = float(patch_edges(spec, batch, [outside], direction="noise").values[0, 0])
    full, empty = curve["full_metric"], curve["empty_metric"]
    assert curve["faithfulness_signed"][k] == pytest.approx((full + effect - empty) / (full - empty), rel=1e-6)
    assert curve["edges_signed"][k] == int(inside.sum())


def test_with_only_the_top_kept_the_shares_it_decides_match_and_the_rest_are_not_measured(llama, monkeypatch):
    from attrpatch.methods.edges import eap

    model, batch, dense, _ = llama
    monkeypatch.setattr(eap, "MAX_TABLE_BYTES", 0)
    monkeypatch.setattr(eap, "DEFAULT_KEEP", 200)
    scores = attribute_edges(model, batch, direction="noise", positions=True)
    report, _ = evaluate_mib(as_spec(model), batch, {"noise": scores},
                             EdgeConfig(direction="noise", positions="each", mib=True))
    assert report["kept"] == 200
    for key in ("faithfulness_signed", "faithfulness_absolute"):
        decided = [k for k, f in enumerate(report["curve"][key]) if not math.isnan(f)]
        assert 9 in decided and 0 in decided and len(decided) < 10  # 100% always; 50% not within 200
        for k in decided:
            assert report["curve"][key][k] == pytest.approx(dense["curve"][key][k], abs=1e-9), (key, k)
    assert math.isnan(report["cpr"]) and math.isnan(report["cmd"])


def test_cli_per_position_mib_reports_the_scores_and_writes_no_graph(tmp_path, capsys):
    from test_mib import run_edges_cli

    out = run_edges_cli(tmp_path, "llama", "--positions", "each", "--direction", "noise")
    report = json.loads((out / "report.json").read_text())
    assert report["mib"]["positions"] == "each"
    assert {"cpr", "cmd", "curve"} <= set(report["mib"]) and not (tmp_path / "mib.json").exists()
    assert "No MIB graph JSON is written for per-position edges" in (out / "report.md").read_text()
    assert "mib.json not written (MIB's graphs are whole edges)" in capsys.readouterr().out
