"""AtP of dictionary latents and error terms (sparse feature circuits, Marks et al. 2024), from the same
backward pass as the other sites.

Each dictionary is spliced into both runs (engine/splicing.py: x = decode(f) + error, outputs unchanged).
For latent i of the dictionary at layer L and position p, and for the error term at (L, p):

    score(L, i, p)     = d metric / d f_i[p] . (f_i[p](source) - f_i[p](receiver))
                       = (W_dec[i] * scale) . g[p]  . delta f_i[p]            g: d metric / d x' at receiver
    score(L, error, p) = g[p] . (error[p](source) - error[p](receiver))

summed over prompts and divided by their number, as attribution.py does for every site. With no input
normalisation, the latents of one position and its error add up to the site's own AtP score:
sum_i score(L, i, p) + score(L, error, p) = g[p] . (x[p](source) - x[p](receiver)).

Sparse: only latents active (f != 0) in the source or the receiving run at some prompt and position of
the chunk are kept (k of the d_sae ids), and a latent inactive in both has delta 0, so score 0. Memory per
dictionary and chunk: the source run's active latents [batch, pos, k_source] and its error [batch, pos,
d_model]; the receiving run's deltas [batch, pos, k] and [batch, pos, d_model], and in its backward one
[batch, pos, k] latent gradient at a time; the dense [batch, pos, d_sae] encoding lives only inside its hook. Kept scores: [pos, k] per metric (k <= d_sae: for a 16k-latent
dictionary at 30 layers, at most 30 * pos * 16k * 4 bytes = 39 MB per metric at 20 positions, and k is
in practice the union of a few hundred active latents). Only the ``atp`` estimator scores features.
"""

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ...engine.splicing import active, splice
from ...model.dictionaries import Dictionary, check_fits
from ...model.sites import Component, ModelSpec
from .gradients import Chunk, masked


@dataclass
class FeatureScores:
    """AtP scores of dictionary latents, mean over prompts. ``ids[metric][layer]``: the latents scored [k]
    (active in either run somewhere); ``values[metric][layer]``: [pos, k]; ``error[metric][layer]``: [pos];
    ``hooks[layer]``: the dictionary's hook point (``L3.resid_pre``)."""

    hooks: dict[int, str]
    ids: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    values: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    error: dict[str, dict[int, Tensor]] = field(default_factory=dict)

    def score(self, c: Component, metric_name: str) -> float:
        """The score of a ``feature`` (unit: latent id) or ``sae_error`` component; pos None sums positions."""
        pos = slice(None) if c.pos is None else c.pos
        if c.site == "sae_error":
            return float(self.error[metric_name][c.layer][pos].sum())
        where = (self.ids[metric_name][c.layer] == c.unit).nonzero().view(-1)
        return 0.0 if len(where) == 0 else float(self.values[metric_name][c.layer][pos, where[0]].sum())

    def components(self, metric_name: str, *, per_position: bool = True) -> list[Component]:
        """Every scored latent and error term under ``metric_name``, per position (or all positions)."""
        ids, error = self.ids[metric_name], self.error[metric_name]
        positions = range(next(iter(error.values())).shape[0]) if per_position else [None]
        return [Component(site, layer, pos, unit) for layer in sorted(error) for pos in positions
                for site, units in (("feature", ids[layer].tolist()), ("sae_error", [None])) for unit in units]

    def undoable(self, run: Callable) -> Callable:
        """``run`` (one chunk's scoring, methods/halving.run_chunks) that leaves these scores as they were when it
        runs out of memory, so the retried chunk is not counted twice (scores are replaced, never changed in
        place, so a copy of the tables is enough)."""
        def wrapped(*args):
            saved = {name: {m: dict(per) for m, per in getattr(self, name).items()}
                     for name in ("ids", "values", "error")}
            try:
                return run(*args)
            except torch.OutOfMemoryError:
                for name, table in saved.items():
                    setattr(self, name, table)
                raise
        return wrapped

    def mean(self, n: int) -> None:
        """Sums over prompts -> means over ``n`` prompts, in place."""
        for table in (self.values, self.error):
            for per in table.values():
                for t in per.values():
                    t /= n


def by_layer(spec: ModelSpec, dictionaries: Sequence[Dictionary]) -> dict[int, Dictionary]:
    """{layer: dictionary}, each checked against the model; one dictionary per layer (a feature component
    names its layer)."""
    found: dict[int, Dictionary] = {}
    for d in dictionaries:
        check_fits(d, d_model=spec.dims.d_model, n_layers=spec.dims.n_layers, model=spec.name)
        if d.layer in found:
            raise ValueError(f"two dictionaries at layer {d.layer} ({found[d.layer].hook} and {d.hook}); "
                             "feature components name their layer, so give at most one dictionary per layer")
        found[d.layer] = d
    return found


