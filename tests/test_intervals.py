"""Bootstrap intervals over prompt pairs, and the false-negative bound from joint patches of random subsets."""

import pytest
import torch

import attrpatch as ap
from attrpatch.analysis.agreement import agreement
from attrpatch.analysis.intervals import agreement_intervals, effect_intervals
from attrpatch.analysis.subsets import draw_subsets, subset_bound
from attrpatch.model.sites import components
from conftest import N_POS, random_pairs
from test_attribute import _saturated_gpt2


def _per_prompt(n_components=40, n_prompts=8, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    exact = torch.randn(n_components, 1, generator=g) * 2 + torch.randn(n_components, n_prompts, generator=g)
    return exact + noise * torch.randn(n_components, n_prompts, generator=g), exact


def test_agreement_intervals_bracket_the_statistic_on_all_prompts():
    approx, exact = _per_prompt()
    found = agreement_intervals(approx, exact, k=5, tol=0.01, n_boot=200)
    plain = agreement(approx.mean(1), exact.mean(1), k=5, tol=0.01)
    for name, interval in found.items():
        assert interval.value == pytest.approx(getattr(plain, name))
        assert interval.low <= interval.high
    assert found["pearson"].low > 0.8  # approx tracks exact closely
    same = agreement_intervals(exact, exact, k=5, tol=0.01, n_boot=50)["pearson"]
    assert same.low == pytest.approx(1) and same.high == pytest.approx(1)


def test_effect_intervals_contain_the_mean_and_vanish_without_spread():
    _, exact = _per_prompt()
    low, high = effect_intervals(exact, n_boot=300)
    mean = exact.double().mean(1)
    assert bool(((low <= mean) & (mean <= high)).all())
    flat_low, flat_high = effect_intervals(exact[:, :1].repeat(1, 8))
    torch.testing.assert_close(flat_low, flat_high)


def test_interval_inputs_must_be_the_same_components():
    approx, exact = _per_prompt()
    with pytest.raises(ValueError, match=r"approx \(39, 8\) and exact \(40, 8\) must both be \[component, batch\]"):
        agreement_intervals(approx[1:], exact, k=5, tol=0.01)


def _joint_effects(model, batch, comps, included):
    """Exact effect of patching each subset (a row of ``included``) jointly: [subset]."""
    rows = [tuple(c for c, keep in zip(comps, row) if keep) for row in included.tolist()]
    effects = ap.patch(model, batch, [r for r in rows if r]).values[:, 0]
    out, it = torch.zeros(len(rows), dtype=effects.dtype), iter(effects)
    for i, r in enumerate(rows):
        out[i] = next(it) if r else 0.0
    return out


def test_false_negative_bound_does_not_miss_a_planted_component():
    """A saturated layer-0 key has a large effect that AtP scores ~0: it stays unverified, and the subset
    bound must still cover it (and name it)."""
    model = _saturated_gpt2()
    batch = ap.make_batch(random_pairs(n=4, changed=(2,)))
    spec = ap.model_spec(model)
    keys = components("k", spec.dims, N_POS, per_position=False)
    exact = ap.patch(model, batch, keys).values[:, 0]
    atp = ap.attribute(model, batch, sites=["k"])
    scores = torch.tensor([abs(atp.score(c, "logit_diff")) for c in keys])
    verified = set(torch.argsort(scores, descending=True)[:3].tolist())
    planted = int(exact.abs().argmax())
    assert planted not in verified and scores[planted] < 1e-3 and abs(exact[planted]) > 0.1
    unverified = [i for i in range(len(keys)) if i not in verified]
    included = draw_subsets(len(unverified), n_subsets=48, seed=1)
    joint = _joint_effects(model, batch, [keys[i] for i in unverified], included)
    signed = torch.tensor([atp.score(keys[i], "logit_diff") for i in unverified])
    for bound in (subset_bound(included, joint), subset_bound(included, joint, scores=signed)):
        assert bound.bound >= float(exact[unverified].abs().max()) >= abs(float(exact[planted]))
        assert unverified[bound.detected[0]] == planted  # the control variate does not hide what AtP misses
        assert "no unverified component's effect exceeds" in bound.statement() and "48 forwards" in bound.statement()
    assert "control variate (without: " in bound.statement()


def _additive(n: int, n_subsets: int, seed: int, miss: float = 0.0):
    """Synthetic additive effects e = a + r (|r| ~ 5% of |a|), one planted e the scores miss (a = 0)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    e = a * (1 + 0.05 * torch.randn(n, generator=g, dtype=torch.float64))
    e[7], a[7] = miss, 0.0
    included = draw_subsets(n, n_subsets, seed=seed)
    return included, included.double() @ e, a, e


def test_the_control_variate_tightens_the_bound_and_still_covers():
    """Where the scores explain most of each effect the bound shrinks several-fold at the same number of
    subsets; over repeated draws it covers the largest unverified effect at least as often as it claims
    (95%, Bonferroni), the planted one the scores miss included."""
    ratios, covered = [], 0
    for seed in range(40):
        included, joint, a, e = _additive(400, 20, seed, miss=0.3)
        plain, cv = subset_bound(included, joint), subset_bound(included, joint, scores=a)
        ratios.append(cv.bound / plain.bound)
        covered += cv.bound >= float(e.abs().max())
        assert cv.plain == plain.bound
    assert max(ratios) < 0.5 and covered >= 38


def test_control_variate_scores_must_match_the_components():
    included, joint, a, _ = _additive(30, 8, 0)
    with pytest.raises(ValueError, match=r"scores has shape \(29,\); expected one per component \(30\)"):
        subset_bound(included, joint, scores=a[:29])


def test_subset_draws_keep_every_component_on_both_sides():
    included = draw_subsets(30, n_subsets=6, p=0.2, seed=3)
    assert bool((included.sum(0) >= 2).all() and ((~included).sum(0) >= 2).all())
    with pytest.raises(ValueError, match="n_subsets must be >= 4"):
        draw_subsets(5, n_subsets=2)


def test_redundant_components_are_refused_a_bound():
    """Ten components that each carry the same information (any one patched, or all: effect 1, as a token's
    residual stream across layers): subsets hide them from one another, the in-minus-out differences are
    ~0 and X would claim them absent. The joint patch of all exposes it and the statement refuses a bound."""
    n, redundant = 200, 10
    for antithetic in (False, True):
        included = draw_subsets(n, 20, seed=0, antithetic=antithetic)
        effects = included[:, :redundant].any(1).double()  # 1 when any redundant member is in the subset
        bound = subset_bound(included, effects, scores=torch.zeros(n), joint=1.0)
        assert bound.bound < 1.0  # what the subsets alone would claim: wrong
        assert not bound.additive["holds"] and bound.statement().startswith("NO BOUND: effects do not add")
        effect = torch.linspace(-0.1, 0.1, n, dtype=torch.float64)
        fine = subset_bound(included, included.double() @ effect, joint=float(effect.sum()))  # truly additive
        assert fine.additive["holds"] and "checked: all jointly" in fine.statement() and "21 forwards" in fine.statement()
    assert bound.additive["implied"] > 1.9  # every complement pair sums to ~2 where all of them give 1


def test_antithetic_subsets_pair_each_with_its_complement():
    included = draw_subsets(30, 8, seed=2, antithetic=True)
    assert bool((included[4:] == ~included[:4]).all()) and bool((included.sum(0) == 4).all())
    with pytest.raises(ValueError, match="n_subsets must be even and p 0.5, got 7 and 0.5"):
        draw_subsets(30, 7, antithetic=True)
