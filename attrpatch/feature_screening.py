"""The feature screen: AtP of every active dictionary latent and error term, exact patching of the top-k and
a random control sample, and their agreement, as screening.py does for the other sites.

Per direction: one attribution per estimator with the dictionaries spliced in (methods/estimators/features.py;
the latents' scores come from the same backward as the sites'; ``feature_estimators``: the screen's
estimators that can score latents, AtP always among them, the first of them ranking), then per dictionary
(its ``feature`` latents and ``sae_error`` terms, per position) the top ``config.top_k`` by |score| under the primary metric plus
``config.random_k`` controls drawn from the rest, patched exactly (methods/patching/features.py), every
metric read from the same patched runs. Agreement (analysis/agreement.py) and the false-negative bound are
per dictionary. A dictionary's error term is a component like its latents: a large error score says the
dictionary misses what the model uses there.
"""

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .analysis.agreement import agreement, false_negatives, tolerance
from .analysis.causes import NOT_MEASURED, measured_causes
from .analysis.flags import disagreement_flags
from .analysis.intervals import effect_intervals, with_intervals
from .analysis.ranking import control_sample, ranks, top_k
from .config import ScreenConfig, with_primary_metric
from .engine.metrics import METRICS
from .inputs.batch import PromptBatch
from .methods.estimators.attribution import attribute
from .methods.estimators.features import FEATURE_ESTIMATORS, by_hook
from .methods.patching.features import patch_features
from .model.dictionaries import Dictionary
from .model.sites import as_spec


@dataclass
class FeatureResult:
    """``rows``: one per verified latent or error term x direction: name (``L3F17@5``), layer, hook, feature
    (latent id, None for the error), pos, chosen (top | control), rank_approx, rank_exact (among the verified),
    approx (the ranking estimator's score), one score per estimator run (``atp``, ``ig``, ..), exact_<metric>
    for every metric, exact_ci (95% bootstrap over prompt pairs), flags and causes (with exact_half, the half
    patch, where measured). ``agreement[direction][hook]``: Agreement dict (of ``estimator``) with
    <statistic>_ci intervals + false_negatives + n_scored + n_flagged + ``pearson_by_estimator``. ``hooks``:
    the dictionaries' hooks (``L3.resid_pre``, ``L3.resid_mid>mlp_out``)."""

    hooks: list[str]
    metric: str
    metrics: list[str]
    estimators: list[str]
    rows: list[dict] = field(default_factory=list)
    agreement: dict = field(default_factory=dict)

    @property
    def estimator(self) -> str:
        return self.estimators[0]

    def to_dict(self) -> dict:
        return {"hooks": self.hooks, "metric": self.metric, "metrics": self.metrics, "estimator": self.estimator,
                "estimators": self.estimators, "rows": self.rows, "agreement": self.agreement}


def feature_estimators(config: ScreenConfig) -> list[str]:
    """The screen's estimators that score latents (methods/estimators/features.py), the first ranking;
    AtP always among them; a screen of GradDrop or AtP* only ranks its features by AtP."""
    return list(dict.fromkeys([e for e in config.estimators if e in FEATURE_ESTIMATORS] + ["atp"]))


def screen_features(model: nn.Module, batch: PromptBatch, dictionaries: Sequence[Dictionary],
                    config: ScreenConfig = ScreenConfig()) -> FeatureResult:
    """Screen the dictionaries' latents and error terms (module docstring); ``config`` gives the metrics,
    directions, top_k, random_k, seed, batch_size and copies."""
    config = with_primary_metric(config)
    spec = as_spec(model)
    found = by_hook(spec, dictionaries)
    graded = [m for m in config.metrics if m in METRICS]
    estimators = feature_estimators(config)
    screened = FeatureResult(hooks=list(found), metric=config.metric, metrics=list(config.metrics),
                             estimators=estimators)
    for direction in config.directions:
        runs = {est: attribute(spec, batch, sites=[], metrics=graded, direction=direction, estimator=est,
                               ig_steps=config.ig_steps, batch_size=config.batch_size,
                               dictionaries=list(found.values()),
                               feature_prompts=est == estimators[0]) for est in estimators}
        tol = tolerance(runs[estimators[0]], config.metric)
        screened.agreement[direction] = {}
        for i, (hook, d) in enumerate(sorted(found.items(), key=lambda item: (item[1].layer, item[0]))):
            rows, screened.agreement[direction][hook] = _screen_dictionary(spec, batch, d, runs, config, direction,
                                                                           tol, config.seed + i)
            screened.rows += rows
    return screened


