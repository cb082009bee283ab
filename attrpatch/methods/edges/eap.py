"""Edges: attribution for every edge of a model from one backward pass (EAP, Syed et al. 2023; EAP-IG).

Definitions (docs/methods.md#edges; names in graph.py):
    sender A     writes into the residual stream: ``embed`` (block 0's input: token embeddings, plus GPT-2's
                 position embeddings), head ``LlHh`` (z_h @ W_O[h]: its slice of the output projection's
                 input times that slice of the projection; the bias belongs to no head), ``Ll.mlp`` (the MLP
                 module's output). Post-norm families (Gemma 2 and 3, OLMo 2): what the block adds, after the
                 output norm, a head's part at its run's norm scale (writes.py has the definitions)
    receiver B   reads it: ``LlHh.q`` per query head, ``LlHk.k`` and ``LlHk.v`` per key-value head (no
                 ungrouping), ``Ll.mlp``, ``logits``. input_B is the residual stream B reads, BEFORE its norm:
                 the input of the attention norm (q, k, v), the MLP norm (resid_mid) or the final norm
    edge A -> B  A is computed before B reads: A in an earlier layer, or a head of B's layer into B = Ll.mlp
                 (sequential blocks only: a parallel block's MLP reads beside its attention, graph.py)
    a_A(run)     A's write [batch, pos, d_model];   delta_A = a_A(source) - a_A(receiver)
    exact(A->B)  metric of the receiving run in which B is computed from input_B + a_A(source) - a_A(run),
                 a_A(run) being A's value in that same run; everything else (B's changed output included)
                 runs as usual; minus the receiving run's metric. Several edges patch jointly the same way.
                 (patching.py)
    score(A->B)  = sum over pos, d_model of delta_A * d metric / d input_B at the receiver, mean over
                 prompts (EAP). Scores out of A sum to A's node AtP score; into B, to input_B's score.
                 ``positions=True`` keeps the sum over pos undone too: per-position edges A@p -> B@p
                 (positions.py), [sender, receiver, pos] from the same products
    EAP-IG       the gradient averaged over the runs whose token embeddings lie on the line from receiver
                 to source (ig.py's midpoints); deltas from the plain runs.
    GIM          EAP with the receiving run's backward under GIM's rules (gim.py; ``relp_gim``: with RelP's
                 too); the receivers' norm VJPs then hold the norm scale constant as well.

Receiver gradients come from one backward: at each q/k/v projection output and each MLP / final norm
output, a tensor hook pulls the gradient back through the head's projection columns and the norm (its
vector-Jacobian product at the recorded norm input, one per receiver), giving d metric / d input_B.

Cost per chunk of prompts: EAP 2 forwards + 1 backward per metric, plus the products [senders x receivers x
batch x pos x d_model] (about 0.3 of a forward on GPT-2 small). Memory: the deltas of every sender,
(1 + L (H + 1)) x batch x pos x d_model floats (GPT-2 small, 8 x 64 tokens: 157 x 512 x 768 x 4 B = 0.25 GB;
Llama-3-8B, 1057 senders, 4 B per float: 17 MB per token, so 16 x 128 tokens take 35 GB: chunk prompts with
``batch_size``), plus the [senders, receivers] tables; with ``positions=True`` the [sender, receiver, pos]
tables too (positions.py: S x R x n_pos x 4 B per metric), or, above positions.MAX_TABLE_BYTES or with
``keep``, only the top ``keep`` by |score| and a seeded uniform pool (position_top.py). Post-norm families also
keep each layer's o [batch, pos, d_model] per run (writes.py) and form a layer's head deltas from two
[head, batch, pos, d_model] products, one per run, instead of one.
"""

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor, nn

