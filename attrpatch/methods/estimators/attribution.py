"""Attribution: the score of every component of every requested site, by one of the estimators.

For a component c with activation a_c, in a run that *receives* a patch from a *source* run
(``inputs.directions``: denoise patches clean into corrupt, noise corrupt into clean):

    score(c) = (a_c(source) - a_c(receiver)) . d metric / d a_c  evaluated on the receiver      (AtP)

The dot product runs over the component's own dimensions (d_model, d_head, or none for a neuron). Scores
are kept per position; a component at all positions scores the sum over positions. Each estimator is one
module with its formula and cost (``ESTIMATORS``); gradients.py is the machinery they share. A new
estimator is a new module with ``score(chunk, ...)`` and ``passes(n_layers, n_metrics, ...)``, registered
in ``ESTIMATORS``.
"""

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...engine.hooks import eval_mode, frozen_weights
from ...engine.metrics import check_metric, wide
from ...inputs.batch import PromptBatch
from ...inputs.directions import check_direction
from ...model.dictionaries import Dictionary
from ...model.sites import SITES, Component, ModelSpec, as_spec, check_site, site_shape
from ..ablation import check_ablation, site_values
from ..halving import retried, run_chunks
from . import atp, atp_star, gim, graddrop, ig, relp
from .features import FeatureScores, Splices, feature_scores
from .gradients import Chunk

ESTIMATORS = {"atp": atp, "atp_star": atp_star, "ig": ig, "graddrop": graddrop, "relp": relp, "gim": gim,
              "relp_gim": gim.RELP_GIM, "relp_t4": gim.RELP_T4}  # name -> module (relp_gim, relp_t4: gim.py)


def check_estimator(name: str) -> None:
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown estimator {name!r}; known: {', '.join(ESTIMATORS)}.")


@dataclass
class Scores:
    """AtP scores. ``values[metric][site]``: float32 (float64 for float64 models) [layer, pos, (head | d_mlp)], mean over prompts, or
    [batch, layer, pos, (head | d_mlp)] with ``per_prompt``. ``clean_metric``/``corrupt_metric``: the
    metric's mean over prompts on each run. ``prompts`` (with ``prompt_positions``): {metric: {site:
    [batch, layer, pos | 1, (head | d_mlp)]}}, the per-prompt scores beside the mean ``values``."""

    values: dict[str, dict[str, Tensor]]
    direction: str
    clean_metric: dict[str, float]
    corrupt_metric: dict[str, float]
    n_prompts: int
    per_prompt: bool = False
    passes: dict[str, int] = field(default_factory=dict)  # forward/backward passes (recompute's reruns: forwards)
    estimator: str = "atp"
    prompts: dict[str, dict[str, Tensor]] | None = None
    features: FeatureScores | None = None  # the dictionaries' latents and error terms (features.py)

    def score(self, component: Component, metric_name: str) -> float:
        """The (mean) score of one component; all-position components sum their positions."""
        values = self.values[metric_name][component.site]
        if self.per_prompt:
            values = values.mean(0)
        return float(values[component.index()].sum())


