"""Exact edge patching (path patching): the ground truth edge scores approximate (definitions: eap.py).

    exact(E) = metric(receiving run, every receiver B of the edge set E computed from
                      input_B + sum over A with (A -> B) in E of a_A(source) - a_A(this run))
               - metric(receiving run), mean over prompts

Per-position edges (positions.py) are patched the same way at their position only: receiver B at p reads
input_B[p] + the sum over A with (A@p -> B@p) in E; a whole edge is every position of it.

A sender's value "in this run" is its value in the patched run itself: for a single edge it is the
receiving run's (nothing before B changes); for a joint set it follows the other patches, so patching every
edge (an empty circuit) turns the receiving run into the source run exactly.

How B is computed from a changed input: q, k, v of one head are that head's columns of the projection,
applied to norm(input_B + delta) and written over the head's slice of the projection's output; an MLP reads
norm(input_B + delta) at its own input (a norm shared with the attention keeps its output there); the logits
read input_B + delta through the final norm's input. Batched and resumed like node patching
(patching/exact.py): one edge set per copy of the prompt batch, each pass starting at the block of its earliest
receiver from the receiver's recorded block input. ``resume=False, copies=1`` is one full forward per set.
A pass that runs out of memory is retried as two of half its copies, as in node patching.
"""

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from ...engine.forward import block_calls, forward_last
from ...engine.hooks import batch_pos, call_input, eval_mode, hooked, record
from ...engine.metrics import Target, check_metric, metric, wide
from ...engine.partial import run_blocks
from ...inputs.batch import PromptBatch
from ...inputs.directions import check_direction, clean_and_corrupt
from ...model.sites import ModelSpec, as_spec
from ..halving import halve
from ..patching.passes import DEFAULT_ROWS
from .graph import Edge, EdgeModel, Node
from .positions import PositionEdge, position_index
from .sources import ablated_source, ablation_means, check_edge_ablation
from .writes import weighted_delta

EdgeSet = Edge | PositionEdge | tuple[Edge | PositionEdge, ...]  # a tuple is patched jointly, in one copy


@dataclass
class EdgeEffects:
    """Exact effects. ``values``: [item, metric] float32 (float64 for float64 models), mean over prompts;
    ``per_prompt``: [item, metric, batch] when asked for (the bootstrap's input, analysis/intervals.py)."""

    items: list[EdgeSet]
    metrics: list[str]
    values: Tensor
    direction: str
    receiver_metric: dict[str, float]
    passes: dict[str, float] = field(default_factory=dict)
    per_prompt: Tensor | None = None

    def effect(self, item: EdgeSet, metric_name: str) -> float:
        return float(self.values[self.items.index(item), self.metrics.index(metric_name)])


def _members(item: EdgeSet) -> tuple[Edge | PositionEdge, ...]:
    return item if isinstance(item, tuple) else (item,)


def _index(em: EdgeModel, edge: Edge | PositionEdge, n_pos: int) -> tuple[int, int, int | None]:
    """(sender, receiver, pos) of a per-position edge; pos None (every position) for a whole edge."""
    if isinstance(edge, PositionEdge):
        return position_index(em.graph, edge, n_pos)
    if not isinstance(edge, Edge):
        raise TypeError(f"edge sets hold Edge or PositionEdge, got {type(edge).__name__} {edge!r}; e.g. "
                        "Edge(\"L0H1\", \"L2H3.k\") or PositionEdge(\"L0H1\", \"L2H3.k\", 4)")
    return (*em.graph.index(edge), None)


