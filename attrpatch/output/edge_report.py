"""Writing an edge screen: report.json (its "edges" list: one entry per verified edge x direction),
circuit.json (the faithfulness curve), results.csv (one row per verified edge x direction x metric),
edge_scores.safetensors (every edge score, [sender, receiver] with the names in its metadata; per-position runs
add ``pos/<direction>/<metric>`` [sender, receiver, pos], or ``top/<direction>/index`` and ``top/<direction>/<metric>``
when only the top-K was kept), report.md (the clean-run check first, as in the node
report, then agreement and the circuit). Per-position runs (``positions: each``) name edges
``L3H1@5->L7.mlp@5`` and give each edge's ``pos``; report.md adds the token (or role) at that position.
``result``: the edge screen's EdgeResult (analysis/results.py)."""

import json
from pathlib import Path

from ..analysis.results import EdgeResult
from ..config import EdgeConfig, config_dict
from ..methods.ablation import label as ablation_label
from .files import safetensors_bytes, write_atomic, write_csv, write_json
from .findings import fn_words
from .markdown import name, num, table
from .mib import mib_lines
from .report_md import _sanity_section

EDGE_ROWS = 5  # rows per receiver kind

EDGE_REPORT_VERSION = 1


def edge_report(result: EdgeResult, *, model: str, task: str, tokens: list[str] | None = None) -> dict:
    """``tokens``: one label per position (the token, or its role), shown with per-position edges."""
    c: EdgeConfig = result.config
    return {
        "version": EDGE_REPORT_VERSION, "kind": "edges", "model": model, "model_class": result.model, "task": task,
        "n_prompts": result.n_prompts, "n_edges": result.n_edges, "positions": c.positions, "tokens": tokens,
        "options": config_dict(c),
        "directions": list(c.directions), "metric": c.metric, "metrics": list(c.metrics), "estimator": c.estimator,
        "clean_metric": result.clean_metric, "corrupt_metric": result.corrupt_metric,
        "edges": result.edges, "agreement": result.agreement, "false_negatives": result.false_negatives,
        "circuit": {k: v for k, v in result.circuit.items() if k != "edges"}, "timing": result.timing,
        "attribution_cost": {d: s.passes for d, s in result.scores.items()},  # batch_size: an out-of-memory retry's
        "sanity": result.sanity, **({"mib": result.mib} if result.mib else {}),
        "ablation": None if c.ablation is None else ablation_label(c.ablation),
    }


def edge_rows(entries: list[dict], metrics) -> list[dict]:
    """One row per verified edge x direction x metric."""
    return [{"direction": e["direction"], "sender": e["sender"], "receiver": e["receiver"], "pos": e.get("pos"),
             "selected": e["selected"],
             "metric": m, "approx": e["approx_metrics"][m], "exact": e["exact_metrics"][m],
             "exact_norm": e["exact_norm"][m], "rank_approx": e["rank_approx"], "rank_exact": e["rank_exact"],
             "flags": ";".join(e["flags"])} for e in entries for m in metrics]


def write_edge_scores(path: Path, result: EdgeResult) -> None:
    tensors, graph = {}, None
    for direction, scores in result.scores.items():
        graph = scores.graph
        for m, t in scores.values.items():
            tensors[f"{direction}/{m}"] = t.float().contiguous()
        for m, t in (scores.by_position or {}).items():
            tensors[f"pos/{direction}/{m}"] = t.float().contiguous()  # [sender, receiver, pos]
        if scores.position_top is not None:  # only the top-K kept: flat [sender, receiver, pos] indices
            tensors[f"top/{direction}/index"] = scores.position_top.index.contiguous()
            for m, t in scores.position_top.value.items():
                tensors[f"top/{direction}/{m}"] = t.float().contiguous()
    meta = {"axes": "sender receiver", "senders": json.dumps([s.name for s in graph.senders]),
            "receivers": json.dumps([r.name for r in graph.receivers]), "note": "EAP scores, mean over prompts; "
            "zero where no edge exists"}
    data = safetensors_bytes(tensors, meta)
    write_atomic(path, lambda f: f.write(data), binary=True)


def write_edges(out: Path, result: EdgeResult, *, model_name: str, task: str, prompt_selection: dict | None = None,
                tokens: list[str] | None = None) -> dict:
    """Write report.json, report.md, circuit.json, results.csv and edge_scores.safetensors into ``out``;
    prompt_selection: how the prompts were chosen (prompts.prepare_pairs), recorded in the report; tokens: a
    label per position (inputs/alignment.position_labels)."""
    out = Path(out)
    report = {**edge_report(result, model=model_name, task=task, tokens=tokens), "prompt_selection": prompt_selection}
    write_json(out / "report.json", report)
    write_json(out / "circuit.json", result.circuit)
    write_csv(out / "results.csv", edge_rows(result.edges, result.config.metrics))
    write_edge_scores(out / "edge_scores.safetensors", result)
    write_atomic(out / "report.md", lambda f: f.write("\n".join(edge_summary(report)) + "\n"))
    return report


