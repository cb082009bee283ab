"""The memory plan of an edges run (``attrpatch edges``, edge_screening.py), traced as planning.py traces a
screen: attrpatch's own edge code on a model whose weights are on the meta device, under engine/memory.py's
tracker; on a real model and batch the same function measures instead. ``attrpatch plan --edges`` adds its
phases to the screen's plan.

Traced, through the functions the edges run calls, with its arguments (edge_screening.screen_edges):
  edges          methods/edges.attribute_edges on every prompt (--batch-size chunks), for the first
                 direction: the source run, the deltas of every sender [sender, batch, pos, d_model] (the
                 largest buffer at width), the receiving run with grad and one backward per metric.
  edge_patching  methods/edges/patching.patch_edges of the verified edges (top-k + control sample) on every
                 prompt, --copies edge sets per pass (default: the device's rows, as the run takes them).
  per position   with ``positions="each"`` (``attrpatch edges --positions each``; ``attrpatch plan --edges
                 --positions each``) the edges phase holds the [sender, receiver, pos] score table per
                 metric too, S x R x n_pos x 4 B (methods/edges/positions.py; GPT-2 small at 64 tokens, 4
                 metrics: 72 MB), or above 1 GiB its top-K and pool only (position_top.py: (K + pool) x 12 B
                 per metric, plus one receiver group's [sender, unit, pos] products), and edge patching
                 verifies per-position edges (each receiver's mask [copy, sender, pos]: the same deltas as a
                 whole edge's).

Not traced, or traced differently from a real run:
  - The prompts are synthetic, as in planning.py (full length, no shared prefix).
  - Which edges are verified depends on the scores: the plan verifies as many, chosen by the library's
    ranking (analysis/ranking.top_k and control_sample) from seeded random scores.
  - The faithfulness curve (methods/edges/circuits.py: one circuit per pass, holding every sender's
    write [sender, batch, pos, d_model], as large as EAP's deltas, without EAP's gradients) and the
    evidence (activation changes, attention statistics: one forward each).
"""

from dataclasses import replace

import torch
from torch import nn

from .analysis.ranking import control_sample, top_k
from .config import EdgeConfig, with_primary_metric
from .engine.memory import MemoryTracker, fused_attention
from .inputs.batch import PromptBatch
from .methods.edges.eap import attribute_edges
from .methods.edges.graph import EdgeModel
from .methods.edges.patching import patch_edges
from .methods.edges.positions import position_edges
from .methods.patching.passes import DEFAULT_ROWS
from .model import hf_compat
from .model.sites import as_spec
from .planning import halves, meta_model, name_devices, size_text, synthetic_batch

EDGE_PHASES = ("edges", "edge_patching")


def verified_edges(spec, config: EdgeConfig, n_pos: int) -> list:
    """As many edges as an edges run verifies (top-k and the control sample; per-position edges of ``n_pos``
    positions with ``config.positions`` each), ranked from seeded random scores: the plan has no scores to rank by."""
    graph = EdgeModel(spec).graph
    every = graph.edges() if config.positions == "all" else position_edges(graph, n_pos)
    g = torch.Generator().manual_seed(config.seed)
    top = top_k(torch.randn(len(every), generator=g), config.top_k)
    return [every[j] for j in top + control_sample(len(every), top, config.random_k, config.seed)]


