"""Verification that cannot miss the largest effect (issue 24 item 3): a site whose components that can have
an effect fit ``verify_budget`` is verified exhaustively (the others cost nothing and are exactly 0), and the
other sites grow past the top-k by AtP*'s adaptive stopping; a component AtP ranks last (sign flipped, ~0)
with the largest exact effect is reported first whatever top_k is."""

import numpy as np
import pytest
import torch

import attrpatch as ap
import attrpatch.steps as steps
from attrpatch.analysis.ranking import BLOCK, THRESHOLD_SHARE, extend, plan_verification
from attrpatch.analysis.records import SitePlan
from attrpatch.config import ScreenConfig
from attrpatch.methods.patching.passes import copy_cost, same_prefix
from attrpatch.model.sites import Component, components
from attrpatch.output import report_md
from attrpatch.output.report import report_dict
from attrpatch.screening import screen
from conftest import N_POS, random_pairs, tiny_model
from test_attribute import _saturated_gpt2


def test_components_before_the_first_differing_position_cost_nothing_and_have_no_effect():
    model = tiny_model("llama")
    batch = ap.make_batch(random_pairs(n=3, changed=(2, 4)))
    spec = ap.model_spec(model)
    cost, same = copy_cost(spec, batch), same_prefix(batch)
    assert same == 2
    comps = components("mlp_out", spec.dims, N_POS, per_position=True)
    early = [c for c in comps if c.pos < same]
    assert early and all(cost(c) is None for c in early)
    naive = ap.patch(model, batch, early, resume=False, copies=1).values  # one full forward each
    assert torch.equal(naive, torch.zeros_like(naive))
    late = [c for c in comps if c.pos >= same]
    assert all(0 < cost(c) <= 1 for c in late)
    first, last = (min(late, key=lambda c: (c.layer, c.pos)), max(late, key=lambda c: (c.layer, c.pos)))
    assert cost(first) > cost(last)  # a later layer and position resumes later and computes fewer rows
    assert cost(Component("resid_pre", 0, None)) == 0.0  # the whole stream: read off the source run


def _config(**options):
    return ScreenConfig(**{"sites": ("resid_pre", "head"), "top_k": 1, "random_k": 0, "direction": "denoise",
                           "metrics": ("logit_diff",), "progress": False, **options})


def test_a_site_within_the_budget_is_verified_exhaustively():
    model, batch = tiny_model("qwen2"), ap.make_batch(random_pairs(n=3, changed=(2, 4)))
    result = screen(model, batch, _config())
    spec = ap.model_spec(model)
    for site in ("resid_pre", "head"):
        v = result.verification["denoise"][site]
        assert v["mode"] == "exhaustive" and v["control"] == 0 and v["stopped"] == "all verified"
        each = site == "resid_pre"
        every = components(site, spec.dims, N_POS, per_position=each)
        possible = [c for c in every if not (each and c.pos < 2)]
        assert v["top"] == len(possible) and v["no_effect"] == len(every) - len(possible)
        verified = {c["name"] for c in result.components if c["site"] == site}
        assert verified == {str(c) for c in possible}
        assert result.false_negatives["denoise"][site]["verdict"] == "all_verified"
        # the report's top list of the site is the exact one: the largest |exact| first
        exact = ap.patch(model, batch, possible).values[:, 0]
        best = str(possible[int(exact.abs().argmax())])
        listed = sorted((c for c in result.components if c["site"] == site), key=lambda c: -abs(c["exact"]))
        assert listed[0]["name"] == best
    text = report_md.render(report_dict(result, model="tiny", task="t"))
    assert "- resid_pre: exhaustive, all" in text and "(exhaustive: the exact top list)" in text


def _plant(monkeypatch, flip: str):
    """Every estimator's score of ``flip`` (a component name) is set to -1e-4 x its exact sign: AtP ranks it
    last among the components that can have an effect, with the wrong sign."""
    original = steps.attribute

    def planted(spec, batch, **options):
        scores = original(spec, batch, **options)
        c = next(c for c in components("k", spec.dims, batch.n_pos, per_position=False) if str(c) == flip)
        for per_site in scores.values.values():
            t = per_site["k"]
            t[..., c.layer, :, c.unit] = 0.0
            t[..., c.layer, 0, c.unit] = -1e-4 * planted.sign
        return scores
    monkeypatch.setattr(steps, "attribute", planted)
    return planted


@pytest.mark.parametrize("flip", [False, True])
def test_the_largest_effect_is_reported_first_whatever_top_k(monkeypatch, flip):
    """A saturated layer-0 key: plain AtP scores it ~0, its patch has the largest effect (test_attribute);
    planted with a sign-flipped score too. top_k=1: only the exhaustive verification finds it."""
    model, batch = _saturated_gpt2(), ap.make_batch(random_pairs(n=4, changed=(2,)))
    spec = ap.model_spec(model)
    keys = components("k", spec.dims, N_POS, per_position=False)
    exact = ap.patch(model, batch, keys).values[:, 0]
    best = int(exact.abs().argmax())
    if flip:
        _plant(monkeypatch, str(keys[best])).sign = float(torch.sign(exact[best]))
    config = dict(sites=("k",), top_k=1, random_k=0, direction="denoise", metrics=("logit_diff",), progress=False)
    found = screen(model, batch, ScreenConfig(**config))
    first = max(found.components, key=lambda c: abs(c["exact"]))
    assert first["name"] == str(keys[best]) and found.verification["denoise"]["k"]["mode"] == "exhaustive"
    assert first["rank_approx"] > 1  # AtP did not rank it first ...
    if flip:
        assert first["approx"] * first["exact"] < 0  # ... with the wrong sign
    assert "missed" in first["flags"] or "sign_flip" in first["flags"] or "large_error" in first["flags"]
    top_only = screen(model, batch, ScreenConfig(**config, verify_budget=0))  # the check can fail
    assert str(keys[best]) not in {c["name"] for c in top_only.components}


