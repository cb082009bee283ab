"""The screen: AtP on every component, exact patching of the top-k and a random control sample, and the
comparison of the two, per site, direction and metric. The CLI's ``screen`` is a thin layer on this.

Verification is per site: the top-k of each site by |AtP score| under the primary metric, plus
``random_k`` components drawn uniformly from the rest of that site (the control sample that estimates
what AtP missed). Every metric is read from the same patched forward passes.
"""

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .attribute import ESTIMATORS, Scores, as_spec, attribute, check_estimator
from .batch import DIRECTIONS, PromptBatch, check_direction
from .capture import eval_mode, forward_last
from .compare import (RESID_LIKE, agreement, candidates, default_per_position, disagreement_flags,
                      false_negatives, ranks, select)
from . import distributed
from .checkpoint import Progress
from .diagnose import LARGE_CHANGE, SATURATED_MAX_PROB, activation_change, attention_stats
from .metrics import METRICS, MIN_GAP, Target, check_metric, metric, normalise
from .patch import patch
from .sites import SITES, Component, check_site

POSITIONS = ("default", "each", "all")
DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")
METRIC_TOL = 0.1  # normalised effect below which a component "does nothing" under a metric
DIRECTION_TOL = 0.3  # normalised denoise/noise difference called a disagreement


@dataclass(frozen=True, kw_only=True)
class ScreenConfig:
    sites: tuple[str, ...] = DEFAULT_SITES
    metric: str = "logit_diff"
    metrics: tuple[str, ...] = METRICS
    direction: str = "denoise"  # denoise | noise | both
    top_k: int | None = 30  # None: verify every component (the exhaustive sweep)
    random_k: int = 20
    positions: str = "default"  # default | each | all
    seed: int = 0
    batch_size: int | None = None
    copies: int | None = None
    estimator: str = "atp"  # atp | atp_star | ig | graddrop | all
    ig_steps: int = 8
    progress: bool = True

    def __post_init__(self):
        for s in self.sites:
            check_site(s)
        if not self.sites:
            raise ValueError(f"no sites given; choose from {', '.join(SITES)}")
        for m in (self.metric, *self.metrics):
            check_metric(m)
        if self.metric not in self.metrics:
            object.__setattr__(self, "metrics", (self.metric, *self.metrics))
        if self.direction != "both":
            check_direction(self.direction)
        if self.positions not in POSITIONS:
            raise ValueError(f"Unknown positions {self.positions!r}; known: {', '.join(POSITIONS)}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (all), got {self.top_k}")
        if self.random_k < 0:
            raise ValueError(f"random_k must be >= 0, got {self.random_k}")
        if self.estimator != "all":
            check_estimator(self.estimator)

    @property
    def estimators(self) -> tuple[str, ...]:
        """Estimators to run; the first ranks, flags and fills ``approx``."""
        return ESTIMATORS if self.estimator == "all" else (self.estimator,)

    @property
    def directions(self) -> tuple[str, ...]:
        return DIRECTIONS if self.direction == "both" else (self.direction,)

    def per_position(self, site: str) -> bool:
        return default_per_position(site) if self.positions == "default" else self.positions == "each"


@dataclass
class ScreenResult:
    """Everything a report or a figure needs. ``rows`` is the long table: one row per verified component
    x direction x metric. ``components``: one entry per verified component x direction."""

    config: ScreenConfig
    model: str
    n_prompts: int
    n_pos: int
    clean_metric: dict[str, float]
    corrupt_metric: dict[str, float]
    scores: dict[str, Scores]
    components: list[dict]
    rows: list[dict]
    agreement: dict  # direction -> site -> metric -> Agreement dict
    false_negatives: dict  # direction -> site -> FalseNegatives dict
    attention: dict  # direction -> {"max_prob": [[..]], "entropy": [[..]]} per layer x head (receiver run)
    estimators: dict  # direction -> estimator -> {"cost": .., "sites": site -> agreement + false negatives}
    numerical: dict  # non-finite scores and effects, named per component
    timing: dict = field(default_factory=dict)


