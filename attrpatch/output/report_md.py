"""report.md: the plain-words summary of a screen, rendered from the report dict alone."""

import math

from ..analysis.agreement import THRESHOLD_SHARE
from ..analysis.causes import FREEZE_WORDS, NO_CAUSE, REMOVED, removed_share
from ..analysis.groups import GROUP_TOL
from ..engine.metrics import DISCRETE_METRICS
from ..inputs.corruption import STR_WORDS
from ..inputs.directions import QUESTION
from . import findings
from .markdown import ci as _ci, name as _name, num as _f, table as _table

MAX_LISTED = 12


def render(r: dict) -> str:
    """report.md in the order a researcher reads it: does the model do the task; what was found, per site; the
    top components of each site; where AtP and exact patching disagree; metrics; cost; the terms."""
    m = r["metric"]
    lines = [f"# attrpatch screen: {r['task']} on {r['model']}", ""]
    lines += _sanity_section(r.get("sanity") or {})
    lines += _numerical_section(r.get("numerical") or {})
    lines += _corruption_words(r)
    lines += [f"{r['n_prompts']} prompt pairs of {r['n_pos']} tokens; direction {r['direction']}; primary metric "
              f"`{m}`; sites {', '.join(f'{s} ({p})' for s, p in r['positions'].items())}; verified the top "
              f"{r['top_k'] or 'all'} of each site by |AtP| plus {r['random_k']} random others"
              + (f"; model in {r['dtype']}, scores and effects accumulated in {r['accumulation_dtype']}."
                 if r.get("dtype") else "."), ""]
    lines += _table(["metric", "clean", "corrupt" + (" (unit of scale)" if _ablation(r) else ""), "gap"],
                    [[k, _f(r["clean_metric"][k]), _f(r["corrupt_metric"][k]),
                      _f(r["clean_metric"][k] - r["corrupt_metric"][k])] for k in r["metrics"]])
    for direction in r["directions"]:
        comps = [c for c in r["components"] if c["direction"] == direction]
        lines += _direction_section(r, direction, comps)
    lines += ["## Where AtP and exact patching disagree", ""]
    for direction in r["directions"]:
        lines += _no_cause_words(r, [c for c in r["components"] if c["direction"] == direction], direction)
    lines += findings.disagreement_table(r)
    both = [c for c in r["components"] if "directions_disagree" in c["flags"] and c["direction"] == "denoise"]
    if both:
        lines += ["### Denoising and noising disagree", ""]
        lines += [f"- **{_name(c, r.get('tokens'))}**: {c['causes'][-1]}" for c in both[:MAX_LISTED]] + [""]
    lines += _metric_section(r)
    if len(r.get("estimators", {}).get(r["directions"][0], {})) > 1:
        lines += _estimator_section(r)
    lines += _cost_section(r["timing"])
    lines += _glossary(r)
    return "\n".join(lines)


def _cost_section(t: dict) -> list[str]:
    """What was counted and the clocks of whole phases (a phase's seconds over what it counted)."""
    attribution, patching, diagnostics = (t.get(k, 0.0) for k in ("attribution_s", "verification_s", "diagnostics_s"))
    counted = t.get("forward_equivalents_verification", 0.0)
    per = f"; {1000 * patching / counted:.1f} ms per counted forward equivalent" if counted else ""
    frozen = t.get("frozen_forward_equivalents")
    return ["## Cost", "", f"Phases, by their clocks: attribution {attribution:.2f} s; exact patching (verified "
            f"components, half patches, frozen runs) {patching:.2f} s for {counted:.1f} counted full-forward "
            f"equivalents{f' ({frozen:.1f} of them frozen runs)' if frozen else ''}{per}; diagnostics "
            f"(attention statistics, activation changes) {diagnostics:.2f} s; {attribution + patching + diagnostics:.2f} s "
            f"in all (loading, intervals and figures are outside). Forward passes spent: "
            f"{t.get('forward_passes', 0):.0f} (a patched copy of the batch counts one; a full-forward "
            "equivalent counts the blocks and positions a pass computes, its unembedding, the source and "
            "receiving runs).", ""]


