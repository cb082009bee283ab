"""The screen: attribution of every component, exact patching of the top-k and a random control sample, and the
comparison of the two, per site, direction and metric. The CLI's ``screen`` is a thin layer on this.

Verification is per site: the top-k of each site by |AtP score| under the primary metric, plus
``random_k`` components drawn uniformly from the rest of that site (the control sample that estimates
what AtP missed). Every metric is read from the same patched forward passes.

Per prompt pair, scores and exact effects of the verified components are kept (all ranks gathered, and
checkpointed), so every agreement statistic and exact effect gets a bootstrap interval over pairs. Each
flagged component gets one more patched copy moved half way (alpha = 0.5) for its measured causes
(analysis/causes.py), and each large AtP error one with the attention patterns frozen at the receiver's
(a second, norm scales frozen, where that leaves half the error; methods/patching/frozen.py), unless
``measure_causes`` is False (--no-causes: the same flags, causes marked not measured); ``fn_subsets`` adds
joint patches of random subsets of each site's unverified components, read with the estimator's scores as
a control variate, and of all of them, the additivity check (analysis/subsets.py).

``ablation`` (zero | mean | resample) replaces the corrupt run as the source: every score and exact effect is
against that ablation of the clean run, noising only (methods/ablation.py).
"""

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .analysis.causes import explain, unmeasured
from .analysis.findings import non_finite, site_results
from .analysis.flags import APPROX_FLAGS, mark_cross_flags
from .analysis.grading import grade_estimators
from .analysis.ranking import plan_verification
from .analysis.records import Cost, Finding, finding_dicts
from .analysis.results import ScreenResult
from .config import ScreenConfig, with_primary_metric
from .engine import distributed, forked
from .engine.forked import Forked
from .inputs.batch import PromptBatch
from .methods.estimators.attribution import Scores
from .model.sites import as_spec
from .output.checkpoint import Progress
from .output.report import long_table
from .steps import Steps


@dataclass
class Direction:
    """One direction's part of the screen (``screen_direction``): what ScreenResult keeps per direction, its
    findings in report order, and what it added to the run's clock and tally (``timing``, ``cost``)."""

    scores: Scores  # the primary estimator's
    all_scores: dict[str, Scores]
    verification: dict
    attention: dict
    agreement: dict
    false_negatives: dict
    components: list[Finding]
    estimators: dict
    timing: dict = field(default_factory=dict)
    cost: Cost = field(default_factory=lambda: Cost(forward_passes=0.0))


