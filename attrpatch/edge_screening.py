"""The edge screen: EAP (or EAP-IG) for every edge, exact edge patching of the top-k and a random control
sample, their agreement, flags with measured causes, both directions, every metric from the same patched
runs; then the circuit of the top-n edges and its faithfulness curve. The CLI's ``edges`` is a thin layer
on this; verification reuses the node screen's analysis (ranking, agreement, flags). With
``config.positions == "each"`` every step works on per-position edges sender@p->receiver@p instead
(methods/edges/positions.py): ranked, verified and cut into circuits as whole edges are.
"""

import time
import warnings

import torch
from torch import nn

from .analysis import circuits
from .analysis.agreement import agreement, false_negatives, tolerance
from .analysis.baselines import logit_diff
from .analysis.findings import query_heads
from .analysis.flags import causes, disagreement_flags, mark_cross_flags
from .analysis.intervals import effect_intervals
from .analysis.ranking import plan_site, ranks, top_k
from .analysis.records import Finding, finding_dicts
from .analysis.results import EdgeResult
from .analysis.sanity import clean_run_check
from .config import EdgeConfig, with_primary_metric
from .edge_mib import evaluate_mib
from .engine.forward import forward_last
from .engine.hooks import eval_mode
from .engine.metrics import normalise
from .inputs.batch import PromptBatch
from .methods.edges.circuits import outside_circuits, patch_circuits
from .methods.edges.eap import EdgeScores, attribute_edges
from .methods.edges.graph import Edge, EdgeModel, Node
from .methods.edges.patching import patch_edges
from .methods.edges.positions import position_exists
from .methods.patching.diagnostics import activation_change, attention_stats
from .model.sites import Component, as_spec
from .model.ungroup import check_ungroupable
from .output.checkpoint import Progress


def screen_edges(model: nn.Module, batch: PromptBatch, config: EdgeConfig = EdgeConfig(),
                 progress: Progress | None = None) -> EdgeResult:
    """Per direction: scores -> top-k + control -> exact patching -> agreement and flags; then the circuit.
    ``progress`` (output.checkpoint.Progress) saves each completed step (a direction's scores, its exact edge
    patches, the faithfulness curve) and, on resume, skips the steps already saved."""
    spec, config = as_spec(model), with_primary_metric(config)
    if config.mib:
        check_ungroupable(spec.model)  # refused before the screen, not after it
    progress = progress or Progress(None)
    batch = batch.to(spec.device)
    forward_s, sanity = _baselines(spec, batch)
    timing = {"forward_s": forward_s}
    scores, entries, agree, fns = {}, [], {}, {}
    for direction in config.directions:
        start = time.perf_counter()
        scores[direction] = progress.edge_scores(f"edge-attribution-{direction}", EdgeModel(spec).graph)
        if scores[direction] is None:
            metrics = (config.metric, *(m for m in config.metrics if m != config.metric))  # the top-K's ranking first
            scores[direction] = attribute_edges(spec, batch, metrics=metrics, direction=direction,
                                                estimator=config.estimator, ig_steps=config.ig_steps,
                                                batch_size=config.batch_size, ablation=config.ablation,
                                                positions=config.positions == "each", seed=config.seed)
            progress.save_edge_scores(f"edge-attribution-{direction}", scores[direction])
        timing[f"attribution_{direction}_s"] = time.perf_counter() - start
        start = time.perf_counter()
        found, agree[direction], fns[direction] = _verify(spec, batch, scores[direction], config, progress)
        entries += found
        timing[f"verification_{direction}_s"] = time.perf_counter() - start
    mark_cross_flags(entries, config.metric)
    start = time.perf_counter()
    ranking = scores[config.directions[0]]
    circuit = progress.record("edge-circuit")
    if circuit is None:
        circuit = faithfulness_curve(spec, batch, ranking, config)
        progress.save_record("edge-circuit", circuit)
    timing["circuit_s"] = time.perf_counter() - start
    mib, export = {}, None
    if config.mib:
        start = time.perf_counter()
        mib, export = evaluate_mib(spec, batch, scores, config)
        timing["mib_s"] = time.perf_counter() - start
    first = next(iter(scores.values()))
    return EdgeResult(config=config, model=spec.name, n_prompts=batch.n, n_edges=candidates(first, config.positions, top=0)[2],
                      clean_metric=first.clean_metric, corrupt_metric=first.corrupt_metric, scores=scores,
                      edges=finding_dicts(entries), agreement=agree, false_negatives=fns, circuit=circuit, timing=timing,
                      sanity=sanity, mib=mib, mib_export=export)


