"""Edge ablations: the senders' source values a_A(source) taken from an ablation of the clean run instead of
the corrupt run (``--ablation zero|mean`` for edges; methods/ablation.py has the node version and the
conventions).

    zero    a_A(source) = 0                      (the embeddings, a head's write z_h W_O[h], an MLP's output)
    mean    a_A(source) = mean over the run's prompts of a_A(clean), per position      (needs aligned prompts)

Direction: noising only, as for nodes: the receiving run is the clean run, and

    exact(A -> B) = m(clean with B computed from input_B + a_A(ablated) - a_A(clean)) - m(clean)
    EAP(A -> B)   = grad_B m(clean) . (a_A(ablated) - a_A(clean))

so every identity of the corrupt-run edges holds with the ablation as the source (all edges out of A jointly
= the node ablation of A; every edge patched = the clean run with every sender ablated). A head's write is
linear in z, so ablating z (zero or mean) ablates the write the same way. Post-norm families (writes.py):
zero ablation only (z = 0 makes every head's write 0 at any norm scale); mean is refused. Resample ablation is not offered
for edges. Cost: mean takes one clean forward of every prompt before the screen.
"""

import torch
from torch import Tensor

from ...inputs.batch import PromptBatch
from ...model.sites import Component, ModelSpec
from ..ablation import ablated_values, check_ablation

EDGE_ABLATIONS = ("zero", "mean")
SENDER_KEYS = ("embed", "z", "mlp")  # EdgeModel.sender_points' keys: (kind,) or (kind, layer)


def check_edge_ablation(ablation: str | None, direction: str, estimator: str = "atp") -> None:
    """None (the corrupt run is the source), or an ablation edges offer, in the noising direction, by EAP."""
    if ablation is None:
        return
    if ablation not in EDGE_ABLATIONS:
        raise ValueError(f"Unknown edge ablation {ablation!r}; edges offer {', '.join(EDGE_ABLATIONS)} "
                         "(resample is for node screens)")
    check_ablation(ablation, direction, estimator)


def _members(spec: ModelSpec) -> dict[tuple, Component]:
    """Sender keys (EdgeModel.sender_points) -> the node components whose hook points they read."""
    out = {("embed",): Component("resid_pre", 0)}
    for layer in range(spec.dims.n_layers):
        out[("z", layer)] = Component("head", layer)
        out[("mlp", layer)] = Component("mlp_out", layer)
    return out


def ablation_means(spec: ModelSpec, batch: PromptBatch, ablation: str | None,
                   batch_size: int | None = None) -> dict | None:
    """For mean ablation, every sender's mean clean value {key: [1, pos, ...]} over all of ``batch``'s
    prompts (computed once, before chunking); None otherwise."""
    if ablation != "mean":
        return None
    if spec.arch.post_norm:
        raise ValueError(f"--ablation mean is not offered for edges of post-norm models ({spec.name}): a head's "
                         "write is its part of the attention output at the run's own norm scale (methods/edges/"
                         "writes.py), and no run has the mean z and the mean scale together; use --ablation zero "
                         "(every write 0) or the corrupt run")
    members = _members(spec)
    values = ablated_values(spec, batch, list(members.values()), "mean", "noise", batch_size)
    return {key: values[(c.site, c.layer)][:1] for key, c in members.items()}


def ablated_source(receiver: dict, ablation: str, means: dict | None) -> dict:
    """The source values of the senders in ``receiver`` ({key: [batch, pos, ...]}, a run's, keyed as
    EdgeModel.sender_points): zeros, or the means broadcast over the batch; other keys pass through."""
    out = dict(receiver)
    for key, t in receiver.items():
        if key[0] not in SENDER_KEYS:
            continue
        if ablation == "zero":
            out[key] = torch.zeros_like(t)
        else:
            mean: Tensor = means[key].to(t.device, t.dtype)
            out[key] = mean[:, :t.shape[1]].expand_as(t)  # [batch, pos, ...]
    return out
