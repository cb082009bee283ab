"""MIB's format and scores (output/mib.py, analysis/mib.py, edge_mib.py, model/ungroup.py): the export holds
exactly MIB's graph, round-trips, gives grouped-query models one k/v receiver per query head computed per
query head; the area and pruning follow MIB's definitions, written here independently."""

import json

import pytest
import torch

import attrpatch as ap
from attrpatch.analysis import mib
from attrpatch.config import EdgeConfig
from attrpatch.edge_mib import evaluate_mib, mib_scores
from attrpatch.methods.edges.eap import attribute_edges
from attrpatch.methods.edges.graph import Edge, Graph
from attrpatch.methods.edges.patching import patch_edges
from attrpatch.model.sites import as_spec
from attrpatch.model.ungroup import ungrouped
from attrpatch.output.mib import mib_graph, read_mib, write_mib
from conftest import random_pairs, tiny_model

MIB_PERCENTAGES = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1]  # MIB_circuit_track/evaluation.py
GQA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


def mib_edge_names(n_layers: int, n_heads: int) -> list[str]:
    """MIB's / EAP-IG's graph, from its definition: input, every head and every MLP send; every later head's
    q, k, v, every MLP (its own layer's heads too) and the logits receive; in Graph.from_model's order."""
    names, stream = [], ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        names += [f"{node}->{head}<{letter}>" for node in stream for head in heads for letter in "qkv"]
        stream += heads
        names += [f"{node}->m{layer}" for node in stream]
        stream.append(f"m{layer}")
    return names + [f"{node}->logits" for node in stream]


def mib_area(faith: list[float]) -> tuple[float, float]:
    """MIB's area under f and under |1 - f|: trapezoids between consecutive percentages."""
    under = from_one = 0.0
    for i in range(len(faith) - 1):
        width = MIB_PERCENTAGES[i + 1] - MIB_PERCENTAGES[i]
        under += width * (faith[i] + faith[i + 1]) / 2
        from_one += width * (abs(1 - faith[i]) + abs(1 - faith[i + 1])) / 2
    return under, from_one


def test_the_area_on_a_hand_example_equals_mibs_formula():
    assert mib.area([1.0] * 10) == pytest.approx((0.999, 0.0))  # from 0.1%, not from 0
    faith = [0.0, 0.1, -0.2, 0.4, 0.5, 0.9, 1.3, 1.0, 0.95, 1.0]
    assert mib.area(faith) == pytest.approx(mib_area(faith))
    assert mib.summary(faith, [2 - f for f in faith]) == pytest.approx(
        {"cpr": mib_area(faith)[0], "cmd": mib_area([2 - f for f in faith])[1]})
    assert mib.circuit_sizes(32491) == [int(p * 32491) for p in MIB_PERCENTAGES]


@pytest.fixture(scope="module")
def gpt2_scores():
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs(3))
    return model, batch, attribute_edges(model, batch, direction="noise")


def test_the_gpt2_export_has_every_edge_of_mibs_graph_and_no_other(gpt2_scores):
    model, _, scores = gpt2_scores
    out = mib_graph(scores.graph, scores.values["logit_diff"], model.config.n_embd)
    assert list(out["edges"]) == mib_edge_names(3, 4)  # the same edges, in EAP-IG's order
    assert len(out["edges"]) == scores.graph.n_edges
    assert out["cfg"] == {"n_layers": 3, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 32}
    assert list(out["nodes"]) == ["input", *(f"a{l}.h{h}" if h < 4 else f"m{l}" for l in range(3)
                                             for h in range(5)), "logits"]
    assert out["edges"]["input->a0.h1<q>"] == {"score": pytest.approx(scores.score(Edge("embed", "L0H1.q"),
                                                                                   "logit_diff")), "in_graph": False}
    assert out["edges"]["a2.h3->m2"]["score"] == pytest.approx(scores.score(Edge("L2H3", "L2.mlp"), "logit_diff"))
    assert out["edges"]["m2->logits"]["score"] == pytest.approx(scores.score(Edge("L2.mlp", "logits"), "logit_diff"))


