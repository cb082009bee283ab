"""Per-position edges sender@p->receiver@p (attrpatch/methods/edges/positions.py): the identities that tie
them to whole edges and to per-position node patches, and the naive references (tests/edge_reference.py),
on tiny random models of every family edges support."""

import json

import pytest
import torch

import attrpatch as ap
from attrpatch.config import EdgeConfig
from attrpatch.edge_screening import faithfulness_curve
from attrpatch.methods.edges.circuits import patch_circuits
from attrpatch.methods.edges.eap import attribute_edges
from attrpatch.methods.edges.graph import Edge, Graph
from attrpatch.methods.edges.patching import patch_edges
from attrpatch.methods.edges.positions import PositionEdge, position_edges, position_products
from conftest import N_POS, random_pairs, tiny_model
from edge_reference import position_eap_reference, position_edge_patch_reference

FAMILIES = ("gpt2", "llama", "llama3", "mistral", "qwen2", "qwen3", "phi3")  # pre-norm sequential; the rest: test_family_edges.py
CHANGED = (1, 3)  # random_pairs' corrupted positions: every sender before position 1 is the same in both runs


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request):
    model = tiny_model(request.param, dtype=torch.float64)
    return model, ap.make_batch(random_pairs(3))


def whole_edges(graph: Graph) -> list[Edge]:
    """Edges into every kind of receiver (q, k, v of the last KV head, MLP, logits) from every kind of sender."""
    kv = graph.n_kv - 1
    return [Edge("embed", "L0H1.q"), Edge("L0H2", f"L1H{kv}.v"), Edge("L0.mlp", f"L2H{kv}.k"),
            Edge("L1H0", "L1.mlp"), Edge("L2H1", "logits"), Edge("L1.mlp", "logits"), Edge("embed", "L2.mlp")]


def at_positions(edge: Edge, positions) -> tuple[PositionEdge, ...]:
    return tuple(PositionEdge(edge.sender, edge.receiver, p) for p in positions)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_every_position_of_an_edge_patched_jointly_equals_the_whole_edge(setup, direction):
    """(a)"""
    model, batch = setup
    edges = whole_edges(attribute_edges(model, batch).graph)
    whole = patch_edges(model, batch, edges, direction=direction, copies=3)
    joint = patch_edges(model, batch, [at_positions(e, range(N_POS)) for e in edges], direction=direction, copies=3)
    assert torch.allclose(joint.values, whole.values, atol=1e-10)
    assert whole.values.abs().max() > 1e-3  # not a comparison of zeros


def test_every_edge_out_of_a_sender_at_a_position_equals_the_node_patch_there(setup):
    """(b): A@p -> every receiver at p, jointly = node patching A at p alone (denoising and noising)."""
    model, batch = setup
    graph = attribute_edges(model, batch).graph
    nodes = {("embed", 3): ap.Component("resid_pre", 0, 3), ("L0H1", 1): ap.Component("head", 0, 1, 1),
             ("L1.mlp", 4): ap.Component("mlp_out", 1, 4), ("L1H3", 6): ap.Component("head", 1, 6, 3),
             ("L2H0", 6): ap.Component("head", 2, 6, 0)}
    items = [tuple(PositionEdge(s, e.receiver, p) for e in graph.edges() if e.sender == s) for s, p in nodes]
    for direction in ("denoise", "noise"):
        edges = patch_edges(model, batch, items, direction=direction)
        node = ap.patch(model, batch, list(nodes.values()), direction=direction)
        assert torch.allclose(edges.values, node.values.to(edges.values.dtype), atol=1e-9)
        assert edges.values.abs().max() > 1e-3