from ...engine.forward import forward_last
from ...engine.hooks import batch_pos, eval_mode, hooked, record
from ...engine.metrics import check_metric, wide
from ...inputs.batch import PromptBatch
from ...inputs.directions import check_direction
from ...model.sites import ModelSpec, as_spec
from ..estimators import gim, relp
from ..estimators.gradients import Receiving
from ..estimators.ig import alphas, along
from ..halving import retried, run_chunks
from .graph import QKV, Edge, EdgeModel, Graph
from .position_top import DEFAULT_KEEP, PositionTop, TopKeeper, check_keep, draw_pool
from .positions import MAX_TABLE_BYTES, flat_positions, position_edges, position_products, table_bytes
from .sources import ablated_source, ablation_means, check_edge_ablation
from .writes import head_deltas

POOL_SIZE = 4096  # per-position edges drawn uniformly when only the top is kept: where controls come from
EDGE_ESTIMATORS = ("atp", "ig", "gim", "relp_gim", "relp_t4")  # EAP, EAP-IG, EAP under GIM's rules (RelP's; T = 4)
_RULES = {"gim": {}, "relp_gim": {"relp_rules": relp.DEFAULT_RULES},  # gim.modifying's options
          "relp_t4": {"rules": gim.RELP_T4_RULES, "relp_rules": relp.DEFAULT_RULES}}


@dataclass
class EdgeScores:
    """``values[metric]``: [sender, receiver] float32 (float64 for float64 models), mean over prompts, zero
    where no edge exists (``graph.exists``); ``by_position[metric]``: [sender, receiver, pos], the same
    scores per position (positions.py), when asked for (their sum over pos is ``values``); ``position_top``:
    their top-K and a uniform pool instead, when the table is too large (position_top.py)."""

    graph: Graph
    values: dict[str, Tensor]
    direction: str
    clean_metric: dict[str, float]
    corrupt_metric: dict[str, float]
    n_prompts: int
    estimator: str = "atp"
    passes: dict[str, int] = field(default_factory=dict)
    by_position: dict[str, Tensor] | None = None
    position_top: PositionTop | None = None

    def score(self, edge: Edge, metric_name: str) -> float:
        return float(self.values[metric_name][self.graph.index(edge)])

    def flat(self, metric_name: str) -> Tensor:
        """[edge] in ``graph.edges()`` order."""
        return self.graph.flat(self.values[metric_name])

    def position_flat(self, metric_name: str) -> Tensor:
        """[edge * pos] in ``position_edges()`` order (per-position scores only)."""
        return flat_positions(self.graph, self.by_position[metric_name])

    def position_edges(self) -> list:
        """Every per-position edge (positions.PositionEdge), in ``position_flat`` order."""
        return position_edges(self.graph, self.by_position[next(iter(self.by_position))].shape[-1])


def deltas(em: EdgeModel, source: dict, receiver: dict, mask: Tensor, dtype: torch.dtype) -> Tensor:
    """delta_A = a_A(source) - a_A(receiver) of every sender A, pads zeroed: [sender, batch, pos, d_model].

    source, receiver: sender activations as ``EdgeModel.sender_points`` keys them."""
    d = em.spec.dims
    embed = source[("embed",)] - receiver[("embed",)]  # [batch, pos, d_model]
    # filled in place, one sender group at a time: no model-dtype copy of the whole [sender, ..] tensor beside it
    out = torch.empty(1 + d.n_layers * (d.n_heads + 1), *embed.shape, dtype=dtype, device=embed.device)
    out[0] = embed
    for layer in range(d.n_layers):
        at = 1 + layer * (d.n_heads + 1)
        out[at:at + d.n_heads] = head_deltas(em, layer, source, receiver)
        out[at + d.n_heads] = source[("mlp", layer)] - receiver[("mlp", layer)]
    return out.mul_(mask[None, :, :, None].to(dtype))  # pads zeroed


def norm_vjp(norm: nn.Module, x: Tensor, grad: Tensor, frozen_scale: bool = False) -> Tensor:
    """d metric / d norm input, one per receiver: x [batch, pos, d_model], grad [unit, batch, pos, d_model]
    (the gradient at the norm's output through each receiver alone) -> [unit, batch, pos, d_model].
    frozen_scale: the norm's scale held constant (GIM's and RelP's norm rule, relp.norm_rule)."""
    with torch.enable_grad():
        xs = x.detach().expand(grad.shape[0], *x.shape).clone().requires_grad_(True)
        y = norm.forward(xs)  # .forward: no hooks
        (g,) = torch.autograd.grad(relp.norm_rule(norm, xs, y) if frozen_scale else y, xs, grad.to(x.dtype))
    return g


