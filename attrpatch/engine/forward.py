"""Forward passes that read only the last real token's logits, the unembedding (with logit soft-capping,
its one home), and recording each block's call so that a later pass can resume there.

    forward_last(spec, ids, mask, last)   [batch, pos] -> logits [batch, vocab] at each prompt's last token
    unembed(spec, hidden)                 [.., d_model] -> [.., vocab]: final norm(s), LM head, soft-cap
"""

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from ..inputs.batch import RunInput
from ..model import hf_compat
from ..model.sites import ModelSpec
from .hooks import installed, noised


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """tanh soft-capping, cap * tanh(x / cap) (Gemma 2's logits and attention scores); identity for None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def unembed(spec: ModelSpec, hidden: Tensor, *, final_norm: bool = True) -> Tensor:
    """Final norm(s) (unless ``final_norm`` is False), LM head and logit soft-capping: [.., d_model] -> [.., vocab]."""
    if final_norm:
        for mod in spec.final_modules():
            hidden = mod(hidden)
    logits = spec.unembedding()(hidden)
    return softcap(logits, getattr(spec.model.config, "final_logit_softcapping", None))


def forward_last(spec: ModelSpec, ids: "Tensor | RunInput", mask: Tensor, last: Tensor, keep: dict | None = None) -> Tensor:
    """Full forward; logits at each prompt's last real token. ids, mask: [batch, pos] -> [batch, vocab].

    Runs the base model and unembeds only the last positions, so no [batch, pos, vocab] tensor is made.
    ids may be a RunInput (ids plus embedding noise). keep: if given, ``keep["cache"]`` receives the run's
    key/value cache.
    """
    if isinstance(ids, RunInput):
        with noised(spec, ids.noise):
            return forward_last(spec, ids.ids, mask, last, keep)
    base = hf_compat.base_model(spec.model)
    kwargs = {"use_cache": False} if keep is None else hf_compat.recording(base)
    out = base(input_ids=ids, attention_mask=mask, **kwargs)
    if keep is not None:
        keep["cache"] = hf_compat.recorded(out)
    hidden = out.last_hidden_state
    hidden = hidden[torch.arange(ids.shape[0], device=ids.device), last]  # [batch, d_model]
    return unembed(spec, hidden, final_norm=False)  # the base model applied the final norm


@contextmanager
def block_calls(spec: ModelSpec, start: int = 0) -> Iterator[dict[int, tuple[tuple, dict]]]:
    """Record every block call from ``start`` on during the block: yields {layer: (args, kwargs)}."""
    calls: dict[int, tuple[tuple, dict]] = {}

    def make(layer: int):
        def pre_hook(module, args, kwargs):
            calls[layer] = (tuple(_recordable(a) for a in args), {k: _recordable(v) for k, v in kwargs.items()})
        return lambda: spec.blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    with installed([make(layer) for layer in range(start, spec.dims.n_layers)]):
        yield calls


def _recordable(x):
    """Detach tensors; drop key/value caches (a replayed call must not append to the recorded run's)."""
    if isinstance(x, Tensor):
        return x.detach()
    return None if type(x).__name__.endswith("Cache") else x
