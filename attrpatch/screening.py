"""The screen: attribution of every component, exact patching of the top-k and a random control sample, and the
comparison of the two, per site, direction and metric. The CLI's ``screen`` is a thin layer on this.

Verification is per site: the top-k of each site by |AtP score| under the primary metric, plus
``random_k`` components drawn uniformly from the rest of that site (the control sample that estimates
what AtP missed). Every metric is read from the same patched forward passes.

Per prompt pair, scores and exact effects of the verified components are kept (all ranks gathered, and
checkpointed), so every agreement statistic and exact effect gets a bootstrap interval over pairs. Each
flagged component gets one more patched copy moved half way (alpha = 0.5) for its measured causes
(analysis/causes.py), and each large AtP error one with the attention patterns frozen at the receiver's
(a second, norm scales frozen, where that leaves half the error; methods/patching/frozen.py); ``fn_subsets`` adds
joint patches of random subsets of each site's unverified components, read with the estimator's scores as
a control variate, and of all of them, the additivity check (analysis/subsets.py).

``ablation`` (zero | mean | resample) replaces the corrupt run as the source: every score and exact effect is
against that ablation of the clean run, noising only (methods/ablation.py).
"""

from torch import nn

from .analysis.causes import explain
from .analysis.findings import non_finite, site_results
from .analysis.flags import APPROX_FLAGS, mark_cross_flags
from .analysis.grading import grade_estimators
from .analysis.ranking import plan_verification
from .analysis.records import finding_dicts
from .analysis.results import ScreenResult
from .config import ScreenConfig, with_primary_metric
from .inputs.batch import PromptBatch
from .model.sites import as_spec
from .output.checkpoint import Progress
from .output.report import long_table
from .steps import Steps


def screen(model: nn.Module, batch: PromptBatch, config: ScreenConfig = ScreenConfig(),
           progress: Progress | None = None) -> ScreenResult:
    """Run the screen: baselines, then per direction attribution -> plan -> exact patching -> diagnostics
    -> findings; then the cross-direction flags. ``progress`` (output.checkpoint.Progress) saves each
    completed step and, on resume, skips the steps already saved."""
    config = with_primary_metric(config)
    run = Steps(as_spec(model), batch, config, progress or Progress(None))
    run.check_inputs()
    scores, comps, agree, fns, attention, by_estimator, all_scores, verification = {}, [], {}, {}, {}, {}, {}, {}
    for direction in config.directions:
        est_scores, est_seconds = run.attribute(direction)
        scores[direction], all_scores[direction] = est_scores[config.estimators[0]], est_scores
        plan = plan_verification(run.spec.dims, run.batch.n_pos, est_scores, config, run.copy_cost)
        exact, prompts = run.verify(direction, {site: site_plan.verified for site, site_plan in plan.items()})
        plan = run.grow(direction, plan, exact, prompts)
        verification[direction] = {site: site_plan.summary() for site, site_plan in plan.items()}
        verified = [c for site_plan in plan.values() for c in site_plan.verified]
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
        flagged = [e for e in comps[first:] if set(e.flags) & set(APPROX_FLAGS)]
        flagged_comps = [c for c in verified if str(c) in {e.name for e in flagged}]
        slope = config.estimators[0] == "atp"  # AtP is f'(0): its error is the bend the causes locate
        large = [e for e in flagged if "large_error" in e.flags]
        frozen = run.frozen(direction, large, flagged_comps) if slope and not config.ablation else {}
        explain(flagged, run.half(direction, flagged_comps), slope=slope, frozen=frozen)
        by_estimator[direction] = grade_estimators(plan, exact, config, est_scores, est_seconds,
                                                   run.timing["forward_s"], prompts)
    mark_cross_flags(comps, config.metric)
    numerical = non_finite(scores, all_scores, comps, config, run.batch.n_pos, run.spec)
    any_scores, comps = next(iter(scores.values())), finding_dicts(comps)  # the output boundary: dicts from here
    return ScreenResult(config=config, model=run.spec.name, n_prompts=run.n_total, n_pos=run.batch.n_pos,
                        clean_metric=any_scores.clean_metric, corrupt_metric=any_scores.corrupt_metric,
                        scores=scores, components=comps, rows=long_table(comps, config.metrics, config.metric),
                        agreement=agree, false_negatives=fns, attention=attention, estimators=by_estimator,
                        numerical=numerical, verification=verification, timing={**run.timing, **run.cost.to_dict()}, sanity=run.sanity)
