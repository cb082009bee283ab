"""Metrics on the logits at each prompt's last real token: [batch, vocab] -> [batch] (float32).

    logit_diff  logit[answer] - logit[wrong]
    logprob     log p(answer)
    prob        p(answer)
    kl          KL(clean || run) = sum_v p_clean(v) (log p_clean(v) - log p_run(v))

Discrete metrics (no gradient: exact patching reads them, attribution refuses them):

    rank        1 + the number of vocabulary tokens whose logit beats the answer's (1: the answer is top-1)
    accuracy    1 if logit[answer] > logit[wrong], else 0
    top1        1 if the answer is the arg-max token, else 0

A discrete metric is a step function of the logits: a patch moves it only where it crosses a threshold,
so small effects read as 0 and its mean over prompts counts prompts, not evidence (Zhang & Nanda:
report them beside a continuous metric, never instead of one).

All are averaged over prompts. Normalised: (m - m_corrupt) / (m_clean - m_corrupt), 0 at the corrupted
baseline and 1 at the clean one; effects and scores normalise by the same gap.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

METRICS = ("logit_diff", "logprob", "prob", "kl")  # differentiable: AtP can rank by them
DISCRETE_METRICS = ("rank", "accuracy", "top1")  # exact patching only
ALL_METRICS = METRICS + DISCRETE_METRICS
MIN_GAP = 1e-6  # a clean/corrupt gap below this cannot be normalised


@dataclass(frozen=True)
class Target:
    """answer, wrong: [batch]; clean_logprobs: [batch, vocab] (for kl)."""

    answer: Tensor
    wrong: Tensor
    clean_logprobs: Tensor

    @classmethod
    def from_clean(cls, answer: Tensor, wrong: Tensor, clean_logits: Tensor) -> "Target":
        """clean_logits: [batch, vocab] of the clean run at the last real tokens."""
        return cls(answer, wrong, clean_logits.detach().to(wide(clean_logits.dtype)).log_softmax(-1))

    def repeat(self, n: int) -> "Target":
        """The same target for ``n`` copies of the batch (copy-major, as patched runs stack them)."""
        return Target(self.answer.repeat(n), self.wrong.repeat(n), self.clean_logprobs.repeat(n, 1))


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype metrics and scores accumulate in: float32, or float64 for float64 models."""
    return torch.promote_types(dtype, torch.float32)


def graded(metrics) -> list[str]:
    """The metrics of ``metrics`` that have a gradient (attribution scores them), in order."""
    return [m for m in metrics if m not in DISCRETE_METRICS]


def check_metric(name: str, *, gradient: bool = False) -> None:
    """Refuse an unknown metric; with ``gradient``, also a discrete one (attribution needs a gradient)."""
    if name not in ALL_METRICS:
        raise ValueError(f"Unknown metric {name!r}; known: {', '.join(ALL_METRICS)}.")
    if gradient and name in DISCRETE_METRICS:
        raise ValueError(f"metric {name!r} is discrete and has no gradient, so attribution (AtP and the other "
                         f"estimators) cannot score or rank by it; use one of {', '.join(METRICS)} to rank, and "
                         f"read {name!r} from exact patching (ap.patch(metrics=[..., {name!r}]))")


def metric(name: str, logits: Tensor, target: Target) -> Tensor:
    """[batch, vocab] -> [batch], computed in float32 (float64 for float64 logits)."""
    return metric_values((name,), logits, target)[name]


def metric_values(names, logits: Tensor, target: Target) -> dict[str, Tensor]:
    """Each metric of ``names`` on ``logits`` [copies * batch, vocab], the rows copy-major (as patched runs
    stack copies of the target's batch): {name: [copies * batch]}, in float32 (float64 for float64
    logits). The log-softmax is computed once for all the metrics that need it, and the clean distribution
    broadcasts over the copies instead of being repeated. (A log-sum-exp form that never materialises log p
    is 20% faster but loses KL's precision to cancellation: 1e-4 absolute on 49k-token logits, against
    5e-6 here.)"""
    for name in names:
        check_metric(name)
    logits = logits.to(wide(logits.dtype))
    batch = target.answer.shape[0]
    copies = logits.shape[0] // batch
    if copies * batch != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits are not copies of the target's {batch} prompts")
    answer, wrong = (t.to(logits.device).repeat(copies) for t in (target.answer, target.wrong))
    out, logprobs = {}, None
    for name in names:
        if name in ("logit_diff", "accuracy"):
            diff = _pick(logits, answer) - _pick(logits, wrong)
            out[name] = diff if name == "logit_diff" else (diff > 0).to(logits.dtype)
        elif name in ("rank", "top1"):
            above = (logits > _pick(logits, answer)[:, None]).sum(-1)  # tokens beating the answer
            out[name] = (above + 1).to(logits.dtype) if name == "rank" else (above == 0).to(logits.dtype)
        else:
            logprobs = logits.log_softmax(-1) if logprobs is None else logprobs  # [copies * batch, vocab]
            if name == "logprob":
                out[name] = _pick(logprobs, answer)
            elif name == "prob":
                out[name] = _pick(logprobs, answer).exp()
            else:  # device_map: the logits may be on another device than the target
                ref = target.clean_logprobs.to(device=logits.device, dtype=logits.dtype)  # [batch, vocab]
                kl = (ref.exp() * (ref - logprobs.view(copies, batch, -1))).sum(-1)  # [copies, batch]
                out[name] = kl.flatten()
    return out


def _pick(values: Tensor, index: Tensor) -> Tensor:
    return values.gather(-1, index.to(values.device)[:, None]).squeeze(-1)


def normalise(value: float, clean: float, corrupt: float, *, offset: bool) -> float:
    """Map a metric value (offset=True) or a difference of metric values (offset=False) to the 0=corrupt,
    1=clean scale; NaN when the clean/corrupt gap is below MIN_GAP (the scale is undefined)."""
    gap = clean - corrupt
    if abs(gap) < MIN_GAP:
        return float("nan")
    return ((value - corrupt) if offset else value) / gap
