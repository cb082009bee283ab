"""The screen: attribution of every component, exact patching of the top-k and a random control sample, and the
comparison of the two, per site, direction and metric. The CLI's ``screen`` is a thin layer on this.

Verification is per site: the top-k of each site by |AtP score| under the primary metric, plus
``random_k`` components drawn uniformly from the rest of that site (the control sample that estimates
what AtP missed). Every metric is read from the same patched forward passes.

Per prompt pair, scores and exact effects of the verified components are kept (all ranks gathered, and
checkpointed), so every agreement statistic and exact effect gets a bootstrap interval over pairs. Each
flagged component gets one more patched copy moved half way (alpha = 0.5) for its measured causes
(analysis/causes.py); ``fn_subsets`` adds joint patches of random subsets of each site's unverified
components (analysis/subsets.py).
"""

import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .analysis.baselines import check_baselines, logit_diff
from .analysis.causes import explain
from .analysis.findings import non_finite, site_results
from .analysis.flags import APPROX_FLAGS, mark_cross_flags
from .analysis.grading import grade_estimators
from .analysis.ranking import plan_verification, prompt_candidates
from .analysis.sanity import clean_run_check
from .analysis.subsets import draw_subsets, subset_bound
from .engine import distributed
from .engine.forward import forward_last
from .engine.hooks import eval_mode
from .engine.metrics import DISCRETE_METRICS, METRICS, Target, check_metric, graded, metric
from .inputs.batch import PromptBatch
from .inputs.directions import DIRECTIONS, check_direction
from .methods.attribution import ESTIMATORS, Scores, attribute, check_estimator
from .methods.diagnostics import activation_change, attention_stats
from .methods.patching import Effects, patch
from .model.sites import RESID_LIKE, SITES, as_spec, check_site
from .output.checkpoint import Progress
from .output.report import long_table

POSITIONS = ("default", "each", "all")
DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")


def check_metrics_and_direction(config, discrete: bool = False) -> None:
    """Validate a screen config's ``metric``, ``metrics`` and ``direction`` (denoise | noise | both), adding the
    primary metric to ``metrics`` when missing (node and edge screens alike). The primary metric ranks by
    attribution, so it needs a gradient; ``discrete``: ``metrics`` may hold discrete ones (read from the
    patched runs only)."""
    check_metric(config.metric, gradient=True)
    for m in config.metrics:
        check_metric(m, gradient=not discrete)
    if config.metric not in config.metrics:
        object.__setattr__(config, "metrics", (config.metric, *config.metrics))
    if config.direction != "both":
        check_direction(config.direction)


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
    estimator: str = "atp"  # atp | atp_star | ig | graddrop | relp | all
    ig_steps: int = 8
    fn_subsets: int = 0  # joint patches of random subsets of the unverified, per site (0: off; AtP*'s bound)
    progress: bool = True

    def __post_init__(self):
        for s in self.sites:
            check_site(s)
        if not self.sites:
            raise ValueError(f"no sites given; choose from {', '.join(SITES)}")
        check_metrics_and_direction(self, discrete=True)
        if self.positions not in POSITIONS:
            raise ValueError(f"Unknown positions {self.positions!r}; known: {', '.join(POSITIONS)}.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (all), got {self.top_k}")
        if self.random_k < 0:
            raise ValueError(f"random_k must be >= 0, got {self.random_k}")
        if self.estimator != "all":
            check_estimator(self.estimator)
        if self.fn_subsets != 0 and self.fn_subsets < 4:
            raise ValueError(f"fn_subsets must be 0 (off) or >= 4 (subsets to estimate a variance on both sides "
                             f"of each component), got {self.fn_subsets}; 20 or more gives a useful bound")

    @property
    def estimators(self) -> tuple[str, ...]:
        """Estimators to run; the first ranks, flags and fills ``approx``."""
        return tuple(ESTIMATORS) if self.estimator == "all" else (self.estimator,)

    @property
    def directions(self) -> tuple[str, ...]:
        return DIRECTIONS if self.direction == "both" else (self.direction,)

    def per_position(self, site: str) -> bool:
        """Researchers start per position for the residual-stream sites, at all positions for heads/neurons."""
        return site in RESID_LIKE if self.positions == "default" else self.positions == "each"


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
    sanity: dict = field(default_factory=dict)  # the clean-run check (analysis.sanity)