@pytest.mark.parametrize("estimator", ["atp", "ig"])
def test_position_scores_sum_to_the_whole_edge_scores(setup, estimator):
    """(c): the same backward, the sum over positions left undone; every metric."""
    model, batch = setup
    metrics = ("logit_diff", "logprob")
    per = attribute_edges(model, batch, metrics=metrics, estimator=estimator, ig_steps=2, positions=True)
    whole = attribute_edges(model, batch, metrics=metrics, estimator=estimator, ig_steps=2)
    for m in metrics:
        assert per.by_position[m].shape == (*whole.values[m].shape, N_POS)
        assert torch.allclose(per.by_position[m].sum(-1), whole.values[m], atol=1e-10)
        assert torch.allclose(per.values[m], whole.values[m], atol=1e-10)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_position_edge_patching_equals_one_naive_forward_per_edge(setup, direction):
    """(d): batched, resumed per-position patching against a plain hook adding A's difference at p only."""
    model, batch = setup
    edges = [PositionEdge(e.sender, e.receiver, p) for e, p in zip(whole_edges(attribute_edges(model, batch).graph),
                                                                   (1, 3, 4, 6, 6, 6, 2))]
    fast = patch_edges(model, batch, edges, direction=direction, copies=4)
    for i, e in enumerate(edges):
        assert fast.values[i, 0].item() == pytest.approx(position_edge_patch_reference(model, batch, e, direction),
                                                         abs=1e-9), e
    assert fast.values.abs().max() > 1e-3


def test_position_scores_equal_the_reference_gradient_products(setup):
    model, batch = setup
    scores = attribute_edges(model, batch, positions=True)
    for e in whole_edges(scores.graph):
        for p in (1, 3, 6):
            edge = PositionEdge(e.sender, e.receiver, p)
            i, j = scores.graph.index(e)
            assert scores.by_position["logit_diff"][i, j, p].item() == pytest.approx(
                position_eap_reference(model, batch, edge), abs=1e-6), edge  # as test_edges.py (rope in float32)


def test_positions_before_the_first_changed_token_and_logits_before_the_last_are_zero():
    """Planted: a causal model's senders at position 0 are equal in both runs (tokens differ from position 1
    on), and the metric reads the logits at the last position only; their scores and exact effects are 0,
    while the same edges at later positions are not."""
    model, batch = tiny_model("llama", dtype=torch.float64), ap.make_batch(random_pairs(3))
    scores = attribute_edges(model, batch, positions=True)
    table = scores.by_position["logit_diff"]  # [sender, receiver, pos]
    assert table[:, :, 0].abs().max() == 0
    assert table[:, -1, :N_POS - 1].abs().max() == 0  # logits before the last position
    assert table[:, :, CHANGED[0]].abs().max() > 1e-3
    edges = [PositionEdge("embed", "L1H0.q", 0), PositionEdge("L0H1", "logits", 2), PositionEdge("L0H1", "logits", 6)]
    effects = patch_edges(model, batch, edges).values[:, 0]
    assert effects[:2].abs().max() < 1e-12 and abs(effects[2]) > 1e-3  # 0 to the rounding of a batched pass


def test_prompts_of_different_lengths_patch_the_logits_at_each_prompts_last_position():
    """Padding: the logits receiver at p is read where p is a prompt's last position (here 5, 7 and 4)."""
    model = tiny_model("gpt2", dtype=torch.float64)
    batch = ap.make_batch(random_pairs(3, lengths=[6, 8, 5]))
    edges = [PositionEdge("L2H1", "logits", p) for p in range(8)] + [PositionEdge("L1.mlp", "L2H0.k", 2)]
    fast = patch_edges(model, batch, edges, copies=3)
    for i, e in enumerate(edges):
        assert fast.values[i, 0].item() == pytest.approx(position_edge_patch_reference(model, batch, e), abs=1e-9), e
    scores = attribute_edges(model, batch, positions=True)
    whole = attribute_edges(model, batch)
    assert torch.allclose(scores.by_position["logit_diff"].sum(-1), whole.values["logit_diff"], atol=1e-10)


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi3"])
def test_position_masks_patched_together_equal_the_same_sets_patched_one_by_one(family):
    """circuits.py's per-position masks [item, sender, receiver, pos] against patch_edges on the same sets."""
    model = tiny_model(family, dtype=torch.float64)
    batch = ap.make_batch(random_pairs(3, lengths=[6, 7, 5]))
    graph = attribute_edges(model, batch).graph
    every = position_edges(graph, batch.n_pos)
    g = torch.Generator().manual_seed(2)
    picks = [torch.rand(len(every), generator=g) < p for p in (0.01, 0.3, 0.9)]
    masks = torch.zeros(len(picks), *graph.exists.shape, batch.n_pos, dtype=torch.bool)
    for i, pick in enumerate(picks):
        masks[i][graph.exists] = pick.view(-1, batch.n_pos)
    fast = patch_circuits(model, batch, masks, direction="noise", copies=2)
    items = [tuple(e for e, keep in zip(every, pick) if keep) for pick in picks]
    slow = patch_edges(model, batch, items, direction="noise", copies=1, resume=False)
    assert fast.values[:, 0].tolist() == pytest.approx(slow.values[:, 0].tolist(), abs=1e-9)