def edge_summary(report: dict) -> list[str]:
    """report.md of an edge screen: the clean-run check (read first when it warns), agreement per direction,
    the circuit."""
    lines = [f"# Edge screen: {report['model']} on {report['task']}", "",
             f"{report['n_prompts']} prompt pairs, {report['n_edges']} {_edge_words(report)} scored by "
             f"{report['estimator']}{_ablation_words(report)}.", ""]
    lines += _sanity_section(report.get("sanity") or {})
    lines += ["## Approximation vs exact edge patching", ""]
    for d in report["directions"]:
        a = report["agreement"][d][report["metric"]]
        fn = report["false_negatives"][d]
        lines.append(f"- {d}: {len(report['edges']) // len(report['directions'])} edges verified; Pearson "
                     f"{a['pearson']:.3f}, Spearman {a['spearman']:.3f}, sign agreement {a['sign_agreement']:.2f}, "
                     f"recall@{a['k']} {a['recall_at_k']:.2f}. False negatives: {fn_words(fn)}.")
    lines += [""] + _top_edges(report) + control_edges(report)
    c = report["circuit"]
    lines += ["## Circuit", "", f"CPR {c['cpr']:.3f}, CMD {c['cmd']:.3f}; the smallest circuit with faithfulness "
              f">= {c['threshold']}: {c['smallest_faithful']} edges (circuit.json, figures/). Faithfulness "
              "(0 = corrupt, 1 = clean) of the top edges by |score|, every other edge corrupted"
              f"{_curve_cost(report)}:", ""]
    lines += table(["edges", *map(str, c["sizes"])], [["faithfulness", *(
        "n/a" if f is None else f"{round(f, 2) + 0.0:.2f}" for f in c["faithfulness"])]])
    return lines + ([""] + mib_lines(report["mib"]) if report.get("mib") else [])


def _edge_words(report: dict) -> str:
    """'edges', or what a per-position edge is."""
    if report.get("positions") != "each":
        return "edges"
    return ("per-position edges (sender@p->receiver@p: receiver B reads A's write at its own position p; a k/v "
            "receiver's p is the key position, reaching queries p' >= p through attention)")


def _ablation_words(report: dict) -> str:
    """', against mean ablation (...)' when the senders' source is an ablation of the clean run."""
    if not report.get("ablation"):
        return ""
    return (f", against {report['ablation'].replace('_', ' ')} of the clean run (noising: each edge's sender "
            "replaced by its ablated value; the corrupt run's gap is the unit of scale only)")


def receiver_kind(receiver: str) -> str:
    """logits, mlp, or a head's q / k / v input."""
    return receiver.rsplit(".", 1)[-1] if "." in receiver else receiver


def _top_edges(report: dict) -> list[str]:
    """The verified edges with the largest |exact| per receiver kind, the first direction's, and the random
    controls among them marked."""
    d = report["directions"][0]
    edges = sorted((e for e in report["edges"] if e["direction"] == d and e["exact"] is not None),
                   key=lambda e: -abs(e["exact"]))
    kinds: dict[str, list] = {}
    for e in edges:
        kinds.setdefault(receiver_kind(e["receiver"]), []).append(e)
    lines = [f"## Top edges by exact effect ({d}), per receiver kind", "",
             "Rank within the verified edges of the run; `control`: drawn at random, not by the estimator; "
             "[95% CI]: bootstrap over prompt pairs.", ""]
    for kind, rows in kinds.items():
        lines += [f"### into {kind}", ""]
        lines += table(["edge", report["estimator"], "exact [95% CI]", "rank: score / exact", "selected", "flags"],
                       [[name(e, report.get("tokens")), num(e["approx"]), exact_text(e),
                         f"{e['rank_approx']} / {e['rank_exact']}", e["selected"], ", ".join(e["flags"]) or "-"]
                        for e in rows[:EDGE_ROWS]])
    return lines


def exact_text(e: dict) -> str:
    """An edge's exact effect with its bootstrap interval over prompt pairs (none in reports before it)."""
    low, high = e.get("exact_ci") or (None, None)
    return num(e["exact"]) + ("" if low is None else f" [{num(low)}, {num(high)}]")


def control_edges(report: dict) -> list[str]:
    """Per direction: the random control edges (drawn outside the top-k), the largest of them by |exact|, and
    how many beat the weakest top-k edge: where the estimator's ranking missed something."""
    lines = ["## Control edges", "", "Edges drawn at random from those outside the estimator's top-k, verified "
             "as the top-k were: an estimate of what the ranking leaves out.", ""]
    for d in report["directions"]:
        mine = [e for e in report["edges"] if e["direction"] == d and e["exact"] is not None]
        controls = sorted((e for e in mine if e["selected"] == "control"), key=lambda e: -abs(e["exact"]))
        top = [abs(e["exact"]) for e in mine if e["selected"] == "top"]
        if not controls:
            lines += [f"- {d}: no control edges (--random-k 0).", ""]
            continue
        weakest = min(top, default=0.0)
        beat = sum(abs(e["exact"]) > weakest for e in controls)
        lines += [f"- {d}: {len(controls)} controls; the largest |exact| {abs(controls[0]['exact']):.3g} "
                  f"({name(controls[0], report.get('tokens'))}); {beat} beat the weakest top-{len(top)} edge (|exact| {weakest:.3g}).", ""]
        lines += table(["control edge", report["estimator"], "exact [95% CI]", "rank: score / exact"],
                       [[name(e, report.get("tokens")), num(e["approx"]), exact_text(e),
                         f"{e['rank_approx']} / {e['rank_exact']}"] for e in controls[:EDGE_ROWS]])
    return lines


def _curve_cost(report: dict) -> str:
    """`` (N patched copies, S s)`` of the faithfulness curve, from report.json's circuit and timing."""
    c, seconds = report["circuit"], report.get("timing", {}).get("circuit_s")
    if seconds is None or "forward_equivalents" not in c:
        return ""
    return f" ({c['forward_equivalents']:.1f} forward-equivalents of patched passes, {seconds:.1f} s)"
