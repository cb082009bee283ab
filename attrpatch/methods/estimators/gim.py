"""GIM, gradient interaction modifications (Edin et al. 2025, arXiv 2505.17630): AtP whose backward pass
follows three rules, each for an interaction that plain gradients get wrong; the forward is the model's own
to the bit.

    score(c) = (a_c(source) - a_c(receiver)) . G_c        G_c: d metric / d a_c under the rules below

    norm         y = w . (x - mu(x)) / sigma(x) + b  (RMSNorm: mu = 0, b = 0)  ->  dy/dx = w / sigma(x), mu kept
                 (the scale sigma is a constant in the backward; the centring is linear and keeps its gradient)
    temperature  A = softmax(s)  ->  dA/ds = diag(A_T) - A_T A_T^T,  A_T = softmax(s / T)   (T = 2)
                 (the Jacobian of the softmax taken at the softer pattern A_T, without the chain rule's 1/T,
                 as in the reference code; s: the logits after scaling, soft-capping and the mask)
    q, k, v      the gradients into the attention's queries, keys and values times 0.25, 0.25 and 0.5
                 (after rotary embeddings and any per-head norm: q = q.detach() + 0.25 (q - q.detach()))

The norm rule is RelP's LN-rule (relp.py's ``norm``). The attention rules route each layer through a
function registered with transformers' AttentionInterface under a name of its own, with the mask function
of the model's implementation: the model's implementation (eager or sdpa) gives the output's value, and an
eager re-computation under the rules, added as (z_rules - z_rules.detach()) (exactly zero), gives its
gradient. Every rule is switchable (``GimRules``); with all off (``GimRules.off()``) GIM is AtP, and the
q/k/v and temperature rules are then not installed at all. ``RELP_GIM``: RelP's rules with GIM's attention
rules; ``RELP_T4``: RelP's rules with the temperature rule alone at T = 4 (the estimator ``relp_t4``). Cost per chunk: as AtP, 2 forwards + 1 backward per metric; the receiving forward computes each
attention twice (its value, and the graph under the rules).
"""

import sys
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from math import isfinite
from types import SimpleNamespace
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ...engine.forward import softcap as _softcap
from ...model.sites import ModelSpec
from . import relp
from .gradients import Chunk

_rules: ContextVar["GimRules | None"] = ContextVar("attrpatch_gim", default=None)


@dataclass(frozen=True, kw_only=True)
class GimRules:
    """Which of GIM's rules the backward pass follows. norm: norm scales held constant; temperature: the
    softmax Jacobian's temperature (1: off); q, k, v: the gradient factors into queries, keys, values (1: off)."""

    norm: bool = True
    temperature: float = 2.0
    q: float = 0.25
    k: float = 0.25
    v: float = 0.5

    def __post_init__(self):
        if not (isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"GIM temperature must be a finite number > 0 (1: the plain softmax gradient), "
                             f"got {self.temperature}")
        for name in ("q", "k", "v"):
            value = getattr(self, name)
            if not isfinite(value):
                raise ValueError(f"GIM gradient factor {name} must be finite (1: off), got {value}")

    @classmethod
    def off(cls) -> "GimRules":
        return cls(norm=False, temperature=1.0, q=1.0, k=1.0, v=1.0)

    @property
    def attention(self) -> bool:
        """Whether any rule acts inside attention (then attention is routed through ``_attention``)."""
        return self.temperature != 1 or (self.q, self.k, self.v) != (1, 1, 1)


