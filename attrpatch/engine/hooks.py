"""Hooks, all installed through one context manager (:func:`installed`) that removes them in ``finally``.

:func:`hooked` puts callbacks on hook points: a callback sees a hook point's raw tensor (the tensor the model itself uses) and returns either None
(leave it) or a replacement of the same shape. Several callbacks on one module chain in registration
order, so q, k and v of one fused projection can be hooked together.
"""

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..model.sites import HookPoint, ModelSpec

Callback = Callable[[Tensor], Tensor | None]


def call_input(args: tuple, kwargs: dict) -> tuple[Tensor, Callable[[Tensor], tuple[tuple, dict]]]:
    """The hidden-states input of a module call, and how to rebuild the call with it replaced."""
    if args and isinstance(args[0], Tensor):
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"], lambda t: (args, {**kwargs, "hidden_states": t})
    raise TypeError(f"cannot find the input tensor among args {[type(a).__name__ for a in args]} "
                    f"and kwargs {sorted(kwargs)}")


def output_tensor(output) -> tuple[Tensor, Callable[[Tensor], object]]:
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
        raw, rebuild = output_tensor(output)
        new = callback(raw)
        return None if new is None else rebuild(new)
    return point.module.register_forward_hook(hook)


@contextmanager
def installed(registrations: Iterable[Callable[[], torch.utils.hooks.RemovableHandle]]) -> Iterator[None]:
    """Call each registration (it registers one hook and returns its handle) for the duration of the
    block; every handle is removed afterwards, even on error. Every module hook in attrpatch goes through
    here."""
    handles = []
    try:
        for register in registrations:
            handles.append(register())
        yield
    finally:
        for handle in handles:
            handle.remove()


def hooked(hooks: list[tuple[HookPoint, Callback]]):
    """Install (point, callback) hooks for the duration of the block (see :func:`installed`)."""
    return installed([lambda point=point, callback=callback: add_hook(point, callback)
                      for point, callback in hooks])


def batch_pos(raw: Tensor, n_pos: int) -> tuple[int, int]:
    """(batch, pos) of a raw activation, [batch, pos, ..] or flattened [batch*pos, ..]."""
    return (raw.shape[0], raw.shape[1]) if raw.ndim >= 3 else (raw.shape[0] // n_pos, n_pos)


def record(points: dict, store: dict, n_pos: int,
           copy: Callable[[Tensor], Tensor] = Tensor.detach) -> list[tuple[HookPoint, Callback]]:
    """Hooks keeping each point's normalised view [batch, pos, ...] in ``store`` under its key, passed
    through ``copy``: detached by default; ``Tensor.clone`` where later patches write into the run."""
    def keep(key, point):
        def callback(raw):
            store[key] = copy(point.read(raw, *batch_pos(raw, n_pos)))
        return callback
    return [(p, keep(key, p)) for key, p in points.items()]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the block; the model's own training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def noised(spec: ModelSpec, noise: Tensor | None) -> Iterator[None]:
    """Add ``noise`` [batch, pos, d_model] to the token embeddings for the block (before any other hook)."""
    if noise is None:
        yield
        return
    def hook(module, args, output):
        return output + noise.to(device=output.device, dtype=output.dtype)
    with installed([lambda: spec.module(spec.arch.embed).register_forward_hook(hook, prepend=True)]):
        yield


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Every parameter with requires_grad False for the block (restored afterwards): a backward pass to
    the activations then neither computes nor keeps anything for weight gradients."""
    thawed = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in thawed:
            p.requires_grad_(False)
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)
