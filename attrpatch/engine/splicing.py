"""Splicing a dictionary into the forward pass with its error term, so that outputs are unchanged:

    f     = encode(x)                                   [batch, pos, d_sae]   (no grad; x detached)
    error = x - decode(f)                               [batch, pos, d_model] (grad flows to x through it)
    x'    = decode(f[..., ids]; ids) + error            == x to float tolerance

``ids`` [k] are the latents the run keeps (those active in it, or in either run): decode reads only their
rows of W_dec, and a latent outside ``ids`` is 0 in this run. An ``edit`` decides what the run does with
the latents and the error: record them, score them from the error's gradient (the gradient of x'; a
latent's is (W_dec[i] * scale) . that), or write another run's values into them (exact patching). Because f is computed from a detached x, the gradient
reaching x is the one reaching x' (through ``error``): splicing changes neither the outputs nor the
gradients of the other sites.
"""

from typing import Callable

import torch
from torch import Tensor

from ..model.dictionaries import Dictionary
from ..model.sites import HookPoint
from .hooks import Callback, batch_pos

# edit(f [batch, pos, d_sae], error [batch, pos, d_model], stats: decode's (scale, shift))
#   -> (latents [batch, pos, k], ids [k], error)
Edit = Callable[[Tensor, Tensor, tuple], tuple[Tensor, Tensor, Tensor]]


def active(*fs: Tensor) -> Tensor:
    """Sorted ids of the latents nonzero anywhere in any of ``fs`` ([batch, pos, d_sae] each): [k]."""
    return torch.cat([f.flatten(0, -2).ne(0).any(0).nonzero().view(-1) for f in fs]).unique()


def keep_active(f: Tensor, error: Tensor, stats: tuple = ()) -> tuple[Tensor, Tensor, Tensor]:
    """The plain splice: the run's own active latents and error."""
    ids = active(f)
    return f[..., ids], ids, error


def splice(point: HookPoint, d: Dictionary, n_pos: int, edit: Edit = keep_active) -> Callback:
    """A hook callback (engine/hooks.py) replacing x at ``point`` by decode(latents) + error (module docstring)."""
    def callback(raw: Tensor) -> Tensor:
        x = point.read(raw, *batch_pos(raw, n_pos))  # [batch, pos, d_model]
        with torch.no_grad():
            plain = x.detach()
            _, stats = d.normalise(plain)
            f = d.encode(plain)  # [batch, pos, d_sae]
            recon = d.decode(f, stats)
        latents, ids, error = edit(f, x - recon, stats)
        out = d.decode(latents, stats, ids) + error  # [batch, pos, d_model]
        return out.reshape(raw.shape)
    return callback
