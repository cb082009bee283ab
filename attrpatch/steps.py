"""The steps of one screen (screening.py runs them in order): check the inputs, attribute, verify by exact
patching, the half and frozen patches behind the measured causes, the subset bound, the diagnostics. Each
step works on this rank's shard of the prompts, returns all-rank means, and is saved to ``progress`` once
done (a resumed run skips it). ``config`` is a config.ScreenConfig.
"""

import time
import warnings

import torch

from .analysis.baselines import check_baselines, logit_diff
from .analysis.causes import REMOVED, removed_share
from .analysis.ranking import extend, spare_budget
from .analysis.records import Cost, Finding, SitePlan
from .analysis.sanity import clean_run_check
from .analysis.subsets import draw_subsets, subset_bound
from .config import ScreenConfig
from .engine import distributed
from .engine.forward import forward_last
from .engine.hooks import eval_mode
from .engine.metrics import DISCRETE_METRICS, Target, graded, metric
from .inputs.batch import PromptBatch
from .methods.estimators.attribution import Scores, attribute
from .methods.patching.diagnostics import activation_change, attention_stats
from .methods.patching.exact import Effects, patch
from .methods.patching.frozen import frozen_measurements
from .methods.patching.passes import copy_cost
from .output.checkpoint import Progress


BACKWARD_EQUIVALENTS = 2.0  # forward-equivalents of one attribution backward with its scores (measured)


def attribution_options(config: ScreenConfig, direction: str, estimator: str) -> dict:
    """The keyword arguments of a screen's attribute call (methods/estimators/attribution.py) for one direction and
    estimator; the memory plan (planning.py) makes the same call."""
    return dict(sites=config.sites, metrics=graded(config.metrics), direction=direction,
                batch_size=config.batch_size, estimator=estimator, ig_steps=config.ig_steps,
                recompute=config.low_memory, progress=config.progress,
                prompt_positions={s: config.per_position(s) for s in config.sites}, ablation=config.ablation)


def patch_options(config: ScreenConfig, direction: str) -> dict:
    """The keyword arguments a screen's patch calls share (methods/patching/exact.py); the memory plan makes the
    same call."""
    return dict(direction=direction, copies=config.copies, batch_size=config.batch_size, per_prompt=True,
                progress=config.progress, ablation=config.ablation)