def edge_copies(config: EdgeConfig, device: str, n_prompts: int) -> EdgeConfig:
    """``config`` with the edge sets per patched pass an edges run on ``device`` takes (methods/edges/patching.py)."""
    if config.copies is not None:
        return config
    chunk = min(config.batch_size or n_prompts, n_prompts)
    return replace(config, copies=max(1, DEFAULT_ROWS.get(torch.device(device).type, 256) // chunk))


def trace_edges(model: nn.Module, batch: PromptBatch, config: EdgeConfig, *,
                phases: tuple[str, ...] = EDGE_PHASES) -> dict:
    """The memory of an edges run's attribution ("edges") and edge patching ("edge_patching") of ``model``
    on ``batch`` (module docstring): planned on a meta model and batch, measured on real ones. Returns
    MemoryTracker.summary() with a "load" phase (the weights)."""
    spec = as_spec(model)
    direction = config.directions[0]
    chosen = verified_edges(spec, config, batch.n_pos) if "edge_patching" in phases else []  # not traced
    tracker = MemoryTracker(model)
    with fused_attention(), hf_compat.meta_autocast(), tracker:
        with tracker.phase("load"):
            pass
        if "edges" in phases:
            with tracker.phase("edges"):
                scores = attribute_edges(spec, batch, metrics=config.metrics, direction=direction,
                                         estimator=config.estimator, ig_steps=config.ig_steps,
                                         batch_size=config.batch_size, positions=config.positions == "each")
                del scores
        if "edge_patching" in phases:
            with tracker.phase("edge_patching"):
                effects = patch_edges(spec, batch, chosen, metrics=config.metrics, direction=direction,
                                      copies=config.copies, batch_size=config.batch_size)
                del effects
    return tracker.summary()


def plan_edges(model_config, config: EdgeConfig, *, n_prompts: int, seq_len: int, dtype: str = "float32",
               device: str = "cuda") -> dict:
    """The memory plan of ``attrpatch edges`` for the model of ``model_config`` on ``device``: as
    planning.plan_screen returns, with the phases "load", "edges" and "edge_patching", and "settings"."""
    model = meta_model(model_config, dtype)
    config = edge_copies(config, device, n_prompts)
    plan = trace_edges(model, synthetic_batch(n_prompts, seq_len), config)
    name_devices(plan, device)
    plan["settings"] = {"top_k": config.top_k, "random_k": config.random_k, "estimator": config.estimator,
                        "positions": config.positions,
                        "batch_size": config.batch_size or n_prompts, "copies": config.copies,
                        "metrics": list(config.metrics)}
    return plan


def edge_config(args) -> EdgeConfig:
    """The EdgeConfig ``attrpatch plan --edges`` plans: an edges run's defaults (top 50 + 30 control edges,
    EAP) with the plan's --metric, graded --metrics, --direction, --batch-size, --copies, --seed, EAP-IG
    for --estimator ig, and per-position edges for --positions each."""
    from .engine.metrics import graded
    return with_primary_metric(EdgeConfig(
        metric=args.metric, metrics=tuple(graded(args.metrics)), direction=args.direction or "both",
        estimator="ig" if args.estimator == "ig" else "atp", ig_steps=args.ig_steps, seed=args.seed,
        batch_size=args.batch_size, copies=args.copies, positions="each" if args.positions == "each" else "all"))


def add_edges(plan: dict, edges: dict) -> dict:
    """A screen's plan with an edges run's phases added (``plan["settings"]["edges"]``: its settings); the peak,
    devices and largest buffer are over both."""
    for name in EDGE_PHASES:
        if name in edges["phases"]:
            plan["phases"][name] = edges["phases"][name]
    plan["peak_bytes"] = max(plan["peak_bytes"], edges["peak_bytes"])
    for device, peak in edges["devices"].items():
        plan["devices"][device] = max(plan["devices"].get(device, 0), peak)
    if edges.get("largest") and (not plan.get("largest") or edges["largest"]["bytes"] > plan["largest"]["bytes"]):
        plan["largest"] = edges["largest"]
    plan["settings"]["edges"] = edges["settings"]
    return plan


def fit_edges(model_config, config: EdgeConfig, *, n_prompts: int, seq_len: int, max_memory: int,
              dtype: str = "float32", device: str = "cuda") -> tuple[EdgeConfig, dict]:
    """``config`` with the --batch-size and --copies that fit ``max_memory`` by the plan, and the plan with
    its choice in ``plan["chosen"]``: attribution (edges) tries halved batch sizes; edge patching halved
    copies, then halved batch sizes at one copy. Raises ValueError when nothing tried fits."""
    model, batch = meta_model(model_config, dtype), synthetic_batch(n_prompts, seq_len)
    config = edge_copies(config, device, n_prompts)
    plan = name_devices(trace_edges(model, batch, config), device)
    plan["max_memory"], plan["fits"] = max_memory, plan["peak_bytes"] <= max_memory
    if plan["weights_bytes"] > max_memory:
        raise ValueError(f"--max-memory {size_text(max_memory)}: the weights alone take "
                         f"{size_text(plan['weights_bytes'])}; spread them with --device-map auto")
    n = config.batch_size or n_prompts
    chosen = {"batch_size": n, "copies": config.copies, "low_memory": False}
    if plan["phases"]["edges"]["peak_bytes"] > max_memory:
        tries = [{"batch_size": b} for b in halves(n)[1:]]
        chosen["batch_size"] = _first_fit(model, batch, config, "edges", tries, max_memory)["batch_size"]
    if plan["phases"]["edge_patching"]["peak_bytes"] > max_memory:
        tries = [{"copies": c} for c in halves(config.copies)[1:]]
        tries += [{"copies": 1, "batch_size": b} for b in halves(n)[1:]]
        found = _first_fit(model, batch, config, "edge_patching", tries, max_memory)
        chosen["copies"] = found["copies"]
        chosen["batch_size"] = min(chosen["batch_size"], found.get("batch_size", n))
    plan["chosen"] = chosen
    return replace(config, batch_size=chosen["batch_size"], copies=chosen["copies"]), plan


def _first_fit(model, batch, config: EdgeConfig, phase: str, tries: list[dict], max_memory: int) -> dict:
    """The first of ``tries`` (changes to ``config``) whose ``phase`` fits ``max_memory``."""
    peaks = []
    for change in tries:
        peak = trace_edges(model, batch, replace(config, **change), phases=(phase,))["peak_bytes"]
        if peak <= max_memory:
            return change
        peaks.append(peak)
    raise ValueError(f"--max-memory {size_text(max_memory)}: the {phase} phase of this edges run does not fit in any "
                     f"setting tried (the least: {size_text(min(peaks, default=0))}); use --device-map auto, fewer "
                     "prompts, or a larger limit")