def screen(model: nn.Module, batch: PromptBatch, config: ScreenConfig = ScreenConfig(),
           progress: Progress | None = None) -> ScreenResult:
    """Run the screen. ``progress`` (checkpoint.Progress) saves each completed step and, on resume, skips
    the steps already saved."""
    spec = as_spec(model)
    progress = progress or Progress(None)
    batch = distributed.shard(batch.to(spec.device))  # this rank's prompts; everything below is reduced
    n_local, n_total = batch.n, distributed.total(batch.n)

    def reduce(value):
        return distributed.mean(value, n_local, n_total)
    if not batch.aligned and any(config.per_position(s) for s in config.sites):
        each = [s for s in config.sites if config.per_position(s)]
        raise ValueError(f"sites {each} are scored per position, which needs prompts of one token length; "
                         f"lengths here: {sorted(set((batch.last + 1).tolist()))}. Use positions='all' "
                         "(--positions all) or prompts of equal length.")
    timing = {"attribution_s": 0.0, "verification_s": 0.0, "diagnostics_s": 0.0, "forward_passes": 2.0}
    with eval_mode(spec.model), torch.no_grad():
        clean_logits = forward_last(spec, batch.run("clean"), batch.mask, batch.last)
        start = time.perf_counter()
        corrupt_logits = forward_last(spec, batch.run("corrupt"), batch.mask, batch.last)
        timing["forward_s"] = time.perf_counter() - start
    check_baselines(clean_logits, corrupt_logits, batch, config, reduce)

    scores, comps, agree, fns, attention, by_estimator = {}, [], {}, {}, {}, {}
    by_estimator_scores: dict[str, dict[str, Scores]] = {}
    for direction in config.directions:
        est_scores, est_seconds = {}, {}
        for est in config.estimators:
            start = time.perf_counter()
            step = f"attribution-{direction}-{est}"
            est_scores[est] = progress.scores(step, spec.device)
            if est_scores[est] is None:
                est_scores[est] = _reduce_scores(
                    attribute(spec, batch, sites=config.sites, metrics=config.metrics, direction=direction,
                              batch_size=config.batch_size, estimator=est, ig_steps=config.ig_steps,
                              progress=config.progress), reduce, n_total)
                progress.save_scores(step, est_scores[est])
            est_seconds[est] = time.perf_counter() - start
            timing["attribution_s"] += est_seconds[est]
            timing["forward_passes"] += est_scores[est].passes["forward"]
        scores[direction] = est_scores[config.estimators[0]]
        by_estimator_scores[direction] = est_scores

        plan = _plan(spec, batch, est_scores, config)
        verified = [c for site_plan in plan.values() for c in site_plan["verified"]]
        exact = {}
        for site, site_plan in plan.items():  # one saved step per site
            start = time.perf_counter()
            step = f"exact-{direction}-{site}"
            effects = progress.effects(step, site_plan["verified"])
            if effects is None:
                effects = patch(spec, batch, site_plan["verified"], metrics=config.metrics, direction=direction,
                                copies=config.copies, batch_size=config.batch_size, progress=config.progress)
                effects.values = reduce(effects.values)
                effects.receiver_metric = reduce(effects.receiver_metric)
                progress.save_effects(step, effects)
            exact.update({c: effects.values[i] for i, c in enumerate(site_plan["verified"])})  # [metric]
            timing["verification_s"] += time.perf_counter() - start
            timing["forward_passes"] += effects.passes["patched_rows"] + 2
            timing["forward_equivalents_verification"] = (
                timing.get("forward_equivalents_verification", 0.0) + effects.passes["forward_equivalents"])

        start = time.perf_counter()
        receiver_ids = batch.runs(direction)[1]
        with eval_mode(spec.model):
            max_prob, entropy = map(reduce, attention_stats(spec, receiver_ids, batch.mask))
            change = dict(zip(verified, reduce(activation_change(spec, batch, direction, verified))))
        attention[direction] = {"max_prob": max_prob.tolist(), "entropy": entropy.tolist()}
        timing["diagnostics_s"] += time.perf_counter() - start

        agree[direction], fns[direction] = {}, {}
        base = scores[direction]
        for site, site_plan in plan.items():
            entries, site_agree, fn = _site_results(site, site_plan, exact, config, base, direction,
                                                    max_prob, change, spec.dims.n_kv_heads)
            comps += entries
            agree[direction][site] = site_agree
            fns[direction][site] = fn
        by_estimator[direction] = _estimator_results(plan, exact, config, est_scores, est_seconds,
                                                     timing["forward_s"])
    _mark_cross_flags(comps, config)
    numerical = _non_finite(scores, by_estimator_scores, comps, config, batch.n_pos, spec)
    rows = _long_table(comps, config)
    any_scores = next(iter(scores.values()))
    return ScreenResult(config=config, model=spec.name, n_prompts=n_total, n_pos=batch.n_pos,
                        clean_metric=any_scores.clean_metric, corrupt_metric=any_scores.corrupt_metric,
                        scores=scores, components=comps, rows=rows, agreement=agree, false_negatives=fns,
                        attention=attention, estimators=by_estimator, numerical=numerical, timing=timing)