class _Scorer(Receiving):
    """One chunk of prompts: the source run, then receiving runs whose backward adds every edge's product
    delta_A . grad_B into ``values[metric]`` [sender, receiver] (runs, target and per-metric backward:
    gradients.Receiving, as the node estimators' Chunk)."""

    def __init__(self, em: EdgeModel, batch: PromptBatch, metrics: list[str], direction: str, values: dict,
                 by_position: dict | None = None, keeper: TopKeeper | None = None):
        super().__init__(batch, metrics, direction)
        self.em, self.values, self.acc = em, values, next(iter(values.values())).dtype
        self.by_position = by_position  # {metric: [sender, receiver, pos]} for per-position edges
        self.keeper = keeper  # or their running top-K (position_top.py)
        self.norm_in: dict = {}
        self.delta: Tensor | None = None
        self.weight = 1.0
        self.frozen_scale = False  # the norm rule is on (GIM)
        self.ablation, self.means = None, None  # the senders' source: an ablation (sources.py) or the source run

    def run(self, run, store: dict, hooks: list = ()) -> Tensor:
        hooks = record(self.em.sender_points(), store, self.batch.n_pos) + list(hooks)
        with hooked(hooks):
            return forward_last(self.em.spec, run, self.batch.mask, self.batch.last)

    def add(self, j0: int, grad: Tensor) -> None:
        """Products of every earlier sender's delta with the gradients [unit, batch, pos, d_model] of the
        receivers j0, j0 + 1, ...: into values[metric][:, j0:j0 + unit]."""
        n, units = self.em.graph.n_before[j0], slice(j0, j0 + grad.shape[0])
        if self.by_position is not None or self.keeper is not None:
            grad = grad.reshape(grad.shape[0], *self.delta.shape[1:])  # OPT's MLP: [unit, batch * pos, d] rows
            prod = position_products(self.delta[:n], grad.to(self.acc))  # [sender, unit, pos]
            if self.keeper is not None:  # one backward, weight 1 (position_top.check_keep)
                self.keeper.add(self.metric, prod, j0)
            else:
                self.by_position[self.metric][:n, units] += prod * self.weight
            self.values[self.metric][:n, units] += prod.sum(-1) * self.weight
            return
        prod = self.delta[:n].flatten(1) @ grad.to(self.acc).flatten(1).T  # [sender, unit]: one matmul
        self.values[self.metric][:n, units] += prod * self.weight

    def grad_hooks(self) -> list:
        """Per layer: q/k/v projection outputs and the MLP's input (EdgeModel.mlp_point); the final norm's
        output; and the norm inputs they pull back through."""
        em, graph, hooks = self.em, self.em.graph, []
        for layer in range(em.spec.dims.n_layers):
            for kind in ("q", "mlp"):
                hooks.append((em.norm_point(kind, layer), self._keep_input((kind, layer))))
            for site in QKV:
                j0 = graph.receiver_index[f"L{layer}H0.{site}"]
                hooks.append((em.spec.hook_point(site, layer), self._qkv_grad(site, layer, j0)))
            j = graph.receiver_index[f"L{layer}.mlp"]
            hooks.append((em.mlp_point(layer), self._norm_grad(("mlp", layer), j, own=True)))
        hooks.append((em.norm_point("logits", 0), self._keep_input(("logits", 0))))
        hooks.append((em.norm_point("logits", 0, "output"), self._norm_grad(("logits", 0), len(graph.receivers) - 1)))
        return hooks

    def _keep_input(self, key):
        def callback(raw):
            self.norm_in[key] = raw.detach()
        return callback

    def _qkv_grad(self, site: str, layer: int, j0: int):
        point = self.em.spec.hook_point(site, layer)
        w, _ = self.em.in_slices(site, layer)  # [d_model, unit, d_head]
        norm = self.em.norm("q", layer)

        def callback(raw):
            n, n_pos = batch_pos(raw, self.batch.n_pos)

            def on_grad(grad):
                g_out = point.read(grad, n, n_pos)  # [batch, pos, unit, d_head]
                g_norm = torch.bmm(g_out.movedim(2, 0).flatten(1, 2), w.to(g_out.dtype).permute(1, 2, 0))
                g_norm = g_norm.unflatten(1, (n, n_pos))  # [unit, batch, pos, d_model]: through each head alone
                self.add(j0, norm_vjp(norm, self.norm_in[("q", layer)], g_norm, self.frozen_scale))
            raw.register_hook(on_grad)
        return callback

    def _norm_grad(self, key, j: int, own: bool = False):
        """The gradient at the norm's output, pulled back to its input. ``own``: taken on a view of the tensor,
        which the hooked module alone reads (Phi's MLP shares its norm's output with the attention; OLMo 2's
        reads the residual stream itself)."""
        norm = self.em.norm(key[0], key[1])

        def callback(raw):
            mine = raw.view_as(raw) if own else raw
            mine.register_hook(lambda grad: self.add(j, norm_vjp(norm, self.norm_in[key], grad[None], self.frozen_scale)))
            return mine if own else None
        return callback

    def backward(self, embed=None, receiver: dict | None = None, source: dict | None = None) -> None:
        """A receiving forward with grad (token embeddings from ``embed(raw)`` if given), then one backward per
        metric. Without ``receiver`` the deltas are formed from this run's sender values and ``source``."""
        root, store = [], {}

        def make_root(raw):
            leaf = (raw if embed is None else embed(raw)).detach().requires_grad_(True)
            root.append(leaf)
            return leaf
        hooks = [(self.em.spec.hook_point("embed", 0), make_root)] + self.grad_hooks()
        with torch.enable_grad():
            logits = self.run(self.receiver_run, store, hooks)
            self.logits.setdefault("receiver", logits.detach())
            if receiver is None:
                self.delta = deltas(self.em, source, store, self.batch.mask.bool(), self.acc)
            del store
            self.backward_each(logits, root)


