"""AtP of dictionary latents and error terms (sparse feature circuits, Marks et al. 2024), from the same
backward pass as the other sites.

Each dictionary is spliced into both runs (engine/splicing.py: y = decode(f) + error, outputs unchanged;
a transcoder's y is its written point, an SAE's its read point). For latent i of dictionary D (at layer L)
at position p, and for D's error term at p:

    score(D, i, p)     = d metric / d f_i[p] . (f_i[p](source) - f_i[p](receiver))
                       = (W_dec[i] * scale) . g[p]  . delta f_i[p]            g: d metric / d y' at receiver
    score(D, error, p) = g[p] . (error[p](source) - error[p](receiver))

Estimators (``FEATURE_ESTIMATORS``): ``atp``; ``ig``, g averaged over the k interpolated runs of ig.py (the
deltas from the plain runs, as for the sites: IG of a latent, as Marks et al. use for latents and error
terms, with the sites' path between the runs' embeddings); ``relp``, ``gim``, ``relp_gim``, ``relp_t4``, g
from their modified backward (decode is linear in f, so the splice needs no rule of its own). GradDrop
and AtP* combine several labelled backward passes per metric and are refused.

summed over prompts and divided by their number, as attribution.py does for every site. With no input
normalisation, the latents of one position and its error add up to the site's own AtP score:
sum_i score(L, i, p) + score(L, error, p) = g[p] . (x[p](source) - x[p](receiver)).

Sparse: only latents active (f != 0) in the source or the receiving run at some prompt and position of
the chunk are kept (k of the d_sae ids), and a latent inactive in both has delta 0, so score 0. Memory per
dictionary and chunk: the source run's active latents [batch, pos, k_source] and its error [batch, pos,
d_model]; the receiving run's deltas [batch, pos, k] and [batch, pos, d_model], and in its backward one
[batch, pos, k] latent gradient at a time; the dense [batch, pos, d_sae] encoding lives only inside its hook. Kept scores: [pos, k] per metric (k <= d_sae: for a 16k-latent
dictionary at 30 layers, at most 30 * pos * 16k * 4 bytes = 39 MB per metric at 20 positions, and k is
in practice the union of a few hundred active latents). Dictionaries are named by ``Dictionary.hook`` (``L6.resid_pre``, ``L6.resid_mid>mlp_out``): a layer may
hold several, and their components then carry the dictionary's slot (model/sites.py's Component).
"""

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from ...engine.splicing import active, splice, union
from ...model.dictionaries import Dictionary, check_fits
from ...model.sites import Component, ModelSpec
from .gradients import Chunk, masked

FEATURE_ESTIMATORS = ("atp", "ig", "relp", "gim", "relp_gim", "relp_t4")  # one backward per metric and run