def _reduce_scores(scores: Scores, reduce, n_total: int) -> Scores:
    """The all-rank mean of a rank's scores (identity in a single process)."""
    scores.values = {m: {s: reduce(t) for s, t in per.items()} for m, per in scores.values.items()}
    scores.clean_metric, scores.corrupt_metric = reduce(scores.clean_metric), reduce(scores.corrupt_metric)
    scores.n_prompts = n_total
    return scores


def _plan(spec, batch: PromptBatch, est_scores: dict[str, Scores], config: ScreenConfig) -> dict:
    """Per site: every component, each estimator's scores per metric, and what to verify: the union of
    the estimators' top-k by |score| under the primary metric (the first estimator's order first), and a
    random control sample of the rest."""
    plan = {}
    first = config.estimators[0]
    for i, site in enumerate(config.sites):
        per_pos = config.per_position(site)
        comps = None
        approx: dict[str, dict] = {}
        for est, scores in est_scores.items():
            approx[est] = {}
            for m in config.metrics:
                comps, approx[est][m] = candidates(scores, site, m, spec.dims, batch.n_pos, per_pos)
        tops = {est: select(approx[est][config.metric], config.top_k, 0, 0)[0] for est in est_scores}
        top = list(dict.fromkeys(j for est in (first, *tops) for j in tops[est]))
        rest = torch.tensor([j for j in range(len(comps)) if j not in set(top)], dtype=torch.long)
        g = torch.Generator().manual_seed(config.seed + i)
        control = sorted(rest[torch.randperm(len(rest), generator=g)[:config.random_k]].tolist())
        plan[site] = {"all": comps, "approx": approx[first], "by_estimator": approx, "tops": tops, "top": top,
                      "control": control, "rank_approx": ranks(approx[first][config.metric]),
                      "verified": [comps[j] for j in top + control]}
    return plan


def _estimator_results(plan: dict, exact: dict, config: ScreenConfig, est_scores: dict, seconds: dict,
                       forward_s: float) -> dict:
    """Per estimator: its cost, and per site how well its scores (primary metric) track the exact effects
    of everything verified, the recall of the true top-k, and the controls that beat its top-k."""
    primary = config.metrics.index(config.metric)
    out = {}
    for est, scores in est_scores.items():
        sites = {}
        for site, p in plan.items():
            idx = p["top"] + p["control"]
            if not idx:
                continue
            ex = torch.stack([exact[p["all"][j]][primary] for j in idx])
            approx = p["by_estimator"][est][config.metric][idx]
            k = len(p["tops"][est])
            a = agreement(approx, ex, k=max(k, 1), tol=_tol(scores, config.metric)).to_dict()
            in_top = torch.tensor([j in set(p["tops"][est]) for j in idx])
            weakest = ex[in_top].abs().min() if in_top.any() else torch.tensor(float("inf"))
            a["false_negatives"] = int((ex[~in_top].abs() > weakest).sum())  # verified, outside its top-k
            sites[site] = a
        out[est] = {"cost": {**scores.passes, "seconds": seconds[est],
                             "forward_equivalents": seconds[est] / max(forward_s, 1e-9)}, "sites": sites}
    return out