def _baselines(spec, batch: PromptBatch) -> tuple[float, dict]:
    """Seconds of one plain forward (the cost unit), and the clean-run check (does the model do the task?),
    whose warnings are raised as ``warnings.warn`` as in the node screen."""
    with eval_mode(spec.model), torch.no_grad():
        logits = {"clean": forward_last(spec, batch.run("clean"), batch.mask, batch.last)}
        start = time.perf_counter()
        logits["corrupt"] = forward_last(spec, batch.run("corrupt"), batch.mask, batch.last)
        seconds = time.perf_counter() - start
    sanity = clean_run_check(logit_diff(batch, logits["clean"]), logit_diff(batch, logits["corrupt"]))
    for message in sanity["warnings"]:
        warnings.warn(message, stacklevel=3)
    return seconds, sanity


def candidates(scores: EdgeScores, positions: str, metrics=(), top: int | None = None) -> tuple[list, dict, int]:
    """The edges a run ranks (whole Edges, or PositionEdges for ``positions`` each), their scores {metric:
    [edge]} in that order for ``metrics``, and how many edges there are. When only the per-position top-K
    was kept (methods/edges/position_top.py): the first ``top`` of it (all K for None) and then the uniform
    pool, so that a control sample drawn outside the top ``top`` is uniform over the rest (a pool edge's
    rank_approx is then its rank among these candidates, not among every edge)."""
    kept = scores.position_top
    if positions == "each" and kept is not None:
        head = kept.index[:top]
        pool = ~torch.isin(kept.pool, head)
        flat = torch.cat([head, kept.pool[pool]])
        approx = {m: torch.cat([kept.value[m][:len(head)], kept.pool_value[m][pool]]).float() for m in metrics}
        return kept.edges(scores.graph, flat), approx, scores.graph.n_edges * kept.n_pos
    if positions == "each":
        every = scores.position_edges()
        return every, {m: scores.position_flat(m).float() for m in metrics}, len(every)
    return scores.graph.edges(), {m: scores.flat(m).float() for m in metrics}, scores.graph.n_edges


def _verify(spec, batch: PromptBatch, scores: EdgeScores, config: EdgeConfig, progress: Progress):
    """Exact effects of the top-k edges by |score| and a random control sample (the edges' SitePlan, drawn
    as a node site's is; a saved step); their findings, agreement per metric and false-negative bound."""
    graph, direction, primary = scores.graph, scores.direction, config.metrics.index(config.metric)
    every, approx, n_edges = candidates(scores, config.positions, config.metrics, top=config.top_k)  # [edge]
    plan = plan_site("edges", every, {config.estimator: approx}, first=config.estimator, metric=config.metric,
                     k=config.top_k, random_k=config.random_k, seed=config.seed)
    top, idx, rank_approx = plan.top, plan.indices, plan.rank_approx
    effects = progress.edge_effects(f"edge-exact-{direction}", plan.verified)
    if effects is None or effects.per_prompt is None:
        effects = patch_edges(spec, batch, plan.verified, metrics=config.metrics, direction=direction,
                              copies=config.copies, batch_size=config.batch_size, per_prompt=True,
                              ablation=config.ablation)
        progress.save_effects(f"edge-exact-{direction}", effects)
    exact = effects.values.float()  # [verified, metric]
    low, high = effect_intervals(effects.per_prompt[:, primary]) if idx else ([], [])  # 95%, over pairs
    k = min(config.top_k, len(top))
    agree = {m: agreement(approx[m][idx], exact[:, i], k=max(k, 1), tol=tolerance(scores, m)).to_dict()
             for i, m in enumerate(config.metrics)}
    fn = false_negatives(exact[len(top):, primary], exact[:len(top), primary], n_edges - len(idx)).to_dict()
    rank_exact = ranks(exact[:, primary])
    evidence = _evidence(spec, batch, direction, plan.verified, graph)
    tol = tolerance(scores, config.metric)
    entries = []
    for r, j in enumerate(idx):
        edge, value, estimate = every[j], float(exact[r, primary]), float(approx[config.metric][j])
        flags = disagreement_flags(estimate, value, tol, int(rank_approx[j]), int(rank_exact[r]), k)
        where, ev = evidence[edge]
        at = {} if config.positions == "all" else {"pos": edge.pos}
        entries.append(Finding(
            where={"sender": edge.sender, "receiver": edge.receiver, **at}, name=str(edge), direction=direction,
            selected="top" if r < len(top) else "control", approx=estimate, exact=value,
            exact_ci=[float(low[r]), float(high[r])],
            rank_approx=int(rank_approx[j]), rank_exact=int(rank_exact[r]), flags=flags,
            approx_metrics={m: float(approx[m][j]) for m in config.metrics},
            exact_metrics={m: float(exact[r, i]) for i, m in enumerate(config.metrics)},
            exact_norm={m: normalise(float(exact[r, i]), scores.clean_metric[m], scores.corrupt_metric[m],
                                     offset=False) for i, m in enumerate(config.metrics)},
            evidence=ev, causes=causes(flags, where, ev)))
    return entries, agree, fn