def _glossary(r: dict) -> list[str]:
    terms = [
        ("AtP", "attribution patching: the linear estimate grad . (a_source - a_receiver), one backward pass"),
        ("exact", "the effect of patching the component's source value into the receiving run, measured"),
        ("denoise / noise", "patch clean into corrupt (is it sufficient?) / corrupt into clean (is it necessary?)"),
        ("share of gap", "|exact| / |clean - corrupt| of the metric: 100% = the whole difference the corruption makes"),
        ("rank in site", "1 = the largest |AtP| (or |exact|) among the verified components of that site"),
        ("grouped rows", f"one site at one position, consecutive layers, one sign, |exact| within "
         f"{GROUP_TOL:.0%} of the largest: one finding; every member in report.json `groups`"),
        ("disagreement rows", "one component, or one site at one position flagged at consecutive layers with the "
         "same likely cause, in either direction (ranges over those layers)"),
        ("large_error", "|AtP - exact| > 50% of the larger of the two (and above 1% of the gap)"),
        ("sign_flip / missed / overestimated", "opposite signs / exact in the verified top-k, AtP not / AtP in, "
         "exact not"),
        ("f(alpha)", "the metric with the component moved alpha of the way to its source value; AtP = f'(0)"),
        ("bend in alpha 0..1/2", "the slope at alpha = 0 (AtP) differs from the secant 2 e(1/2) of the first half "
         "patch: the non-linearity acts right at the receiver (percentages of the error above 100% mean the "
         "second half bends back)"),
        ("curvature", "the two half patches' secants differ: f bends along the whole way"),
        ("saturation", "an attention row puts more than 95% on one token, so the softmax is flat to first order"),
        ("error removed by freezing", "1 - |error with that part frozen at the receiver's| / |AtP error|: "
         f"patterns = attention patterns, norm = norm scales; {REMOVED:.0%} or more names the cause"),
        ("false negatives", f"random controls drawn from outside the top-k; the threshold is "
         f"{THRESHOLD_SHARE:.0%} of the largest verified |exact| of the site; a 95% upper bound on how many "
         "unverified exceed it (hypergeometric); \"cannot bound\" when that bound is larger than the number of "
         "verified components above the threshold"),
        ("95% CI", "bootstrap interval over prompt pairs")]
    return ["## Terms", "", *[f"- **{k}**: {v}." for k, v in terms], ""]


CORRUPTION_WORDS = {"str": "symmetric token replacement", "abc": "symmetric token replacement: S2 becomes a third "
                    "name, so IO, S1 and S2 are three different names (IOI's ABC prompts)"}


ABLATION_WORDS = {"zero": "replaced by zero", "mean": "replaced by its mean over the {n} prompts, per position",
                  "resample": "replaced by its value in another prompt's clean run (prompt i takes prompt i + 1's)"}


def _ablation(r: dict) -> str | None:
    return (r.get("corruption") or {}).get("ablation")


def _corruption_words(r: dict) -> list[str]:
    """The corruption line: which corrupt run (or ablation) the effects are measured against."""
    c = r.get("corruption") or {}
    if c.get("ablation"):
        scale = (c.get("scale") or {}).get("method", "str")
        return [f"Ablation: **{c['ablation']} ablation**, not a corrupted prompt: each component of the clean run "
                f"{ABLATION_WORDS[c['ablation']].format(n=r['n_prompts'])}. Exact effect = m(clean with c ablated) - "
                "m(clean) (the noising direction only), AtP = grad_clean . (ablated - clean). Its baseline is no "
                "prompt's run, so its sizes are not comparable with a corrupted-prompt patch; normalised effects "
                f"divide by the clean - corrupt gap of the `{scale}` corrupt prompts as a unit of scale only.", ""]
    if not c.get("method"):
        return []
    if c["method"] == "noise":
        return [f"Corruption: `noise` (Gaussian noise on the key tokens' embeddings, std {c['noise_std']}x theirs).", ""]
    words = CORRUPTION_WORDS.get(c["method"], "the task file’s corrupt prompts")
    if c["method"] == "str" and r.get("task") in STR_WORDS:  # a built-in task: name its swap
        words += f": {STR_WORDS[r['task']]}"
    return [f"Corruption: `{c['method']}` ({words}).", ""]


