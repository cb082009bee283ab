"""Sliding-window patching (Zhang & Nanda 2023): W adjacent layers of one site patched together.

A window of width W centred on layer l covers layers l - (W - 1) // 2 .. l + W // 2, clipped to the
model's layers (windows at the ends are narrower); width 1 is single-layer patching.

    exact(window) = metric(receiver with every layer of the window set to its source value) - metric(receiver)
                    one joint patch: the window's components patched together in one pass (patching.patch
                    with a tuple), so layer l + 1 sees layer l's patched value overwritten by its own source
    AtP(window)   = sum over the window's layers of AtP(layer): the first-order estimate of a joint patch
                    is the sum of its parts' estimates (one backward for every window of every width)

Cost: one AtP pass (2 forwards + 1 backward per metric) and one patched pass per window (batched as in
patching/exact.py) per width. Discrete metrics (rank, accuracy, top1) have exact values and no AtP (NaN).
"""

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from ...engine.metrics import DISCRETE_METRICS, check_metric
from ...inputs.batch import PromptBatch
from ...model.sites import Component, ModelSpec, as_spec, check_component
from ..estimators.attribution import attribute
from .exact import patch


def window(site: str, centre: int, width: int, n_layers: int, pos: int | None = None,
           unit: int | None = None) -> tuple[Component, ...]:
    """The components of the window of ``width`` layers centred on ``centre``, clipped to 0..n_layers-1."""
    first, last = max(0, centre - (width - 1) // 2), min(n_layers - 1, centre + width // 2)
    return tuple(Component(site, layer, pos, unit) for layer in range(first, last + 1))


def windows(site: str, width: int, n_layers: int, pos: int | None = None,
            unit: int | None = None) -> list[tuple[Component, ...]]:
    """One window per centre layer 0..n_layers-1."""
    return [window(site, centre, width, n_layers, pos, unit) for centre in range(n_layers)]


def check_widths(widths: Sequence[int], n_layers: int) -> tuple[int, ...]:
    """The distinct widths, in order; each must be an int in 1..n_layers."""
    widths = tuple(dict.fromkeys(widths))
    if not widths:
        raise ValueError(f"no window width given; give one or more of 1..{n_layers} (e.g. --window 1,3,5)")
    for w in widths:
        if not isinstance(w, int) or not 1 <= w <= n_layers:
            raise ValueError(f"window width {w!r} out of range: valid 1..{n_layers} (the model's layers); "
                             "1 patches single layers")
    return widths


@dataclass
class WindowSweep:
    """Effects of every window, per width. ``exact[w]``, ``atp[w]``: [centre layer, metric], mean over
    prompts (AtP NaN for discrete metrics); ``windows[w]``: the layers each centre's window covers."""

    site: str
    pos: int | None
    unit: int | None
    direction: str
    metrics: list[str]
    exact: dict[int, Tensor]
    atp: dict[int, Tensor]
    windows: dict[int, list[list[int]]]
    clean_metric: dict[str, float]  # of the differentiable metrics (from the attribution pass)
    corrupt_metric: dict[str, float]
    receiver_metric: dict[str, float]  # every metric, on the unpatched receiving run

    def to_dict(self) -> dict:
        """Plain numbers (JSON): the effects as nested lists [width][centre][metric] keyed by str(width)."""
        return {"site": self.site, "pos": self.pos, "unit": self.unit, "direction": self.direction,
                "metrics": self.metrics, "clean_metric": self.clean_metric, "corrupt_metric": self.corrupt_metric,
                "receiver_metric": self.receiver_metric,
                "exact": {str(w): t.tolist() for w, t in self.exact.items()},
                "atp": {str(w): t.tolist() for w, t in self.atp.items()},
                "windows": {str(w): v for w, v in self.windows.items()}}


def sweep_windows(model: nn.Module | ModelSpec, batch: PromptBatch, *, site: str, widths: Sequence[int] = (1,),
                  pos: int | None = None, unit: int | None = None, metrics: Sequence[str] = ("logit_diff",),
                  direction: str = "denoise", estimator: str = "atp", batch_size: int | None = None,
                  copies: int | None = None) -> WindowSweep:
    """Exact effect and AtP of the window of each width centred on each layer of ``site`` (at ``pos``, or
    every position for None; ``unit``: a head or neuron for head-like and neuron sites)."""
    spec = as_spec(model)
    metrics = list(dict.fromkeys(metrics))
    for m in metrics:
        check_metric(m)
    if site == "embed":
        raise ValueError("site 'embed' has one layer, so it has no sliding window; choose resid_pre, attn_out, "
                         "mlp_out, head, neuron, q, k or v")
    n_layers = spec.dims.n_layers
    widths = check_widths(widths, n_layers)
    check_component(Component(site, 0, pos, unit), spec, batch.n_pos)
    graded = [m for m in metrics if m not in DISCRETE_METRICS]
    scores = attribute(spec, batch, sites=[site], metrics=graded or ["logit_diff"], direction=direction,
                       estimator=estimator, batch_size=batch_size)
    exact, approx, covered = {}, {}, {}
    for w in widths:
        items = windows(site, w, n_layers, pos, unit)
        effects = patch(spec, batch, items, metrics=metrics, direction=direction, batch_size=batch_size,
                        copies=copies)
        exact[w] = effects.values
        approx[w] = torch.tensor([[sum(scores.score(c, m) for c in item) if m in graded else float("nan")
                                   for m in metrics] for item in items], dtype=effects.values.dtype)
        covered[w] = [[c.layer for c in item] for item in items]
    return WindowSweep(site=site, pos=pos, unit=unit, direction=direction, metrics=metrics, exact=exact, atp=approx,
                       windows=covered, clean_metric=scores.clean_metric, corrupt_metric=scores.corrupt_metric,
                       receiver_metric=effects.receiver_metric)
