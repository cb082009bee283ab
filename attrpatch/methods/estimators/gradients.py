"""The core every gradient-based estimator shares: cache the source run, run the receiving run with grad,
and hand each hook point's delta . gradient product to the estimator as its gradient arrives.

    delta(c)    = a_c(source) - a_c(receiver)                    [batch, pos, ...]  (pad positions zeroed)
    product(c)  = sum over c's own dims of delta(c) * d metric / d a_c     [batch, pos, (head | d_mlp)]

Source and receiver follow ``inputs.directions``. The receiving run starts from a fresh leaf at the
embeddings, so the backward computes no weight gradients, and each product is formed inside a tensor hook
so no gradient outlives it. An estimator (atp.py, ig.py, graddrop.py, atp_star.py) decides what to do
with the products: add them (AtP), average them over interpolated runs (IG), combine several backward
passes (GradDrop).
"""

from contextlib import nullcontext
from typing import Callable

import torch
from torch import Tensor

from ...engine.forward import block_calls, forward_last
from ...engine.hooks import batch_pos, hooked, record
from ...engine.metrics import Target, metric
from ...inputs.batch import PromptBatch, RunInput, fingerprint
from ...inputs.directions import clean_and_corrupt
from ...model.sites import ModelSpec, unit_reduce
from . import blockwise

Key = tuple[str, int]  # (site, layer)


def product(site: str, delta: Tensor, grad: Tensor) -> Tensor:
    """delta . grad over the component's own dimensions: [batch, pos, ..] -> [batch, pos, (unit)]."""
    return unit_reduce(site, delta * grad)


def masked(delta: Tensor, mask: Tensor) -> Tensor:
    """Zero the pad positions of [batch, pos, ...] (no copy when nothing is padded)."""
    if bool(mask.all()):
        return delta
    return delta * mask.view(*mask.shape, *([1] * (delta.ndim - 2))).to(delta.dtype)


class Receiving:
    """What a chunk scored by backward passes shares, node and edge alike (``Chunk`` here, edges' scorer):
    the prompts, direction and metrics, the two runs' last-token logits (``logits["source"]``,
    ``logits["receiver"]``), and which backward is running (``metric``, ``label``)."""

    def __init__(self, batch: PromptBatch, metrics: list[str], direction: str):
        self.batch, self.metrics, self.direction = batch, metrics, direction
        self.source_run, self.receiver_run = batch.runs(direction)
        self.logits: dict[str, Tensor] = {}  # "source", "receiver": [batch, vocab]
        self.metric, self.label = metrics[0], None

    def target(self) -> Target:
        clean, _ = clean_and_corrupt(self.direction, self.logits["source"], self.logits["receiver"])
        return Target.from_clean(self.batch.answer, self.batch.wrong, clean)

    def backward_each(self, logits: Tensor, root: list[Tensor], labels=(None,),
                      after_metric: Callable[[str], None] | None = None) -> None:
        """Per metric, one backward from its sum over the chunk to ``root`` per label in ``labels`` (the
        gradient hooks read ``metric`` and ``label``); after_metric(metric) runs after each metric's last."""
        target = self.target()
        totals = [metric(m, logits, target).sum() for m in self.metrics]
        for i, (m, total) in enumerate(zip(self.metrics, totals)):
            self.metric = m
            for j, label in enumerate(labels):
                self.label = label
                last = i == len(self.metrics) - 1 and j == len(labels) - 1
                torch.autograd.grad(total, root, retain_graph=not last)
            self.label = None
            if after_metric is not None:
                after_metric(m)

    def metric_sums(self) -> dict[str, dict[str, float]]:
        """The chunk's summed metric values on the clean and the corrupt run."""
        target = self.target()
        clean, corrupt = clean_and_corrupt(self.direction, self.logits["source"], self.logits["receiver"])
        with torch.no_grad():
            return {"clean": {m: float(metric(m, clean, target).sum()) for m in self.metrics},
                    "corrupt": {m: float(metric(m, corrupt, target).sum()) for m in self.metrics}}