def check_baselines(clean_logits, corrupt_logits, batch: PromptBatch, config: ScreenConfig,
                    reduce=lambda v: v) -> None:
    """Refuse, before any expensive work, baselines that are not finite or that the metric cannot tell
    apart (normalised effects would divide by ~0). ``reduce``: the cross-rank mean (every rank decides
    alike)."""
    target = Target.from_clean(batch.answer, batch.wrong, clean_logits)
    values = {}
    for run, logits in (("clean", clean_logits), ("corrupt", corrupt_logits)):
        bad = (~torch.isfinite(logits.float())).any(-1)
        if reduce(float(bad.any())) > 0:
            raise FloatingPointError(
                f"the {run} run's logits are not finite for prompts {bad.nonzero().flatten().tolist()}"
                f"{' (of this rank)' if distributed.active() else ''}; "
                "fp16 overflow is the usual cause: try --dtype bfloat16 or float32")
        values[run] = reduce(float(metric(config.metric, logits, target).mean()))
    if abs(values["clean"] - values["corrupt"]) < MIN_GAP:
        raise ValueError(
            f"clean and corrupt prompts give the same {config.metric} ({values['clean']:.6g} vs "
            f"{values['corrupt']:.6g}): the corruption does not change the behaviour, so effects cannot be "
            "normalised. Check the answer/wrong tokens and the corruption, or choose another --metric.")


def _non_finite(scores, est_scores, comps, config: ScreenConfig, n_pos: int, spec) -> dict:
    """Every non-finite score (per estimator, metric, site) and exact effect, named per component."""
    found = {"scores": [], "effects": []}
    for direction, per_est in est_scores.items():
        for est, sc in per_est.items():
            for m in config.metrics:
                for site in config.sites:
                    names, approx = candidates(sc, site, m, spec.dims, n_pos, config.per_position(site))
                    bad = (~torch.isfinite(approx)).nonzero().flatten().tolist()
                    if bad:
                        found["scores"].append({"direction": direction, "estimator": est, "metric": m,
                                                "site": site, "count": len(bad),
                                                "components": [str(names[i]) for i in bad[:50]]})
    for e in comps:
        bad = [m for m, v in e["exact_metrics"].items() if v != v or abs(v) == float("inf")]
        if bad:
            e["flags"].append("non_finite")
            found["effects"].append({"direction": e["direction"], "component": e["name"], "metrics": bad})
    return found


def _tol(scores: Scores, metric: str) -> float:
    """Effects smaller than 1% of the clean-corrupt gap are treated as zero when comparing signs."""
    return max(0.01 * abs(scores.clean_metric[metric] - scores.corrupt_metric[metric]), 1e-6)


def _site_results(site, plan, exact, config, scores: Scores, direction, max_prob, change, n_kv):
    idx = plan["top"] + plan["control"]
    comps = [plan["all"][j] for j in idx]
    primary = config.metrics.index(config.metric)
    ex = torch.stack([exact[c] for c in comps]) if comps else torch.zeros(0, len(config.metrics))  # [comp, metric]
    k = len(plan["top"]) if config.top_k is None else min(config.top_k, len(plan["top"]))
    site_agree = {}
    for j, m in enumerate(config.metrics):
        approx_m = plan["approx"][m][idx]
        site_agree[m] = agreement(approx_m, ex[:, j], k=max(k, 1), tol=_tol(scores, m)).to_dict()
    n_top = len(plan["top"])
    fn = false_negatives(ex[n_top:, primary], ex[:n_top, primary],
                         n_unverified=len(plan["all"]) - n_top).to_dict()
    rank_exact = ranks(ex[:, primary]) if comps else torch.zeros(0)
    entries = []
    for r, (j, c) in enumerate(zip(idx, comps)):
        approx = float(plan["approx"][config.metric][j])
        value = float(ex[r, primary])
        flags = disagreement_flags(approx, value, _tol(scores, config.metric), int(plan["rank_approx"][j]),
                                   int(rank_exact[r]), k)
        evidence = {"activation_change": change[c]}
        by_est = {est: float(v[config.metric][j]) for est, v in plan["by_estimator"].items()}
        if c.site in ("head", "q", "k", "v"):
            evidence["attn_max_prob"] = float(max_prob[c.layer, _query_heads(c, max_prob.shape[1], n_kv)].max())
        entries.append({
            "direction": direction, "site": c.site, "layer": c.layer, "head": c.head, "neuron": c.neuron,
            "pos": c.pos, "name": str(c), "selected": "top" if r < n_top else "control",
            "approx": approx, "exact": value, "approx_estimators": by_est,
            "approx_metrics": {m: float(plan["approx"][m][j]) for m in config.metrics},
            "exact_metrics": {m: float(ex[r, i]) for i, m in enumerate(config.metrics)},
            "exact_norm": {m: normalise(float(ex[r, i]), scores.clean_metric[m], scores.corrupt_metric[m],
                                        offset=False) for i, m in enumerate(config.metrics)},
            "rank_approx": int(plan["rank_approx"][j]), "rank_exact": int(rank_exact[r]),
            "flags": flags, "evidence": evidence, "causes": _causes(flags, c, evidence),
        })
    return entries, site_agree, fn


