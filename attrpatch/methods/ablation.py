"""Ablations as a screen's source (``ScreenConfig(ablation=...)``, ``--ablation``): the value that replaces
component c in the clean run, for attribution and exact patching alike (both take it from
``patching.ablated_values``, so the two ablate the same values).

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

from torch import Tensor

from ..inputs.batch import PromptBatch
from ..model.sites import Component, ModelSpec
from .patching import ABLATIONS, ablated_values

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
