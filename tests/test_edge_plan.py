"""The edge screen chooses what to verify as a node site does: one SitePlan (analysis/records.py) drawn by
analysis/ranking.plan_site, the top-k by |score| under the primary metric and a seeded control sample of the
rest, with the verified edges' findings in the plan's order."""

import warnings

import attrpatch as ap
from attrpatch.analysis.ranking import control_sample, plan_site, top_k
from attrpatch.analysis.records import SitePlan
from conftest import random_pairs, tiny_model


def test_the_edge_screen_verifies_its_site_plan_in_order():
    config = ap.EdgeConfig(top_k=5, random_k=4, circuit_points=2, direction="both", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random model fails the clean-run check
        result = ap.screen_edges(tiny_model("gpt2"), ap.make_batch(random_pairs(4)), config)
    for direction in ("denoise", "noise"):
        scores = result.scores[direction]
        approx = {m: scores.flat(m).float() for m in result.config.metrics}
        plan = plan_site("edges", scores.graph.edges(), {"atp": approx}, first="atp", metric=config.metric, k=5,
                         random_k=4, seed=3)
        assert isinstance(plan, SitePlan) and plan.top == top_k(approx[config.metric], 5)
        assert plan.control == control_sample(scores.graph.n_edges, plan.top, 4, 3)
        assert set(plan.control).isdisjoint(plan.top) and len(plan.control) == 4
        found = [e for e in result.edges if e["direction"] == direction]
        assert [e["name"] for e in found] == [str(edge) for edge in plan.verified]
        assert [e["selected"] for e in found] == ["top"] * 5 + ["control"] * 4
        assert [e["rank_approx"] for e in found] == [int(plan.rank_approx[j]) for j in plan.indices]
