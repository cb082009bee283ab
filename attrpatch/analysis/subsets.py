"""A false-negative bound from joint patches of random subsets of the unverified components (after AtP*'s
subsampling diagnostic, Kramár et al. 2024).

Draw S subsets of the n unverified components, each component in each subset with probability p, and patch
every subset jointly (S forwards). If effects add up within a subset, E_s = sum_{c in s} e_c + noise, then
for each component c

    d_c  = mean(E_s : c in s) - mean(E_s : c not in s)              an unbiased estimate of e_c
    se_c = sqrt(var(E_s : c in s) / n_in + var(E_s : c not in s) / n_out)

and with confidence ``confidence`` (normal approximation, Bonferroni over the n components) every
|e_c| <= X = max_c (|d_c| + z se_c), z = Phi^-1(1 - (1 - confidence) / (2n)). Components whose interval
excludes 0 are reported as detected. The bound is as good as the additivity: interactions between
components of one subset are noise here, and make se_c, so X, larger rather than wrong in expectation.
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

    def statement(self) -> str:
        return (f"with {self.confidence:.0%} confidence no unverified component's effect exceeds "
                f"{self.bound:.3g} ({self.n_subsets} forwards of joint patches over {self.n_components} "
                f"components; assumes effects add within a subset)")


def draw_subsets(n_components: int, n_subsets: int, p: float = 0.5, seed: int = 0) -> Tensor:
    """[subset, component] bool: each component in each subset with probability p; every component is
    in at least one subset and out of at least one (redrawn columns otherwise)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if n_subsets < 4:
        raise ValueError(f"n_subsets must be >= 4 to estimate a variance on both sides, got {n_subsets}")
    g = torch.Generator().manual_seed(seed)
    included = torch.rand(n_subsets, n_components, generator=g) < p
    for _ in range(100):
        bad = (included.sum(0) < 2) | ((~included).sum(0) < 2)
        if not bad.any():
            break
        included[:, bad] = torch.rand(n_subsets, int(bad.sum()), generator=g) < p
    return included


def subset_bound(included: Tensor, effects: Tensor, confidence: float = 0.95) -> SubsetBound:
    """included [subset, component] bool, effects [subset] (joint exact effect of each subset)."""
    if included.shape[0] != effects.shape[0]:
        raise ValueError(f"included has {included.shape[0]} subsets but effects has {effects.shape[0]}")
    m, e = included.double(), effects.double()[:, None]  # [subset, component], [subset, 1]
    n_in, n_out = m.sum(0), (1 - m).sum(0)
    if bool((n_in < 2).any() or (n_out < 2).any()):
        raise ValueError("every component must be in >= 2 subsets and out of >= 2 (use draw_subsets)")
    mean_in, mean_out = (m * e).sum(0) / n_in, ((1 - m) * e).sum(0) / n_out
    var_in = (m * (e - mean_in) ** 2).sum(0) / (n_in - 1)
    var_out = ((1 - m) * (e - mean_out) ** 2).sum(0) / (n_out - 1)
    estimates, errors = mean_in - mean_out, (var_in / n_in + var_out / n_out).sqrt()
    n = included.shape[1]
    z = NormalDist().inv_cdf(1 - (1 - confidence) / (2 * n))
    upper = estimates.abs() + z * errors
    significant = (estimates.abs() > z * errors).nonzero().flatten().tolist()
    detected = sorted(significant, key=lambda c: -abs(float(estimates[c])))
    return SubsetBound(bound=float(upper.max()) if n else math.nan, confidence=confidence, n_components=n,
                       n_subsets=included.shape[0], estimates=estimates, errors=errors, detected=detected)