def test_position_products_equal_a_loop_over_positions():
    g = torch.Generator().manual_seed(0)
    delta, grad = torch.randn(5, 2, 4, 3, generator=g), torch.randn(6, 2, 4, 3, generator=g)
    out = position_products(delta, grad)
    for p in range(4):
        assert torch.allclose(out[..., p], delta[:, :, p].flatten(1) @ grad[:, :, p].flatten(1).T, atol=1e-6)


def test_the_per_position_faithfulness_curve_runs_from_corrupt_to_clean():
    model, batch = tiny_model("llama", dtype=torch.float64), ap.make_batch(random_pairs(3))
    scores = attribute_edges(model, batch, positions=True)
    curve = faithfulness_curve(model, batch, scores, EdgeConfig(circuit_points=5, positions="each"))
    assert curve["n_edges"] == scores.graph.n_edges * N_POS and curve["positions"] == "each"
    assert curve["faithfulness"][0] == pytest.approx(0.0, abs=1e-9)
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-9)
    assert {"sender", "receiver", "pos", "score"} <= set(curve["edges"][0])


def test_the_edge_memory_plan_holds_the_per_position_score_table():
    """edge_planning traces the [sender, receiver, pos] table: the edges phase's peak grows by about it."""
    from attrpatch.edge_planning import plan_edges
    from attrpatch.methods.edges.positions import table_bytes
    from conftest import CONFIGS

    peaks = {}
    for positions in ("all", "each"):
        config = EdgeConfig(direction="noise", metrics=("logit_diff",), positions=positions)
        plan = plan_edges(CONFIGS["gpt2"](), config, n_prompts=2, seq_len=64, device="cpu")
        peaks[positions] = plan["phases"]["edges"]["peak_bytes"]
        assert plan["settings"]["positions"] == positions
    table = table_bytes(Graph(3, 4, 4), 64, 1, torch.float32)  # 16 x 40 x 64 x 4 B
    assert table <= peaks["each"] - peaks["all"] <= 3 * table


def test_bad_positions_are_refused_naming_the_fix():
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs(2))
    with pytest.raises(ValueError, match=r"position 7 of embed@7->L1H0.q@7 is outside these prompts' positions 0..6"):
        patch_edges(model, batch, [PositionEdge("embed", "L1H0.q", 7)])
    with pytest.raises(ValueError, match=r"no edge L2H0->L1H0.q"):
        patch_edges(model, batch, [PositionEdge("L2H0", "L1H0.q", 2)])
    with pytest.raises(TypeError, match=r"edge sets hold Edge or PositionEdge, got tuple"):
        patch_edges(model, batch, [(("embed", "logits"),)])
    with pytest.raises(ValueError, match=r"Unknown positions 'every'; known: all, each"):
        EdgeConfig(positions="every")


