"""The frozen measurements (methods/patching/frozen.py) reuse runs (issue 27): the patches' source from exact
patching's shared runs, one receiving run for both freezes. Against a reference that makes every run
itself, per freeze (the computation before the reuse), on tiny random models, and in a whole screen."""

import pytest
import torch

import attrpatch as ap
import attrpatch.steps as steps
from attrpatch.config import ScreenConfig
from attrpatch.methods.patching.frozen import FREEZES, frozen_effects, frozen_measurements
from attrpatch.model.sites import components
from attrpatch.screening import screen
from conftest import N_POS, random_pairs, tiny_model

SITES = ("resid_pre", "attn_out", "mlp_out", "head")


def frozen_reference(model, batch, comps, *, direction, metric_name="logit_diff", freezes=FREEZES, copies=None,
                     batch_size=None, explained=None, reduce=lambda t: t, runs=None):
    """frozen_measurements with every run made per freeze: a RelP attribution, then frozen_effects with its own
    source and receiving run (no ``runs``, no shared receivers)."""
    out, passes, todo = {str(c): {} for c in comps}, {}, list(comps)
    for freeze in freezes:
        if not todo:
            break
        scores = ap.attribute(model, batch, sites=sorted({c.site for c in todo}), metrics=(metric_name,),
                              direction=direction, estimator="relp", relp_rules=(freeze,), batch_size=batch_size)
        effects, spent = frozen_effects(model, batch, todo, freeze=freeze, metric_name=metric_name,
                                        direction=direction, copies=copies or 16, batch_size=batch_size)
        effects = reduce(effects)
        for key, value in (*scores.passes.items(), *spent.items()):
            passes[key] = passes.get(key, 0) + value
        for i, c in enumerate(todo):
            out[str(c)][freeze] = (float(reduce(torch.tensor(scores.score(c, metric_name)))), float(effects[i]))
        todo = [c for c in todo if not (explained and explained(c, freeze, *out[str(c)][freeze]))]
    return out, passes


def _comps(model):
    dims = ap.model_spec(model).dims
    return [c for s in SITES for c in components(s, dims, N_POS, per_position=s != "head")][::3]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gemma2"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("batch_size", [None, 2])
def test_reused_runs_give_the_same_frozen_measurements(family, direction, batch_size):
    """One attribution source run for both freezes, the patches' source from it (or patch's shared runs), one
    receiver for both freezes: the same slopes and effects as every run made per freeze, and per chunk three
    runs fewer (the two patch sources, the second receiver) and one attribution forward fewer, each a
    forward-equivalent."""
    model = tiny_model(family)
    batch, comps = ap.make_batch(random_pairs(n=5)), _comps(model)
    shared: dict = {}
    ap.patch(model, batch, comps, direction=direction, batch_size=batch_size, runs=shared)  # as the screen does
    reused, passes = frozen_measurements(model, batch, comps, direction=direction, batch_size=batch_size,
                                         runs=shared, copies=4)
    own, own_passes = frozen_measurements(model, batch, comps, direction=direction, batch_size=batch_size, copies=4)
    ref, ref_passes = frozen_reference(model, batch, comps, direction=direction, batch_size=batch_size, copies=4)
    for c in comps:
        for freeze in FREEZES:
            for found in (reused, own):
                assert found[str(c)][freeze] == pytest.approx(ref[str(c)][freeze], abs=1e-6), (str(c), freeze)
    chunks = len(list(batch.chunks(batch_size)))
    assert (ref_passes["runs"], ref_passes["forward"]) == (4 * chunks, 4 * chunks)  # per freeze and chunk 2 + 2
    for found in (passes, own_passes):
        assert (found["runs"], found["forward"]) == (chunks, 3 * chunks)  # the receiver; 2 + 1 attribution forwards
        assert found["forward_equivalents"] == pytest.approx(ref_passes["forward_equivalents"] - 3 * chunks)
        assert (found["patched_rows"], found["backward"]) == (ref_passes["patched_rows"], ref_passes["backward"])


def test_uncovered_hook_points_make_their_own_source_run():
    """Shared runs that lack a component's hook point are not read: the source run is made, and counted."""
    model = tiny_model("llama")
    batch, comps = ap.make_batch(random_pairs(n=3)), _comps(model)
    shared: dict = {}
    ap.patch(model, batch, comps[:1], runs=shared)  # one hook point only
    for freeze in FREEZES:
        found, passes = frozen_effects(model, batch, comps, freeze=freeze, runs=shared, sources={})
        ref, _ = frozen_effects(model, batch, comps, freeze=freeze)
        assert passes["runs"] == 2  # the source and the receiver
        torch.testing.assert_close(found, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_screen_reports_the_same_causes_with_the_runs_reused(family, monkeypatch):
    """End to end: every component's causes and frozen evidence, as a screen reports them, equal those of the
    reference's runs; the frozen step's forward-equivalents drop by the runs saved."""
    config = ScreenConfig(sites=("head", "mlp_out", "resid_pre"), top_k=3, random_k=3, direction="both",
                          progress=False)
    batch = ap.make_batch(random_pairs(n=6))
    spent = []

    def counted(measure):
        def call(*args, **kwargs):
            found, passes = measure(*args, **kwargs)
            spent.append(passes)
            return found, passes
        return call
    monkeypatch.setattr(steps, "frozen_measurements", counted(frozen_measurements))
    reused = screen(tiny_model(family), batch, config)
    monkeypatch.setattr(steps, "frozen_measurements", counted(frozen_reference))
    ref = screen(tiny_model(family), batch, config)
    frozen = [c for c in ref.components if "frozen" in c["evidence"]]
    assert frozen, "no large AtP error: the test would show nothing"
    assert len(reused.components) == len(ref.components)
    for a, b in zip(reused.components, ref.components):
        assert (a["name"], a["causes"]) == (b["name"], b["causes"])
        for freeze, pair in b["evidence"].get("frozen", {}).items():
            assert a["evidence"]["frozen"][freeze] == pytest.approx(pair, abs=1e-6)
    n = len(spent) // 2
    saved = sum(p["runs"] for p in spent[n:]) - sum(p["runs"] for p in spent[:n])
    assert saved >= n  # at least the pattern freeze's source, per direction
    fewer = sum(p["forward"] for p in spent[n:]) - sum(p["forward"] for p in spent[:n])  # attribution sources
    assert reused.timing["frozen_forward_equivalents"] == pytest.approx(
        ref.timing["frozen_forward_equivalents"] - saved - fewer)
