"""The edge-score JSON that MIB's circuit track and EAP-IG load (``eap.graph.Graph.from_json``):

    {"cfg":   {"n_layers": L, "n_heads": H, "parallel_attn_mlp": false, "d_model": D},
     "nodes": {"input": {"in_graph": b}, "a0.h0": {...}, ..., "m0": {...}, ..., "logits": {"in_graph": true}},
     "edges": {"input->a0.h1<q>": {"score": s, "in_graph": b}, "a2.h3->m5": {...}, "m11->logits": {...}, ...}}

Names (attrpatch's graph.py -> MIB's):

    senders     embed -> input,   LlHh -> al.hh,   Ll.mlp -> ml
    receivers   LlHh.q / .k / .v -> al.hh with the suffix <q> / <k> / <v>,   Ll.mlp -> ml,   logits -> logits
    edge        "{sender}->{receiver}" ("input->a0.h1<q>", "a2.h3->m5", "m11->logits")

MIB's graph (EAP-IG ``Graph.from_model``, sequential blocks): input and every head and MLP send; every head's
q, k and v, every MLP and the logits receive; A -> B exists when A is computed before B reads the residual
stream (an earlier layer, or a head of B's layer into B's MLP): attrpatch's ``Graph.exists``, edge for edge.

Grouped-query models: MIB evaluates them ungrouped (TransformerLens's ``ungroup_grouped_query_attention``),
with one k and one v receiver per QUERY head, ``al.hh<k>`` being head h's own copy of its group's keys. attrpatch's
graph has one k and v receiver per key-value head (``LlHg.k``, g < n_kv), which is not that: the export takes a
graph of the ungrouped model (model/ungroup.py), in which receiver ``LlHh.k`` is head h's keys, and refuses a
grouped one. The scores are computed per query head on that model, not a key-value head's score divided.

``score``: MIB's sign, positive when the edge supports the clean behaviour (edge_mib.py); ``in_graph``: the
edges of a circuit when one is given, else false; a node is in the graph when an edge in the graph leaves it
(the logits always are). JSON floats round-trip float32 exactly.
"""

import json
from pathlib import Path

import torch
from torch import Tensor

from .files import write_json
from .markdown import table


def mib_name(node) -> str:
    """A graph.py Node's MIB name (without a q/k/v suffix): input, a3.h2, m3, logits."""
    if node.kind == "embed":
        return "input"
    if node.kind == "logits":
        return "logits"
    if node.kind == "mlp":
        return f"m{node.layer}"
    return f"a{node.layer}.h{node.unit}"


def edge_name(sender, receiver) -> str:
    """'input->a0.h1<q>', 'a2.h3->m5', 'm11->logits'."""
    suffix = f"<{receiver.kind}>" if receiver.kind in ("q", "k", "v") else ""
    return f"{mib_name(sender)}->{mib_name(receiver)}{suffix}"


def _check(graph) -> None:
    if graph.n_kv != graph.n_heads:
        raise ValueError(f"MIB's graph has one k and v receiver per query head ({graph.n_heads}); this graph has "
                         f"{graph.n_kv} key-value heads. Score the ungrouped model (model.ungroup.ungrouped(model)) "
                         "and export its graph; scores per key-value head cannot be split per query head")


def mib_graph(graph, scores: Tensor, d_model: int, in_graph: Tensor | None = None, meta: dict | None = None) -> dict:
    """The JSON object of ``scores`` [sender, receiver] (graph.py Graph, ungrouped) in MIB's format; ``in_graph``
    [sender, receiver] bool marks a circuit; ``meta`` goes under an "attrpatch" key MIB's loader ignores."""
    _check(graph)
    if tuple(scores.shape) != tuple(graph.exists.shape):
        raise ValueError(f"scores must be [sender, receiver] = {tuple(graph.exists.shape)}; got {tuple(scores.shape)}")
    in_graph = torch.zeros_like(graph.exists) if in_graph is None else in_graph.bool() & graph.exists
    values = scores.double().tolist()
    marked = in_graph.tolist()
    edges = {edge_name(graph.senders[i], graph.receivers[j]): {"score": values[i][j], "in_graph": marked[i][j]}
             for i, j in _edge_order(graph)}
    sends = in_graph.any(1).tolist()
    nodes = {mib_name(s): {"in_graph": bool(sends[i])} for i, s in enumerate(graph.senders)}
    nodes["logits"] = {"in_graph": True}
    cfg = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "parallel_attn_mlp": graph.parallel, "d_model": d_model}
    return {"cfg": cfg, "nodes": nodes, "edges": edges, **({"attrpatch": meta} if meta else {})}