def _direction_section(r: dict, direction: str, comps: list[dict]) -> list[str]:
    """What was found in one direction: a line per site, the agreement statistics, a table per site."""
    m = r["metric"]
    head = (f"{_ablation(r).capitalize()} ablation: is it necessary? (the clean run with it ablated)"
            if _ablation(r) else f"{direction.capitalize()}: {QUESTION[direction]}")
    gap = r["clean_metric"][m] - r["corrupt_metric"][m]
    lines = [f"## {head}", "", f"### What was found, per site", "",
             f"Exact effects in units of `{m}` (the clean - corrupt gap is {_f(gap, 2)}); \"false negatives\": random "
             f"controls against {THRESHOLD_SHARE:.0%} of the site's largest verified |exact| (Terms, at the end).", ""]
    lines += findings.site_lines(r, direction)
    lines += verification_lines(r, direction)
    lines += ["### How well AtP agreed with exact patching", "",
              "Each statistic with its 95% bootstrap interval over prompt pairs.", ""]
    rows = [[site, per_metric[m]["n"], _ci(per_metric[m], "pearson"), _ci(per_metric[m], "spearman"),
             _ci(per_metric[m], "sign_agreement"), f"{_ci(per_metric[m], 'recall_at_k')} (k={per_metric[m]['k']})"]
            for site, per_metric in r["agreement"][direction].items()]
    lines += _table(["site", "verified", "pearson", "spearman", "sign agreement", "recall@k"], rows)
    lines += _subset_words(r["false_negatives"][direction])
    lines += ["### Top components of each site", ""]
    return lines + findings.site_tables(r, direction)


def verification_lines(r: dict, direction: str) -> list[str]:
    """How each site was verified (report.json ``verification``): exhaustively, or the top-k grown by
    adaptive stopping, and why it stopped."""
    sites = (r.get("verification") or {}).get(direction) or {}
    if not sites:
        return []
    budget = r.get("verify_budget")
    lines = ["Verification per site, in forward-equivalents (one patched copy per component); "
             + (f"--verify-budget {budget:g} beyond the top-k and controls, " if budget is not None else "")
             + "spent on the sites in order:", ""]
    for site, v in sites.items():
        cost = f"{v['forward_equivalents']:.1f} forward-equivalents"
        if v["mode"] == "exhaustive":
            skipped = (f"; the other {v['no_effect']} sit before the first position where the prompts differ and "
                       "have no effect") if v["no_effect"] else ""
            lines.append(f"- {site}: exhaustive, all {v['top']} components that can have an effect{skipped} "
                         f"({cost}): its agreement and recall are facts, not estimates")
        else:
            grown = f"grown to the top {v['top']} in blocks of 10, " if v["mode"] == "adaptive" else f"top {v['top']}, "
            why = {"below threshold": "stopped: the last block held no effect of interest "
                                      f"(>= {THRESHOLD_SHARE:.0%} of the largest verified)",
                   "budget": "stopped: budget spent", "all verified": "every component verified"}.get(v["stopped"], "")
            lines.append(f"- {site}: {grown}{v['control']} controls, of {v['components']} ({cost}); {why}".rstrip("; "))
    return lines + [""]


def _subset_words(fns: dict) -> list[str]:
    """The joint-subset false-negative bound (--fn-subsets) per site, in words."""
    found = [f"- {site}: {fn['subsets']['statement']}" + (f"; detected among them: {', '.join(fn['subsets']['detected'][:5])}"
                                                           if fn["subsets"]["detected"] else "")
             for site, fn in fns.items() if fn.get("subsets")]
    return ["Joint patches of random subsets of the unverified components (--fn-subsets):", "", *found, ""] if found else []


