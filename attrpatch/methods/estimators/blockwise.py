"""The backward pass block by block (``attribute(..., recompute=True)``): peak memory below the site
activations a plain AtP caches, for about two more forwards' worth of blocks.

    1. the source run without grad keeps only each block's call (its input hidden state [batch, pos,
       d_model] and its other arguments) and the embeddings (Chunk.cache_source, ``lazy``);
    2. the receiving run without grad: each block's call is kept likewise;
    3. the top: final norm, LM head and metric on the last block's output at the last tokens only, with
       grad: g = d metric / d h_L                                                  [batch, pos, d_model]
    4. for block l = L-1 .. 0: rerun source block l without grad (its hook points' source activations),
       rerun receiving block l with grad from its kept input x_l (its deltas, as in the plain path), hand g
       back through it (g <- d metric / d x_l) while its hook points see their gradients, then free the
       block's graph and deltas before block l-1.

Alive at once: the two runs' block inputs, one block's deltas and one block's autograd state. Every
backward pass the estimator asks for (metrics x labels) travels down together, one gradient each, so each
block is rerun once per call. Estimators that need every source activation up front (ig, atp_star with q
or k) cache the source whole (``lazy=False``) and keep every delta. The part before block 0 (embeddings)
keeps its graph from step 2, so an ``embed`` site gets its gradient when g reaches it. Same products as
the plain backward, up to float rounding (tests/test_recompute.py: every family, every gradient estimator).
"""

from typing import Callable

import torch
from torch import Tensor

from ...engine.forward import forward_last, unembed
from ...engine.hooks import call_input, hooked, installed, output_tensor
from ...engine.metrics import metric

EMBED = ("embed", 0)


def _recorders(spec, calls: dict, top: list) -> list:
    """Hooks keeping each block's call and the last block's output; grad is off inside every block (the
    embeddings before block 0 keep theirs)."""
    final = spec.dims.n_layers - 1

    def make(layer: int):
        def pre_hook(module, args, kwargs):
            calls[layer] = (args, kwargs)
            torch.set_grad_enabled(False)

        def hook(module, args, output):
            torch.set_grad_enabled(True)
            if layer == final:
                top.append(output_tensor(output)[0])
        block = spec.blocks[layer]
        return [lambda: block.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True),
                lambda: block.register_forward_hook(hook)]
    return [r for layer in range(spec.dims.n_layers) for r in make(layer)]


def backward(chunk, points_hooks: list, root: list, *, hooks: list, context, labels: list,
             after_metric: Callable[[str], None] | None) -> None:
    """Chunk.backward with recomputation (see the module docstring); same arguments, ``points_hooks``: the
    embed and site hooks, ``root``: where the embed hook puts its leaf."""
    spec, batch = chunk.spec, chunk.batch
    calls: dict[int, tuple] = {}
    top: list[Tensor] = []
    with hooked(points_hooks + list(hooks)), context():
        with torch.enable_grad(), installed(_recorders(spec, calls, top)):
            logits = forward_last(spec, chunk.receiver_run, batch.mask, batch.last)
            chunk.logits.setdefault("receiver", logits.detach())
        passes = [(m, label) for m in chunk.metrics for label in labels]
        chunk.reruns += 1 + (chunk.source_calls is not None)
        grads = _top_grads(chunk, top.pop(), labels)
        for layer in reversed(range(spec.dims.n_layers)):
            if chunk.source_calls is not None:
                _rerun_source(chunk, layer)
            args, kwargs = calls.pop(layer)
            hidden, rebuild = call_input(args, kwargs)
            x = hidden.detach().requires_grad_(True)  # [batch, pos, d_model]
            with torch.enable_grad():
                args, kwargs = rebuild(x)
                out = output_tensor(spec.blocks[layer](*args, **kwargs))[0]
                grads = _through(chunk, out, x, grads, passes)
            del out, x
            if chunk.source_calls is not None:  # this block's deltas are spent
                for key in [k for k in chunk.deltas if k[1] == layer and k != EMBED]:
                    del chunk.deltas[key]
        if EMBED in chunk.points:  # the embeddings: their graph from the forward, down to the leaf
            _through(chunk, hidden, root[0], grads, passes)
    for m in chunk.metrics:
        chunk.metric = m
        if after_metric is not None:
            after_metric(m)


def _rerun_source(chunk, layer: int) -> None:
    """Source block ``layer`` again, without grad, from its recorded call: its hook points fill chunk.source."""
    args, kwargs = chunk.source_calls.pop(layer)
    chunk.capturing = True
    try:
        with torch.no_grad():
            chunk.spec.blocks[layer](*args, **kwargs)
    finally:
        chunk.capturing = False


def _top_grads(chunk, h_last: Tensor, labels: list) -> list[Tensor]:
    """d metric / d (last block output) per pass, [batch, pos, d_model], nonzero at the last tokens only."""
    batch = chunk.batch
    rows = torch.arange(batch.n, device=h_last.device)
    last = batch.last.to(h_last.device)
    with torch.enable_grad():
        at_last = h_last[rows, last].detach().requires_grad_(True)  # [batch, d_model]
        logits = unembed(chunk.spec, at_last)
        target = chunk.target()
        grads = []
        for i, m in enumerate(chunk.metrics):
            total = metric(m, logits, target).sum()
            (g,) = torch.autograd.grad(total, at_last, retain_graph=i < len(chunk.metrics) - 1)
            full = torch.zeros_like(h_last)
            full[rows, last] = g
            grads += [full] * len(labels)
    return grads


def _through(chunk, out: Tensor, x: Tensor, grads: list[Tensor], passes: list) -> list[Tensor]:
    """Each pass's gradient at ``out`` handed back to ``x``, with chunk.metric and chunk.label set for the
    hooks that fire on the way."""
    new = []
    for i, ((m, label), g) in enumerate(zip(passes, grads)):
        chunk.metric, chunk.label = m, label
        (gx,) = torch.autograd.grad(out, x, g.to(out.device), retain_graph=i < len(passes) - 1)
        new.append(gx)
    chunk.label = None
    return new
