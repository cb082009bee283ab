"""An edge screen scored as MIB scores circuits (``EdgeConfig(mib=True)``, ``attrpatch edges --mib FILE``):
the edge scores on MIB's graph with MIB's sign, and MIB's faithfulness curve, CPR and CMD (analysis/mib.py has
the definitions).

    graph    MIB's: one k and one v receiver per query head. Multi-head models: attrpatch's graph as it is.
             Grouped-query models: the graph of the ungrouped model (model/ungroup.py), which computes the
             same function with each query head's own copy of its group's k and v projections; there
             receiver LlHh.k is query head h's keys, MIB's ``al.hh<k>``.
    score    MIB's EAP: (a(corrupt) - a(clean)) . d(-metric)/d input at the clean run, i.e. minus attrpatch's
             noising score (estimated m(clean with the edge corrupted) - m(clean)): positive when the edge
             supports the clean behaviour. The run's noising scores when it has them on MIB's graph, else a
             noising attribution on the ungrouped model with the run's estimator.
    curve    each circuit measured by exact patching (methods/edges/circuits.py: every edge outside it patched
             to its corrupted value in the clean run, one pass per circuit): 10 shares x (signed, absolute)
             plus the empty circuit, MIB's m(empty); m(full) is the clean run's metric. With
             ``config.ablation`` (zero | mean), MIB's zero / mean-positional intervention: the edges outside are ablated
             (methods/edges/sources.py) and the scores are EAP's against that ablation.

Cost: 21 patched passes (about one forward each), plus, for a grouped-query model or a run without the
noising direction, one more attribution. Memory: the ungrouped copy's k and v weights (model/ungroup.py).
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .analysis import mib
from .config import EdgeConfig
from .inputs.batch import PromptBatch
from .methods.edges.circuits import patch_circuits
from .methods.edges.eap import EdgeScores, attribute_edges
from .model.sites import ModelSpec, as_spec
from .model.ungroup import ungrouped

INTERVENTIONS = {None: "patching", "zero": "zero", "mean": "mean-positional"}  # MIB's names (its "mean" also
# averages over positions; attrpatch's mean ablation is per position, as for nodes)
THRESHOLD = 0.8  # the exported circuit: the smallest signed-score circuit this faithful


@dataclass(frozen=True, kw_only=True)
class MibScores:
    """What the MIB export writes: ``scores`` [sender, receiver] on ``graph`` (ungrouped), MIB's sign;
    ``in_graph`` the exported circuit (or None)."""

    graph: object
    scores: Tensor
    d_model: int
    in_graph: Tensor | None
    meta: dict


def mib_scores(spec: ModelSpec, batch: PromptBatch, scores: dict[str, EdgeScores],
               config: EdgeConfig) -> tuple[ModelSpec, EdgeScores]:
    """The ungrouped model's spec and its noising scores with MIB's sign (``values`` negated)."""
    model = ungrouped(spec.model)
    if model is spec.model and "noise" in scores:
        base, target = scores["noise"], spec
    else:
        target = as_spec(model)
        base = attribute_edges(target, batch, metrics=[config.metric], direction="noise",
                               estimator=config.estimator, ig_steps=config.ig_steps, batch_size=config.batch_size,
                               ablation=config.ablation)
    return target, replace(base, values={m: -v for m, v in base.values.items()})


def evaluate_mib(spec: ModelSpec, batch: PromptBatch, scores: dict[str, EdgeScores],
                 config: EdgeConfig) -> tuple[dict, MibScores]:
    """report.json's ``mib`` entry (cpr, cmd, curve) and the export of the scores."""
    target, signed = mib_scores(spec, batch, scores, config)
    graph, table = signed.graph, signed.values[config.metric]
    owner = mib.owners(graph.senders, graph.receivers)
    by_sign = mib.circuits(table, graph.exists, owner, absolute=False)  # [share, sender, receiver]
    by_abs = mib.circuits(table, graph.exists, owner, absolute=True)
    kept = torch.cat([torch.zeros_like(graph.exists)[None], by_sign, by_abs])  # the empty circuit first
    effects = patch_circuits(target, batch, graph.exists & ~kept, metrics=[config.metric], direction="noise",
                             batch_size=config.batch_size, ablation=config.ablation)
    full = signed.clean_metric[config.metric]
    metric = [full + float(v) for v in effects.values[:, 0]]
    n = len(mib.SHARES)
    f_sign = mib.faithfulness(metric[1:1 + n], full, metric[0])
    f_abs = mib.faithfulness(metric[1 + n:], full, metric[0])
    curve = {"shares": list(mib.SHARES), "edges_asked": mib.circuit_sizes(graph.n_edges),
             "edges_signed": [int(c.sum()) for c in by_sign], "edges_absolute": [int(c.sum()) for c in by_abs],
             "faithfulness_signed": f_sign, "faithfulness_absolute": f_abs,
             "full_metric": full, "empty_metric": metric[0], "corrupt_metric": signed.corrupt_metric[config.metric]}
    ungrouped_graph = graph.n_kv != spec.dims.n_kv_heads
    report = {**mib.summary(f_sign, f_abs), "metric": config.metric, "n_edges": graph.n_edges,
              "intervention": INTERVENTIONS[config.ablation],
              "ranked_by": f"{signed.estimator} noise scores, MIB's sign (CPR: signed, CMD: absolute)",
              "graph": "ungrouped: one k and v receiver per query head" if ungrouped_graph else "the model's own",
              "curve": curve, "forward_equivalents": effects.passes["forward_equivalents"]}
    reach = next((k for k, f in enumerate(f_sign) if f == f and f >= THRESHOLD), None)
    meta = {"metric": config.metric, "estimator": signed.estimator, "direction": "noise", "n_prompts": batch.n,
            "sign": "positive supports the clean behaviour: -(EAP noising score)",
            "in_graph": f"the smallest signed-score circuit with faithfulness >= {THRESHOLD}, pruned"
            if reach is not None else "none (no circuit reached the threshold)"}
    export = MibScores(graph=graph, scores=table, d_model=target.dims.d_model,
                       in_graph=None if reach is None else by_sign[reach], meta=meta)
    return report, export