@dataclass
class FeatureScores:
    """Scores of dictionary latents, mean over prompts, by dictionary hook (``L3.resid_pre``).
    ``ids[metric][hook]``: the latents scored [k] (active in either run somewhere); ``values[metric][hook]``:
    [pos, k]; ``error[metric][hook]``: [pos]; ``layers[hook]``: the dictionary's layer; ``slots[hook]``: its
    place in the layer (``resid_pre``, ``resid_mid>mlp_out``); ``estimator``: which one gave the scores.
    ``prompts`` (when kept): per-prompt scores, ``prompts[metric][hook][start]`` = (ids [k], latents [batch,
    pos, k], error [batch, pos]) of the chunk of prompts from row ``start`` (read by ``per_prompt``)."""

    layers: dict[str, int]
    slots: dict[str, str]
    ids: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    values: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    error: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    estimator: str = "atp"
    prompts: dict[str, dict[str, dict[int, tuple[Tensor, Tensor, Tensor]]]] | None = None

    @classmethod
    def of(cls, found: dict[str, Dictionary], estimator: str = "atp", prompts: bool = False) -> "FeatureScores":
        return cls(layers={h: d.layer for h, d in found.items()}, slots={h: d.slot for h, d in found.items()},
                   estimator=estimator, prompts={} if prompts else None)

    def hook(self, c: Component) -> str:
        """The hook of ``c``'s dictionary (KeyError naming the dictionaries when there is none)."""
        return hook_of(c, self.layers, self.slots)

    def component(self, hook: str, pos: int | None, unit: int | None) -> Component:
        """Latent ``unit`` (None: the error term) of dictionary ``hook`` at ``pos``; the slot named only when
        the layer holds several dictionaries."""
        layer = self.layers[hook]
        shared = sum(v == layer for v in self.layers.values()) > 1
        return Component("sae_error" if unit is None else "feature", layer, pos, unit,
                         self.slots[hook] if shared else None)

    def score(self, c: Component, metric_name: str) -> float:
        """The score of a ``feature`` (unit: latent id) or ``sae_error`` component; pos None sums positions."""
        pos, hook = slice(None) if c.pos is None else c.pos, self.hook(c)
        if c.site == "sae_error":
            return float(self.error[metric_name][hook][pos].sum())
        where = (self.ids[metric_name][hook] == c.unit).nonzero().view(-1)
        return 0.0 if len(where) == 0 else float(self.values[metric_name][hook][pos, where[0]].sum())

    def per_prompt(self, c: Component, metric_name: str) -> Tensor:
        """The score of ``c`` on each prompt: [batch] (needs ``prompts``); pos None sums positions."""
        if self.prompts is None:
            raise ValueError("per-prompt feature scores were not kept; attribute(..., feature_prompts=True)")
        pos, hook, out = slice(None) if c.pos is None else c.pos, self.hook(c), []
        for _, (ids, values, error) in sorted(self.prompts[metric_name][hook].items()):
            if c.site == "sae_error":
                out.append(error[:, pos].reshape(len(error), -1).sum(1))
                continue
            where = (ids == c.unit).nonzero().view(-1)
            out.append(values[:, pos, where[0]].reshape(len(values), -1).sum(1) if len(where)
                       else values.new_zeros(len(values)))
        return torch.cat(out)

    def components(self, metric_name: str, *, per_position: bool = True, hook: str | None = None) -> list[Component]:
        """Every scored latent and error term under ``metric_name`` (of dictionary ``hook``, or all), per
        position (or all positions)."""
        ids, error = self.ids[metric_name], self.error[metric_name]
        positions = range(next(iter(error.values())).shape[0]) if per_position else [None]
        hooks = sorted(error, key=lambda h: (self.layers[h], h)) if hook is None else [hook]
        return [self.component(h, pos, unit) for h in hooks for pos in positions
                for unit in (*ids[h].tolist(), None)]

    def undoable(self, run: Callable) -> Callable:
        """``run`` (one chunk's scoring, methods/halving.run_chunks) that leaves these scores as they were when it
        runs out of memory, so the retried chunk is not counted twice (scores are replaced, never changed in
        place, so a copy of the tables is enough)."""
        def wrapped(*args):
            saved = {name: {m: dict(per) for m, per in getattr(self, name).items()}
                     for name in ("ids", "values", "error")}
            if self.prompts is not None:
                saved["prompts"] = {m: {h: dict(chunks) for h, chunks in per.items()}
                                    for m, per in self.prompts.items()}
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


def hook_of(c: Component, layers: dict[str, int], slots: dict[str, str]) -> str:
    """The hook of the dictionary ``c`` names: its layer's only one, or the one of its ``dictionary`` slot."""
    mine = [h for h, layer in layers.items() if layer == c.layer and c.dictionary in (None, slots[h])]
    if len(mine) == 1:
        return mine[0]
    if not mine:
        raise KeyError(f"{c}: no dictionary at layer {c.layer}" + (f" in slot {c.dictionary!r}" if c.dictionary else "")
                       + f"; dictionaries: {', '.join(sorted(layers)) or 'none'}")
    raise KeyError(f"{c}: layer {c.layer} has {len(mine)} dictionaries ({', '.join(sorted(mine))}); name one as "
                   f"Component(..., dictionary={slots[mine[0]]!r})")


def by_hook(spec: ModelSpec, dictionaries: Sequence[Dictionary]) -> dict[str, Dictionary]:
    """{hook: dictionary} (``Dictionary.hook``), each checked against the model; at most one per hook."""
    found: dict[str, Dictionary] = {}
    for d in dictionaries:
        check_fits(d, d_model=spec.dims.d_model, n_layers=spec.dims.n_layers, model=spec.name)
        if d.hook in found:
            raise ValueError(f"two dictionaries at {d.hook} ({found[d.hook].name} and {d.name}); give at most one "
                             "dictionary per hook point (several per layer are fine)")
        found[d.hook] = d
    return found


def feature_scores(spec: ModelSpec, dictionaries: Sequence[Dictionary], *, estimator: str, recompute: bool,
                   ablation: str | None, per_prompt: bool,
                   prompts: bool = False) -> tuple[dict[str, Dictionary], FeatureScores | None]:
    """attribute()'s dictionaries by hook and the empty FeatureScores they fill (None without any); prompts:
    keep per-prompt scores too (``FeatureScores.prompts``)."""
    found = by_hook(spec, dictionaries)
    if found and (estimator not in FEATURE_ESTIMATORS or recompute or ablation is not None or per_prompt):
        raise ValueError(f"dictionaries are scored by estimator {' | '.join(FEATURE_ESTIMATORS)} with the whole "
                         f"backward (got estimator={estimator!r}, recompute={recompute}, ablation={ablation!r}, "
                         f"per_prompt={per_prompt}); use one of those estimators without --recompute, --ablation "
                         "or per-prompt scores")
    return found, FeatureScores.of(found, estimator, prompts) if found else None


