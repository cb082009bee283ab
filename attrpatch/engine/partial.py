"""Partial forward passes, resumed at a block (not ``--resume``, which continues a killed run:
output/checkpoint.py). The patched passes of exact patching start at the earliest patched block (earlier
blocks compute exactly what the receiving run computed) and, in a causal model, at the earliest patched
position (earlier positions' keys and values come from the receiving run's cache).
"""

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from ..model import hf_compat
from ..model.sites import ModelSpec
from .forward import unembed
from .hooks import call_input, installed


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
               last: Tensor, first_pos: int = 0, cache=None, first_rows: int | None = None,
               final_patched: bool = False, starts: list[int] | None = None) -> Tensor:
    """Resume the forward pass at block ``start`` with ``hidden`` [n*batch, pos - first_pos, d_model],
    replaying each block's recorded call expanded to ``n`` copies; returns last-token logits [n*batch, vocab].

    first_pos > 0: only positions from ``first_pos`` on are computed; the earlier ones, unchanged by any
    patch at or after them in a causal model, are read as keys and values from the receiver's ``cache``.
    first_rows: block ``start`` computes only its first ``first_rows`` positions (patches after its
    attention change no other row of it); the rest of its output is the receiver's, recorded as the next
    block's input. final_patched: something in the final block is patched (a joint patch spanning layers), so
    its MLP must run on every row.
    starts: each copy's own first block, ascending (copy-major order), when copies join the pass as it goes:
    copy c computes blocks starts[c] on only and enters with the receiver's input to that block (every block
    before it would compute exactly that), so one pass serves patches at several layers with no wasted
    block; ``hidden`` then holds the copies starting at ``start`` only. None: every copy starts at ``start``."""
    starts = [start] * n if starts is None else list(starts)
    if len(starts) != n or starts[0] != start or starts != sorted(starts):
        raise ValueError(f"starts {starts} must be {n} ascending blocks beginning at {start}")
    past = hf_compat.prefix_cache(cache, first_pos, [active(starts, layer) for layer in range(spec.dims.n_layers)]) \
        if first_pos else None
    with _last_mlp_on_last_row(spec, last, start, hidden.shape[1] + first_pos, final_patched):
        hidden = _run(spec, start, hidden, calls, starts, batch, first_pos, past, first_rows)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    hidden = hidden[rows, last.repeat(n) - first_pos]  # [n*batch, d_model]
    return unembed(spec, hidden)


def active(starts: list[int], layer: int) -> int:
    """Copies that compute block ``layer`` (those whose first block is at or before it)."""
    return sum(s <= layer for s in starts)


@contextmanager
def _last_mlp_on_last_row(spec: ModelSpec, last: Tensor, start: int, n_pos: int,
                          last_block_patched: bool) -> Iterator[None]:
    """The final block's MLP runs on the last position only, when every prompt ends there and nothing is
    patched in that block: its output [rows, 1, d] broadcasts into the residual add, whose other rows are
    never read. Skipped for families without an MLP module (OPT)."""
    parent = spec.arch.neuron.rpartition(".")[0]
    final = spec.dims.n_layers - 1
    if not parent or start >= final or last_block_patched or not bool((last == n_pos - 1).all()):
        yield
        return

    def pre_hook(module, args, kwargs):
        x, rebuild = call_input(args, kwargs)
        return rebuild(x[:, -1:])
    with installed([lambda: spec.module(parent, final).register_forward_pre_hook(pre_hook, with_kwargs=True)]):
        yield


def _run(spec: ModelSpec, start: int, hidden: Tensor, calls: dict, starts: list[int], batch: int, first_pos: int,
         past, first_rows: int | None) -> Tensor:
    """The blocks from ``start`` on (see run_blocks): [n*batch, pos - first_pos, d_model] out."""
    for layer in range(start, spec.dims.n_layers):
        n = active(starts, layer)
        if hidden.shape[0] < n * batch:  # copies joining here enter with the receiver's input to this block
            joining = call_input(*calls[layer])[0][:, first_pos:]
            hidden = torch.cat([hidden, joining.repeat(n - hidden.shape[0] // batch, 1, 1)])
        rows_only = first_rows is not None and layer == start
        step = hidden[:, :first_rows] if rows_only else hidden
        _, rebuild = call_input(*calls[layer])
        args, kwargs = rebuild(step)
        if first_pos:
            args, kwargs = _from_position(spec.blocks[layer], args, kwargs, first_pos, past, step)
        args, kwargs = expand((args, kwargs), n, batch)  # hidden has n*batch rows: left as it is
        out = spec.blocks[layer](*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        if rows_only:  # splice the computed rows into the receiver's unchanged output
            after = expand(call_input(*calls[layer + 1])[0][:, first_pos:], n, batch).clone()
            if after.shape[0] != hidden.shape[0]:  # a batch of one prompt: expand leaves it
                after = after.repeat(n, 1, 1)
            after[:, :first_rows] = hidden
            hidden = after
    return hidden


def _from_position(block: nn.Module, args: tuple, kwargs: dict, first_pos: int, past, hidden: Tensor):
    """Rewrite a recorded block call for queries from ``first_pos`` on, with ``past`` keys and values."""
    bound = inspect.signature(block.forward).bind(*args, **kwargs)
    named = bound.arguments
    extra = named.pop("kwargs", {})
    named.update(extra)
    n_query = hidden.shape[1]
    mask = named.get("attention_mask")
    end = first_pos + n_query
    if isinstance(mask, Tensor) and mask.ndim == 4:
        named["attention_mask"] = mask[:, :, first_pos:end, :end]
    else:  # causal: query i (absolute first_pos + i) sees keys 0..first_pos + i
        q = torch.arange(first_pos, first_pos + n_query, device=hidden.device)[:, None]
        k = torch.arange(first_pos + n_query, device=hidden.device)[None, :]
        allowed = (k <= q)[None, None]
        named["attention_mask"] = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min)
    for key, value in list(named.items()):  # (cos, sin) [batch, pos, d_head]; Gemma 3 in 4.57: _global, _local
        if key.startswith("position_embeddings") and isinstance(value, tuple):
            named[key] = tuple(t[:, first_pos:end] for t in value)
    if isinstance(named.get("position_ids"), Tensor):
        named["position_ids"] = named["position_ids"][:, first_pos:end]
    named[hf_compat.cache_name(block.forward, type(block).__name__)] = past
    named["cache_position"] = torch.arange(first_pos, first_pos + n_query, device=hidden.device)
    named["hidden_states"] = hidden
    return (), named