def _edge_order(graph):
    """(sender, receiver) index pairs in the order EAP-IG's Graph.from_model adds edges: per layer, every
    earlier node into each head's q, k, v; then every node so far into the MLP; finally into the logits."""
    receivers = {(r.kind, r.layer, r.unit): j for j, r in enumerate(graph.receivers)}
    for layer in range(graph.n_layers):
        before = graph.n_before[receivers[("q", layer, 0)]]
        for i in range(before):
            for h in range(graph.n_heads):
                for kind in ("q", "k", "v"):
                    yield i, receivers[(kind, layer, h)]
        j = receivers[("mlp", layer, None)]
        for i in range(graph.n_before[j]):
            yield i, j
    for i in range(len(graph.senders)):
        yield i, len(graph.receivers) - 1


def write_mib(path: Path, graph, scores: Tensor, d_model: int, in_graph: Tensor | None = None,
              meta: dict | None = None) -> None:
    write_json(Path(path), mib_graph(graph, scores, d_model, in_graph, meta))


def write_export(path: Path, export) -> None:
    """Write an edge screen's ``mib_export`` (edge_mib.MibScores: read, not imported)."""
    write_mib(path, export.graph, export.scores, export.d_model, export.in_graph, export.meta)


def mib_lines(mib: dict) -> list[str]:
    """report.md's MIB section: CPR and CMD, and the curve at MIB's shares."""
    c = mib["curve"]

    def cells(values):
        return ["n/a" if f is None or f != f else f"{round(f, 2) + 0.0:.2f}" for f in values]
    each = mib.get("positions") == "each"
    pruned = "pruned per (component, position) as attrpatch defines it (analysis/mib.py)" if each else \
        "pruned as MIB prunes it"
    lines = ["## MIB's scores", "", f"CPR {area_text(mib['cpr'])} (area under faithfulness, circuits by signed score), "
             f"CMD {area_text(mib['cmd'])} (area under |1 - faithfulness|, by |score|), as MIB's circuit track computes "
             f"them: {mib['n_edges']} {'per-position ' if each else ''}edges of MIB's graph ({mib['graph']}), scored "
             f"by {mib['ranked_by']}; each circuit {pruned} and measured exactly ({_outside(mib)}); areas over the "
             "shares, from 0.1%." + (" No MIB graph JSON is written for per-position edges." if each else ""), ""]
    if mib.get("kept"):
        lines[-2] += (f" Only the top {mib['kept']} per-position edges by |score| were kept: the shares they do not "
                      "decide are n/a, and so are the areas then.")
    header = ["share", *(f"{100 * p:g}%" for p in c["shares"])]
    lines += table(header, [["edges (signed)", *("n/a" if n is None else str(n) for n in c["edges_signed"])],
                            ["faithfulness (signed)", *cells(c["faithfulness_signed"])],
                            ["edges (absolute)", *("n/a" if n is None else str(n) for n in c["edges_absolute"])],
                            ["faithfulness (absolute)", *cells(c["faithfulness_absolute"])]])
    return lines + [""]


def area_text(x: float | None) -> str:
    """CPR or CMD with 3 decimals; n/a when not measured (None or NaN: a kept top-K left shares undecided)."""
    return "n/a" if x is None or x != x else f"{x:.3f}"


def _outside(mib: dict) -> str:
    """What happens to the edges outside a circuit, in MIB's intervention names."""
    how = mib.get("intervention", "patching")
    return "every edge outside it patched from the corrupt run" if how == "patching" else \
        f"every edge outside it ablated: {how}"


def read_mib(path: Path, graph) -> tuple[Tensor, Tensor]:
    """(scores [sender, receiver] float32, in_graph [sender, receiver] bool) of a MIB JSON file for ``graph``
    (ungrouped); a ValueError naming the first edge the file lacks or ``graph`` does not have."""
    _check(graph)
    data = json.loads(Path(path).read_text())
    missing = [k for k in ("cfg", "nodes", "edges") if k not in data]
    if missing:
        raise ValueError(f"{path} is not a MIB graph: no {', '.join(missing)} (expected keys cfg, nodes, edges)")
    index = {edge_name(graph.senders[i], graph.receivers[j]): (i, j) for i, j in graph.exists.nonzero().tolist()}
    unknown = next((name for name in data["edges"] if name not in index), None)
    if unknown is not None:
        raise ValueError(f"{path}: edge {unknown!r} is not in this model's graph ({graph.n_layers} layers, "
                         f"{graph.n_heads} heads); was the file written for another model?")
    absent = next((name for name in index if name not in data["edges"]), None)
    if absent is not None:
        raise ValueError(f"{path}: edge {absent!r} of this model's graph is missing from the file")
    scores = torch.zeros(graph.exists.shape, dtype=torch.float32)
    in_graph = torch.zeros(graph.exists.shape, dtype=torch.bool)
    for name, (i, j) in index.items():
        scores[i, j] = data["edges"][name]["score"]
        in_graph[i, j] = bool(data["edges"][name]["in_graph"])
    return scores, in_graph
