"""Stage 4, methods: what is computed on the model (definitions: docs/methods.md), in three rooms that
import in this order (scripts/layout.py checks it):

    ablation      zero, mean and resample ablations: the values that replace a component (both rooms read them)
    halving       out of memory: a pass retried at half its copies, an attribution chunk at half its prompts
    estimators/   the linear estimates: one module per estimator on the shared gradient core
    patching/     exact activation patching and what builds on it
    edges/        edges between components: the graph, EAP / EAP-IG on the estimators' core, edge patching
"""