def attribute(model: nn.Module | ModelSpec, batch: PromptBatch, *, sites: Sequence[str] = SITES,
              metrics: Sequence[str] = ("logit_diff",), direction: str = "denoise", per_prompt: bool = False,
              batch_size: int | None = None, estimator: str = "atp", ig_steps: int = 8,
              relp_rules: Sequence[str] = relp.DEFAULT_RULES, gim_rules: gim.GimRules = gim.GimRules(),
              recompute: bool = False,
              prompt_positions: Mapping[str, bool] | None = None, progress: bool = False,
              ablation: str | None = None, dictionaries: Sequence[Dictionary] = (),
              feature_prompts: bool = False, sources: dict | None = None) -> Scores:
    """Scores of every component of ``sites`` under each of ``metrics``, in ``direction``.

    batch: prompt pairs, processed in chunks of ``batch_size`` prompts (all at once for None).
    estimator: a key of ``ESTIMATORS``: ``atp`` (atp.py), ``ig`` (integrated gradients over ``ig_steps``
        points, ig.py), ``graddrop`` (graddrop.py), ``atp_star`` (QK fix + GradDrop, atp_star.py) or ``relp``
        (LRP rules ``relp_rules`` in the backward pass, relp.py), ``gim`` (GIM's rules ``gim_rules`` in the
        backward pass, gim.py) or ``relp_gim`` (both: ``relp_rules`` and ``gim_rules``).
    ablation: zero | mean | resample: the source values are that ablation of the clean run (ablation.py;
        direction "noise" and estimator "atp" only); the source run's metric stays as ``corrupt_metric``.
    recompute: the backward block by block, each source and receiving block rerun when the gradient reaches
        it (blockwise.py): one block's deltas and autograd state alive at a time instead of every site's
        activations and the whole run's autograd state, for about two more forward passes.
    prompt_positions: keep per-prompt scores in ``Scores.prompts`` beside the mean ``values`` (instead of
        ``per_prompt``'s [batch, ..] values), per site with positions (True) or summed over them (False;
        sites not named keep them): [batch, layer, pos | 1, (unit)].
    dictionaries: spliced into both runs with their error terms; ``Scores.features`` holds the AtP scores of
        their active latents and error terms from the same backward (features.py; estimators
        features.FEATURE_ESTIMATORS: atp, ig, relp, gim, relp_gim, relp_t4); ``feature_prompts``: keep their
        per-prompt scores too (FeatureScores.per_prompt).
    sources: a dict shared by calls on the same prompts and direction: a chunk's source run is read from there
        if it holds the chunk's points, else made and stored (Chunk.cache_source); passes count the runs made.
    """
    spec = as_spec(model)
    sites, metrics = list(dict.fromkeys(sites)), list(dict.fromkeys(metrics))
    _check(spec, sites, metrics, direction, estimator, ablation, ig_steps, per_prompt and prompt_positions is not None)
    layers, features = feature_scores(spec, dictionaries, estimator=estimator, recompute=recompute,
                                      ablation=ablation, per_prompt=per_prompt, prompts=feature_prompts)
    d, device = spec.dims, spec.device
    batch = batch.to(device)
    lead = (batch.n,) if per_prompt else ()
    acc = wide(next(spec.model.parameters()).dtype)  # >= float32
    values = {m: {s: torch.zeros(*lead, *site_shape(s, d, batch.n_pos), device=device, dtype=acc)
                  for s in sites} for m in metrics}
    prompts = None if prompt_positions is None else {
        m: {s: torch.zeros(batch.n, *site_shape(s, d, batch.n_pos if prompt_positions.get(s, True) else 1),
                           device=device, dtype=acc) for s in sites} for m in metrics}
    options = _options(estimator, ig_steps, relp_rules, gim_rules)
    fixed = None if ablation is None else site_values(spec, batch, sites, ablation, batch_size)
    sums = {run: {m: 0.0 for m in metrics} for run in ("clean", "corrupt")}
    reruns = []

    def run(part: PromptBatch, start: int, into: dict) -> None:
        """Score one chunk of prompts, adding its sums to ``into`` (per_prompt: its rows of ``values``)."""
        rows = slice(start, start + part.n) if per_prompt or prompts is not None else None
        chunk = Chunk(spec, part, sites, metrics, direction, values if per_prompt else into, rows, prompts=prompts,
                      recompute=recompute, sources=sources)
        if fixed is not None:
            chunk.ablated = {key: t[start:start + part.n] for key, t in fixed.items()}
        if features is not None:
            chunk.splices = Splices(chunk, layers, features, 1 / ig_steps if estimator == "ig" else 1.0, start).hooks
        ESTIMATORS[estimator].score(chunk, **options)
        for run_name, per_metric in chunk.metric_sums().items():
            for m in metrics:
                sums[run_name][m] += per_metric[m]
        reruns.append(chunk.reruns - chunk.saved)
    with eval_mode(spec.model), frozen_weights(spec.model), tqdm(total=batch.n, desc="attribution",
                                                                 disable=not progress) as bar:
        step = run if features is None else features.undoable(run)  # a retried chunk's features counted once
        size, n_chunks = run_chunks(batch, batch_size,
                                    lambda part, start, into: (step(part, start, into), bar.update(part.n)),
                                    summed={} if per_prompt else values, rows=values if per_prompt else prompts,
                                    device=device, what=f"attributing ({estimator})")
    _to_means({} if per_prompt else values, features, batch.n)
    cost = ESTIMATORS[estimator].passes(d.n_layers, len(metrics), **options)
    passes = {k: v * n_chunks + (sum(reruns) if k == "forward" else 0) for k, v in cost.items()}
    return Scores(
        values=values, direction=direction, n_prompts=batch.n, per_prompt=per_prompt,
        clean_metric={m: sums["clean"][m] / batch.n for m in metrics},
        corrupt_metric={m: sums["corrupt"][m] / batch.n for m in metrics},
        passes={**passes, **retried(size, batch_size, batch.n)},
        estimator=estimator, prompts=prompts, features=features,
    )


def _to_means(values: dict, features, n: int) -> None:
    """Sums over ``n`` prompts -> means, in place: every tensor of {metric: {site: tensor}} and the features'."""
    for per_site in values.values():
        for t in per_site.values():
            t /= n
    if features is not None:
        features.mean(n)


def _options(estimator: str, ig_steps: int, relp_rules: Sequence[str], gim_rules: gim.GimRules) -> dict:
    """The keyword arguments ``estimator``'s score(chunk) takes."""
    return {"ig": {"steps": ig_steps}, "relp": {"rules": relp.check_rules(relp_rules)}, "gim": {"rules": gim_rules},
            "relp_gim": {"rules": gim_rules, "relp_rules": relp.check_rules(relp_rules)}}.get(estimator, {})


def _check(spec: ModelSpec, sites: list[str], metrics: list[str], direction: str, estimator: str, ablation: str | None,
           ig_steps: int, both_per_prompt: bool) -> None:
    """attribute's options, refused with the fix before any work."""
    for s in sites:
        check_site(s, spec)
    for m in metrics:
        check_metric(m, gradient=True)
    check_direction(direction)
    check_estimator(estimator)
    if ablation is not None:
        check_ablation(ablation, direction, estimator)
    if both_per_prompt:
        raise ValueError("per_prompt=True and prompt_positions both keep per-prompt scores; pass one of them")
    if estimator == "ig" and ig_steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