def patch_edges(model: nn.Module | ModelSpec, batch: PromptBatch, items: Sequence[EdgeSet], *,
                metrics: Sequence[str] = ("logit_diff",), direction: str = "denoise", copies: int | None = None,
                resume: bool = True, batch_size: int | None = None, per_prompt: bool = False,
                ablation: str | None = None) -> EdgeEffects:
    """Exact effect of patching each of ``items`` (an Edge or a PositionEdge, or a tuple of them patched
    jointly); per prompt
    too with ``per_prompt``; ``ablation`` (zero | mean, noising): the senders' values from that ablation of
    the clean run instead of the corrupt run (sources.py)."""
    spec = as_spec(model)
    em = EdgeModel(spec)
    items, metrics = list(items), list(dict.fromkeys(metrics))
    check_direction(direction)
    for m in metrics:
        check_metric(m)
    sets = [[_index(em, e, batch.n_pos) for e in _members(item)] for item in items]  # validates every edge
    check_edge_ablation(ablation, direction)
    batch = batch.to(spec.device)
    means = ablation_means(spec, batch, ablation, batch_size)
    acc = wide(next(spec.model.parameters()).dtype)
    sums = torch.zeros(len(items), len(metrics), dtype=acc)
    receiver = {m: 0.0 for m in metrics}
    passes = {"patched_rows": 0.0, "forward_equivalents": 0.0}
    prompts = []  # [item, metric, chunk] per chunk, with per_prompt
    with eval_mode(spec.model), torch.no_grad():
        for chunk in batch.chunks(batch_size):
            n_copies = copies or max(1, DEFAULT_ROWS.get(spec.device.type, 256) // chunk.n)
            effects, base = _Pass(em, chunk, metrics, direction, ablation, means).patch(sets, n_copies, resume, passes)
            sums += effects.sum(-1).cpu()
            prompts += [effects.cpu()] if per_prompt else []
            for m in metrics:
                receiver[m] += base[m]
    return EdgeEffects(items=items, metrics=metrics, values=sums / batch.n, direction=direction,
                       receiver_metric={m: v / batch.n for m, v in receiver.items()}, passes=passes,
                       per_prompt=torch.cat(prompts, -1) if per_prompt else None)


class _Pass:
    """One chunk of prompts: the source and receiving runs, then the patched passes."""

    def __init__(self, em: EdgeModel, batch: PromptBatch, metrics: list[str], direction: str,
                 ablation: str | None = None, means: dict | None = None):
        self.em, self.batch, self.metrics = em, batch, metrics
        spec, n_pos = em.spec, batch.n_pos
        source_run, self.receiver_run = batch.runs(direction)
        self.source, self.receiver = {}, {}
        with hooked(record(em.sender_points(), self.source, n_pos)):
            source_logits = forward_last(spec, source_run, batch.mask, batch.last)
        with block_calls(spec) as self.calls, hooked(record(em.sender_points(), self.receiver, n_pos)):
            receiver_logits = forward_last(spec, self.receiver_run, batch.mask, batch.last)
        if ablation is not None:  # noising: the receiving run is the clean run
            self.source = ablated_source(self.receiver, ablation, means)
        clean, _ = clean_and_corrupt(direction, source_logits, receiver_logits)
        self.target = Target.from_clean(batch.answer, batch.wrong, clean)
        self.base = {m: metric(m, receiver_logits, self.target) for m in metrics}  # [batch]

    def patch(self, sets: list[list[tuple[int, int, int | None]]], copies: int, resume: bool, passes: dict):
        """Effects [item, metric, batch] of every edge set, and the receiving run's summed metrics."""
        graph, n_layers = self.em.graph, self.em.spec.dims.n_layers
        starts = [min((min(graph.receivers[j].layer, n_layers - 1) for _, j, _ in s), default=n_layers - 1)
                  for s in sets]
        return self.patch_groups(starts, lambda group, start: self._run([sets[i] for i in group], start, resume),
                                 copies, resume, passes)

    def patch_groups(self, starts: list[int], run, copies: int, resume: bool, passes: dict):
        """Effects [item, metric, batch] of items whose passes start at ``starts`` (one per item), ``copies``
        items per pass, ``run(group, start)`` giving a pass's last-token logits; and the receiving run's
        summed metrics."""
        n_layers = self.em.spec.dims.n_layers
        order = sorted(range(len(starts)), key=lambda i: (starts[i], i))
        effects = torch.zeros(len(starts), len(self.metrics), self.batch.n, dtype=wide(self.base[self.metrics[0]].dtype),
                              device=self.batch.clean.device)
        groups: list[list[int]] = []
        for i in order:  # a pass never spans start blocks
            if groups and starts[groups[-1][0]] == starts[i] and len(groups[-1]) < copies:
                groups[-1].append(i)
            else:
                groups.append([i])
        while groups:
            group = groups.pop(0)
            start = starts[group[0]] if resume else 0
            try:
                logits = run(group, start)
            except torch.OutOfMemoryError:
                if len(group) == 1:
                    raise
                what = f"patching {len(group)} edge sets x {self.batch.n} prompts"
                groups[:0] = halve(group, what, self.em.spec.device)
                continue
            n = len(group)
            passes["patched_rows"] += n
            passes["forward_equivalents"] += n * (n_layers - start) / n_layers
            for k, m in enumerate(self.metrics):
                patched = metric(m, logits, self.target.repeat(n)).view(n, self.batch.n)
                effects[group, k] = (patched - self.base[m]).to(effects.dtype)
        return effects, {m: float(v.sum()) for m, v in self.base.items()}

    def _run(self, sets: list[list[tuple[int, int, int | None]]], start: int, resume: bool) -> Tensor:
        """Last-token logits [copy * batch, vocab] of one pass with copy c patching ``sets[c]``."""
        n, b = len(sets), self.batch
        graph = self.em.graph
        masks: dict[int, Tensor] = {}  # receiver -> [copy, sender, pos] 0/1
        for c, s in enumerate(sets):
            for i, j, p in s:
                mask = masks.setdefault(j, torch.zeros(n, len(graph.senders), b.n_pos))
                mask[c, i, slice(None) if p is None else p] = 1.0
        live: dict = {}
        writer = _Writer(self.em, self.source, self.receiver, live, n, b)
        hooks = record(self.em.sender_points(start if resume else 0), live, b.n_pos) + writer.hooks(masks)
        with hooked(hooks):
            if not resume:
                return forward_last(self.em.spec, self.receiver_run.repeat(n), b.mask.repeat(n, 1), b.last.repeat(n))
            hidden = call_input(*self.calls[start])[0]
            return run_blocks(self.em.spec, start, hidden.repeat(n, 1, 1), self.calls, n, b.n, b.last)


class _Writer:
    """The hooks that compute each patched receiver from its changed input, per copy."""

    def __init__(self, em: EdgeModel, source: dict, receiver: dict, live: dict, n: int, batch: PromptBatch):
        self.em, self.source, self.receiver, self.live, self.n, self.batch = em, source, receiver, live, n, batch

    def current(self, key, copies: Tensor) -> Tensor:
        """A sender activation in this pass, for ``copies``: [copy, batch, pos, ...] (broadcast over copies
        where it is the receiving run's, i.e. computed before the pass starts)."""
        if key not in self.live:
            return self.receiver[key][None]
        value = self.live[key]
        return value.unflatten(0, (self.n, value.shape[0] // self.n))[copies]

    def delta(self, mask: Tensor, copies: Tensor, last: bool = False) -> Tensor:
        """sum over the masked senders A of a_A(source) - a_A(this pass), at the masked positions:
        [copy, batch, pos, d_model] for the copies in ``copies`` (mask [copy, sender, pos]); at the last real
        position only ([copy, batch, 1, d_model]) when ``last``."""
        graph, d = self.em.graph, self.em.spec.dims
        m = mask[copies]
        total = 0.0
        for key, cols in _sender_columns(graph, d.n_layers):
            weights = m[:, cols]  # [copy, unit, pos]
            if not bool(weights.any()):
                continue
            keys = [key, ("o", key[1])] if key[0] == "z" and self.em.post_norm else [key]
            source = {k: self.source[k][None] for k in keys}
            now = {k: self.current(k, copies) for k in keys}
            if last:
                source = {k: _at_last(v, self.batch.last) for k, v in source.items()}
                now = {k: _at_last(v, self.batch.last) for k, v in now.items()}
                weights = weights[:, :, self.batch.last.to(weights.device)][..., None]  # [copy, unit, batch, 1]
            else:
                weights = weights[:, :, None]  # [copy, unit, 1, pos]
            weights = weights.to(now[key].device, now[key].dtype).movedim(1, -1)  # [copy, batch | 1, pos | 1, unit]
            if key[0] == "z":  # [copy, batch, pos, head, d_head] -> the masked heads' write
                part = weighted_delta(self.em, key[1], source, now, weights)
            else:
                part = (source[key] - now[key]) * weights  # [copy, batch | 1, pos | 1, 1]
            total = total + part
        return total

    def receiver_delta(self, j: int, mask: Tensor, copies: Tensor, last: bool = False) -> Tensor:
        """``delta`` for receiver ``j`` (whose mask is ``mask``); a writer may compute it with its layer's."""
        return self.delta(mask, copies, last)

    def hooks(self, masks: dict[int, Tensor]) -> list:
        graph, hooks, norm_in = self.em.graph, [], {}
        by_layer: dict = {}
        for j, mask in masks.items():
            r = graph.receivers[j]
            by_layer.setdefault((r.kind if r.kind in ("mlp", "logits") else "q", r.layer), []).append((j, mask))
        for (kind, layer), entries in by_layer.items():
            if kind == "logits":
                hooks.append((self.em.norm_point(kind, layer), self._norm_input(*entries[0], True)))
                continue
            hooks.append((self.em.norm_point(kind, layer), lambda raw, key=(kind, layer): norm_in.__setitem__(key, raw)))
            if kind == "mlp":
                hooks.append((self.em.mlp_point(layer), self._mlp_input(*entries[0], norm_in)))
                continue
            for j, mask in entries:
                hooks.append((self.em.spec.hook_point(graph.receivers[j].kind, layer), self._head_input(j, mask, norm_in)))
        return hooks

    def _patched_input(self, j: int, mask: Tensor, norm_in: dict, copies: Tensor) -> Tensor:
        """norm(input_B + delta) of receiver j's layer and kind, in ``copies``: [copy, batch, pos, d_model]."""
        r = self.em.graph.receivers[j]
        kind = "mlp" if r.kind == "mlp" else "q"
        x = norm_in[(kind, r.layer)]  # [copy * batch, pos, d_model], or OPT's MLP: [copy * batch * pos, d_model]
        x = x.reshape(self.n, self.batch.n, -1, x.shape[-1])[copies]  # [copy, batch, pos, d_model]
        return self.em.norm(kind, r.layer).forward(x + self.receiver_delta(j, mask, copies).to(x.dtype))

    def _head_input(self, j: int, mask: Tensor, norm_in: dict):
        """q, k or v of head r.unit recomputed from norm(input + delta) in the copies that patch it."""
        r = self.em.graph.receivers[j]
        point = self.em.spec.hook_point(r.kind, r.layer)
        w, bias = self.em.in_slices(r.kind, r.layer)
        copies = mask.flatten(1).any(1).nonzero().flatten()

        def callback(raw):
            normed = self._patched_input(j, mask, norm_in, copies)
            head = normed @ w[:, r.unit].to(normed.dtype) + bias[r.unit]
            new = raw.clone()
            rows, n_pos = batch_pos(new, self.batch.n_pos)
            view = point.read(new, rows, n_pos).unflatten(0, (self.n, rows // self.n))  # [copy, batch, pos, unit, d_head]
            view[copies, :, :, r.unit] = head.to(view.dtype)
            return new
        return callback

    def _mlp_input(self, j: int, mask: Tensor, norm_in: dict):
        """The MLP's input, norm(input_B + delta), in the copies that patch it (EdgeModel.mlp_point: a norm
        shared with the attention, as Phi's, keeps its output for the attention)."""
        copies = mask.flatten(1).any(1).nonzero().flatten()

        def callback(raw):
            new = raw.clone()
            view = new.view(self.n, self.batch.n, -1, new.shape[-1])  # [copy, batch, pos, d_model] (OPT: flattened)
            view[copies] = self._patched_input(j, mask, norm_in, copies).to(new.dtype)
            return new
        return callback

    def _norm_input(self, j: int, mask: Tensor, last: bool):
        """The final norm's input plus delta at the last real position, in the copies that patch it (the final
        norm sees [rows, d_model] in a resumed pass)."""
        copies = mask.flatten(1).any(1).nonzero().flatten()

        def callback(raw):
            delta = self.receiver_delta(j, mask, copies, last)  # [copy, batch, 1, d_model]
            new = raw.clone()
            view = new.unflatten(0, (self.n, new.shape[0] // self.n))  # [copy, batch, (pos), d_model]
            if new.ndim == 2:  # resumed: the final norm runs on the last positions only
                view[copies] += delta[:, :, 0].to(new.dtype)
                return new
            else:
                rows = torch.arange(self.batch.n, device=new.device)
                picked = view[copies][:, rows, self.batch.last] + delta[:, :, 0].to(new.dtype)
                view[copies[:, None], rows[None], self.batch.last[None]] = picked
            return new
        return callback


def _sender_columns(graph, n_layers: int):
    """(activation key, sender indices) of each sender group: the embeddings, each layer's heads, its MLP."""
    yield ("embed",), [0]
    for layer in range(n_layers):
        heads = [graph.sender_index[f"L{layer}H{h}"] for h in range(graph.n_heads)]
        yield ("z", layer), heads
        yield ("mlp", layer), [graph.sender_index[f"L{layer}.mlp"]]


def _at_last(t: Tensor, last: Tensor) -> Tensor:
    """[copy, batch, pos, ...] -> [copy, batch, 1, ...] at each prompt's last real position; a tensor with
    one position (the final block's MLP, computed on the last row only) is already there."""
    if t.shape[2] == 1:
        return t
    rows = torch.arange(t.shape[1], device=t.device)
    return t[:, rows, last.to(t.device)][:, :, None]