def _score_chunk(scorer: _Scorer, estimator: str, steps: int) -> None:
    """EAP: the source run, then one receiving run with grad. EAP-IG: the source and receiver runs (deltas
    and token embeddings), then ``steps`` runs with grad on the line between their embeddings."""
    token, n_pos = {("token",): scorer.em.spec.hook_point("embed", 0)}, scorer.batch.n_pos
    source: dict = {}
    with torch.no_grad():
        scorer.logits["source"] = scorer.run(scorer.source_run, source, record(token, source, n_pos))
    if scorer.ablation is not None:  # the corrupt run's logits stay: its gap is the unit of scale
        source = ablated_source(source, scorer.ablation, scorer.means)
    if estimator == "atp":
        scorer.backward(source=source)
        return
    if estimator in _RULES:
        scorer.frozen_scale = True
        with gim.modifying(scorer.em.spec, **_RULES[estimator]):
            scorer.backward(source=source)
        return
    receiver: dict = {}
    with torch.no_grad():
        scorer.logits["receiver"] = scorer.run(scorer.receiver_run, receiver, record(token, receiver, n_pos))
    scorer.delta = deltas(scorer.em, source, receiver, scorer.batch.mask.bool(), scorer.acc)
    scorer.weight = 1.0 / steps
    for alpha in alphas(steps):
        scorer.backward(embed=lambda raw, a=alpha: along(receiver[("token",)], source[("token",)], a, raw),
                        receiver=receiver)


