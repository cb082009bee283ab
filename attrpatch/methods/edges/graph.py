"""The edge graph of a model: its senders, receivers and edges, their names, and where each lives
(the definitions are in eap.py's docstring).

    senders    embed, then per layer l: LlH0 .. LlH{n_heads-1}, Ll.mlp                S = 1 + L * (H + 1)
    receivers  per layer l: LlHh.q (h < H), LlHk.k, LlHk.v (k < n_kv), Ll.mlp; then logits
                                                                                    R = L * (H + 2 KV + 1) + 1
Both lists are in the order the forward pass computes them, so the senders an edge into receiver r can
come from are a prefix of the sender list (``n_before``). In a parallel block (GPT-NeoX, Phi-1/2: attention
and MLP read the same residual stream and their writes are added together) the MLP reads before its layer's
heads write: no edge LlHh -> Ll.mlp, as MIB's ``parallel_attn_mlp`` graph.

Families (Arch.edges): pre-norm sequential (GPT-2, Llama, Mistral, Qwen2, Qwen3, Phi-3, OPT), parallel
(GPT-NeoX, Phi-1/2) and post-norm (Gemma 2, Gemma 3, OLMo 2: each write is normalised before the add; the
senders' writes are then writes.py's). OPT-350m (do_layer_norm_before=False: the residual stream itself is
normalised after each add) is refused.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...model.archs import ARCHS, UnsupportedModel
from ...model.hf_compat import offloaded
from ...model.sites import HookPoint, ModelSpec, _plain

EDGE_FAMILIES = tuple(name for name, arch in ARCHS.items() if arch.edges)  # the built-in rows; Arch.edges says
QKV = ("q", "k", "v")


@dataclass(frozen=True, order=True)
class Edge:
    """sender -> receiver, by name: Edge("L0H3", "L2H1.k"), Edge("embed", "logits")."""

    sender: str
    receiver: str

    def __str__(self) -> str:
        return f"{self.sender}->{self.receiver}"


@dataclass(frozen=True)
class Node:
    """One sender or receiver: ``kind`` embed | head | mlp | q | k | v | logits, its layer (-1 for embed,
    n_layers for logits) and unit (head or key-value head), and its place in the computation order."""

    kind: str
    layer: int
    unit: int | None = None

    @property
    def name(self) -> str:
        if self.kind in ("embed", "logits"):
            return self.kind
        if self.kind == "mlp":
            return f"L{self.layer}.mlp"
        suffix = "" if self.kind == "head" else f".{self.kind}"
        return f"L{self.layer}H{self.unit}{suffix}"

    @property
    def order(self) -> tuple[int, int]:
        """(layer, stage): attention inputs 0, head writes 1, MLP input 2, MLP write 3."""
        stage = {"q": 0, "k": 0, "v": 0, "logits": 0, "head": 1, "mlp": 3, "embed": 3}
        return self.layer, stage[self.kind]


class Graph:
    """Senders and receivers of a model with ``n_layers``, ``n_heads`` query heads and ``n_kv`` key-value
    heads; ``exists`` [sender, receiver] marks the edges (sender computed before the receiver reads);
    ``parallel``: each MLP reads beside its layer's attention, not after it."""

    def __init__(self, n_layers: int, n_heads: int, n_kv: int, parallel: bool = False):
        self.n_layers, self.n_heads, self.n_kv, self.parallel = n_layers, n_heads, n_kv, parallel
        self.senders = [Node("embed", -1)] + [
            node for layer in range(n_layers)
            for node in [*(Node("head", layer, h) for h in range(n_heads)), Node("mlp", layer)]]
        self.receivers = [
            node for layer in range(n_layers)
            for node in [*(Node("q", layer, h) for h in range(n_heads)),
                         *(Node(kind, layer, u) for kind in ("k", "v") for u in range(n_kv)), Node("mlp", layer)]
        ] + [Node("logits", n_layers)]
        self.sender_index = {s.name: i for i, s in enumerate(self.senders)}
        self.receiver_index = {r.name: i for i, r in enumerate(self.receivers)}
        self.n_before = [self._n_before(r) for r in self.receivers]
        self.exists = torch.zeros(len(self.senders), len(self.receivers), dtype=torch.bool)
        for j, n in enumerate(self.n_before):
            self.exists[:n, j] = True

    def _n_before(self, r: Node) -> int:
        order = (r.layer, 2 if not self.parallel else 0) if r.kind == "mlp" else r.order  # sequential: an MLP
        # reads after its layer's heads write; parallel: with them
        return sum(1 for s in self.senders if s.order < order)

    @property
    def n_edges(self) -> int:
        return int(self.exists.sum())

    def edges(self) -> list[Edge]:
        """Every edge, sender-major: the order of ``flat`` tables."""
        return [Edge(self.senders[i].name, self.receivers[j].name) for i, j in self.exists.nonzero().tolist()]

    def index(self, edge: Edge) -> tuple[int, int]:
        """(sender, receiver) indices; a KeyError or ValueError naming the problem and the valid names."""
        if edge.sender not in self.sender_index:
            raise KeyError(f"unknown sender {edge.sender!r} in {edge}; senders are embed, L<l>H<h>, L<l>.mlp "
                           f"(layers 0..{self.n_layers - 1}, heads 0..{self.n_heads - 1})")
        if edge.receiver not in self.receiver_index:
            raise KeyError(f"unknown receiver {edge.receiver!r} in {edge}; receivers are L<l>H<h>.q, L<l>H<k>.k, "
                           f"L<l>H<k>.v (k < {self.n_kv}), L<l>.mlp, logits (layers 0..{self.n_layers - 1})")
        i, j = self.sender_index[edge.sender], self.receiver_index[edge.receiver]
        if not self.exists[i, j]:
            into_mlp = "" if self.parallel else " (or, into L<l>.mlp, from layer l's heads)"
            raise ValueError(f"no edge {edge}: {edge.sender} is computed after {edge.receiver} reads the residual "
                             f"stream; a sender must come from an earlier layer{into_mlp}")
        return i, j

    def flat(self, table: Tensor) -> Tensor:
        """[sender, receiver] -> [edge], in ``edges()`` order."""
        return table[self.exists]


