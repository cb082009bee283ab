"""RelP, relevance patching (Jafari et al. 2025, arXiv 2508.21258): AtP with the backward pass replaced by
layer-wise relevance propagation (LRP) rules.

    score(c) = (a_c(source) - a_c(receiver)) . R_c        R_c: d metric / d a_c under the rules below

The receiving forward is unchanged in value; only what flows backward changes. Each rule makes one
non-linear part linear in the backward pass, at its operating point on the receiver (docs/methods.md#relp):

    norm     y = w . (x - mu(x)) / sigma(x) + b  (RMSNorm: mu = 0, b = 0)   ->  dy/dx = w / sigma(x), mu kept
             ("LN-rule": the normalising scale held constant)
    act      y = act(x)                          ->  dy/dx = act(x) / x   ("identity rule")
    half     p = act(gate) * up  (gated MLPs)    ->  dp/dgate-path, dp/dup-path each halved ("half rule")
    pattern  z = A v, A = softmax(q k / sqrt(d))  ->  A held constant, gradient only through v ("AH rule")

Rule outputs are formed as y.detach() + J (x - x.detach()) with J the rule's frozen coefficient, so the
forward value is the model's own to the bit. Where x == 0 exactly the coefficient is set to 0. Linear
layers, residual additions, rotary embeddings and the metric keep their plain gradient (LRP's 0-rule is
the gradient times the input). ``DEFAULT_RULES`` are those of the reference code's IOI experiments (norm,
act, half); ``pattern`` routes attention through the eager function of qk_fix.py and is optional: with it,
queries and keys, which act only through the pattern, score 0 (use atp_star's QK fix for them).
With no rule, RelP is AtP. Cost per chunk: as AtP, 2 forwards + 1 backward per metric.
"""

from contextlib import ExitStack, contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from ...engine.hooks import call_input, installed
from ...model.sites import ModelSpec
from . import qk_fix
from .gradients import Chunk

RULES = ("norm", "act", "half", "pattern")
DEFAULT_RULES = ("norm", "act", "half")
_ACTIVATION_MODULES = ("transformers.activations", "torch.nn.modules.activation")


def check_rules(rules: Sequence[str]) -> tuple[str, ...]:
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"Unknown RelP rule(s) {unknown}; known: {', '.join(RULES)} "
                         f"(default: {', '.join(DEFAULT_RULES)}).")
    return tuple(dict.fromkeys(rules))


def frozen(y: Tensor, x: Tensor, coefficient: Tensor) -> Tensor:
    """y in value, coefficient * dx in the backward pass (coefficient detached): [..] -> [..]."""
    return y.detach() + coefficient.detach() * (x - x.detach())


def ratio(y: Tensor, x: Tensor) -> Tensor:
    """y / x elementwise, 0 where x == 0."""
    safe = torch.where(x == 0, torch.ones_like(x), x)
    return torch.where(x == 0, torch.zeros_like(y), y / safe)


def norm_rule(module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """LN-rule: y = w . (x - mu) / sigma + b with sigma (and w) frozen; mu = 0, b = 0 for RMSNorm.
    x, y: [.., d] (the normalised axis last)."""
    if is_layer_norm(module):
        centred = x - x.mean(-1, keepdim=True)
        bias = module.bias if getattr(module, "bias", None) is not None else 0
        return frozen(y, centred, ratio(y - bias, centred))
    return frozen(y, x, ratio(y, x))


def is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm)


def is_norm(module: nn.Module) -> bool:
    return is_layer_norm(module) or type(module).__name__.endswith("RMSNorm")


def is_activation(module: nn.Module) -> bool:
    """A parameter-free elementwise activation (GELU, SiLU, ReLU, ...) of transformers or torch."""
    return (type(module).__module__ in _ACTIVATION_MODULES and not isinstance(module, (nn.Softmax, nn.MultiheadAttention))
            and not list(module.parameters()))


def _output_rule(module: nn.Module, rule):
    """Register (first in line, so sites hooked on the same module see the rule's output) a forward hook
    replacing the module's output y by rule(module, x, y)."""
    def hook(mod, args, kwargs, output):
        x, _ = call_input(args, kwargs)
        return rule(mod, x, output)
    return lambda: module.register_forward_hook(hook, prepend=True, with_kwargs=True)


def _halve_input(module: nn.Module):
    """Half rule on a gated MLP: the product entering the down projection passes half its gradient on to
    each factor (registered first, so the neuron site reads the gradient of the product itself)."""
    def pre_hook(mod, args, kwargs):
        p, rebuild = call_input(args, kwargs)
        return rebuild(p.detach() + 0.5 * (p - p.detach()))
    return lambda: module.register_forward_pre_hook(pre_hook, prepend=True, with_kwargs=True)


def registrations(spec: ModelSpec, rules: Sequence[str]) -> list:
    """The module hooks that make the model's backward pass follow ``rules`` (pattern excepted)."""
    out = []
    for module in spec.model.modules():
        if "norm" in rules and is_norm(module):
            out.append(_output_rule(module, norm_rule))
        elif "act" in rules and is_activation(module):
            out.append(_output_rule(module, lambda mod, x, y: frozen(y, x, ratio(y, x))))
    if "half" in rules and spec.arch.gated:
        out += [_halve_input(spec.module(spec.arch.neuron, layer)) for layer in range(spec.dims.n_layers)]
    return out


@contextmanager
def propagating(spec: ModelSpec, rules: Sequence[str] = DEFAULT_RULES) -> Iterator[None]:
    """Forwards inside the block are unchanged in value; their backward pass follows ``rules``."""
    rules = check_rules(rules)
    with ExitStack() as stack:
        if "pattern" in rules:
            stack.enter_context(qk_fix.recording(spec, lambda *args: None, fixed_pattern=True))
        stack.enter_context(installed(registrations(spec, rules)))
        yield


def score(chunk: Chunk, *, rules: Sequence[str] = DEFAULT_RULES) -> None:
    """Add the RelP score of every component of the chunk's sites into its values."""
    chunk.cache_source()
    chunk.backward(lambda key, prod: chunk.add(*key, prod), context=lambda: propagating(chunk.spec, rules))


def passes(n_layers: int, n_metrics: int, rules: Sequence[str] = DEFAULT_RULES) -> dict[str, int]:
    return {"forward": 2, "backward": n_metrics}