def attribute_edges(model: nn.Module | ModelSpec, batch: PromptBatch, *, metrics: Sequence[str] = ("logit_diff",),
                    direction: str = "denoise", estimator: str = "atp", ig_steps: int = 8,
                    batch_size: int | None = None, ablation: str | None = None, positions: bool = False,
                    keep: int | None = None, seed: int = 0) -> EdgeScores:
    """The score of every edge under each metric, in ``direction``: EAP (``atp``), EAP-IG (``ig``), or EAP
    under GIM's default rules (``gim``; ``relp_gim``: with RelP's default rules). ``ablation`` (zero | mean,
    noising, EAP): the senders' source values from that ablation of the clean run (sources.py).
    ``positions``: per-position scores too (``by_position``, positions.py), from the same backward; with
    ``keep``, or when their table exceeds positions.MAX_TABLE_BYTES, only the top ``keep`` (default
    position_top.DEFAULT_KEEP) by |score| under the first of ``metrics`` and a pool drawn with ``seed``
    (``position_top``)."""
    spec = as_spec(model)
    em = EdgeModel(spec)
    metrics = list(dict.fromkeys(metrics))
    for m in metrics:
        check_metric(m, gradient=True)
    check_direction(direction)
    if estimator not in EDGE_ESTIMATORS:
        raise ValueError(f"Unknown edge estimator {estimator!r}; known: {', '.join(EDGE_ESTIMATORS)} "
                         "(atp: EAP, ig: EAP-IG, gim: EAP under GIM's rules, relp_gim: under GIM's and RelP's)")
    if estimator == "ig" and ig_steps < 1:
        raise ValueError(f"ig_steps must be >= 1, got {ig_steps}")
    check_edge_ablation(ablation, direction, estimator)
    graph, batch = em.graph, batch.to(spec.device)
    means = ablation_means(spec, batch, ablation, batch_size)
    acc = wide(next(spec.model.parameters()).dtype)
    values = {m: torch.zeros(len(graph.senders), len(graph.receivers), device=spec.device, dtype=acc)
              for m in metrics}
    summed, keeper = {"values": values}, None
    if positions and (keep is not None or table_bytes(graph, batch.n_pos, len(metrics), acc) > MAX_TABLE_BYTES):
        check_keep(estimator, batch_size, batch.n, keep)
        pool = draw_pool(graph, batch.n_pos, POOL_SIZE, seed)
        keeper = TopKeeper(graph, batch.n_pos, metrics, keep or DEFAULT_KEEP, pool, acc)
    elif positions:
        summed["by_position"] = {m: torch.zeros(*values[m].shape, batch.n_pos, device=spec.device, dtype=acc)
                                 for m in metrics}
    sums = {run: {m: 0.0 for m in metrics} for run in ("clean", "corrupt")}

    def run(part: PromptBatch, start: int, into: dict) -> None:
        if keeper is not None and part.n < batch.n:  # an out-of-memory retry split the backward
            check_keep(estimator, part.n, batch.n)
        scorer = _Scorer(em, part, metrics, direction, into["values"], into.get("by_position"), keeper)
        scorer.ablation, scorer.means = ablation, means
        _score_chunk(scorer, estimator, ig_steps)
        for run_name, by_metric in scorer.metric_sums().items():
            for m in metrics:
                sums[run_name][m] += by_metric[m]
    with eval_mode(spec.model):
        size, n_chunks = run_chunks(batch, batch_size, run, summed=summed, device=spec.device,
                                    what=f"attributing edges ({estimator})")
    by_position = summed.get("by_position")
    for t in [*values.values(), *(by_position or {}).values()]:
        t /= batch.n
    cost = {"forward": 2, "backward": len(metrics)} if estimator != "ig" else \
        {"forward": 2 + ig_steps, "backward": len(metrics) * ig_steps}
    return EdgeScores(graph=graph, values={m: v.cpu() for m, v in values.items()}, direction=direction,
                      clean_metric={m: v / batch.n for m, v in sums["clean"].items()},
                      corrupt_metric={m: v / batch.n for m, v in sums["corrupt"].items()},
                      n_prompts=batch.n, estimator=estimator,
                      passes={**{k: v * n_chunks for k, v in cost.items()}, **retried(size, batch_size, batch.n)},
                      by_position=None if by_position is None else {m: v.cpu() for m, v in by_position.items()},
                      position_top=None if keeper is None else keeper.result(batch.n))
