"""Exact patching of many large edge sets at once (a faithfulness curve's circuits), given as dense masks.

Each item is a [sender, receiver] 0/1 mask of the edges patched jointly, with patching.py's definition:

    delta_B(copy c) = sum_A mask_c[A, B] (a_A(source) - a_A(copy c))  =  mask_c[:, B] . W_c
    W_c[A]          = a_A(source) - a_A(copy c)                       [sender, batch, pos, d_model]

patching.py's writer folds each receiver's mask into the heads before W_O: one [rows, d_model] x
[d_model, d_model] product per receiver and sender layer. When most receivers are patched from most
senders, as in a circuit curve (every edge outside the circuit), that is ~20 forwards of work per copy on
SmolLM2. Here W_c is filled as the pass computes each sender (the heads projected once, as EAP's deltas),
and the receivers of one layer read it in one product, [receiver, sender] @ [sender, batch * pos * d_model]:
about one forward of work per copy. The same sums in another order: equal to float rounding.

Per-position circuits (positions.py) give masks [item, sender, receiver, pos]: receiver B at p reads
mask_c[:, B, p] . W_c[:, :, p], one product per position (the same work).

Cost: the forwards of the copies (resumed at the earliest patched receiver's block) plus, per copy, that
product per layer. Memory: W for every copy of a pass, [copy, sender, batch, pos, d_model] in the model's
dtype: EAP's largest buffer (eap.py) once per copy, hence one copy per pass by default; the masks, bool.
"""

from typing import Sequence

import torch
from torch import Tensor, nn

from ...engine.hooks import batch_pos, call_input, eval_mode, hooked
from ...engine.metrics import check_metric, wide
from ...engine.partial import run_blocks
from ...inputs.batch import PromptBatch
from ...inputs.directions import check_direction
from ...model.sites import ModelSpec, as_spec
from .graph import EdgeModel
from .patching import EdgeEffects, _at_last, _Pass, _Writer
from .sources import ablation_means, check_edge_ablation
from .writes import head_deltas


def patch_circuits(model: nn.Module | ModelSpec, batch: PromptBatch, masks: Tensor, *,
                   metrics: Sequence[str] = ("logit_diff",), direction: str = "noise", copies: int = 1,
                   batch_size: int | None = None, ablation: str | None = None) -> EdgeEffects:
    """Exact effect of patching, jointly, the edges of each mask in ``masks`` [item, sender, receiver] (bool;
    entries where ``graph.exists`` is False are ignored), or of the per-position edges of each mask
    [item, sender, receiver, pos]. ``items`` of the result are the item indices. ``ablation``: as
    patching.patch_edges's."""
    spec = as_spec(model)
    em = EdgeModel(spec)
    graph, metrics = em.graph, list(dict.fromkeys(metrics))
    check_direction(direction)
    for m in metrics:
        check_metric(m)
    shape = (len(graph.senders), len(graph.receivers))
    if masks.ndim not in (3, 4) or tuple(masks.shape[1:3]) != shape or masks.ndim == 4 and masks.shape[3] != batch.n_pos:
        raise ValueError(f"masks must be [item, sender, receiver] = [n, {shape[0]}, {shape[1]}] for {spec.name}, or "
                         f"[item, sender, receiver, pos] = [n, {shape[0]}, {shape[1]}, {batch.n_pos}] per position; "
                         f"got {tuple(masks.shape)}")
    masks = masks.bool() & (graph.exists if masks.ndim == 3 else graph.exists[..., None])
    check_edge_ablation(ablation, direction)
    batch = batch.to(spec.device)
    means = ablation_means(spec, batch, ablation, batch_size)
    sums = torch.zeros(len(masks), len(metrics), dtype=wide(next(spec.model.parameters()).dtype))
    receiver = {m: 0.0 for m in metrics}
    passes = {"patched_rows": 0.0, "forward_equivalents": 0.0}
    layers = torch.tensor([min(r.layer, spec.dims.n_layers - 1) for r in graph.receivers])
    patched = _patched(masks)  # [item, receiver]
    starts = [int(layers[row].min()) if row.any() else spec.dims.n_layers - 1 for row in patched]
    with eval_mode(spec.model), torch.no_grad():
        for chunk in batch.chunks(batch_size):
            p = _Pass(em, chunk, metrics, direction, ablation, means)
            effects, base = p.patch_groups(starts, lambda group, start: _run(p, masks[group], start),
                                           copies, True, passes)
            sums += effects.sum(-1).cpu()
            for m in metrics:
                receiver[m] += base[m]
    return EdgeEffects(items=list(range(len(masks))), metrics=metrics, values=sums / batch.n, direction=direction,
                       receiver_metric={m: v / batch.n for m, v in receiver.items()}, passes=passes)


def _run(p: _Pass, masks: Tensor, start: int) -> Tensor:
    """Last-token logits [copy * batch, vocab] of one pass, copy c patching ``masks[c]`` [sender, receiver]."""
    n, b = len(masks), p.batch
    writer = _SharedWriter(p.em, p.source, p.receiver, n, b, masks, start)
    receivers = _patched(masks).any(0).nonzero().flatten().tolist()
    hooks = writer.fill_hooks() + writer.hooks({j: masks[:, :, j].float() for j in receivers})
    with hooked(hooks):
        hidden = call_input(*p.calls[start])[0]
        return run_blocks(p.em.spec, start, hidden.repeat(n, 1, 1), p.calls, n, b.n, b.last)


def _patched(masks: Tensor) -> Tensor:
    """[item, receiver]: whether each item patches the receiver (from any sender, at any position)."""
    out = masks.any(1)  # [item, receiver(, pos)]
    return out.any(-1) if out.ndim == 3 else out