def test_a_round_trip_keeps_every_score_and_flag(gpt2_scores, tmp_path):
    model, _, scores = gpt2_scores
    graph, table = scores.graph, scores.values["logit_diff"].float()
    circuit = mib.top_edges(table, graph.exists, 7, absolute=True)
    write_mib(tmp_path / "g.json", graph, table, 32, circuit)
    back, in_graph = read_mib(tmp_path / "g.json", graph)
    assert torch.equal(back, table * graph.exists) and torch.equal(in_graph, circuit)
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["nodes"]["logits"]["in_graph"] and sum(e["in_graph"] for e in data["edges"].values()) == 7
    del data["edges"]["m2->logits"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="edge 'm2->logits' of this model's graph is missing"):
        read_mib(tmp_path / "bad.json", graph)


@pytest.mark.parametrize("family", GQA_FAMILIES)
def test_ungrouping_computes_the_same_function_and_leaves_the_model_alone(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = ungrouped(model)
    ids = torch.randint(2, 40, (2, 7))
    with torch.no_grad():
        assert torch.allclose(copy(ids).logits, model(ids).logits, atol=1e-5)
    assert as_spec(copy).dims.n_kv_heads == 4 and as_spec(model).dims.n_kv_heads == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    mha = tiny_model("gpt2")
    assert ungrouped(mha) is mha


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_a_gqa_export_has_one_k_and_v_receiver_per_query_head_computed_per_query_head(family):
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs(3))
    grouped = attribute_edges(model, batch, direction="noise")
    with pytest.raises(ValueError, match="one k and v receiver per query head"):
        mib_graph(grouped.graph, grouped.values["logit_diff"], 32)
    _, scores = mib_scores(as_spec(model), batch, {"noise": grouped}, EdgeConfig(direction="noise"))
    out = mib_graph(scores.graph, scores.values["logit_diff"], 32)
    assert list(out["edges"]) == mib_edge_names(3, 4)
    for kind in ("k", "v"):
        for g in range(2):  # query heads 2g, 2g + 1 share key-value head g
            per_head = [scores.score(Edge("L0H1", f"L2H{h}.{kind}"), "logit_diff") for h in (2 * g, 2 * g + 1)]
            whole = grouped.score(Edge("L0H1", f"L2H{g}.{kind}"), "logit_diff")
            assert sum(per_head) == pytest.approx(-whole, rel=1e-6, abs=1e-9)  # MIB's sign: minus noising
            assert per_head[0] != pytest.approx(per_head[1], rel=1e-3)  # each head's own, not the group's halved


def test_patching_a_groups_query_head_k_edges_jointly_equals_patching_the_key_value_heads_edge():
    model, batch = tiny_model("llama", dtype=torch.float64), ap.make_batch(random_pairs(3))
    whole = patch_edges(model, batch, [Edge("L0.mlp", "L2H1.k")], direction="noise").values
    split = patch_edges(ungrouped(model), batch, [(Edge("L0.mlp", "L2H2.k"), Edge("L0.mlp", "L2H3.k")),
                                                  Edge("L0.mlp", "L2H2.k")], direction="noise").values
    assert split[0] == pytest.approx(whole[0], rel=1e-9, abs=1e-12)
    assert split[1] != pytest.approx(whole[0], rel=1e-3)


def test_pruning_drops_nodes_without_an_edge_in_or_out_as_mib_does():
    graph = Graph(2, 1, 1)
    owner = mib.owners(graph.senders, graph.receivers)

    def circuit(*names):
        mask = torch.zeros_like(graph.exists)
        for name in names:
            mask[graph.index(Edge(*name.split("->")))] = True
        return mask
    kept = circuit("embed->L0H0.q", "L0H0->logits")
    assert torch.equal(mib.prune(kept, owner), kept)
    assert not mib.prune(circuit("L0H0->L1H0.q"), owner).any()  # L0H0 has no edge in, L1H0 none out
    assert torch.equal(mib.prune(kept | circuit("embed->L1.mlp"), owner), kept)  # m1: an edge in, none out
    assert torch.equal(mib.prune(kept | circuit("embed->L1.mlp", "L1.mlp->logits"), owner),
                       kept | circuit("embed->L1.mlp", "L1.mlp->logits"))


def test_cpr_ranks_by_signed_score_and_cmd_by_absolute_score():
    exists = torch.ones(1, 4, dtype=torch.bool)
    scores = torch.tensor([[0.5, -3.0, 1.0, 0.1]])
    assert mib.top_edges(scores, exists, 2, absolute=False).tolist() == [[True, False, True, False]]
    assert mib.top_edges(scores, exists, 2, absolute=True).tolist() == [[False, True, True, False]]