def screen(model: nn.Module, batch: PromptBatch, config: ScreenConfig = ScreenConfig(),
           progress: Progress | None = None) -> ScreenResult:
    """Run the screen: baselines, then per direction attribution -> plan -> exact patching -> diagnostics
    -> findings (``screen_direction``); then the cross-direction flags. ``progress`` (output.checkpoint.Progress)
    saves each completed step and, on resume, skips the steps already saved. ``config.processes=2`` runs the
    two directions side by side in two processes on a CPU (engine/forked.py): the same report."""
    config = with_primary_metric(config)
    run = Steps(as_spec(model), batch, config, progress or Progress(None))
    run.check_inputs()
    if processes(config, run.spec.device) == 2:
        threads = torch.get_num_threads()
        with Forked(lambda: _in_child(run, config.directions[1]), max(1, threads // 2),
                    max(1, threads - threads // 2)) as child:
            first = screen_direction(run, config.directions[0], unit=True)
            done = [first, child.result()]
        _merge(run, done[1])
    else:
        done = [screen_direction(run, direction) for direction in config.directions]
    by = dict(zip(config.directions, done))
    comps = [e for d in done for e in d.components]
    mark_cross_flags(comps, config.metric)
    scores = {k: d.scores for k, d in by.items()}
    all_scores = {k: d.all_scores for k, d in by.items()}
    numerical = non_finite(scores, all_scores, comps, config, run.batch.n_pos, run.spec)
    any_scores, comps = next(iter(scores.values())), finding_dicts(comps)  # the output boundary: dicts from here
    return ScreenResult(config=config, model=run.spec.name, n_prompts=run.n_total, n_pos=run.batch.n_pos,
                        clean_metric=any_scores.clean_metric, corrupt_metric=any_scores.corrupt_metric,
                        scores=scores, components=comps, rows=long_table(comps, config.metrics, config.metric),
                        agreement={k: d.agreement for k, d in by.items()},
                        false_negatives={k: d.false_negatives for k, d in by.items()},
                        attention={k: d.attention for k, d in by.items()},
                        estimators={k: d.estimators for k, d in by.items()}, numerical=numerical,
                        verification={k: d.verification for k, d in by.items()},
                        timing={**run.timing, **run.cost.to_dict()}, sanity=run.sanity)


def processes(config: ScreenConfig, device: torch.device) -> int:
    """How many processes the screen's directions run in: ``config.processes``, 1 by default. Two (direction
    "both", a CPU, one rank) measured only 1.06x faster than one on SmolLM2's IOI screen on 2 cores (192.9 s vs
    204.8 s, scripts/bench.py --preset smollm2 --only screen; the CLI 217.8 vs 240.8 s, back to back): the patched
    passes already use both threads well and the noising direction has more to verify, while a second process
    holds its own activations; so it is an option, not the default."""
    possible = (len(config.directions) == 2 and device.type == "cpu" and not distributed.active()
                and forked.available() > 0)
    if config.processes == 2 and not possible:
        raise ValueError("processes=2 (--processes 2) runs the two directions in two forked processes: it needs "
                         "direction='both' (--direction both), a model on the CPU, a single-process run and Linux; "
                         "use --processes 1")
    return config.processes or 1


def screen_direction(run: Steps, direction: str, unit: bool = False) -> Direction:
    """One direction: attribution -> plan -> exact patching -> diagnostics -> findings, with their measured
    causes. ``unit``: time one forward in this process first, the unit of the estimators' cost (a process
    sharing the cores with another is slower than the run's unit, timed on all of them)."""
    config = run.config
    forward_s = run.time_forward() if unit else run.timing["forward_s"]
    est_scores, est_seconds = run.attribute(direction)
    scores = est_scores[config.estimators[0]]
    plan = plan_verification(run.spec.dims, run.batch.n_pos, est_scores, config, run.copy_cost)
    exact, prompts = run.verify(direction, {site: site_plan.verified for site, site_plan in plan.items()})
    plan = run.grow(direction, plan, exact, prompts)
    verified = [c for site_plan in plan.values() for c in site_plan.verified]
    max_prob, entropy, change = run.diagnose(direction, verified)
    comps, agree, fns = [], {}, {}
    for site, site_plan in plan.items():
        entries, agree[site], fns[site] = site_results(
            site, site_plan, exact, config, scores, direction, max_prob, change, run.spec.dims.n_kv_heads, prompts)
        comps += entries
        if config.fn_subsets:
            fns[site]["subsets"] = run.subsets(direction, site, site_plan)
    flagged = [e for e in comps if set(e.flags) & set(APPROX_FLAGS)]
    flagged_comps = [c for c in verified if str(c) in {e.name for e in flagged}]
    slope = config.estimators[0] == "atp"  # AtP is f'(0): its error is the bend the causes locate
    large = [e for e in flagged if "large_error" in e.flags]
    if config.measure_causes:
        frozen = run.frozen(direction, large, flagged_comps) if slope and not config.ablation else {}
        explain(flagged, run.half(direction, flagged_comps), slope=slope, frozen=frozen)
    else:
        for e in flagged:
            e.causes = unmeasured(e.causes)
    return Direction(scores=scores, all_scores=est_scores,
                     verification={site: site_plan.summary() for site, site_plan in plan.items()},
                     attention={"max_prob": max_prob.tolist(), "entropy": entropy.tolist()}, agreement=agree,
                     false_negatives=fns, components=comps,
                     estimators=grade_estimators(plan, exact, config, est_scores, est_seconds, forward_s, prompts))


def _in_child(run: Steps, direction: str) -> Direction:
    """``direction`` in the forked process: no progress bars (the parent's are on the terminal); returns what
    it added to the clock and the tally."""
    timing, cost = dict(run.timing), replace(run.cost)
    run.config = replace(run.config, progress=False)
    found = screen_direction(run, direction, unit=True)
    found.timing = {k: v - timing.get(k, 0.0) for k, v in run.timing.items() if k != "forward_s"}
    found.cost = run.cost.minus(cost)
    return found


def _merge(run: Steps, child: Direction) -> None:
    """Add the child's clock and tally to the run's: the report counts both processes' work."""
    for key, value in child.timing.items():
        run.timing[key] = run.timing.get(key, 0.0) + value
    run.cost.add(child.cost)