class _SharedWriter(_Writer):
    """patching.py's writer, with every sender's W_c kept for the pass and each layer's receivers' deltas
    computed together."""

    def __init__(self, em: EdgeModel, source: dict, receiver: dict, n: int, batch: PromptBatch, masks: Tensor,
                 start: int):
        super().__init__(em, source, receiver, {}, n, batch)
        self.masks, self.start, self.ready = masks, start, {}
        self.pending: dict[int, Tensor] = {}  # post-norm: a layer's z until its o arrives
        d = em.spec.dims
        like = source[("embed",)]
        self.w = torch.zeros(n, len(em.graph.senders), batch.n, batch.n_pos, d.d_model, dtype=like.dtype,
                             device=like.device)  # [copy, sender, batch, pos, d_model]
        for key in em.sender_points():  # senders before the pass: the receiving run's, the same in every copy
            if key[0] == "embed" and start > 0 or key[0] != "embed" and key[1] < start:
                self._fill(key, receiver[key][None])

    def _fill(self, key: tuple, now: Tensor) -> None:
        """W of the senders under ``key`` from their value ``now`` [copy | 1, batch, pos | 1, ...] in this pass."""
        graph, source = self.em.graph, self.source[key][None]
        if now.shape[2] == 1 and source.shape[2] > 1:  # the final MLP, computed at the last position only
            source = _at_last(source, self.batch.last)
        if key[0] == "z" and self.em.post_norm:  # the heads' writes need o, which comes next (writes.py)
            self.pending[key[1]] = now
            return
        if key[0] in ("z", "o"):  # [copy, batch, pos, head, d_head] -> [copy, head, batch, pos, d_model]
            now = {("z", key[1]): self.pending.pop(key[1]), key: now} if key[0] == "o" else {key: now}
            at = graph.sender_index[f"L{key[1]}H0"]
            value = head_deltas(self.em, key[1], {k: self.source[k][None] for k in now}, now).movedim(0, 1)
            cols = slice(at, at + graph.n_heads)
        else:
            diff = source - now
            at = 0 if key[0] == "embed" else graph.sender_index[f"L{key[1]}.mlp"]
            value, cols = diff[:, None], slice(at, at + 1)
        if value.shape[3] == self.batch.n_pos:
            self.w[:, cols] = value.to(self.w.dtype)
        else:  # one position: each prompt's last
            rows = torch.arange(self.batch.n, device=self.w.device)
            self.w[:, cols, rows, self.batch.last] = value[:, :, :, 0].to(self.w.dtype)  # [copy, sender, batch, d]

    def fill_hooks(self) -> list:
        def fill(key, point):
            def callback(raw):
                value = point.read(raw, *batch_pos(raw, self.batch.n_pos))
                self._fill(key, value.unflatten(0, (self.n, value.shape[0] // self.n)))
            return callback
        return [(point, fill(key, point)) for key, point in self.em.sender_points(self.start).items()]

    def receiver_delta(self, j: int, mask: Tensor, copies: Tensor, last: bool = False) -> Tensor:
        if j not in self.ready:
            self._layer_deltas(j, last)
        return self.ready.pop(j)[copies]

    def _layer_deltas(self, j: int, last: bool) -> None:
        """The deltas [copy, batch, pos | 1, d_model] of every patched receiver read at the same point as
        receiver j (the q/k/v of its layer; an MLP or the logits alone), in one product."""
        graph = self.em.graph
        r = graph.receivers[j]
        if r.kind in ("mlp", "logits"):
            group = [j]
        else:
            group = [i for i, o in enumerate(graph.receivers) if o.layer == r.layer and o.kind in ("q", "k", "v")
                     and bool(self.masks[:, :, i].any())]
        n_before = graph.n_before[j]
        w = self.w[:, :n_before]  # [copy, sender, batch, pos, d_model]
        if last:  # each prompt's last position: [copy, sender, batch, 1, d_model]
            w = w[:, :, torch.arange(self.batch.n, device=w.device), self.batch.last][:, :, :, None]
        m = self.masks[:, :n_before, group].to(w.device, w.dtype)  # [copy, sender, receiver(, pos)]
        if m.ndim == 4 and last:  # per position, at each prompt's last
            m = m[..., self.batch.last.to(m.device)]  # [copy, sender, receiver, batch]
            deltas = torch.einsum("csrb,csbd->crbd", m, w[:, :, :, 0])[:, :, :, None]
        elif m.ndim == 4:
            deltas = torch.einsum("csrp,csbpd->crbpd", m, w)  # [copy, receiver, batch, pos, d_model]
        else:
            deltas = (m.transpose(1, 2) @ w.flatten(2)).unflatten(2, w.shape[2:])  # [copy, receiver, batch, pos | 1, d_model]
        for k, i in enumerate(group):
            self.ready[i] = deltas[:, k]


def outside_circuits(exists: Tensor, order: Sequence[int], sizes: Sequence[int]) -> Tensor:
    """[size, sender, receiver] bool: the edges outside each circuit of the top-n edges, n in ``sizes``;
    ``order``: every edge index (``graph.edges()`` order) by rank, ``exists``: graph.exists."""
    rank = torch.empty(len(order), dtype=torch.long)
    rank[torch.as_tensor(list(order), dtype=torch.long)] = torch.arange(len(order))
    masks = torch.zeros(len(sizes), *exists.shape, dtype=torch.bool)
    masks[:, exists] = rank[None, :] >= torch.as_tensor(list(sizes), dtype=torch.long)[:, None]  # [size, edge]
    return masks
