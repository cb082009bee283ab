"""The screen: attribution of every component, exact patching of the top-k and a random control sample, and the
comparison of the two, per site, direction and metric. The CLI's ``screen`` is a thin layer on this.

Verification is per site: the top-k of each site by |AtP score| under the primary metric, plus
``random_k`` components drawn uniformly from the rest of that site (the control sample that estimates
what AtP missed). Every metric is read from the same patched forward passes.
"""

import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .analysis.agreement import grade_estimators
from .analysis.findings import non_finite, site_results
from .analysis.flags import mark_cross_flags
from .analysis.ranking import plan_verification
from .analysis.sanity import clean_run_check
from .engine import distributed
from .engine.forward import forward_last
from .engine.hooks import eval_mode
from .engine.metrics import METRICS, MIN_GAP, Target, check_metric, metric
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


def check_metrics_and_direction(config) -> None:
    """Validate a screen config's ``metric``, ``metrics`` and ``direction`` (denoise | noise | both), adding the
    primary metric to ``metrics`` when missing (node and edge screens alike)."""
    for m in (config.metric, *config.metrics):
        check_metric(m)
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
    progress: bool = True

    def __post_init__(self):
        for s in self.sites:
            check_site(s)
        if not self.sites:
            raise ValueError(f"no sites given; choose from {', '.join(SITES)}")
        check_metrics_and_direction(self)
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
        exact = run.verify(direction, plan)
        verified = [c for site_plan in plan.values() for c in site_plan["verified"]]
        max_prob, entropy, change = run.diagnose(direction, verified)
        attention[direction] = {"max_prob": max_prob.tolist(), "entropy": entropy.tolist()}
        agree[direction], fns[direction] = {}, {}
        for site, site_plan in plan.items():
            entries, agree[direction][site], fns[direction][site] = site_results(
                site, site_plan, exact, config, scores[direction], direction, max_prob, change,
                run.spec.dims.n_kv_heads)
            comps += entries
        by_estimator[direction] = grade_estimators(plan, exact, config, est_scores, est_seconds,
                                                   run.timing["forward_s"])
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

    def attribute(self, direction: str) -> tuple[dict[str, Scores], dict[str, float]]:
        """Every estimator's scores in ``direction``, and the seconds each took."""
        config, est_scores, est_seconds = self.config, {}, {}
        for est in config.estimators:
            start = time.perf_counter()
            step = f"attribution-{direction}-{est}"
            est_scores[est] = self.progress.scores(step, self.spec.device)
            if est_scores[est] is None:
                est_scores[est] = _reduce_scores(
                    attribute(self.spec, self.batch, sites=config.sites, metrics=config.metrics, direction=direction,
                              batch_size=config.batch_size, estimator=est, ig_steps=config.ig_steps,
                              progress=config.progress), self.reduce, self.n_total)
                self.progress.save_scores(step, est_scores[est])
            est_seconds[est] = time.perf_counter() - start
            self.timing["attribution_s"] += est_seconds[est]
            self.timing["forward_passes"] += est_scores[est].passes["forward"]
        return est_scores, est_seconds

    def verify(self, direction: str, plan: dict) -> dict:
        """Exact effects of every planned component: {component: [metric]}; one saved step per site. The
        sites not saved yet share one ``patch`` call (one source and one receiving run for all of them, and
        passes grouped across sites by layer)."""
        config, exact, timing = self.config, {}, self.timing
        start, start_cpu = time.perf_counter(), time.process_time()
        todo = {}
        for site, site_plan in plan.items():
            effects = self.progress.effects(f"exact-{direction}-{site}", site_plan["verified"])
            if effects is None:
                todo[site] = site_plan["verified"]
            else:
                self._count(effects.passes)
                exact.update({c: effects.values[i] for i, c in enumerate(site_plan["verified"])})  # [metric]
        if todo:
            shared = [c for comps in todo.values() for c in comps]
            effects = patch(self.spec, self.batch, shared, metrics=config.metrics, direction=direction,
                            copies=config.copies, batch_size=config.batch_size, progress=config.progress)
            effects.values = self.reduce(effects.values)
            effects.receiver_metric = self.reduce(effects.receiver_metric)
            self._count(effects.passes)
            at = 0
            for i, (site, comps) in enumerate(todo.items()):
                part = Effects(components=comps, metrics=effects.metrics, values=effects.values[at:at + len(comps)],
                               direction=direction, receiver_metric=effects.receiver_metric,
                               passes=effects.passes if i == 0 else {k: 0.0 for k in effects.passes})
                self.progress.save_effects(f"exact-{direction}-{site}", part)
                exact.update({c: part.values[j] for j, c in enumerate(comps)})  # [metric]
                at += len(comps)
        timing["verification_s"] += time.perf_counter() - start
        timing["verification_cpu_s"] = timing.get("verification_cpu_s", 0.0) + time.process_time() - start_cpu
        return exact

    def _count(self, passes: dict) -> None:
        """Add one patch call's passes to the screen's tally (its source and receiving runs included)."""
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
            change = dict(zip(verified, self.reduce(activation_change(self.spec, self.batch, direction, verified))))
        self.timing["diagnostics_s"] += time.perf_counter() - start
        return max_prob, entropy, change


def logit_diff(batch: PromptBatch, logits) -> "torch.Tensor":
    """logit[answer] - logit[wrong] per pair: [batch, vocab] -> [batch]."""
    return metric("logit_diff", logits, Target(batch.answer, batch.wrong, logits[:, :0]))


def solved(model: nn.Module, batch: PromptBatch, batch_size: int | None = None) -> "torch.Tensor":
    """Which pairs the model solves on the clean prompt (answer logit above the wrong one): [batch] bool."""
    spec = as_spec(model)
    out = []
    with eval_mode(spec.model), torch.no_grad():
        for chunk in batch.to(spec.device).chunks(batch_size):
            logits = forward_last(spec, chunk.run("clean"), chunk.mask, chunk.last)
            out.append(logit_diff(chunk, logits).cpu() > 0)
    return torch.cat(out)


def _reduce_scores(scores: Scores, reduce, n_total: int) -> Scores:
    """The all-rank mean of a rank's scores (identity in a single process)."""
    scores.values = {m: {s: reduce(t) for s, t in per.items()} for m, per in scores.values.items()}
    scores.clean_metric, scores.corrupt_metric = reduce(scores.clean_metric), reduce(scores.corrupt_metric)
    scores.n_prompts = n_total
    return scores


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


def config_dict(config: ScreenConfig) -> dict:
    return asdict(config)