def _query_heads(c: Component, n_heads: int, n_kv: int) -> slice:
    """The query heads whose attention pattern a head/q (one head) or k/v (its group) component shapes."""
    if c.site in ("head", "q"):
        return slice(c.unit, c.unit + 1)
    group = n_heads // n_kv
    return slice(c.unit * group, (c.unit + 1) * group)


def _causes(flags: list[str], c: Component, evidence: dict) -> list[str]:
    """Likely causes of an AtP/exact disagreement, each with the number that backs it."""
    if not flags:
        return []
    causes = []
    p = evidence.get("attn_max_prob")
    if p is not None and p > SATURATED_MAX_PROB:
        causes.append(f"attention saturation: mean max attention probability {p:.3f} in L{c.layer}")
    ch = evidence["activation_change"]
    if ch > LARGE_CHANGE:
        causes.append(f"large activation change: |a_src - a_recv| = {ch:.2f} x max(|a_src|, |a_recv|)")
    if c.site == "embed" or (c.site in RESID_LIKE and c.layer == 0):
        causes.append("early-layer non-linearity (embeddings, layer 0)")
    return causes


def _mark_cross_flags(comps: list[dict], config: ScreenConfig) -> None:
    """Flags that compare metrics with one another, and denoising with noising, for the same component."""
    for e in comps:
        norms = {m: v for m, v in e["exact_norm"].items() if v == v}  # drop NaN
        big = [m for m, v in norms.items() if abs(v) >= METRIC_TOL]
        small = [m for m, v in norms.items() if abs(v) < METRIC_TOL / 2]
        opposite = any(norms[a] * norms[b] < 0 for a in big for b in big)
        if opposite or (big and small):
            e["flags"].append("metrics_disagree")
            e["causes"].append("metric non-linearity: normalised effects " +
                               ", ".join(f"{m} {v:+.2f}" for m, v in norms.items()))
    by_key: dict = {}
    for e in comps:
        by_key.setdefault(e["name"], {})[e["direction"]] = e
    for pair in by_key.values():
        if len(pair) < 2:
            continue
        d, n = pair["denoise"]["exact_norm"][config.metric], pair["noise"]["exact_norm"][config.metric]
        if d == d and n == n and abs(d - (-n)) > DIRECTION_TOL:
            kind = "sufficient but not necessary (backup/OR-like)" if abs(d) > abs(n) else \
                "necessary but not sufficient (AND-like)"
            for e in pair.values():
                e["flags"].append("directions_disagree")
                e["causes"].append(f"backup behaviour: denoising restores {d:+.2f}, noising removes {-n:+.2f} "
                                   f"of the clean-corrupt gap: {kind}")


def _long_table(comps: list[dict], config: ScreenConfig) -> list[dict]:
    """One row per verified component x direction x metric."""
    rows = []
    for e in comps:
        for m in config.metrics:
            rows.append({
                "direction": e["direction"], "site": e["site"], "layer": e["layer"], "head": e["head"],
                "neuron": e["neuron"], "pos": e["pos"], "name": e["name"], "selected": e["selected"],
                "metric": m, "primary": m == config.metric, "approx": e["approx_metrics"][m],
                "exact": e["exact_metrics"][m], "exact_norm": e["exact_norm"][m],
                "rank_approx": e["rank_approx"], "rank_exact": e["rank_exact"], "flags": ";".join(e["flags"]),
            })
    return rows


def config_dict(config: ScreenConfig) -> dict:
    return asdict(config)