def feature_scores(spec: ModelSpec, dictionaries: Sequence[Dictionary], *, estimator: str, recompute: bool,
                   ablation: str | None, per_prompt: bool) -> tuple[dict[int, Dictionary], FeatureScores | None]:
    """attribute()'s dictionaries by layer and the empty FeatureScores they fill (None without any)."""
    layers = by_layer(spec, dictionaries)
    if layers and (estimator != "atp" or recompute or ablation is not None or per_prompt):
        raise ValueError(f"dictionaries are scored by estimator 'atp' with the whole backward (got estimator="
                         f"{estimator!r}, recompute={recompute}, ablation={ablation!r}, per_prompt={per_prompt}); "
                         "use --estimator atp without --recompute, --ablation or per-prompt scores")
    return layers, FeatureScores(hooks={layer: d.hook for layer, d in layers.items()}) if layers else None


def _merge(ids: Tensor | None, values: Tensor | None, new_ids: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """Add scores [pos, k'] of latents ``new_ids`` into scores [pos, k] of ``ids`` (ids: sorted union)."""
    if ids is None:
        return new_ids, new
    union = torch.cat([ids, new_ids]).unique()  # sorted
    out = new.new_zeros(new.shape[0], len(union))
    out[:, torch.searchsorted(union, ids)] += values
    out[:, torch.searchsorted(union, new_ids)] += new
    return union, out


class Splices:
    """The dictionaries spliced into one chunk's two runs: the first run through a hook is the source run
    (it records its latents and error), the second the receiving run (its error's gradient g, the gradient
    of the spliced x', scores the error and, through g . W_dec[i] * scale, every kept latent i)."""

    def __init__(self, chunk: Chunk, dictionaries: dict[int, Dictionary], scores: FeatureScores):
        self.chunk, self.dictionaries, self.scores = chunk, dict(dictionaries), scores
        self.source: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer: (ids [k], latents [b, p, k], error)
        dtype = next(chunk.spec.model.parameters()).dtype
        self.hooks = []
        for layer, d in dictionaries.items():
            point = chunk.spec.hook_point(d.site, layer)
            self.dictionaries[layer] = d = d.to(chunk.spec.device, dtype)
            self.hooks.append((point, splice(point, d, chunk.batch.n_pos, self._edit(layer))))

    def _edit(self, layer: int):
        def edit(f: Tensor, error: Tensor, stats: tuple):
            if layer not in self.source:  # the source run
                ids = active(f)
                self.source[layer] = (ids, f[..., ids], error.detach())
                return f[..., ids], ids, error
            return self._receive(layer, f, error, stats)
        return edit

    def _receive(self, layer: int, f: Tensor, error: Tensor, stats: tuple):
        source_ids, source_f, source_error = self.source[layer]
        ids = torch.cat([source_ids, active(f)]).unique()  # [k]
        mine = f[..., ids]  # [batch, pos, k]
        theirs = torch.zeros_like(mine)
        theirs[..., torch.searchsorted(ids, source_ids)] = source_f
        mask = self.chunk.mask
        delta, error_delta = masked(theirs - mine, mask), masked(source_error - error.detach(), mask)
        if torch.is_grad_enabled() and error.requires_grad:
            rows, scale = self.dictionaries[layer].W_dec[ids], stats[0]  # [k, d_model]

            def on_grad(g: Tensor) -> None:  # g: [batch, pos, d_model]
                self._add(layer, None, (g * error_delta).sum((0, -1)))  # [pos]
                latent_grad = (g * scale).to(rows.dtype) @ rows.T  # d metric / d f: [batch, pos, k]
                self._add(layer, ids, (latent_grad * delta).sum(0))  # [pos, k]
            error.register_hook(on_grad)
        return mine, ids, error

    def _add(self, layer: int, ids: Tensor | None, score: Tensor) -> None:
        m, s = self.chunk.metric, self.scores
        score = score.detach().to(torch.float64 if score.dtype == torch.float64 else torch.float32)
        if ids is None:
            per = s.error.setdefault(m, {})
            per[layer] = per[layer] + score if layer in per else score
            return
        per, known = s.values.setdefault(m, {}), s.ids.setdefault(m, {})
        known[layer], per[layer] = _merge(known.get(layer), per.get(layer), ids, score)

