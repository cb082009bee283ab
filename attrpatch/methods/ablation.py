"""Ablations as a screen's source (``ScreenConfig(ablation=...)``, ``--ablation``): the value that replaces
component c in the clean run, for attribution and exact patching alike (both take it from
``ablated_values``, so the two ablate the same values).

    zero       0
    mean       the clean run's mean over the screen's prompts, per position   (needs aligned prompts)
    resample   another prompt's clean value: prompt i takes prompt i + 1's (the last the first's), a fixed
               derangement of prompts drawn in a seeded random order            (needs aligned prompts)

Direction: noising only. The receiver is the clean run:

    effect(c) = m(clean with c ablated) - m(clean)                       (is c necessary, against this baseline?)
    AtP(c)    = grad_clean m . (a_c(ablated) - a_c(clean))

There is no ablated run to restore c into, so denoising an ablation means nothing and is refused. An ablation's
baseline is no prompt's run, so its effects are not comparable in size with a corrupted-prompt patch; the
screen normalises them by the task's clean - corrupt gap as a unit of scale only (docs/ablations.md).
"""

import torch
from torch import Tensor

from ..engine.forward import forward_last
from ..engine.hooks import eval_mode, hooked, record
from ..inputs.batch import PromptBatch
from ..model.sites import Component, ModelSpec

ABLATIONS = ("zero", "mean", "resample")

WORDS = {"zero": "zero ablation", "mean": "mean ablation", "resample": "resample ablation"}


def check_ablation(ablation: str, direction: str, estimator: str = "atp") -> None:
    """Refuse an unknown ablation, any direction but noising, and estimators other than AtP."""
    if ablation not in ABLATIONS:
        raise ValueError(f"Unknown ablation {ablation!r}; known: {', '.join(ABLATIONS)}")
    if direction != "noise":
        raise ValueError(
            f"an ablation replaces component c in the clean run and measures m(clean with c ablated) - m(clean): "
            f"the noising direction only. There is no ablated run to restore c into, so direction {direction!r} "
            "makes no sense with an ablation: use direction 'noise' (the CLI's default with --ablation)")
    if estimator != "atp":
        raise ValueError(f"ablations are scored by AtP only (estimator 'atp'); {estimator!r} needs a corrupt run "
                         "(to interpolate from, or to take keys and queries from), which an ablation does not have")


def label(ablation: str) -> str:
    """The name of an ablation in every output, where a corruption's name would be: 'mean_ablation'."""
    return f"{ablation}_ablation"


def site_values(spec: ModelSpec, batch: PromptBatch, sites, ablation: str,
                batch_size: int | None = None) -> dict[tuple[str, int], Tensor]:
    """The ablation's value at every layer of every site: {(site, layer): [batch, pos, ...]} (normalised
    views, as gradients.Chunk caches them), computed from the clean run of all of ``batch``'s prompts."""
    if ablation == "resample" and batch.n < 2:
        raise ValueError("resample ablation takes another prompt's value; it needs at least 2 prompts")
    members = [Component(s, layer) for s in sites for layer in range(spec.dims.n_layers_of(s))]
    return ablated_values(spec, batch, members, ablation, "noise", batch_size)


def ablated_values(spec: ModelSpec, batch: PromptBatch, members: list, ablation: str, direction: str,
             batch_size: int | None) -> dict:
    """The ablation's source values at each hook point of ``members``: {(site, layer): [batch, pos, ...]},
    from the clean run of every prompt (all chunks, so mean and resample do not depend on the batch size)."""
    if ablation not in ABLATIONS:
        raise ValueError(f"Unknown ablation {ablation!r}; known: {', '.join(ABLATIONS)}")
    if direction != "noise":
        raise ValueError(f"ablation {ablation!r} replaces a component of the clean run (is it necessary?), the "
                         f"noising direction; got direction={direction!r}: pass direction='noise'")
    if ablation != "zero" and not batch.aligned:
        raise ValueError(f"ablation {ablation!r} averages or swaps positions across prompts, which needs prompts "
                         f"of one token length; lengths here: {sorted(set((batch.last + 1).tolist()))}")
    points = {key: spec.hook_point(*key) for key in sorted({(c.site, c.layer) for c in members})}
    parts = []
    with eval_mode(spec.model), torch.no_grad():
        for chunk in batch.chunks(batch_size):
            found: dict = {}
            with hooked(record(points, found, chunk.n_pos, Tensor.clone)):
                forward_last(spec, chunk.run("clean"), chunk.mask, chunk.last)
            parts.append(found)
    clean = {key: torch.cat([part[key] for part in parts]) for key in points}  # [batch, pos, ...]
    if ablation == "zero":
        return {key: torch.zeros_like(t) for key, t in clean.items()}
    if ablation == "mean":
        return {key: t.mean(0, keepdim=True).expand_as(t) for key, t in clean.items()}
    return {key: t.roll(-1, 0) for key, t in clean.items()}  # prompt i takes prompt i + 1's value