class Steps:
    """The steps of one screen on this rank's shard of the prompts; every number they return is the mean
    over all ranks' prompts (``reduce``), and each step is saved to ``progress`` once done."""

    def __init__(self, spec, batch: PromptBatch, config: ScreenConfig, progress: Progress):
        self.spec, self.config, self.progress = spec, config, progress
        self.batch = distributed.shard(batch.to(spec.device))  # this rank's prompts
        self.copy_cost = copy_cost(spec, batch, config.ablation)  # from all ranks' prompts: one plan for all
        self.n_local, self.n_total = self.batch.n, distributed.total(self.batch.n)
        self.timing = {"attribution_s": 0.0, "verification_s": 0.0, "diagnostics_s": 0.0}
        self.cost = Cost()  # the passes every step adds to
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

    def time_forward(self) -> float:
        """Seconds of one forward of the clean prompts in this process now (a second process's unit)."""
        batch = self.batch
        with eval_mode(self.spec.model), torch.no_grad():
            start = time.perf_counter()
            forward_last(self.spec, batch.clean, batch.mask, batch.last)
            return time.perf_counter() - start

    def attribute(self, direction: str) -> tuple[dict[str, Scores], dict[str, float]]:
        """Every estimator's scores in ``direction``, and the seconds each took."""
        config, est_scores, est_seconds = self.config, {}, {}
        self.prompts[direction] = {}
        for est in config.estimators:
            start = time.perf_counter()
            step = f"attribution-{direction}-{est}"
            found = self.progress.scores(step, self.spec.device)
            if found is None:
                scores = attribute(self.spec, self.batch, **attribution_options(config, direction, est))
                found = self.condense(scores)
                self.progress.save_scores(step, *found)
            est_scores[est], self.prompts[direction][est] = found
            for run, values in self.discrete.items():  # no scores, but baselines to normalise effects by
                getattr(est_scores[est], f"{run}_metric").update(values)
            est_seconds[est] = time.perf_counter() - start
            self.timing["attribution_s"] += est_seconds[est]
            self.cost.add_forwards(est_scores[est].passes["forward"])
        return est_scores, est_seconds

    def verify(self, direction: str, todo: dict[str, list], round_: int = 0) -> tuple[dict, dict]:
        """Exact effects {component: [metric]} of each site's ``todo`` components and the intervals' per-prompt
        inputs {"scores": .., "exact": {component: [metric, batch]}}; one saved step per site and round (0: the
        plan's, then :meth:`grow`'s), the unsaved sites in one shared patch call."""
        start, start_cpu = time.perf_counter(), time.process_time()
        exact, per_prompt, unsaved = {}, {}, {}
        if round_ == 0:
            self.runs = {}  # one direction's runs at a time: verification, diagnostics and half patches share them
        step = lambda site: f"exact-{direction}-{site}" + (f"-{round_}" if round_ else "")
        for site, comps in todo.items():
            effects = self.progress.effects(step(site), comps)
            if effects is None or effects.per_prompt is None:
                unsaved[site] = comps
            else:
                self.cost.add_patch(effects.passes)
                _keep(effects, exact, per_prompt)
        if unsaved:
            effects = self._patch(direction, [c for comps in unsaved.values() for c in comps], self.config.metrics)
            at = 0
            for i, (site, comps) in enumerate(unsaved.items()):
                part = Effects(components=comps, metrics=effects.metrics, values=effects.values[at:at + len(comps)],
                               direction=direction, receiver_metric=effects.receiver_metric,
                               per_prompt=effects.per_prompt[at:at + len(comps)],
                               passes=effects.passes if i == 0 else {k: 0.0 for k in effects.passes})
                self.progress.save_effects(step(site), part)
                _keep(part, exact, per_prompt)
                at += len(comps)
        self._clock(start, start_cpu)
        return exact, {"scores": self.prompts[direction], "exact": per_prompt}

    def grow(self, direction: str, plan: dict[str, SitePlan], exact: dict, prompts: dict) -> dict[str, SitePlan]:
        """AtP*'s adaptive stopping (analysis/ranking.extend): rounds of verification, each adding the next
        block of the estimator's order to the sites whose last verified block still held an effect of
        interest, within the budget; ``exact`` and ``prompts`` gain the new effects. The grown plan."""
        primary = self.config.metrics.index(self.config.metric)
        round_ = 0
        while True:
            grown = {}
            for site, site_plan in plan.items():  # sites in order, each round, from what the others left
                spare = spare_budget({**plan, **grown}, self.config)
                grown[site] = extend(site_plan, lambda c: float(exact[c][primary]), self.config, self.copy_cost, spare)
            todo = {s: [p.all[j] for j in p.top[len(plan[s].top):]] for s, p in grown.items()}
            plan, todo = grown, {s: comps for s, comps in todo.items() if comps}
            if not todo:
                return plan
            round_ += 1
            more, more_prompts = self.verify(direction, todo, round_)
            exact.update(more)
            prompts["exact"].update(more_prompts["exact"])

    def _patch(self, direction: str, items: list, metrics, alpha: float = 1.0) -> Effects:
        """One patch call, reduced over ranks, with every rank's per-prompt effects, counted."""
        config = self.config
        effects = patch(self.spec, self.batch, items, metrics=metrics, alpha=alpha, runs=self.runs,
                        **patch_options(config, direction))
        effects.values = self.reduce(effects.values)
        effects.receiver_metric = self.reduce(effects.receiver_metric)
        effects.per_prompt = self.gather(effects.per_prompt)  # [component, metric, batch]
        self.cost.add_patch(effects.passes)
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
            self.cost.add_patch(effects.passes)
        self._clock(start, start_cpu)
        return effects

    def half(self, direction: str, flagged: list) -> dict[str, float]:
        """e(1/2) of each flagged component under the primary metric: {name: effect} (one patched copy each,
        grouped into passes like verification)."""
        if not flagged:
            return {}
        effects = self.patched(f"half-{direction}", direction, flagged, (self.config.metric,), alpha=0.5)
        return {str(c): float(effects.values[i, 0]) for i, c in enumerate(flagged)}

    def frozen(self, direction: str, large: list[Finding], comps: list) -> dict[str, dict[str, tuple[float, float]]]:
        """Which non-linearity carries each large AtP error (entries ``large``, their components among
        ``comps``): per name, {freeze: (g'(0), g(1) - g(0))} with the attention patterns frozen at the
        receiver's, then the norm scales for the errors the patterns leave (methods/patching/frozen.py: one RelP
        attribution per freeze, their source run shared; the patches' source from ``runs``, verification's; one
        receiving run for both freezes; one resumed patched copy per component and freeze)."""
        entry = {e.name: e for e in large}
        todo = [c for c in comps if str(c) in entry and c.site != "embed"]  # frozen runs resume at a block
        if not todo:
            return {}
        start, start_cpu = time.perf_counter(), time.process_time()
        found, passes = frozen_measurements(
            self.spec, self.batch, todo, direction=direction, metric_name=self.config.metric, copies=self.config.copies,
            batch_size=self.config.batch_size, reduce=self.reduce, runs=self.runs, explained=lambda c, freeze, slope, effect:
            removed_share(entry[str(c)].exact, entry[str(c)].approx, slope, effect) >= REMOVED)
        # the RelP attributions are in this step's clock, so in its count: a backward through every block, its
        # scores included, took ~2 forwards on SmolLM2 (16 x 14 tokens: RelP 4.0-4.2x one forward in all)
        attributions = passes["forward"] + BACKWARD_EQUIVALENTS * passes["backward"]
        self.cost.add_frozen(passes, attributions)
        self._clock(start, start_cpu)
        return found

    def subsets(self, direction: str, site: str, site_plan: SitePlan) -> dict | None:
        """AtP*'s false-negative bound for the unverified components of one site: ``fn_subsets`` joint
        patches of random halves of them, the estimator's scores as a control variate (analysis/subsets.py;
        ``plain_bound``: without it)."""
        verified = set(site_plan.verified)
        at = [j for j, c in enumerate(site_plan.all) if c not in verified]
        rest = [site_plan.all[j] for j in at]
        if len(rest) < 2:
            return None
        included = draw_subsets(len(rest), self.config.fn_subsets, seed=self.config.seed,
                                antithetic=self.config.fn_subsets % 2 == 0)
        joint = [tuple(c for c, keep in zip(rest, row) if keep) for row in included.tolist()]
        nonempty = [i for i, items in enumerate(joint) if items]
        effects = self.patched(f"subsets-{direction}-{site}", direction, [joint[i] for i in nonempty] + [tuple(rest)],
                               (self.config.metric,))  # the last: every unverified component, the additivity check
        joint_effects = torch.zeros(len(joint), dtype=torch.float64)
        joint_effects[nonempty] = effects.values[:-1, 0].double()
        return subset_bound(included, joint_effects, scores=site_plan.approx[self.config.metric][at],
                            joint=float(effects.values[-1, 0])).to_dict([str(c) for c in rest])

    def diagnose(self, direction: str, verified: list):
        """Attention max-prob and entropy [layer, head] of the receiving run, and each verified
        component's relative activation change."""
        start = time.perf_counter()
        receiver = self.batch.runs(direction)[1]
        with eval_mode(self.spec.model):
            max_prob, entropy = map(self.reduce, attention_stats(self.spec, receiver, self.batch.mask))
            change = dict(zip(verified, self.reduce(activation_change(
                self.spec, self.batch, direction, verified, ablation=self.config.ablation, shared=self.runs))))
        self.timing["diagnostics_s"] += time.perf_counter() - start
        return max_prob, entropy, change

    def condense(self, scores: Scores) -> tuple[Scores, dict]:
        """Mean scores with ``prompts`` -> (the all-rank mean scores, {metric: {site: [component, batch]}} of all
        ranks' prompts in ``candidates`` order): the intervals need the latter, everything else the former."""
        prompts = {m: {s: self.gather(t.flatten(1).T.float().cpu()) for s, t in per.items()}  # [component, batch]
                   for m, per in scores.prompts.items()}
        scores.prompts = None
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
