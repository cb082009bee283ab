"""Splicing a dictionary into the forward pass with its error term, so that outputs are unchanged:

    f     = encode(x_in)                                [batch, pos, d_sae]   (no grad; x_in detached)
    error = y - decode(f)                               [batch, pos, d_model] (grad flows to y through it)
    y'    = decode(f[..., ids]; ids) + error            == y to float tolerance

For an SAE x_in and y are the same activation (its hook point); a transcoder reads x_in at one hook point
(``resid_mid`` or ``mlp_in``) and replaces y, the activation at its written point (``mlp_out``): y' stands in
for the MLP's output, and the MLP's own computation only reaches the run through the error term.

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

from ..model.dictionaries import Dictionary, hook_points
from ..model.sites import HookPoint, ModelSpec
from .hooks import Callback, batch_pos

# edit(f [batch, pos, d_sae], error [batch, pos, d_model], stats: decode's (scale, shift))
#   -> (latents [batch, pos, k], ids [k], error)
Edit = Callable[[Tensor, Tensor, tuple], tuple[Tensor, Tensor, Tensor]]


def active(*fs: Tensor) -> Tensor:
    """Sorted ids of the latents nonzero anywhere in any of ``fs`` ([batch, pos, d_sae] each): [k]. On meta
    tensors (a memory plan, feature_planning.py) every latent: the most a run keeps."""
    if fs[0].is_meta:
        return torch.arange(fs[0].shape[-1], device=fs[0].device)
    return torch.cat([f.flatten(0, -2).ne(0).any(0).nonzero().view(-1) for f in fs]).unique()


def union(*ids: Tensor) -> Tensor:
    """The sorted union of sorted latent ids [k_1], [k_2], ..; on meta tensors (every latent active, see
    ``active``) the longest of them."""
    if ids[0].is_meta:
        return max(ids, key=len)
    return torch.cat(ids).unique()


def keep_active(f: Tensor, error: Tensor, stats: tuple = ()) -> tuple[Tensor, Tensor, Tensor]:
    """The plain splice: the run's own active latents and error."""
    ids = active(f)
    return f[..., ids], ids, error


def splice(spec: ModelSpec, d: Dictionary, n_pos: int, edit: Edit = keep_active) -> list[tuple[HookPoint, Callback]]:
    """Hooks (engine/hooks.py) replacing y at ``d``'s written point by decode(latents) + error (module
    docstring); a transcoder's first hook reads x_in at its input point and leaves it as it is."""
    read, write = hook_points(spec, d)
    seen: dict[str, Tensor] = {}

    def remember(raw: Tensor) -> None:  # a transcoder's input, before its written point in the same block
        seen["x"] = read.read(raw, *batch_pos(raw, n_pos)).detach()

    def callback(raw: Tensor) -> Tensor:
        y = write.read(raw, *batch_pos(raw, n_pos))  # [batch, pos, d_model]
        with torch.no_grad():
            x = seen.pop("x") if d.out_site else y.detach()
            _, stats = d.normalise(x)
            f = d.encode(x)  # [batch, pos, d_sae]
            recon = d.decode(f, stats)
        latents, ids, error = edit(f, y - recon, stats)
        out = d.decode(latents, stats, ids) + error  # [batch, pos, d_model]
        return out.reshape(raw.shape)
    return ([(read, remember)] if d.out_site else []) + [(write, callback)]


def recording(store: dict, hook: str):
    """Edit keeping the run's dense latents and error of dictionary ``hook`` in ``store[hook]``: (f [batch,
    pos, d_sae], error [batch, pos, d_model]); the run itself unchanged."""
    def edit(f: Tensor, error: Tensor, stats: tuple):
        store[hook] = (f, error)
        ids = active(f)
        return f[..., ids], ids, error
    return edit