def screen(model: nn.Module, batch: PromptBatch, config: ScreenConfig = ScreenConfig(),
           progress: Progress | None = None) -> ScreenResult:
    """Run the screen: baselines, then per direction attribution -> plan -> exact patching -> diagnostics
    -> findings; then the cross-direction flags. ``progress`` (output.checkpoint.Progress) saves each
    completed step and, on resume, skips the steps already saved."""
    run = _Steps(as_spec(model), batch, config, progress or Progress(None))
    run.check_inputs()
    scores, comps, agree, fns, attention, by_estimator, all_scores = {}, [], {}, {}, {}, {}, {}
    for direction in config.directions:
        est_scores, est_seconds = run.attribute(direction)
        scores[direction], all_scores[direction] = est_scores[config.estimators[0]], est_scores
        plan = plan_verification(run.spec.dims, run.batch.n_pos, est_scores, config)
        exact, prompts = run.verify(direction, plan)
        verified = [c for site_plan in plan.values() for c in site_plan["verified"]]
        max_prob, entropy, change = run.diagnose(direction, verified)
        attention[direction] = {"max_prob": max_prob.tolist(), "entropy": entropy.tolist()}
        agree[direction], fns[direction], first = {}, {}, len(comps)
        for site, site_plan in plan.items():
            entries, agree[direction][site], fns[direction][site] = site_results(
                site, site_plan, exact, config, scores[direction], direction, max_prob, change,
                run.spec.dims.n_kv_heads, prompts)
            comps += entries
            if config.fn_subsets:
                fns[direction][site]["subsets"] = run.subsets(direction, site, site_plan)
        flagged = [e for e in comps[first:] if set(e["flags"]) & set(APPROX_FLAGS)]
        explain(flagged, run.half(direction, [c for c in verified if str(c) in {e["name"] for e in flagged}]))
        by_estimator[direction] = grade_estimators(plan, exact, config, est_scores, est_seconds,
                                                   run.timing["forward_s"], prompts)
    mark_cross_flags(comps, config.metric)
    numerical = non_finite(scores, all_scores, comps, config, run.batch.n_pos, run.spec)
    any_scores = next(iter(scores.values()))
    return ScreenResult(config=config, model=run.spec.name, n_prompts=run.n_total, n_pos=run.batch.n_pos,
                        clean_metric=any_scores.clean_metric, corrupt_metric=any_scores.corrupt_metric,
                        scores=scores, components=comps, rows=long_table(comps, config.metrics, config.metric),
                        agreement=agree, false_negatives=fns, attention=attention, estimators=by_estimator,
                        numerical=numerical, timing=run.timing, sanity=run.sanity)


