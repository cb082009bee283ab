"""A false-negative bound from joint patches of random subsets of the unverified components (after AtP*'s
subsampling diagnostic, Kramar et al. 2024), with the estimator as a control variate.

Draw S subsets of the n unverified components, each component in each subset with probability p, and patch
every subset jointly (S forwards). If effects add up within a subset, E_s = sum_{c in s} e_c + noise.

Plain (AtP*'s diagnostic), for each component c:

    d_c  = mean(E_s : c in s) - mean(E_s : c not in s)              an unbiased estimate of e_c
    se_c = sqrt(var(E_s : c in s) / n_in + var(E_s : c not in s) / n_out)
    |e_c| <= |d_c| + z se_c

se_c is set by how much E_s varies across subsets, about p (1 - p) sum_c e_c^2 / (S p (1 - p)): the effects
of ALL the other members are noise for c, so with hundreds of components and tens of subsets the bound is
loose. Control variate: the estimator's scores a_c (AtP) are known for every component at no cost, and
e_c = a_c + r_c exactly (r_c: the estimator's error). Subtract the known part from every joint effect,

    R_s = E_s - sum_{c in s} a_c = sum_{c in s} r_c + noise
    d_c^R, se_c^R: the same in-minus-out difference and error on R_s          (d_c^R estimates r_c)
    |e_c| <= |a_c| + |d_c^R| + z se_c^R

Why this is better: R_s varies as p (1 - p) sum_c r_c^2 instead of p (1 - p) sum_c e_c^2, so where the
estimator explains most of each effect (|r_c| << |e_c|) se^R is far smaller, while d_c^R stays unbiased for
r_c for any fixed a (no coefficient is fitted, so no estimation error couples the components: a fitted
slope beta would absorb a global scale error of the estimator but its own error multiplies every
component's d). A component the estimator misses (a_c ~ 0, e_c large) keeps all of e_c in r_c and is bounded
and detected exactly as in the plain diagnostic: the control variate cannot hide it. The price: X can never
fall below the largest |a_c| of the unverified (the estimator's own claim).

With confidence ``confidence`` (normal approximation, Bonferroni over the n components), every |e_c| <= X =
max_c of the bound, z = Phi^-1(1 - (1 - confidence) / (2n)). Components whose interval (a_c + d_c^R
+- z se_c^R) excludes 0 are reported as detected. The bound is as good as the additivity: interactions
between components of one subset are noise here, and make se_c, so X, larger rather than wrong in
expectation, but only while they are interactions of a few: where components are REDUNDANT (the same
information at many layers, e.g. a token's residual stream, where patching any one of them or all of them
gives the same effect) E_s barely varies, d_c is near 0 for every member and the "bound" is wrong however
many subsets are drawn. ``additivity`` checks it with one more forward, every unverified component patched
jointly: additive effects give E_all = sum_c e_c; with antithetic subsets (each drawn with its complement,
which also makes every component's in/out split exactly even) every pair must give E_s + E_(not s) = E_all.
Pure functions: the caller patches (``patch(model, batch, [tuple(subset) ...])``).
"""

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import torch
from torch import Tensor


@dataclass(frozen=True)
class SubsetBound:
    bound: float  # X: with ``confidence``, no unverified component's |effect| exceeds it
    confidence: float
    n_components: int
    n_subsets: int  # forwards spent (one patched run per subset)
    estimates: Tensor = field(repr=False)  # d_c [component]
    errors: Tensor = field(repr=False)  # se_c [component]
    detected: list[int] = field(default_factory=list)  # components whose interval excludes 0, largest first
    plain: float = math.nan  # X of the plain diagnostic (no control variate), for comparison
    additive: dict | None = None  # the additivity check (``additivity``), when the joint patch of all was run

    def statement(self) -> str:
        how = "" if self.plain != self.plain else (f", the estimator's scores as a control variate (without: "
                                                    f"{self.plain:.3g})")
        check = self.additive
        if check is not None and not check["holds"]:
            return (f"NO BOUND: effects do not add within a subset here (all {self.n_components} unverified "
                    f"patched jointly: {check['joint']:+.3g}; the {self.n_subsets} subsets imply "
                    f"{check['implied']:+.3g} +- {check['se']:.2g}): {_kind(check)}, and the subsets' X = "
                    f"{self.bound:.3g} is not a bound")
        return (f"with {self.confidence:.0%} confidence no unverified component's effect exceeds "
                f"{self.bound:.3g} ({self.n_subsets + (check is not None)} forwards of joint patches over "
                f"{self.n_components} components{how}; assumes effects add within a subset"
                + ("" if check is None else f", checked: all jointly {check['joint']:+.3g}, implied "
                                             f"{check['implied']:+.3g}") + ")")

    def to_dict(self, names: list[str]) -> dict:
        """The report's entry; ``names``: the components' names, for the detected ones (first 20)."""
        return {"bound": self.bound, "plain_bound": self.plain, "additive": self.additive,
                "confidence": self.confidence, "n_components": self.n_components, "n_subsets": self.n_subsets,
                "detected": [names[i] for i in self.detected[:20]], "statement": self.statement()}


def _kind(check: dict) -> str:
    """Subsets that imply more than the joint effect: redundancy (any one gives it); less: synergy."""
    more = abs(check["implied"]) > abs(check["joint"])
    return ("redundant components (any one of them gives the effect) hide one another" if more else
            "components act together (the joint effect exceeds what the halves add up to)")