def test_cli_per_position_edges_name_positions_and_tokens_in_the_reports(tmp_path):
    from attrpatch.cli import main
    from conftest import saved_model, write_task

    _, folder = saved_model(tmp_path / "model", "gpt2")
    task = write_task(tmp_path / "task.jsonl", random_pairs(3))
    out = tmp_path / "run"
    assert main(["edges", "--model", str(folder), "--task", str(task), "--positions", "each", "--top-k", "5",
                 "--random-k", "3", "--direction", "noise", "--circuit-points", "4", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["positions"] == "each" and len(report["tokens"]) == N_POS
    assert report["n_edges"] == Graph(3, 4, 4).n_edges * N_POS
    entry = report["edges"][0]
    assert entry["name"] == f"{entry['sender']}@{entry['pos']}->{entry['receiver']}@{entry['pos']}"
    assert report["circuit"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)
    md = (out / "report.md").read_text()
    assert "per-position edges (sender@p->receiver@p" in md
    assert f"| {entry['name']} (" in md or any(f"{e['name']} (" in md for e in report["edges"])
    assert "pos" in (out / "results.csv").read_text().splitlines()[0]
    for stem in ("circuit_graph", "faithfulness", "edges_scatter_noise"):
        assert (out / "figures" / f"{stem}.png").stat().st_size > 1000


@pytest.mark.real_model
def test_smollm2_ioi_per_position_edges_read_the_answer_at_the_end_position(tmp_path):
    """A small per-position edges run on SmolLM2-135M IOI through the CLI. Edges into the logits can only act
    at the last position (END), and there they are nearly linear (a head's write through the final norm):
    score and exact agree within 20%; the random controls stay below the weakest top edge."""
    from attrpatch.cli import main
    from attrpatch.model.fetch import fetch

    out = tmp_path / "run"
    assert main(["edges", "--model", str(fetch("smollm2")), "--task", "ioi", "--n-prompts", "4",
                 "--positions", "each", "--direction", "noise", "--top-k", "8", "--random-k", "3",
                 "--circuit-points", "3", "--metrics", "logit_diff", "--no-figures", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["positions"] == "each" and report["tokens"][-1] == "END"
    top = [e for e in report["edges"] if e["selected"] == "top"]
    assert len(top) == 8 and all(e["name"].count("@") == 2 for e in top)
    logits = [e for e in top if e["receiver"] == "logits"]
    assert logits and all(e["pos"] == len(report["tokens"]) - 1 for e in logits)
    assert all(abs(e["approx"] - e["exact"]) < 0.2 * abs(e["exact"]) for e in logits)
    weakest = min(abs(e["exact"]) for e in top)
    assert all(abs(e["exact"]) < weakest for e in report["edges"] if e["selected"] == "control")
    assert report["circuit"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_kept_top_and_pool_are_the_full_tables_entries(family):
    """position_top.py: the top-K by |first metric| and the uniform pool equal the dense table's entries, every
    metric, and the whole-edge sums are unchanged."""
    model, batch = tiny_model(family, dtype=torch.float64), ap.make_batch(random_pairs(3))
    metrics = ("logit_diff", "logprob")
    dense = attribute_edges(model, batch, metrics=metrics, positions=True)
    kept = attribute_edges(model, batch, metrics=metrics, positions=True, keep=40)
    top = kept.position_top
    assert kept.by_position is None and len(top.index) == 40
    first = dense.by_position["logit_diff"].flatten()
    assert set(top.index.tolist()) == set(first.abs().topk(40).indices.tolist())
    for m in metrics:
        flat = dense.by_position[m].flatten()
        assert torch.allclose(flat[top.index], top.value[m], atol=1e-12)
        assert torch.allclose(flat[top.pool], top.pool_value[m], atol=1e-12)
        assert torch.allclose(kept.values[m], dense.values[m], atol=1e-12)
    assert bool(dense.graph.exists.flatten()[top.pool // N_POS].all())  # the pool holds existing edges only


def test_the_screen_keeping_only_the_top_verifies_the_same_edges_and_curve(monkeypatch):
    """Above the table limit (set to 0 here) the screen ranks the kept top-K: the same top edges and exact
    effects as the full table, controls from the uniform pool, and the curve's sizes within K equal."""
    import warnings

    from attrpatch.methods.edges import eap, position_top

    model, batch = tiny_model("llama", dtype=torch.float64), ap.make_batch(random_pairs(3))
    config = EdgeConfig(top_k=6, random_k=4, circuit_points=8, direction="noise", positions="each",
                        metrics=("logit_diff", "prob"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model fails the clean-run check
        dense = ap.screen_edges(model, batch, config)
        monkeypatch.setattr(eap, "MAX_TABLE_BYTES", 0)
        monkeypatch.setattr(position_top, "DEFAULT_KEEP", 100)
        monkeypatch.setattr(eap, "DEFAULT_KEEP", 100)
        kept = ap.screen_edges(model, batch, config)
    assert kept.scores["noise"].position_top is not None and dense.scores["noise"].position_top is None
    top = [e for e in kept.edges if e["selected"] == "top"]
    assert [e["name"] for e in top] == [e["name"] for e in dense.edges if e["selected"] == "top"]
    assert [e["exact"] for e in top] == pytest.approx([e["exact"] for e in dense.edges if e["selected"] == "top"])
    assert kept.n_edges == dense.n_edges and len([e for e in kept.edges if e["selected"] == "control"]) == 4
    sizes = kept.circuit["sizes"]
    assert sizes[-1] == dense.n_edges and max(sizes[:-1]) <= 100
    same = {s: f for s, f in zip(dense.circuit["sizes"], dense.circuit["faithfulness"])}
    for s, f in zip(sizes, kept.circuit["faithfulness"]):
        assert f == pytest.approx(same[s], abs=1e-9), s


def test_keeping_the_top_needs_one_backward_of_every_prompt():
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs(3))
    with pytest.raises(ValueError, match=r"running top-k, which needs one backward.*--estimator atp"):
        attribute_edges(model, batch, positions=True, keep=10, estimator="ig")
    with pytest.raises(ValueError, match=r"--batch-size 2 < 3 prompts splits it.*drop --batch-size"):
        attribute_edges(model, batch, positions=True, keep=10, batch_size=2)
    with pytest.raises(ValueError, match=r"keep takes a positive integer.*got 0"):
        attribute_edges(model, batch, positions=True, keep=0)


@pytest.mark.parametrize("keep", [None, 30])
def test_saved_per_position_scores_load_back_for_resume(tmp_path, keep):
    """--resume reads a direction's saved scores: the per-position table, or the kept top-K and pool."""
    from attrpatch.output.checkpoint import Progress

    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs(2))
    scores = attribute_edges(model, batch, positions=True, keep=keep)
    progress = Progress(tmp_path, {"run": 1})
    progress.save_edge_scores("edge-attribution-noise", scores)
    back = Progress(tmp_path, {"run": 1}, resume=True).edge_scores("edge-attribution-noise", scores.graph)
    assert torch.equal(back.values["logit_diff"], scores.values["logit_diff"])
    if keep is None:
        assert torch.equal(back.by_position["logit_diff"], scores.by_position["logit_diff"])
    else:
        assert torch.equal(back.position_top.index, scores.position_top.index) and back.position_top.n_pos == N_POS
        assert torch.equal(back.position_top.pool_value["logit_diff"], scores.position_top.pool_value["logit_diff"])


def test_chunked_prompts_add_up_to_the_same_per_position_table():
    model, batch = tiny_model("llama", dtype=torch.float64), ap.make_batch(random_pairs(5))
    whole = attribute_edges(model, batch, positions=True)
    chunked = attribute_edges(model, batch, positions=True, batch_size=2)
    assert torch.allclose(chunked.by_position["logit_diff"], whole.by_position["logit_diff"], atol=1e-12)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_per_position_identities_hold_against_an_ablation(ablation):
    """--ablation zero|mean (noising): the senders' source is the ablated clean run; (a) and (c) still hold."""
    model, batch = tiny_model("gpt2", dtype=torch.float64), ap.make_batch(random_pairs(3))
    per = attribute_edges(model, batch, direction="noise", ablation=ablation, positions=True)
    whole = attribute_edges(model, batch, direction="noise", ablation=ablation)
    assert torch.allclose(per.by_position["logit_diff"].sum(-1), whole.values["logit_diff"], atol=1e-10)
    edges = whole_edges(whole.graph)
    one = patch_edges(model, batch, edges, direction="noise", ablation=ablation)
    joint = patch_edges(model, batch, [at_positions(e, range(N_POS)) for e in edges], direction="noise",
                        ablation=ablation)
    assert torch.allclose(joint.values, one.values, atol=1e-10) and one.values.abs().max() > 1e-3
