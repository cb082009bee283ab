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

    per position  (``positions="each"``, ``--positions each --mib``): the same on the per-position edges
             A@p -> B@p of the same (ungrouped) graph: E = graph edges x positions, MIB's shares of them, each
             circuit pruned by attrpatch's per-position rule (analysis/mib.py ``prune_positions``; MIB has
             none) and measured by per-position exact patching. report.json's ``mib`` only: no graph JSON is
             written (MIB's graphs are whole edges; it cannot load one). When only the per-position top-K was
             kept (position_top.py: the table above positions.MAX_TABLE_BYTES), a share whose circuit the K do
             not decide (mib.kept_top: by |score| n > K; by signed score, its n-th score below the K-th |score|)
             is not measured: NaN in the curve (null in report.json), so CPR / CMD are NaN; 100% is the
             whole graph and is measured. Memory per position: 21 [sender, receiver, pos] bool masks at once
             (SmolLM2 ungrouped at 14 tokens: 21 x 301 x 841 x 14 B = 74 MB), one at a time when the top-K
             was kept.

Cost: 21 patched passes (about one forward each), plus, for a grouped-query model or a run without the
noising direction, one more attribution. Memory: the ungrouped copy's k and v weights (model/ungroup.py).
"""

import math
from dataclasses import dataclass, replace
from typing import Iterator

import torch
from torch import Tensor

from .analysis import mib
from .config import EdgeConfig
from .inputs.batch import PromptBatch
from .methods.edges.circuits import patch_circuits
from .methods.edges.eap import EdgeScores, attribute_edges
from .methods.edges.positions import position_exists
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
    """The ungrouped model's spec and its noising scores with MIB's sign (``values``, and per position
    ``by_position`` or ``position_top``, negated)."""
    model = ungrouped(spec.model)
    if model is spec.model and "noise" in scores:
        base, target = scores["noise"], spec
    else:
        target = as_spec(model)
        base = attribute_edges(target, batch, metrics=[config.metric], direction="noise",
                               estimator=config.estimator, ig_steps=config.ig_steps, batch_size=config.batch_size,
                               ablation=config.ablation, positions=config.positions == "each", seed=config.seed)
    top = base.position_top
    if top is not None:  # still by |score| descending
        top = replace(top, value={m: -v for m, v in top.value.items()},
                      pool_value={m: -v for m, v in top.pool_value.items()})
    by_position = None if base.by_position is None else {m: -v for m, v in base.by_position.items()}
    return target, replace(base, values={m: -v for m, v in base.values.items()}, by_position=by_position,
                           position_top=top)


def mib_circuits(signed: EdgeScores, config: EdgeConfig, n_pos: int) -> Iterator[Tensor | None]:
    """The empty circuit, then MIB's pruned circuits at each share by signed score, then by |score|:
    [sender, receiver] bool, or per position [sender, receiver, pos] (pruned by mib.prune_positions). When
    only the per-position top-K was kept, a share the K do not decide (mib.kept_top) yields None."""
    graph, top = signed.graph, signed.position_top
    owner, kv = mib.owners(graph.senders, graph.receivers), mib.key_value(graph.receivers)
    exists = graph.exists if config.positions == "all" else position_exists(graph, n_pos)
    yield torch.zeros_like(exists)
    if top is None:
        table = signed.values if config.positions == "all" else signed.by_position
        for absolute in (False, True):
            yield from mib.circuits(table[config.metric], exists, owner, absolute, kv=kv)
        return
    n_total = graph.n_edges * n_pos
    for absolute in (False, True):
        for n in mib.circuit_sizes(n_total):
            flat = mib.kept_top(top.index, top.value[config.metric], n, absolute, n_total)
            if flat is None and n < n_total:
                yield None
                continue
            mask = exists.clone() if flat is None else torch.zeros(exists.shape, dtype=torch.bool)
            if flat is not None:
                mask.view(-1)[flat] = True
            yield mib.prune_positions(mask, owner, kv)


def measure(target: ModelSpec, batch: PromptBatch, circuits: Iterator[Tensor | None], config: EdgeConfig,
            together: bool) -> tuple[list[float], list[int | None], float]:
    """The metric of each circuit (every edge outside it patched, or ablated), its edge count, and the
    forward equivalents: all circuits in one patch_circuits call if ``together``, else one at a time
    (NaN and None for a None circuit)."""
    if together:
        inside = torch.stack(list(circuits))
        effects = patch_circuits(target, batch, ~inside, metrics=[config.metric], direction="noise",
                                 batch_size=config.batch_size, ablation=config.ablation)
        return [float(v) for v in effects.values[:, 0]], [int(c.sum()) for c in inside], \
            effects.passes["forward_equivalents"]
    values, sizes, passes = [], [], 0.0
    for inside in circuits:
        if inside is None:
            values.append(math.nan), sizes.append(None)
            continue
        effects = patch_circuits(target, batch, ~inside[None], metrics=[config.metric], direction="noise",
                                 batch_size=config.batch_size, ablation=config.ablation)
        values.append(float(effects.values[0, 0])), sizes.append(int(inside.sum()))
        passes += effects.passes["forward_equivalents"]
    return values, sizes, passes


def evaluate_mib(spec: ModelSpec, batch: PromptBatch, scores: dict[str, EdgeScores],
                 config: EdgeConfig) -> tuple[dict, MibScores | None]:
    """report.json's ``mib`` entry (cpr, cmd, curve) and the export of the scores (None per position: MIB
    cannot load a per-position graph)."""
    target, signed = mib_scores(spec, batch, scores, config)
    graph, each = signed.graph, config.positions == "each"
    n_pos = batch.n_pos if each else 1
    n = len(mib.SHARES)
    effects, sizes, passes = measure(target, batch, mib_circuits(signed, config, n_pos), config,
                                     together=signed.position_top is None)
    full = signed.clean_metric[config.metric]
    metric = [full + v for v in effects]
    f_sign = mib.faithfulness(metric[1:1 + n], full, metric[0])
    f_abs = mib.faithfulness(metric[1 + n:], full, metric[0])
    curve = {"shares": list(mib.SHARES), "edges_asked": mib.circuit_sizes(graph.n_edges * n_pos),
             "edges_signed": sizes[1:1 + n], "edges_absolute": sizes[1 + n:],
             "faithfulness_signed": f_sign, "faithfulness_absolute": f_abs,
             "full_metric": full, "empty_metric": metric[0], "corrupt_metric": signed.corrupt_metric[config.metric]}
    ungrouped_graph = graph.n_kv != spec.dims.n_kv_heads
    report = {**mib.summary(f_sign, f_abs), "metric": config.metric, "n_edges": graph.n_edges * n_pos,
              "positions": config.positions, "intervention": INTERVENTIONS[config.ablation],
              "ranked_by": f"{signed.estimator} noise scores, MIB's sign (CPR: signed, CMD: absolute)",
              "graph": ("ungrouped: one k and v receiver per query head" if ungrouped_graph else "the model's own")
              + (f", per position ({n_pos}), pruned by attrpatch's per-position rule" if each else ""),
              "curve": curve, "forward_equivalents": passes}
    if signed.position_top is not None:
        report["kept"] = len(signed.position_top.index)  # shares the top-K do not decide: NaN, areas NaN
    return report, None if each else _export(target, signed, config, batch.n, f_sign)


def _export(target: ModelSpec, signed: EdgeScores, config: EdgeConfig, n_prompts: int,
            f_sign: list[float]) -> MibScores:
    """The whole-edge export: the scores, and in_graph the smallest signed circuit reaching THRESHOLD."""
    graph, table = signed.graph, signed.values[config.metric]
    reach = next((k for k, f in enumerate(f_sign) if f == f and f >= THRESHOLD), None)
    in_graph = None
    if reach is not None:
        n = mib.circuit_sizes(graph.n_edges)[reach]
        in_graph = mib.prune(mib.top_edges(table, graph.exists, n, absolute=False),
                             mib.owners(graph.senders, graph.receivers))
    meta = {"metric": config.metric, "estimator": signed.estimator, "direction": "noise", "n_prompts": n_prompts,
            "sign": "positive supports the clean behaviour: -(EAP noising score)",
            "in_graph": f"the smallest signed-score circuit with faithfulness >= {THRESHOLD}, pruned"
            if reach is not None else "none (no circuit reached the threshold)"}
    return MibScores(graph=graph, scores=table, d_model=target.dims.d_model, in_graph=in_graph, meta=meta)
