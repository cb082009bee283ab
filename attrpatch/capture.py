"""Hooks on hook points, removed in ``finally``; forward passes that read the last-token logits.

A callback sees a hook point's raw tensor (the tensor the model itself uses) and returns either None
(leave it) or a replacement of the same shape. Several callbacks on one module chain in registration
order, so q, k and v of one fused projection can be hooked together.
"""

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .sites import HookPoint, ModelSpec, unembed

Callback = Callable[[Tensor], Tensor | None]


def call_input(args: tuple, kwargs: dict) -> tuple[Tensor, Callable[[Tensor], tuple[tuple, dict]]]:
    """The hidden-states input of a module call, and how to rebuild the call with it replaced."""
    if args and isinstance(args[0], Tensor):
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"], lambda t: (args, {**kwargs, "hidden_states": t})
    raise TypeError(f"cannot find the input tensor among args {[type(a).__name__ for a in args]} "
                    f"and kwargs {sorted(kwargs)}")


def _output_tensor(output) -> tuple[Tensor, Callable[[Tensor], object]]:
    """Normalise a module output (tensor or tuple whose first item is the tensor)."""
    if isinstance(output, Tensor):
        return output, lambda t: t
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0], lambda t: (t, *output[1:])
    raise TypeError(f"cannot find the output tensor in a {type(output).__name__}")


def add_hook(point: HookPoint, callback: Callback) -> torch.utils.hooks.RemovableHandle:
    if point.io == "input":
        def pre_hook(module, args, kwargs):
            raw, rebuild = call_input(args, kwargs)
            new = callback(raw)
            return None if new is None else rebuild(new)
        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module, args, output):
        raw, rebuild = _output_tensor(output)
        new = callback(raw)
        return None if new is None else rebuild(new)
    return point.module.register_forward_hook(hook)


@contextmanager
def hooked(hooks: list[tuple[HookPoint, Callback]]) -> Iterator[None]:
    """Install (point, callback) hooks for the duration of the block; always removed, even on error."""
    handles = []
    try:
        for point, callback in hooks:
            handles.append(add_hook(point, callback))
        yield
    finally:
        for handle in handles:
            handle.remove()


def batch_pos(raw: Tensor, n_pos: int) -> tuple[int, int]:
    """(batch, pos) of a raw activation, [batch, pos, ..] or flattened [batch*pos, ..]."""
    return (raw.shape[0], raw.shape[1]) if raw.ndim >= 3 else (raw.shape[0] // n_pos, n_pos)


def forward_last(spec: ModelSpec, ids: Tensor, mask: Tensor, last: Tensor) -> Tensor:
    """Full forward; logits at each prompt's last real token. ids, mask: [batch, pos] -> [batch, vocab].

    Runs the base model and unembeds only the last positions, so no [batch, pos, vocab] tensor is made.
    """
    hidden = spec.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    hidden = hidden[torch.arange(ids.shape[0], device=ids.device), last]  # [batch, d_model]
    logits = spec.module(spec.arch.unembed)(hidden)
    cap = getattr(spec.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap is not None else logits


@contextmanager
def block_calls(spec: ModelSpec, start: int = 0) -> Iterator[dict[int, tuple[tuple, dict]]]:
    """Record every block call from ``start`` on during the block: yields {layer: (args, kwargs)}."""
    calls: dict[int, tuple[tuple, dict]] = {}
    handles = []

    def make(layer: int):
        def pre_hook(module, args, kwargs):
            calls[layer] = (tuple(a.detach() if isinstance(a, Tensor) else a for a in args), dict(kwargs))
        return pre_hook
    try:
        for layer in range(start, spec.dims.n_layers):
            handles.append(spec.blocks[layer].register_forward_pre_hook(make(layer), with_kwargs=True))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def expand(x, n: int, batch: int):
    """Repeat batch-shaped tensors (ndim >= 2, leading dim == batch) ``n`` times, copy-major; recurse into
    tuples, lists and dicts; leave the rest (masks of batch 1, cache positions, None, flags) alone."""
    if isinstance(x, Tensor):
        if n > 1 and x.ndim >= 2 and x.shape[0] == batch and batch > 1:
            return x.repeat(n, *([1] * (x.ndim - 1)))
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(expand(v, n, batch) for v in x)
    if isinstance(x, dict):
        return {k: expand(v, n, batch) for k, v in x.items()}
    return x


def run_blocks(spec: ModelSpec, start: int, hidden: Tensor, calls: dict, n: int, batch: int,
               last: Tensor) -> Tensor:
    """Resume the forward pass at block ``start`` with ``hidden`` [n*batch, pos, d_model], replaying each
    block's recorded call expanded to ``n`` copies; returns last-token logits [n*batch, vocab]."""
    for layer in range(start, spec.dims.n_layers):
        _, rebuild = call_input(*calls[layer])
        args, kwargs = expand(rebuild(hidden), n, batch)  # hidden has n*batch rows: left as it is
        out = spec.blocks[layer](*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.repeat(n)]  # [n*batch, d_model]
    return unembed(spec, hidden)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the block; the model's own training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