def test_mibs_curve_measures_each_pruned_circuit_by_exact_patching():
    model, batch = tiny_model("llama", dtype=torch.float64), ap.make_batch(random_pairs(3))
    config = EdgeConfig(direction="noise", mib=True)
    scores = attribute_edges(model, batch, direction="noise")
    report, export = evaluate_mib(as_spec(model), batch, {"noise": scores}, config)
    curve = report["curve"]
    assert curve["empty_metric"] == pytest.approx(curve["corrupt_metric"], abs=1e-9)  # every edge patched
    assert curve["faithfulness_signed"][-1] == curve["faithfulness_absolute"][-1] == pytest.approx(1.0)
    assert report["cpr"] == pytest.approx(mib_area(curve["faithfulness_signed"])[0])
    assert report["cmd"] == pytest.approx(mib_area(curve["faithfulness_absolute"])[1])
    k = 7  # 20%: a naive reference, the edges outside the circuit patched jointly as one edge set
    owner = mib.owners(export.graph.senders, export.graph.receivers)
    inside = mib.prune(mib.top_edges(export.scores, export.graph.exists, curve["edges_asked"][k], False), owner)
    outside = tuple(e for e, keep in zip(export.graph.edges(), export.graph.flat(inside)) if not keep)
    effect = float(patch_edges(ungrouped(model), batch, [outside], direction="noise").values[0, 0])
    full, empty = curve["full_metric"], curve["empty_metric"]
    assert curve["faithfulness_signed"][k] == pytest.approx((full + effect - empty) / (full - empty), rel=1e-6)
    assert curve["edges_signed"][k] == int(inside.sum())


def run_edges_cli(tmp_path, family: str, *options: str):
    """``attrpatch edges ... --mib tmp_path/mib.json`` on a saved tiny model: the output folder."""
    from attrpatch.cli import main
    from conftest import saved_model, write_task

    _, folder = saved_model(tmp_path / "model", family)
    task = write_task(tmp_path / "task.jsonl", random_pairs(3))
    out = tmp_path / "run"
    assert main(["edges", "--model", str(folder), "--task", str(task), "--top-k", "3", "--random-k", "2",
                 "--circuit-points", "3", "--out", str(out), "--no-figures", "--mib", str(tmp_path / "mib.json"),
                 *options]) == 0
    return out


def test_cli_edges_mib_writes_the_graph_and_reports_cpr_and_cmd(tmp_path):
    out = run_edges_cli(tmp_path, "qwen2", "--direction", "denoise")
    report = json.loads((out / "report.json").read_text())
    assert {"cpr", "cmd", "curve"} <= set(report["mib"]) and report["mib"]["curve"]["shares"] == MIB_PERCENTAGES
    graph = json.loads((tmp_path / "mib.json").read_text())
    assert list(graph["edges"]) == mib_edge_names(3, 4) and graph["cfg"]["n_heads"] == 4
    assert "## MIB's scores" in (out / "report.md").read_text()


def test_the_mib_figure_draws_both_curves_from_report_json(tmp_path):
    """figures/mib_faithfulness.png from the edges run's report.json alone: the signed and the absolute curve at
    MIB's shares (the plotted y are report.json's faithfulness), CPR and CMD in the legend."""
    from attrpatch.plot.circuit import draw_edges, plot_mib
    out = run_edges_cli(tmp_path, "gpt2", "--direction", "denoise")
    report = json.loads((out / "report.json").read_text())
    fig = plot_mib(report["mib"], report=report)
    lines = fig.axes[0].get_lines()[:2]
    curve = report["mib"]["curve"]
    for line, key in zip(lines, ("faithfulness_signed", "faithfulness_absolute")):
        assert list(line.get_ydata()) == pytest.approx([float("nan") if f is None else f for f in curve[key]],
                                                       nan_ok=True)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"by signed score: CPR {report['mib']['cpr']:.3f}", f"by |score|: CMD {report['mib']['cmd']:.3f}"]
    written = draw_edges(out, formats=("png",))
    assert out / "figures" / "mib_faithfulness.png" in written
