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

    def stats(a: Tensor, e: Tensor) -> Tensor:
        found = agreement(a, e, k=k, tol=tol)
        return torch.tensor([getattr(found, n) for n in names], dtype=torch.float64)
    value = stats(approx.mean(1), exact.mean(1))
    idx = resamples(approx.shape[1], n_boot, seed)
    boot = torch.stack([stats(approx[:, i].mean(1), exact[:, i].mean(1)) for i in idx], -1)  # [stat, n_boot]
    low, high = _percentiles(boot, confidence)
    return {n: Interval(float(value[j]), float(low[j]), float(high[j])) for j, n in enumerate(names)}