def _screen_dictionary(spec, batch: PromptBatch, d: Dictionary, runs: dict, config: ScreenConfig, direction: str,
                       tol: float, seed: int) -> tuple[list[dict], dict]:
    """One dictionary's verified rows and agreement (FeatureResult) from the attributions ``runs`` (estimator:
    Scores, the first ranking, with per-prompt feature scores): the top-k and controls patched exactly with
    per-prompt effects (``exact_ci``: 95% over pairs), flags (analysis/flags.py) and, for a sign flip or a
    large error, the half patch and its measured causes (analysis/causes.py)."""
    metric, (first, *_) = config.metric, list(runs)
    features = runs[first].features
    comps = features.components(metric, hook=d.hook)
    by_est = {est: torch.tensor([r.features.score(c, metric) for c in comps], dtype=torch.float64)
              for est, r in runs.items()}
    approx = by_est[first]
    top = top_k(approx, config.top_k)
    chosen = top + control_sample(len(comps), top, config.random_k, seed)
    verified = [comps[j] for j in chosen]
    eff = patch_features(spec, batch, [d], verified, metrics=config.metrics, direction=direction,
                         copies=config.copies or 8, per_prompt=True)
    primary = eff.metrics.index(metric)
    exact, exact_prompts = eff.values[:, primary].double(), eff.per_prompt[:, primary].double()  # [c], [c, batch]
    low, high = effect_intervals(exact_prompts) if verified else ([], [])
    rank, rank_exact = ranks(approx), ranks(exact)
    rows = []
    for n, j in enumerate(chosen):
        c = verified[n]
        rows.append({"name": str(c), "direction": direction, "layer": d.layer, "hook": d.hook, "feature": c.unit,
                     "pos": c.pos, "chosen": "top" if n < len(top) else "control", "rank_approx": int(rank[j]),
                     "rank_exact": int(rank_exact[n]), "approx": float(approx[j]),
                     **{est: float(v[j]) for est, v in by_est.items()},
                     **{f"exact_{m}": float(eff.values[n, k]) for k, m in enumerate(eff.metrics)},
                     "exact_ci": [float(low[n]), float(high[n])],
                     "flags": disagreement_flags(float(approx[j]), float(exact[n]), tol, int(rank[j]),
                                                 int(rank_exact[n]), len(top)), "causes": []})
    _explain(spec, batch, d, rows, verified, config, direction, slope=first == "atp", ig=first != "ig")
    k = min(10, len(top))
    agreed = agreement(approx[top], exact[:len(top)], k, tol).to_dict()
    if len(top) > 1:
        approx_prompts = torch.stack([features.per_prompt(verified[n], metric) for n in range(len(top))]).double()
        agreed = with_intervals(agreed, approx_prompts, exact_prompts[:len(top)], tol)
    agreed["pearson_by_estimator"] = {est: agreement(v[top], exact[:len(top)], 1, tol).pearson
                                      for est, v in by_est.items()}
    fn = false_negatives(exact[len(top):], exact[:len(top)], len(comps) - len(chosen))
    return rows, {**agreed, "false_negatives": fn.to_dict(), "n_scored": len(comps),
                  "n_latents_scored": int(sum(c.site == "feature" for c in comps)),
                  "n_flagged": sum(bool(set(r["flags"]) - {"metrics_disagree"}) for r in rows)}


def _explain(spec, batch: PromptBatch, d: Dictionary, rows: list[dict], verified: list, config: ScreenConfig,
             direction: str, *, slope: bool, ig: bool) -> None:
    """The measured causes (analysis/causes.measured_causes) of every row flagged sign_flip or large_error,
    in place: one half patch (alpha = 0.5) each; with ``ig`` (the ranking estimator is not IG) the IG score,
    when the screen ran IG too. With ``config.measure_causes`` False: none measured, marked NOT_MEASURED."""
    metric = config.metric
    flagged = [n for n, r in enumerate(rows) if {"sign_flip", "large_error"} & set(r["flags"])]
    if not config.measure_causes:
        for n in flagged:  # as measured causes would, this replaces the row's (empty) causes
            rows[n]["causes"] = [NOT_MEASURED]
        return
    if not flagged:
        return
    half = patch_features(spec, batch, [d], [verified[n] for n in flagged], metrics=[metric], direction=direction,
                          copies=config.copies or 8, alpha=0.5)
    for i, n in enumerate(flagged):
        r = rows[n]
        r["exact_half"] = float(half.values[i, 0])
        r["causes"] = measured_causes(r[f"exact_{metric}"], r["exact_half"], r["approx"], r.get("ig") if ig else None,
                                       slope=slope)


def check_dictionaries(model: nn.Module, dictionaries: Sequence[Dictionary], config: ScreenConfig,
                       corruptions: Sequence[str]) -> None:
    """Refuse, before any work, dictionaries that do not fit the model or a run they cannot join."""
    if not dictionaries:
        return
    by_hook(as_spec(model), dictionaries)
    if config.ablation is not None or len(corruptions) > 1:
        raise ValueError("--sae screens features against one corrupted prompt set; it takes neither --ablation "
                         f"nor several corruptions (got ablation={config.ablation!r}, corruptions={list(corruptions)})")


def run_features(model: nn.Module, batch: PromptBatch, dictionaries: Sequence[Dictionary], config: ScreenConfig,
                 out, *, tokens: list | None = None, figures: bool = True, formats: Sequence[str] = ("png",),
                 model_name: str | None = None, task: str | None = None) -> dict:
    """screen_features, written into ``out`` (output/features.py) with figures/features_<direction>.png;
    model_name and task name the figures."""
    from pathlib import Path

    from .output.features import write_features

    found = {**screen_features(model, batch, dictionaries, config).to_dict(), "model": model_name, "task": task}
    write_features(Path(out), found, tokens)
    if figures:
        from .plot.features import plot_features
        from .plot.style import save
        for direction in found["agreement"]:
            save(plot_features(found, direction), Path(out) / "figures" / f"features_{direction}", formats)
    return found