def additivity(included: Tensor, effects: Tensor, joint: float, z: float = 3.0) -> dict:
    """Do the effects add? included [subset, component] bool, effects [subset]; joint: the effect of every
    component patched at once. Antithetic draws (the second half of the subsets the complements of the first,
    ``draw_subsets(antithetic=True)``): additive effects give E_s + E_(not s) = joint for every pair, so
    ``implied`` = their mean and ``se`` its standard error over pairs. Otherwise mean(E_s) / p predicts
    joint (se: std(E_s) / (p sqrt(S)), doubled in variance for the spread of inclusion fractions around p).
    ``holds``: implied within ``z`` se of joint, or within 5% of |joint|."""
    e, half = effects.double(), len(effects) // 2
    if len(e) % 2 == 0 and bool((included[half:] == ~included[:half]).all()):
        pairs = e[:half] + e[half:]  # [pair]
        implied, se = float(pairs.mean()), float(pairs.std()) / math.sqrt(half)
    else:
        p = float(included.double().mean())
        implied = float(e.mean()) / p
        se = float(e.std()) / (p * math.sqrt(len(e))) * math.sqrt(2)
    holds = abs(implied - joint) <= z * se + 0.05 * abs(joint)
    return {"joint": float(joint), "implied": implied, "se": se, "holds": bool(holds)}


def draw_subsets(n_components: int, n_subsets: int, p: float = 0.5, seed: int = 0,
                 antithetic: bool = False) -> Tensor:
    """[subset, component] bool: each component in each subset with probability p; every component is
    in at least one subset and out of at least one (redrawn columns otherwise). antithetic: the second half
    of the subsets are the complements of the first (n_subsets even, p = 0.5): every component is in
    exactly half of them, and each pair checks additivity (``additivity``)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if n_subsets < 4:
        raise ValueError(f"n_subsets must be >= 4 to estimate a variance on both sides, got {n_subsets}")
    if antithetic:
        if n_subsets % 2 or p != 0.5:
            raise ValueError(f"antithetic subsets pair each subset with its complement: n_subsets must be even "
                             f"and p 0.5, got {n_subsets} and {p}")
    g = torch.Generator().manual_seed(seed)
    if antithetic:
        first = torch.rand(n_subsets // 2, n_components, generator=g) < p
        return torch.cat([first, ~first])
    included = torch.rand(n_subsets, n_components, generator=g) < p
    for _ in range(100):
        bad = (included.sum(0) < 2) | ((~included).sum(0) < 2)
        if not bad.any():
            break
        included[:, bad] = torch.rand(n_subsets, int(bad.sum()), generator=g) < p
    return included


def _difference(m: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """In-minus-out mean difference and its standard error per component: m [subset, component] float,
    e [subset, 1] -> ([component], [component])."""
    n_in, n_out = m.sum(0), (1 - m).sum(0)
    mean_in, mean_out = (m * e).sum(0) / n_in, ((1 - m) * e).sum(0) / n_out
    var_in = (m * (e - mean_in) ** 2).sum(0) / (n_in - 1)
    var_out = ((1 - m) * (e - mean_out) ** 2).sum(0) / (n_out - 1)
    return mean_in - mean_out, (var_in / n_in + var_out / n_out).sqrt()


def subset_bound(included: Tensor, effects: Tensor, confidence: float = 0.95,
                 scores: Tensor | None = None, joint: float | None = None) -> SubsetBound:
    """included [subset, component] bool, effects [subset] (joint exact effect of each subset); scores
    [component]: the estimator's score of each component (the control variate; None: the plain bound);
    joint: the effect of all components patched at once (the additivity check; None: not checked)."""
    if included.shape[0] != effects.shape[0]:
        raise ValueError(f"included has {included.shape[0]} subsets but effects has {effects.shape[0]}")
    if scores is not None and scores.shape != included.shape[1:]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}; expected one per component ({included.shape[1]})")
    m, e = included.double(), effects.double()[:, None]  # [subset, component], [subset, 1]
    if bool((m.sum(0) < 2).any() or ((1 - m).sum(0) < 2).any()):
        raise ValueError("every component must be in >= 2 subsets and out of >= 2 (use draw_subsets)")
    n = included.shape[1]
    z = NormalDist().inv_cdf(1 - (1 - confidence) / (2 * n))
    estimates, errors = _difference(m, e)
    upper = estimates.abs() + z * errors
    plain = float(upper.max()) if n else math.nan
    if scores is not None:
        a = scores.double()
        residual, errors = _difference(m, e - m @ a[:, None])  # R_s = E_s - sum_{c in s} a_c
        estimates, upper = a + residual, a.abs() + residual.abs() + z * errors
    significant = (estimates.abs() > z * errors).nonzero().flatten().tolist()
    detected = sorted(significant, key=lambda c: -abs(float(estimates[c])))
    return SubsetBound(bound=float(upper.max()) if n else math.nan, confidence=confidence, n_components=n,
                       n_subsets=included.shape[0], estimates=estimates, errors=errors, detected=detected,
                       plain=plain if scores is not None else math.nan,
                       additive=None if joint is None else additivity(included, effects, joint))
