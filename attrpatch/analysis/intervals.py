"""Bootstrap intervals over prompt pairs: for an exact effect, and for any agreement statistic between an
estimator's scores and the exact effects.

Pure functions on numbers. Inputs are per prompt: ``[component, batch]`` tensors (scores from
``attribute(..., per_prompt=True)``, effects from ``patch(..., per_prompt=True)``). One resample draws
``batch`` prompt indices with replacement and averages every component over the drawn prompts; the
interval is the (1 - confidence)/2 and (1 + confidence)/2 percentiles of the statistic over resamples.
The pairs are the unit of resampling because they are the independent draws: components of one pair share
its prompts.
"""

from dataclasses import dataclass
import torch
from torch import Tensor

from .agreement import agreement

N_BOOT = 1000


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on all prompts
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def resamples(n_prompts: int, n_boot: int = N_BOOT, seed: int = 0) -> Tensor:
    """[n_boot, n_prompts] prompt indices drawn with replacement (deterministic given seed)."""
    if n_prompts < 1:
        raise ValueError(f"a bootstrap needs at least 1 prompt pair, got {n_prompts}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_prompts, (n_boot, n_prompts), generator=g)


def _percentiles(values: Tensor, confidence: float) -> tuple[Tensor, Tensor]:
    """values [.., n_boot] -> (low, high) [..], non-finite resamples left out."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    q = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    return tuple(torch.nanquantile(values.double(), q, dim=-1))  # type: ignore[return-value]


def effect_intervals(per_prompt: Tensor, confidence: float = 0.95, n_boot: int = N_BOOT,
                     seed: int = 0) -> tuple[Tensor, Tensor]:
    """Interval of each component's mean effect: per_prompt [component, batch] -> (low, high) [component]."""
    idx = resamples(per_prompt.shape[1], n_boot, seed)
    means = per_prompt.double()[:, idx].mean(-1)  # [component, n_boot]
    return _percentiles(means, confidence)


def agreement_intervals(approx: Tensor, exact: Tensor, k: int, tol: float, confidence: float = 0.95,
                        n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Interval]:
    """Pearson, Spearman, sign agreement and recall@k (``agreement``), each with its bootstrap interval
    (the same resamples for every statistic). approx, exact: [component, batch]."""
    if approx.shape != exact.shape:
        raise ValueError(f"approx {tuple(approx.shape)} and exact {tuple(exact.shape)} must both be "
                         f"[component, batch] per-prompt values of the same components")
    names = ("pearson", "spearman", "sign_agreement", "recall_at_k")
    found = agreement(approx.mean(1), exact.mean(1), k=k, tol=tol)
    value = [getattr(found, n) for n in names]
    keep = (torch.isfinite(approx) & torch.isfinite(exact)).all(1)  # non-finite components: left out
    idx = resamples(approx.shape[1], n_boot, seed)
    boot = _statistics(approx[keep].double()[:, idx].mean(-1).T, exact[keep].double()[:, idx].mean(-1).T,
                       k, tol)  # [stat, n_boot]
    low, high = _percentiles(boot, confidence)
    return {n: Interval(float(value[j]), float(low[j]), float(high[j])) for j, n in enumerate(names)}


def _statistics(a: Tensor, e: Tensor, k: int, tol: float) -> Tensor:
    """``agreement``'s statistics for every resample at once: a, e [n_boot, component] -> [4, n_boot]."""
    def corr(x, y):
        x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))  # NaN where one side is constant

    def rank(v):  # the rank of each value, ties in index order (agreement.spearman)
        return torch.argsort(torch.argsort(v, dim=1, stable=True), dim=1, stable=True).double()

    def top(v):  # [n_boot, component] bool: the k largest |v| (ties in index order, ranking.magnitude_order)
        order = torch.argsort(v.abs(), dim=1, descending=True, stable=True)[:, :k]
        return torch.zeros_like(v, dtype=torch.bool).scatter_(1, order, True)
    k = min(k, a.shape[1])
    big = e.abs() > tol
    signs = ((torch.sign(a) == torch.sign(e)) & big).sum(1).double() / big.sum(1)  # NaN where nothing is big
    recall = (top(a) & top(e)).sum(1).double() / max(k, 1)
    return torch.stack([corr(a, e), corr(rank(a), rank(e)), signs, recall])


def with_intervals(found: dict, approx: Tensor, exact: Tensor, tol: float, confidence: float = 0.95) -> dict:
    """An ``Agreement`` dict ``found`` (k from it) plus ``<statistic>_ci: [low, high]`` for each of its
    statistics, from per-prompt approx and exact [component, batch]."""
    intervals = agreement_intervals(approx, exact, k=max(found["k"], 1), tol=tol, confidence=confidence)
    return {**found, **{f"{name}_ci": [i.low, i.high] for name, i in intervals.items()}}