def check_edge_family(spec: ModelSpec) -> None:
    """Refuse a model whose family has no edge definition (Arch.edges), naming the supported families; and a
    post-norm model whose attention output projection has a bias (it belongs to no head and is rescaled by
    the norm differently in each run, so the heads' writes would not add up to the attention's)."""
    model_type, flag = spec.model.config.model_type, spec.arch.edges_flag
    if not spec.arch.edges or flag and not getattr(spec.model.config, flag, True):
        why = f"its config sets {flag}=False (the residual stream is normalised after each add, so it is not a " \
              "sum of the senders' writes)" if spec.arch.edges else "its Arch row does not set edges=True"
        raise UnsupportedModel(
            f"edges are not supported for this {model_type!r} model ({spec.name}); supported: "
            f"{', '.join(EDGE_FAMILIES)}. Here {why}. Use node patching (attrpatch screen) for this model.")
    if spec.arch.post_norm and spec.module(spec.arch.head, 0).bias is not None:
        raise UnsupportedModel(
            f"edges are not supported for this {model_type!r} model ({spec.name}): its attention output projection "
            f"({spec.arch.head}) has a bias, which the post-attention norm rescales in each run, so the heads' "
            "writes do not add up to the attention's write. Use node patching (attrpatch screen) for this model.")


def is_parallel(spec: ModelSpec) -> bool:
    """Attention and MLP read the same residual stream (Arch.parallel, or the model's config flag)."""
    flag = spec.arch.parallel_flag
    return bool(getattr(spec.model.config, flag, spec.arch.parallel)) if flag else spec.arch.parallel