def _component(node: Node) -> Component:
    """The node-patching component of a sender (embed, head, mlp_out) or a q/k receiver."""
    if node.kind == "embed":
        return Component("embed", 0)
    if node.kind == "mlp":
        return Component("mlp_out", node.layer)
    return Component(node.kind, node.layer, None, node.unit)


def _evidence(spec, batch, direction: str, edges: list[Edge], graph) -> dict:
    """Per edge: (component the causes name, {activation_change of the sender's activation, attention
    saturation of a q/k receiver's heads})."""
    senders = {e.sender: _component(graph.senders[graph.sender_index[e.sender]]) for e in edges}
    with eval_mode(spec.model):
        change = dict(zip(senders, activation_change(spec, batch, direction, list(senders.values()))))
        max_prob, _ = attention_stats(spec, batch.runs(direction)[1], batch.mask)
    out = {}
    for e in edges:
        receiver = graph.receivers[graph.receiver_index[e.receiver]]
        ev, where = {"activation_change": change[e.sender]}, senders[e.sender]
        if receiver.kind in ("q", "k"):
            where = _component(receiver)
            heads = query_heads(where, spec.dims.n_heads, spec.dims.n_kv_heads)
            ev["attn_max_prob"] = float(max_prob[receiver.layer, heads].max())
        out[e] = (where, ev)
    return out


def faithfulness_curve(spec, batch: PromptBatch, scores: EdgeScores, config: EdgeConfig) -> dict:
    """The circuit of the top-n edges by |score| (primary metric) for n on ``circuits.circuit_sizes``: the
    clean run with every edge outside the circuit patched to its corrupted value (noising), each size one
    copy of a pass that computes every sender's write once (methods/edges/circuits.py);
    normalised 0 = corrupted, 1 = clean, with CPR and CMD. With ``config.ablation`` every edge outside is
    ablated instead, and 0 is the empty circuit (every edge ablated)."""
    every, flat, n_edges = candidates(scores, config.positions, [config.metric])
    flat = flat[config.metric]
    order = top_k(flat, None)
    sizes = circuits.circuit_sizes(n_edges, config.circuit_points)
    exists = scores.graph.exists if config.positions == "all" else position_exists(scores.graph, batch.n_pos)
    if scores.position_top is None:
        masks = outside_circuits(exists, order, sizes)  # [size, sender, receiver(, pos)]
        effects = patch_circuits(spec, batch, masks, metrics=[config.metric], direction="noise",
                                 batch_size=config.batch_size, ablation=config.ablation)
    else:  # circuits within the kept top-K, and the whole graph; one mask in memory at a time
        sizes = [n for n in sizes if n <= len(scores.position_top.index)] + [n_edges]
        effects = _kept_circuits(spec, batch, scores, sizes, config)
    clean, corrupt = scores.clean_metric[config.metric], scores.corrupt_metric[config.metric]
    if config.ablation is not None:  # 0 = every edge ablated (the empty circuit, sizes[0] = 0), as MIB's
        corrupt = clean + float(effects.values[0, 0])
    faith = circuits.faithfulness([clean + float(v) for v in effects.values[:, 0]], clean, corrupt)
    ranked = [{"sender": every[j].sender, "receiver": every[j].receiver, "score": float(flat[j]),
               **({"pos": every[j].pos} if config.positions == "each" else {})}
              for j in order[:max(sizes[1:-1] or [1])]]
    return {"metric": config.metric, "ranked_by": f"{scores.estimator} {scores.direction}", "n_edges": n_edges,
            "positions": config.positions,
            "sizes": sizes, "faithfulness": faith, **circuits.summary(sizes, faith, n_edges),
            "clean_metric": clean, "corrupt_metric": corrupt, "edges": ranked,
            "forward_equivalents": effects.passes["forward_equivalents"]}


def _kept_circuits(spec, batch: PromptBatch, scores: EdgeScores, sizes: list[int], config: EdgeConfig):
    """The faithfulness curve's patches when only the per-position top-K was kept: per size n (<= K, or every
    edge), one patch_circuits call whose mask is every per-position edge but the top n kept."""
    kept, shape = scores.position_top.index, (*scores.graph.exists.shape, batch.n_pos)
    values, passes = [], 0.0
    for n in sizes:
        mask = position_exists(scores.graph, batch.n_pos).clone()  # [sender, receiver, pos]
        mask.view(-1)[kept[:n]] = False
        if n >= scores.graph.n_edges * batch.n_pos:
            mask.zero_()
        effects = patch_circuits(spec, batch, mask.view(1, *shape), metrics=[config.metric], direction="noise",
                                 batch_size=config.batch_size, ablation=config.ablation)
        values.append(effects.values)
        passes += effects.passes["forward_equivalents"]
    effects.values, effects.passes["forward_equivalents"] = torch.cat(values), passes
    return effects