class _Steps:
    """The steps of one screen on this rank's shard of the prompts; every number they return is the mean
    over all ranks' prompts (``reduce``), and each step is saved to ``progress`` once done."""

    def __init__(self, spec, batch: PromptBatch, config: ScreenConfig, progress: Progress):
        self.spec, self.config, self.progress = spec, config, progress
        self.batch = distributed.shard(batch.to(spec.device))  # this rank's prompts
        self.n_local, self.n_total = self.batch.n, distributed.total(self.batch.n)
        self.timing = {"attribution_s": 0.0, "verification_s": 0.0, "diagnostics_s": 0.0, "forward_passes": 2.0}
        self.prompts: dict = {}  # direction -> estimator -> metric -> site -> [component, batch] (all ranks)
        self.runs: dict = {}  # the source and receiving runs that patch calls and diagnostics share

    def gather(self, value):
        """All ranks' per-prompt values of [.., batch] (the last axis) concatenated in prompt order."""
        return distributed.gather(value.movedim(-1, 0)).movedim(0, -1)

    def reduce(self, value):
        return distributed.mean(value, self.n_local, self.n_total)

    def check_inputs(self) -> None:
        """Refuse misaligned per-position input and unusable baselines before any expensive work."""
        batch, config = self.batch, self.config
        if not batch.aligned and any(config.per_position(s) for s in config.sites):
            each = [s for s in config.sites if config.per_position(s)]
            raise ValueError(f"sites {each} are scored per position, which needs prompts of one token length; "
                             f"lengths here: {sorted(set((batch.last + 1).tolist()))}. Use positions='all' "
                             "(--positions all) or prompts of equal length.")
        with eval_mode(self.spec.model), torch.no_grad():
            seconds, cpu, logits = [], [], {}  # the clock's unit: median of three forwards (the first warms up)
            for run in ("clean", "corrupt", "corrupt"):
                start, start_cpu = time.perf_counter(), time.process_time()
                logits[run] = forward_last(self.spec, batch.run(run), batch.mask, batch.last)
                seconds.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            clean_logits, corrupt_logits = logits["clean"], logits["corrupt"]
            self.timing["forward_s"], self.timing["forward_cpu_s"] = sorted(seconds)[1], sorted(cpu)[1]
        self.sanity = clean_run_check(*(distributed.gather(logit_diff(batch, logits))
                                        for logits in (clean_logits, corrupt_logits)))
        for message in self.sanity["warnings"]:
            warnings.warn(message, stacklevel=3)
        check_baselines(clean_logits, corrupt_logits, batch, config, self.reduce)
        target = Target.from_clean(batch.answer, batch.wrong, clean_logits)
        self.discrete = {run: {m: self.reduce(float(metric(m, logits, target).mean())) for m in config.metrics
                               if m in DISCRETE_METRICS} for run, logits in (("clean", clean_logits),
                                                                             ("corrupt", corrupt_logits))}

    def attribute(self, direction: str) -> tuple[dict[str, Scores], dict[str, float]]:
        """Every estimator's scores in ``direction``, and the seconds each took."""
        config, est_scores, est_seconds = self.config, {}, {}
        self.prompts[direction] = {}
        for est in config.estimators:
            start = time.perf_counter()
            step = f"attribution-{direction}-{est}"
            found = self.progress.scores(step, self.spec.device)
            if found is None:
                scores = attribute(self.spec, self.batch, sites=config.sites, metrics=graded(config.metrics),
                                   direction=direction, per_prompt=True, batch_size=config.batch_size,
                                   estimator=est, ig_steps=config.ig_steps, progress=config.progress)
                found = self.condense(scores)
                self.progress.save_scores(step, *found)
            est_scores[est], self.prompts[direction][est] = found
            for run, values in self.discrete.items():  # no scores, but baselines to normalise effects by
                getattr(est_scores[est], f"{run}_metric").update(values)
            est_seconds[est] = time.perf_counter() - start
            self.timing["attribution_s"] += est_seconds[est]
            self.timing["forward_passes"] += est_scores[est].passes["forward"]
        return est_scores, est_seconds

    def verify(self, direction: str, plan: dict) -> tuple[dict, dict]:
        """Exact effects {component: [metric]} and the intervals' per-prompt inputs {"scores": .., "exact":
        {component: [metric, batch]}}; one saved step per site, the unsaved sites in one shared patch call."""
        start, start_cpu = time.perf_counter(), time.process_time()
        exact, per_prompt, todo = {}, {}, {}
        self.runs = {}  # one direction's runs at a time: verification, diagnostics and half patches share them
        for site, site_plan in plan.items():
            effects = self.progress.effects(f"exact-{direction}-{site}", site_plan["verified"])
            if effects is None or effects.per_prompt is None:
                todo[site] = site_plan["verified"]
            else:
                self._count(effects.passes)
                _keep(effects, exact, per_prompt)
        if todo:
            effects = self._patch(direction, [c for comps in todo.values() for c in comps], self.config.metrics)
            at = 0
            for i, (site, comps) in enumerate(todo.items()):
                part = Effects(components=comps, metrics=effects.metrics, values=effects.values[at:at + len(comps)],
                               direction=direction, receiver_metric=effects.receiver_metric,
                               per_prompt=effects.per_prompt[at:at + len(comps)],
                               passes=effects.passes if i == 0 else {k: 0.0 for k in effects.passes})
                self.progress.save_effects(f"exact-{direction}-{site}", part)
                _keep(part, exact, per_prompt)
                at += len(comps)
        self._clock(start, start_cpu)
        return exact, {"scores": self.prompts[direction], "exact": per_prompt}

    def _patch(self, direction: str, items: list, metrics, alpha: float = 1.0) -> Effects:
        """One patch call, reduced over ranks, with every rank's per-prompt effects, counted."""
        config = self.config
        effects = patch(self.spec, self.batch, items, metrics=metrics, direction=direction, copies=config.copies,
                        batch_size=config.batch_size, per_prompt=True, alpha=alpha, progress=config.progress,
                        runs=self.runs)
        effects.values = self.reduce(effects.values)
        effects.receiver_metric = self.reduce(effects.receiver_metric)
        effects.per_prompt = self.gather(effects.per_prompt)  # [component, metric, batch]
        self._count(effects.passes)
        return effects

    def _clock(self, start: float, start_cpu: float) -> None:
        self.timing["verification_s"] += time.perf_counter() - start
        self.timing["verification_cpu_s"] = self.timing.get("verification_cpu_s", 0.0) + time.process_time() - start_cpu

    def patched(self, step: str, direction: str, items: list, metrics, alpha: float = 1.0) -> Effects:
        """Exact (``alpha``: partial) effects of each of ``items``, per prompt too, saved as ``step``."""
        start, start_cpu = time.perf_counter(), time.process_time()
        effects = self.progress.effects(step, items)
        if effects is None or effects.per_prompt is None:
            effects = self._patch(direction, items, metrics, alpha)
            self.progress.save_effects(step, effects)
        else:
            self._count(effects.passes)
        self._clock(start, start_cpu)
        return effects

    def half(self, direction: str, flagged: list) -> dict[str, float]:
        """e(1/2) of each flagged component under the primary metric: {name: effect} (one patched copy each,
        grouped into passes like verification)."""
        if not flagged:
            return {}
        effects = self.patched(f"half-{direction}", direction, flagged, (self.config.metric,), alpha=0.5)
        return {str(c): float(effects.values[i, 0]) for i, c in enumerate(flagged)}

    def subsets(self, direction: str, site: str, site_plan: dict) -> dict | None:
        """AtP*'s false-negative bound for the unverified components of one site: ``fn_subsets`` joint
        patches of random halves of them (analysis/subsets.py)."""
        verified = set(site_plan["verified"])
        rest = [c for c in site_plan["all"] if c not in verified]
        if len(rest) < 2:
            return None
        included = draw_subsets(len(rest), self.config.fn_subsets, seed=self.config.seed)
        joint = [tuple(c for c, keep in zip(rest, row) if keep) for row in included.tolist()]
        nonempty = [i for i, items in enumerate(joint) if items]
        effects = self.patched(f"subsets-{direction}-{site}", direction, [joint[i] for i in nonempty],
                               (self.config.metric,))
        joint_effects = torch.zeros(len(joint), dtype=torch.float64)
        joint_effects[nonempty] = effects.values[:, 0].double()
        bound = subset_bound(included, joint_effects)
        return {"bound": bound.bound, "confidence": bound.confidence, "n_components": bound.n_components,
                "n_subsets": bound.n_subsets, "detected": [str(rest[i]) for i in bound.detected[:20]],
                "statement": bound.statement()}

    def _count(self, passes: dict) -> None:
        """Add one patch call's passes to the screen's tally (the source and receiving runs it made included)."""
        self.timing["forward_passes"] += passes.get("patched_rows", 0.0) + passes.get("runs", 2.0)
        self.timing["forward_equivalents_verification"] = (
            self.timing.get("forward_equivalents_verification", 0.0) + passes.get("forward_equivalents", 0.0))

    def diagnose(self, direction: str, verified: list):
        """Attention max-prob and entropy [layer, head] of the receiving run, and each verified
        component's relative activation change."""
        start = time.perf_counter()
        receiver = self.batch.runs(direction)[1]
        with eval_mode(self.spec.model):
            max_prob, entropy = map(self.reduce, attention_stats(self.spec, receiver, self.batch.mask))
            change = dict(zip(verified, self.reduce(activation_change(self.spec, self.batch, direction, verified,
                                                                      self.runs))))
        self.timing["diagnostics_s"] += time.perf_counter() - start
        return max_prob, entropy, change


    def condense(self, scores: Scores) -> tuple[Scores, dict]:
        """Per-prompt scores -> (the all-rank mean scores, {metric: {site: [component, batch]}} of all ranks'
        prompts in ``candidates`` order): the intervals need the latter, everything else the former."""
        config = self.config
        prompts = {m: {s: self.gather(prompt_candidates(scores, s, m, config.per_position(s))) for s in config.sites}
                   for m in graded(config.metrics)}
        scores.values = {m: {s: t.mean(0) for s, t in per.items()} for m, per in scores.values.items()}
        scores.per_prompt = False
        return _reduce_scores(scores, self.reduce, self.n_total), prompts


def _keep(effects: Effects, exact: dict, per_prompt: dict) -> None:
    """File one patch call's effects by component: [metric] into ``exact``, [metric, batch] into ``per_prompt``."""
    for i, c in enumerate(effects.components):
        exact[c], per_prompt[c] = effects.values[i], effects.per_prompt[i]


def _reduce_scores(scores: Scores, reduce, n_total: int) -> Scores:
    """The all-rank mean of a rank's scores (identity in a single process)."""
    scores.values = {m: {s: reduce(t) for s, t in per.items()} for m, per in scores.values.items()}
    scores.clean_metric, scores.corrupt_metric = reduce(scores.clean_metric), reduce(scores.corrupt_metric)
    scores.n_prompts = n_total
    return scores


def config_dict(config: ScreenConfig) -> dict:
    return asdict(config)