def _site_plan(n: int, top: list[int], control: list[int] = ()) -> SitePlan:
    comps = [Component("neuron", 0, None, unit=j) for j in range(n)]
    approx = torch.linspace(1.0, 0.1, n)  # the estimator's order is 0, 1, 2, ...
    return SitePlan(site="neuron", all=comps, approx={"logit_diff": approx}, by_estimator={},
                    tops={}, top=list(top), control=list(control), rank_approx=torch.arange(1, n + 1),
                    cost=0.1 * (len(top) + len(control)))


CONFIG = ScreenConfig(sites=("neuron",), top_k=20, verify_budget=10.0, progress=False)
COST = lambda c: 0.1  # noqa: E731


def test_adaptive_stopping_grows_while_the_last_block_holds_an_effect_of_interest():
    plan = _site_plan(200, top=range(20), control=[150, 160])
    exact = {c: 1.0 for c in plan.all}  # every effect of interest
    grown = extend(plan, lambda c: exact[c], CONFIG, COST, spare=10.0)
    assert grown.top == list(range(20 + BLOCK)) and grown.mode == "adaptive" and grown.stopped is None
    assert grown.cost == pytest.approx(plan.cost + 0.1 * BLOCK) and grown.extra == pytest.approx(0.1 * BLOCK)
    exact.update({c: 0.0 for c in plan.all[20 - BLOCK:]})  # the last block is below the threshold
    assert extend(plan, lambda c: exact[c], CONFIG, COST, spare=10.0).stopped == "below threshold"
    exact[plan.all[19]] = THRESHOLD_SHARE * 1.01  # one just at interest keeps it going
    assert extend(plan, lambda c: exact[c], CONFIG, COST, spare=10.0).stopped is None


def test_adaptive_stopping_keeps_to_the_budget_and_skips_the_verified():
    exact = lambda c: 1.0  # noqa: E731
    plan = _site_plan(200, top=range(20), control=[25])
    while plan.stopped is None:
        plan = extend(plan, exact, CONFIG, COST, spare=CONFIG.verify_budget - plan.extra)
    assert plan.stopped == "budget" and plan.extra <= CONFIG.verify_budget
    assert plan.extra + 0.1 * BLOCK > CONFIG.verify_budget  # the next block would not have fitted
    assert 25 not in plan.top and len(set(plan.top)) == len(plan.top)  # a control is not verified twice
    small = _site_plan(25, top=range(20))
    small = extend(small, exact, CONFIG, COST, spare=10.0)
    assert small.top == list(range(25)) and extend(small, exact, CONFIG, COST, spare=10.0).stopped == "all verified"
    off = ScreenConfig(sites=("neuron",), top_k=20, verify_budget=0, progress=False)
    assert extend(_site_plan(200, top=range(20)), exact, off, COST, spare=10.0).top == list(range(20))


def test_a_screen_grows_a_site_past_the_top_k_and_resumes_the_same(tmp_path):
    from attrpatch.output.checkpoint import Progress

    model, batch = tiny_model("llama"), ap.make_batch(random_pairs(n=3, changed=(2, 4)))
    config = ScreenConfig(sites=("neuron",), top_k=5, random_k=2, verify_budget=20.0, direction="denoise",
                          metrics=("logit_diff",), progress=False)
    first = screen(model, batch, config, Progress(tmp_path, {"run": 1}))
    v = first.verification["denoise"]["neuron"]
    assert v["mode"] == "adaptive" and v["top"] > 5 and v["stopped"] in ("below threshold", "budget")
    assert v["beyond_top_k"] <= 20.0 and v["forward_equivalents"] > v["beyond_top_k"]
    assert len([c for c in first.components if c["selected"] == "top"]) == v["top"]
    calls = []
    monkey = steps.Steps._patch

    def counted(self, *args, **kwargs):
        calls.append(1)
        return monkey(self, *args, **kwargs)
    steps.Steps._patch = counted
    try:
        again = screen(model, batch, config, Progress(tmp_path, {"run": 1}, resume=True))
    finally:
        steps.Steps._patch = monkey
    assert again.verification == first.verification
    assert [c["exact"] for c in again.components] == [c["exact"] for c in first.components]
    assert sum(calls) <= 1  # every verification round was saved (the half patches may remain)


def test_the_position_map_of_an_exhaustive_site_has_no_unknown_cell(tmp_path):
    """plot.heatmaps.exact_grid: every cell of an exhaustively verified per-position site is known: patched, or
    exactly 0 before the first position where the prompts differ (a top-k site keeps NaN where unverified)."""
    from attrpatch.pipeline import run_screen
    from attrpatch.plot.heatmaps import exact_grid
    from attrpatch.plot.run import load_run
    from conftest import write_task

    task = write_task(tmp_path / "pairs.jsonl", random_pairs(n=3, changed=(2, 4)))
    for budget, out in ((20.0, tmp_path / "all"), (0.0, tmp_path / "top")):
        run_screen(tiny_model("llama"), None, task=str(task), out=out, model_name="tiny", figures=False,
                   config=_config(sites=("resid_pre",), verify_budget=budget))
        grid = exact_grid(load_run(out), "denoise", "logit_diff", "resid_pre")  # [layer, pos]
        if budget:
            assert not np.isnan(grid).any() and (grid[:, :2] == 0).all() and (grid[:, 2:] != 0).any()
        else:
            assert np.isnan(grid).sum() == grid.size - 1  # the top 1