class _TemperedSoftmax(torch.autograd.Function):
    """softmax(s) in value; backward: the softmax Jacobian at softmax(s / T) (temperature rule)."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.temperature = temperature
        return torch.softmax(logits, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (logits,) = ctx.saved_tensors
        soft = torch.softmax(logits / ctx.temperature, dim=-1)
        return soft * (grad - (grad * soft).sum(-1, keepdim=True)), None


def tempered_softmax(logits: Tensor, temperature: float) -> Tensor:
    """Softmax over the last axis whose backward follows the temperature rule (plain for T = 1)."""
    return torch.softmax(logits, -1) if temperature == 1 else _TemperedSoftmax.apply(logits, float(temperature))


def scaled(x: Tensor, factor: float) -> Tensor:
    """x in value, factor * (the gradient) in the backward pass."""
    return x if factor == 1 else x.detach() + factor * (x - x.detach())


def _scaling(module: nn.Module, query: Tensor, kwargs: dict) -> float:
    """The logits' scale: the ``scaling`` the model passes, else GPT-2's (transformers 4.x), else 1/sqrt(d)."""
    if kwargs.get("scaling") is not None:
        return kwargs["scaling"]
    scale = query.shape[-1] ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= module.layer_idx + 1
    return scale


def _additive(mask: Tensor | None, causal: bool, n_query: int, n_key: int, device) -> Tensor | None:
    """The mask as eager attention adds it: float masks as given, boolean ones (True: attend) and the
    implicit causal mask of a None (sdpa's ``is_causal``) as 0 / float32's minimum (no -inf: no NaN rows)."""
    if mask is not None and mask.dtype != torch.bool:
        return mask[..., :n_key]
    if mask is None:
        if not causal or n_query == 1:
            return None
        mask = torch.ones(n_query, n_key, dtype=torch.bool, device=device).tril(n_key - n_query)
    return torch.zeros(mask.shape, device=device).masked_fill(~mask[..., :n_key], torch.finfo(torch.float32).min)


def attention_under_rules(rules: GimRules, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          mask: Tensor | None, kwargs: dict) -> Tensor:
    """Eager attention under the q/k/v and temperature rules. query [batch, head, pos, d_head], key/value
    [batch, kv_head, pos, d_head], mask additive or boolean, broadcastable to [batch, head, pos, pos]
    -> z [batch, pos, head, d_head]."""
    query, key, value = scaled(query, rules.q), scaled(key, rules.k), scaled(value, rules.v)
    rep = query.shape[1] // key.shape[1]
    keys = key.repeat_interleave(rep, dim=1) if rep > 1 else key  # [batch, head, pos, d_head]
    values = value.repeat_interleave(rep, dim=1) if rep > 1 else value
    logits = _softcap(query @ keys.transpose(-1, -2) * _scaling(module, query, kwargs), kwargs.get("softcap"))
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # >= float32
    add = _additive(mask, causal, query.shape[-2], keys.shape[-2], query.device)
    logits = logits if add is None else logits + add.to(logits.dtype)
    pattern = tempered_softmax(logits, rules.temperature).to(query.dtype)  # [batch, head, query, key]
    return (pattern @ values).transpose(1, 2)


def _original(implementation: str, module: nn.Module):
    """The attention function the model would call under ``implementation``."""
    if implementation == "eager":
        found = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if found is None:
            raise TypeError(f"GIM's attention rules need {type(module).__module__}.eager_attention_forward "
                            f"for {type(module).__name__}; run the model with attn_implementation='sdpa' or "
                            f"switch the rules off (GimRules(temperature=1, q=1, k=1, v=1))")
        return found
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _wrapping(implementation: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        original = _original(implementation, module)
        rules = _rules.get()
        if rules is None or not torch.is_grad_enabled():
            return original(module, query, key, value, attention_mask, **kwargs)
        with torch.no_grad():
            out, weights = original(module, query, key, value, attention_mask, **kwargs)
        z = attention_under_rules(rules, module, query, key, value, attention_mask, kwargs)
        return out + (z - z.detach()), weights  # the original's value to the bit, the rules' gradient
    return attention


def _register(implementation: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = f"attrpatch_gim_{implementation}"
    AttentionInterface.register(name, _wrapping(implementation))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    return name


@contextmanager
def attention_rules(spec: ModelSpec, rules: GimRules) -> Iterator[None]:
    """Every attention layer under ``rules``' attention rules for the block; the implementation is restored."""
    model = spec.model
    before = model.config._attn_implementation
    model.set_attn_implementation(_register(before))
    token = _rules.set(rules)
    try:
        yield
    finally:
        _rules.reset(token)
        model.set_attn_implementation(before)


@contextmanager
def modifying(spec: ModelSpec, rules: GimRules = GimRules(), relp_rules: Sequence[str] = ()) -> Iterator[None]:
    """Forwards inside the block are unchanged in value; their backward pass follows ``rules`` (and RelP's
    ``relp_rules``: norm, act, half; not pattern, which would stop the temperature rule's gradient)."""
    if not isinstance(rules, GimRules):
        raise TypeError(f"GIM rules must be a GimRules, got {type(rules).__name__}; e.g. GimRules(temperature=2)")
    relp_rules = relp.check_rules(relp_rules)
    if "pattern" in relp_rules:
        raise ValueError("RelP's pattern rule detaches the attention pattern, so GIM's temperature and q/k rules "
                         "would do nothing; combine GIM with norm, act, half")
    with ExitStack() as stack:
        stack.enter_context(relp.propagating(spec, relp_rules + (("norm",) if rules.norm else ())))
        if rules.attention:
            stack.enter_context(attention_rules(spec, rules))
        yield


def score(chunk: Chunk, *, rules: GimRules = GimRules(), relp_rules: Sequence[str] = ()) -> None:
    """Add the GIM score of every component of the chunk's sites into its values."""
    chunk.cache_source()
    chunk.backward(lambda key, prod: chunk.add(*key, prod), context=lambda: modifying(chunk.spec, rules, relp_rules))


def passes(n_layers: int, n_metrics: int, **options) -> dict[str, int]:
    return {"forward": 2, "backward": n_metrics}


def _score_relp_gim(chunk: Chunk, *, rules: GimRules = GimRules(),
                    relp_rules: Sequence[str] = relp.DEFAULT_RULES) -> None:
    score(chunk, rules=rules, relp_rules=relp_rules)


# RelP's rules (norm, act, half) with GIM's: the estimator ``relp_gim``
RELP_GIM = SimpleNamespace(score=_score_relp_gim, passes=passes,
                           __doc__="RelP's rules (norm, act, half) with GIM's temperature and q/k/v rules (gim.py).")

# RelP's rules with the softmax gradient at temperature 4 and no q/k/v factors: the estimator ``relp_t4``, the
# best at AtP's cost on SmolLM2 IOI (docs/estimators.md: "relp + gim temperature 4", Pearson >= 0.95 on 6 of 8
# site-directions; GIM's q/k/v factors shrink every path through attention and T = 2 or 8 did worse)
RELP_T4_RULES = GimRules(temperature=4.0, q=1.0, k=1.0, v=1.0)


def _score_relp_t4(chunk: Chunk) -> None:
    score(chunk, rules=RELP_T4_RULES, relp_rules=relp.DEFAULT_RULES)


RELP_T4 = SimpleNamespace(score=_score_relp_t4, passes=passes,
                          __doc__="RelP's rules (norm, act, half) with the softmax gradient at temperature 4 (gim.py).")