def _no_cause_words(r: dict, comps: list[dict], direction: str) -> list[str]:
    """The share of large errors whose measured causes and evidence name nothing, and which non-linearity the
    frozen runs (analysis/causes.py frozen_causes) found carrying them."""
    large = [c for c in comps if "large_error" in c["flags"]]
    if not large:
        return []
    if not r.get("measure_causes", True):
        return [f"{direction.capitalize()}: {len(large)} large errors; their causes were not measured (--no-causes: "
                "no half or frozen patches), so the flags stand on exact patching alone.", ""]
    unexplained = sum(c["causes"][:1] == [NO_CAUSE] for c in large)
    carried = {}
    for c in large:
        frozen = c["evidence"].get("frozen") or {}
        named = [FREEZE_WORDS[k] for k, (slope, effect) in frozen.items()
                 if removed_share(c["exact"], c["approx"], slope, effect) >= REMOVED]
        key = named[0] if named else "neither frozen part" if frozen else "not measured frozen"
        carried[key] = carried.get(key, 0) + 1
    return [f"{direction.capitalize()}: {unexplained} of {len(large)} large errors ({unexplained / len(large):.0%}) "
            "have no cause found; carried by " + ", ".join(f"{k} {n}" for k, n in sorted(
                carried.items(), key=lambda kv: -kv[1])) + " (from half patches e(1/2) and patched runs with the "
            "attention patterns or norm scales frozen; IG when run).", ""]


def _metric_section(r: dict) -> list[str]:
    lines = ["## Where the metrics disagree", "",
             "Normalised exact effects (0 = corrupted baseline, 1 = clean) of the same patched runs under "
             "each metric. Probability saturates and hides negative components; KL is unsigned before "
             "normalising; logit difference is the closest to linear.", ""]
    discrete = [m for m in r["metrics"] if m in DISCRETE_METRICS]
    if discrete:
        lines += [f"{', '.join(discrete)}: discrete (Zhang & Nanda's caution): they move only when a prompt crosses "
                  "a threshold, so they hide small effects and count prompts rather than measure; they have no "
                  "gradient, so no AtP, no ranking, and no part in `metrics_disagree`.", ""]
    flagged = [c for c in r["components"] if "metrics_disagree" in c["flags"]]
    flagged.sort(key=lambda c: -max(abs(v or 0) for v in c["exact_norm"].values()))
    if not flagged:
        return lines + ["No verified component changes sign or importance across metrics.", ""]
    lines += _table(["component", "direction", *r["metrics"]],
                    [[_name(c, r.get("tokens")), c["direction"], *(_f(c["exact_norm"][k], 2) for k in r["metrics"])]
                     for c in flagged[:MAX_LISTED]])
    if len(flagged) > MAX_LISTED:
        lines += [f"... and {len(flagged) - MAX_LISTED} more (flag `metrics_disagree` in results.csv).", ""]
    return lines


def _estimator_section(r: dict) -> list[str]:
    lines = ["## Which estimator to trust here", "",
             "Every estimator's top-k was verified by exact patching (the union, once), so each is graded on "
             "the same ground truth: pearson with the exact effects, recall of the true top-k, and verified "
             "components outside its top-k that beat its weakest pick (false negatives). Cost in passes and "
             "in plain-forward equivalents of wall time.", ""]
    for direction in r["directions"]:
        per = r["estimators"][direction]
        sites = list(next(iter(per.values()))["sites"])
        header = ["estimator", "cost"] + [f"{s}: pearson / recall / FN" for s in sites]
        rows = []
        for est, e in per.items():
            c = e["cost"]
            cost = f"{c['forward']} fwd + {c['backward']} bwd, {c['seconds']:.2f} s ({c['forward_equivalents']:.1f}x fwd)"
            rows.append([est, cost] + [f"{_ci(e['sites'][s], 'pearson')} / {_ci(e['sites'][s], 'recall_at_k')} / "
                                       f"{e['sites'][s]['false_negatives']}" for s in sites])
        lines += [f"### {direction}", ""] + _table(header, rows)
        lines += [f"- {s}: {_recommend(per, s)}" for s in sites] + [""]
    return lines


TRUSTED_PEARSON = 0.9  # an estimator is trusted at a site when its Pearson's lower 95% bound reaches this