class EdgeModel:
    """Where a model's senders and receivers live: hook points, norms and weight slices."""

    def __init__(self, spec: ModelSpec):
        check_edge_family(spec)
        if offloaded(spec.model):
            raise ValueError("edges read weights outside the model's forward (each head's W_O and q/k/v columns, "
                             "the norms), and accelerate leaves offloaded weights on the meta device there; load "
                             "without \"cpu\"/\"disk\" entries in --device-map (spread over GPUs with --device-map "
                             "auto and enough memory) or use --max-memory to fit one device")
        self.spec, d = spec, spec.dims
        self.post_norm = spec.arch.post_norm
        self.graph = Graph(d.n_layers, d.n_heads, d.n_kv_heads, parallel=is_parallel(spec))
        self.embed = spec.hook_point("resid_pre", 0)  # block 0's input: token (+ position) embeddings

    def z(self, layer: int) -> HookPoint:
        """The heads' z: the input of the attention output projection, read [batch, pos, head, d_head]."""
        return self.spec.hook_point("head", layer)

    def mlp(self, layer: int) -> HookPoint:
        return self.spec.hook_point("mlp_out", layer)

    def norm(self, kind: str, layer: int) -> nn.Module:
        """The norm whose input is the receiver's input: attention (q, k, v), MLP, or the final norm; an
        identity where the receiver reads the residual stream as it is (OLMo 2)."""
        if kind == "logits":
            return self.spec.final_modules()[0]
        path = self.spec.arch.mlp_norm if kind == "mlp" else self.spec.arch.attn_norm
        return self.spec.module(path, layer) if path is not None else nn.Identity()

    def norm_point(self, kind: str, layer: int, io: str = "input") -> HookPoint:
        """input_B's hook point: the norm's input (io="input"), or its output; without a norm, the input of
        the module that reads the residual stream (the q projection, the MLP)."""
        path = self.spec.arch.mlp_norm if kind == "mlp" else self.spec.arch.attn_norm
        if kind == "logits" or path is not None:
            return HookPoint(self.norm(kind, layer), io, _plain)
        return self.mlp_point(layer) if kind == "mlp" else HookPoint(self.spec.module(self.spec.arch.q, layer),
                                                                     "input", _plain)

    def mlp_point(self, layer: int) -> HookPoint:
        """The MLP module's input, norm(input_B) [batch, pos, d_model]: where an MLP receiver is written and
        its gradient read, so that a norm shared with the attention (Phi) is left alone."""
        path = self.spec.arch.mlp_in or self.spec.arch.neuron.rpartition(".")[0]
        return HookPoint(self.spec.module(path, layer), "input", _plain)

    def out_matrix(self, layer: int) -> Tensor:
        """W_O [head * d_head, d_model]: a head's write is z_h @ W_O[h rows] (the projection's bias belongs to
        no head). GPT-2's Conv1D keeps [in, out]; nn.Linear keeps [out, in]."""
        mod = self.z(layer).module
        return mod.weight if not isinstance(mod, nn.Linear) else mod.weight.T

    def in_slices(self, site: str, layer: int) -> tuple[Tensor, Tensor]:
        """(W [d_model, unit, d_head], b [unit, d_head]): the q/k/v projection columns of each head, so that
        head u's q (k, v) = norm output @ W[:, u] + b[u], for any fused layout the site's reader knows."""
        point = self.spec.hook_point(site, layer)
        mod = point.module
        weight = mod.weight if not isinstance(mod, nn.Linear) else mod.weight.T  # [d_model, out]
        w = point.read(weight[None], 1, weight.shape[0])[0]  # [d_model, unit, d_head]
        bias = mod.bias if mod.bias is not None else torch.zeros(weight.shape[1], dtype=weight.dtype,
                                                                 device=weight.device)
        return w, point.read(bias[None, None], 1, 1)[0, 0]  # [unit, d_head]

    def post(self, layer: int) -> HookPoint:
        """Post-norm families: the attention's write before its norm, o = sum_h z_h W_O[h] [batch, pos,
        d_model] (the post-attention norm's input), which sets the norm's scale (writes.py)."""
        return HookPoint(self.spec.module(self.spec.arch.attn_out, layer), "input", _plain)

    def sender_points(self, start: int = 0) -> dict:
        """{key: hook point} of the sender activations from block ``start`` on: ("embed",) when start is 0,
        ("z", l), for post-norm families ("o", l) (after ("z", l), as the model computes them), and ("mlp", l)
        per layer."""
        points = {("embed",): self.embed} if start <= 0 else {}
        for layer in range(max(start, 0), self.spec.dims.n_layers):
            points[("z", layer)] = self.z(layer)
            if self.post_norm:
                points[("o", layer)] = self.post(layer)
            points[("mlp", layer)] = self.mlp(layer)
        return points
