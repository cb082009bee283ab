"""Stage 6, analysis: pure functions on numbers (no model; baselines.solved alone runs the clean prompts).

    records      what flows between stages: SitePlan, Finding, Cost (dicts only at the output boundary)
    results      what a screen returns: ScreenResult, EdgeResult (read by the outputs)
    ranking      the top-k by |score| and the seeded control sample: what to verify
    agreement    correlations, sign agreement, recall@k; the control sample's false-negative bound
    intervals    bootstrap intervals over prompt pairs
    grading      each estimator graded on the verified set
    flags        disagreement flags and their evidence; the one home of flag names and thresholds
    causes       measured causes: the half patch's split of AtP's error, the frozen runs' verdicts
    subsets      the false-negative bound from joint patches of random subsets, and the additivity check
    findings     one Finding per verified component x direction, and every non-finite number
    groups       verified components that carry the same effect (a site, a position, consecutive layers)
    sanity       the clean-run check: does the model do the task?
    baselines    per-pair logit differences, solved pairs, finite and distinct baselines
    circuits     circuits from edge scores: faithfulness, CPR and CMD
    mib          MIB's circuits (top-n by signed or |score|, pruned; per position by (component, position)),
                 its shares and its CPR and CMD areas
"""