def _recommend(per: dict, site: str) -> str:
    """The cheapest estimator whose Pearson lower bound is >= TRUSTED_PEARSON at ``site``, or the best one."""
    def cost(est):
        c = per[est]["cost"]
        return (c["forward"] + c["backward"], c["seconds"])

    def words(est):
        c, a = per[est]["cost"], per[est]["sites"][site]
        return f"**{est}** (pearson {_ci(a, 'pearson')}; cost {c['forward']} fwd + {c['backward']} bwd)"
    graded = [est for est in per if site in per[est]["sites"]]
    trusted = [est for est in graded if (per[est]["sites"][site].get("pearson_ci") or [math.nan])[0] >= TRUSTED_PEARSON]
    if trusted:
        return f"use {words(min(trusted, key=cost))}, the cheapest whose Pearson lower bound is >= {TRUSTED_PEARSON}"
    finite = [est for est in graded if math.isfinite(per[est]["sites"][site]["pearson"])]
    if not finite:
        return "no estimator has a finite Pearson here"
    best = max(finite, key=lambda est: per[est]["sites"][site]["pearson"])
    return f"none reaches a Pearson lower bound of {TRUSTED_PEARSON}; the best is {words(best)}: verify its top-k"


def _numerical_section(num: dict) -> list[str]:
    if not num.get("scores") and not num.get("effects"):
        return []
    lines = ["## Numerical problems (read first)", "",
             "Non-finite values were found; they are left out of every ranking and correlation below. "
             "fp16 overflow is the usual cause: rerun with --dtype bfloat16 or float32.", ""]
    for s in num.get("scores", [])[:MAX_LISTED]:
        lines.append(f"- {s['count']} non-finite {s['estimator']} scores ({s['direction']}, {s['metric']}, "
                     f"{s['site']}): {', '.join(s['components'][:10])}")
    for e in num.get("effects", [])[:MAX_LISTED]:
        lines.append(f"- non-finite exact effect of {e['component']} ({e['direction']}): {', '.join(e['metrics'])}")
    return lines + [""]


def _sanity_section(check: dict) -> list[str]:
    """Does the model do the task? Accuracy and logit-difference spread, per template; warnings first."""
    if not check:
        return []
    lines = ["## Clean-run check" + (" (read first)" if check.get("warnings") else ""), ""]
    lines += [f"> **Warning:** {w}" for w in check.get("warnings", [])]
    lines += [""] if check.get("warnings") else []
    ld = check["logit_diff"]
    lines.append(f"The model puts the answer above the wrong token on {check['accuracy']:.0%} of {check['n']} clean "
                 f"prompts (and the wrong token above the answer on {check['corrupt_accuracy']:.0%} of the corrupt "
                 f"ones). Clean logit difference: mean {_f(ld['mean'], 2)}, median {_f(ld['median'], 2)}, range "
                 f"{_f(ld['min'], 2)} to {_f(ld['max'], 2)}.")
    sel = check.get("prompt_selection") or {}
    bos = sel.get("bos_token")
    if sel:
        adds = sel.get("tokenizer_adds_bos")
        lines.append(f"Tokenization: --prepend-bos {sel['prepend_bos']}; "
                     + (f"every prompt starts with {bos!r} (position 0)" if bos is not None else "no BOS token")
                     + ("" if adds is None else f"; the tokenizer {'adds' if adds else 'adds no'} BOS by itself") + ".")
        notes = [sel.get("skipped")] if sel.get("skipped") else []
        if sel.get("template"):
            notes.append(f"one template, so that positions align: {sel['template']!r}")
        if sel.get("dropped_other_layout"):
            notes.append(f"{sel['dropped_other_layout']} pairs of another token layout dropped")
        if sel.get("dropped_unsolved"):
            notes.append(f"--keep-correct dropped {sel['dropped_unsolved']} pairs the model does not solve")
        lines += [f"Prompts: {'; '.join(notes)}."] if notes else []
    groups = check.get("per_template") or {}
    if len(groups) > 1:
        lines += ["", *_table(["template", "pairs", "accuracy", "mean logit diff"],
                              [[g, v["n"], f"{v['accuracy']:.0%}", _f(v["mean"], 2)] for g, v in groups.items()])]
    return lines + [""]