def _merge(ids: Tensor | None, values: Tensor | None, new_ids: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """Add scores [.., k'] of latents ``new_ids`` into scores [.., k] of ``ids`` (ids: sorted union)."""
    if ids is None:
        return new_ids, new
    both = union(ids, new_ids)  # sorted
    out = new.new_zeros(*new.shape[:-1], len(both))
    out[..., torch.searchsorted(both, ids)] += values
    out[..., torch.searchsorted(both, new_ids)] += new
    return both, out


Recorded = tuple[Tensor, Tensor, Tensor]  # ids [k], latents [batch, pos, k], error [batch, pos, d_model]


class Splices:
    """The dictionaries spliced into one chunk's runs. Runs without grad record their latents and error:
    the first is the source run, a second (IG's plain receiving run) the receiver. A run with grad is
    scored: deltas = source - receiver (the recorded receiver, else this run itself, as for AtP), and its
    error's gradient g (the gradient of the spliced y') scores the error and, through g . W_dec[i] * scale,
    every kept latent i, each product times ``weight`` (IG: 1 / steps). ``start``: the chunk's first prompt
    row, where its per-prompt scores go when the scores keep them."""

    def __init__(self, chunk: Chunk, dictionaries: dict[str, Dictionary], scores: FeatureScores, weight: float = 1.0,
                 start: int = 0):
        self.chunk, self.dictionaries, self.scores, self.weight = chunk, dict(dictionaries), scores, weight
        self.start = start
        self.recorded: dict[str, list[Recorded]] = {}
        dtype = next(chunk.spec.model.parameters()).dtype
        self.hooks = []
        for hook, d in dictionaries.items():
            self.dictionaries[hook] = d = d.to(chunk.spec.device, dtype)
            self.hooks += splice(chunk.spec, d, chunk.batch.n_pos, self._edit(hook))

    def _edit(self, hook: str):
        def edit(f: Tensor, error: Tensor, stats: tuple):
            ids = active(f)
            if not (torch.is_grad_enabled() and error.requires_grad):  # the source run, then IG's receiver
                self.recorded.setdefault(hook, []).append((ids, f[..., ids], error.detach()))
            else:
                self._receive(hook, (ids, f[..., ids], error.detach()), error, stats)
            return f[..., ids], ids, error
        return edit

    def _receive(self, hook: str, mine: Recorded, error: Tensor, stats: tuple) -> None:
        """Register the scoring of this run's gradient at ``hook`` (class docstring)."""
        (source_ids, source_f, source_error), *rest = self.recorded[hook]
        receiver_ids, receiver_f, receiver_error = rest[0] if rest else mine
        ids = union(source_ids, receiver_ids)  # [k]
        delta = torch.zeros(*source_f.shape[:-1], len(ids), dtype=source_f.dtype, device=source_f.device)
        delta[..., torch.searchsorted(ids, source_ids)] += source_f
        delta[..., torch.searchsorted(ids, receiver_ids)] -= receiver_f  # [batch, pos, k]
        mask = self.chunk.mask
        delta, error_delta = masked(delta, mask), masked(source_error - receiver_error, mask)
        W_dec, scale = self.dictionaries[hook].W_dec, stats[0]

        def on_grad(g: Tensor) -> None:  # g: [batch, pos, d_model]
            error_score = (g * error_delta).sum(-1) * self.weight  # [batch, pos]
            rows = W_dec[ids]  # [k, d_model], only while this gradient is scored
            latent_grad = (g * scale).to(rows.dtype) @ rows.T  # d metric / d f: [batch, pos, k]
            latent_score = latent_grad * delta * self.weight  # [batch, pos, k]
            self._add(hook, None, error_score.sum(0))  # [pos]
            self._add(hook, ids, latent_score.sum(0))  # [pos, k]
            if self.scores.prompts is not None:
                self._keep(hook, ids, latent_score, error_score)
        error.register_hook(on_grad)

    def _keep(self, hook: str, ids: Tensor, latents: Tensor, error: Tensor) -> None:
        """Add this pass's per-prompt scores into the chunk's (FeatureScores.prompts)."""
        chunks = self.scores.prompts.setdefault(self.chunk.metric, {}).setdefault(hook, {})
        wide = torch.float64 if latents.dtype == torch.float64 else torch.float32
        latents, error = latents.detach().to(wide), error.detach().to(wide)
        if self.start in chunks:
            known, values, before = chunks[self.start]
            ids, latents = _merge(known, values, ids, latents)
            error = before + error
        chunks[self.start] = (ids, latents, error)

    def _add(self, hook: str, ids: Tensor | None, score: Tensor) -> None:
        m, s = self.chunk.metric, self.scores
        score = score.detach().to(torch.float64 if score.dtype == torch.float64 else torch.float32)
        if ids is None:
            per = s.error.setdefault(m, {})
            per[hook] = per[hook] + score if hook in per else score
            return
        per, known = s.values.setdefault(m, {}), s.ids.setdefault(m, {})
        known[hook], per[hook] = _merge(known.get(hook), per.get(hook), ids, score)