class Chunk(Receiving):
    """One chunk of prompts being scored: its hook points, source cache, deltas, and the score tensors
    (``values[metric][site]``, [layer, pos, (unit)] summed over prompts, or [batch, layer, pos, (unit)]
    written at ``rows`` when scores are kept per prompt; ``prompts[metric][site]``, if given, receives the
    per-prompt scores at ``rows`` as [batch, layer, pos | 1, (unit)], positions summed where its pos is 1).
    recompute: the backward block by block (blockwise.py). sources: source runs shared by calls on the same
    prompts and direction (cache_source).

    ``metric`` and ``label`` say which backward pass is running: the metric differentiated, and the
    estimator's label of the pass (None for the plain one; GradDrop labels a pass by its dropped layer).
    """

    def __init__(self, spec: ModelSpec, batch: PromptBatch, sites: list[str], metrics: list[str], direction: str,
                 values: dict, rows: slice | None, *, prompts: dict | None = None, recompute: bool = False,
                 sources: dict | None = None):
        super().__init__(batch, metrics, direction)
        self.spec, self.sites = spec, sites
        self.values, self.rows, self.prompts, self.recompute = values, rows, prompts, recompute
        self.points = {(s, layer): spec.hook_point(s, layer) for s in sites
                       for layer in range(spec.dims.n_layers_of(s))}
        self.embed = spec.hook_point("embed", 0)
        self.mask = batch.mask.bool()
        self.source: dict[Key, Tensor] = {}
        self.own: set[Key] = set()  # source tensors no other cached tensor shares storage with
        self.source_calls: dict[int, tuple] | None = None  # recompute: the source run's block calls (blockwise.py)
        self.capturing = False  # blockwise.py reruns a source block: hook points fill ``source``
        self.reruns = 0  # blockwise.py's reruns of every block (forward passes beyond the estimator's own)
        self.deltas: dict[Key, Tensor] = {}
        self.ablated: dict[Key, Tensor] | None = None  # an ablation's source values (methods/ablation.py)
        self.splices: list = []  # (point, callback) hooks active in both runs: dictionaries (features.py)
        self.sources = sources  # source runs shared by calls on the same prompts (attribute(sources=...))
        self.saved = 0  # source runs read from ``sources``, not made: forwards the estimator's count overstates

    def cache(self, run: RunInput, points: dict) -> tuple[dict[Key, Tensor], Tensor]:
        """No-grad forward caching each point's normalised view (detached): ({key: tensor}, last logits)."""
        found: dict[Key, Tensor] = {}
        with torch.no_grad(), hooked(record(points, found, self.batch.n_pos) + self.splices):
            logits = forward_last(self.spec, run, self.batch.mask, self.batch.last)
        return found, logits

    def cache_source(self, lazy: bool = True) -> None:
        """The source run: every point's activation and the embeddings; an ablation's values replace the
        points' (``ablated``, [batch, pos, ...] each; the source run's logits stay, for its metric). A point
        whose tensor shares no storage with another (``own``, never an ablation's) becomes its delta in place.
        With ``recompute`` and ``lazy`` (for estimators with one backward call that read the source only
        through the deltas) and no ablation, only the embeddings and each block's call are kept: blockwise.py
        reruns each source block when the backward reaches it. Otherwise the run may come from ``sources``
        (_source_values), whose values are then never written."""
        if self.recompute and lazy and not self.ablated:
            with block_calls(self.spec) as calls:
                self.source, self.logits["source"] = self.cache(self.source_run, {("embed", 0): self.embed})
            self.source_calls = calls
            return
        self.source, self.logits["source"] = self._source_values({**self.points, ("embed", 0): self.embed})
        self.source.update(self.ablated or {})
        storage = [t.untyped_storage().data_ptr() for t in self.source.values()]
        self.own = set() if self.sources is not None else {  # a shared run's values are never written
            key for key, ptr in zip(self.source, storage) if storage.count(ptr) == 1 and key not in (self.ablated or {})}

    def _source_values(self, points: dict) -> tuple[dict[Key, Tensor], Tensor]:
        """The source run's values at ``points`` and its last logits (``cache``): read from ``sources`` when a
        call on the same prompts and direction stored them there, covering ``points`` (counted in ``saved``),
        else run, and stored there; with an ablation or dictionaries (they change the values) always run."""
        if self.sources is None or self.ablated or self.splices:
            return self.cache(self.source_run, points)
        key = (self.direction, fingerprint(self.batch))
        if key not in self.sources or not set(points) <= set(self.sources[key][0]):
            self.sources[key] = self.cache(self.source_run, points)
        else:
            self.saved += 1
        values, logits = self.sources[key]
        return {k: values[k] for k in points}, logits

    def add(self, site: str, layer: int, score: Tensor) -> None:
        """Add a [batch, pos, (unit)] score into ``values`` under the running metric."""
        target = self.values[self.metric][site]
        if self.prompts is not None:
            kept = self.prompts[self.metric][site]  # [batch, layer, pos | 1, (unit)]
            summed = score.sum(1, keepdim=True) if kept.shape[2] == 1 else score
            kept[self.rows, layer] += summed.to(kept.device, kept.dtype)
        if self.rows is None or self.prompts is not None:  # .to: with device_map the layer may live elsewhere
            target[layer] += score.sum(0).to(target.device, target.dtype)
        else:
            target[self.rows, layer] += score.to(target.device, target.dtype)

    def backward(self, on_product: Callable[[Key, Tensor], None], *, embed: Callable[[Tensor], Tensor] | None = None,
                 hooks: list = (), context=nullcontext, labels: list = (None,),
                 after_metric: Callable[[str], None] | None = None) -> None:
        """One receiving forward with grad, then per metric one backward per label in ``labels``.

        embed(raw) -> the embeddings the receiving run starts from (default: its own); hooks: extra
        (point, callback) hooks; context: a context manager factory active during the forward;
        on_product(key, product) receives each point's product as its gradient arrives;
        after_metric(metric) runs after the last backward of each metric."""
        root: list[Tensor] = []

        def make_root(raw):
            leaf = (raw if embed is None else embed(raw)).detach().view_as(raw).requires_grad_(True)
            root.append(leaf)
            return leaf
        all_hooks = [(self.embed, make_root)] + [(p, self._scorer(key, on_product)) for key, p in self.points.items()]
        if self.recompute:
            return blockwise.backward(self, all_hooks, root, hooks=list(hooks), context=context, labels=list(labels),
                                      after_metric=after_metric)
        with torch.enable_grad(), hooked(all_hooks + list(hooks) + self.splices), context():
            logits = forward_last(self.spec, self.receiver_run, self.batch.mask, self.batch.last)
            self.logits.setdefault("receiver", logits.detach())
            self.backward_each(logits, root, labels, after_metric)

    def _scorer(self, key: Key, on_product):
        site = key[0]
        point = self.points[key]

        def callback(raw):
            n, n_pos = batch_pos(raw, self.batch.n_pos)
            if self.capturing:
                self.source[key] = point.read(raw, n, n_pos).detach()
                return
            if key not in self.deltas:
                if self.source_calls is not None and key not in self.source:  # lazy source (blockwise.py): later
                    return
                source, receiver = self.source.pop(key), point.read(raw, n, n_pos).detach()
                delta = source.sub_(receiver) if key in self.own else source - receiver  # no new tensor if own
                self.deltas[key] = masked(delta, self.mask)
            delta = self.deltas[key]

            def on_grad(grad):
                dtype = self.values[self.metric][site].dtype
                on_product(key, product(site, delta.to(dtype), point.read(grad, n, n_pos).to(dtype)))
            if torch.is_grad_enabled() and raw.requires_grad:  # not in blockwise.py's forward without grad
                raw.register_hook(on_grad)
        return callback
