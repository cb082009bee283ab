"""Sites: where each component of a HuggingFace causal LM lives, and how to read or write it.

Axis names used throughout attrpatch (TransformerLens names):
    batch    prompts (times patch copies during batched patching)
    pos      token position
    layer    transformer block index
    head     attention head (query heads for ``head``/``q``; key-value heads for ``k``/``v``)
    d_model  residual stream width
    d_head   width of one head
    d_mlp    MLP hidden width (one coordinate = one neuron)

A *site* is a kind of activation (``resid_pre``, ``head``, ...). A *hook point* is a site at one layer:
a module of the model plus whether the activation is that module's input or output. Every hook point
reads its raw tensor into a normalised view:

    embed, resid_pre, attn_out, mlp_out   [batch, pos, d_model]
    head, q, k, v                         [batch, pos, head, d_head]
    neuron                                [batch, pos, d_mlp]

Views share storage with the raw tensor, so writing into the view of a clone patches it.
The per-family tables (``archs.ARCHS``) are the only architecture-specific code in attrpatch.
"""

import functools
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from .archs import ARCHS, Arch, UnsupportedModel, how_to_add

SITES = ("embed", "resid_pre", "attn_out", "mlp_out", "head", "neuron", "q", "k", "v")
# Site groups: the one home of every grouping of sites used elsewhere.
RESID_LIKE = ("embed", "resid_pre", "attn_out", "mlp_out")  # [batch, pos, d_model]; per position by default
HEAD_LIKE = ("head", "q", "k", "v")  # one component per (query or key-value) head
QK_SITES = ("q", "k")  # shape the attention pattern (AtP*'s QK fix)
WRITES_IN_BLOCK = ("attn_out", "mlp_out", "head", "neuron", "q", "k", "v")  # computed inside a block
AFTER_ATTENTION = ("head", "attn_out", "mlp_out", "neuron")  # after the block's attention pattern
FEATURE_SITES = ("feature", "sae_error")  # a dictionary's latent (unit: its id) and error term (dictionaries.py)


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def _in_features(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return mod.in_features
    weight = getattr(mod, "weight", None)
    if weight is not None and weight.ndim == 2 and hasattr(mod, "nf"):  # GPT-2 Conv1D: weight [in, out]
        return weight.shape[0]
    if weight is not None and weight.ndim == 2:
        return weight.shape[1]
    raise TypeError(f"cannot read the input width of {type(mod).__name__}")


@dataclass(frozen=True)
class Dims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_mlp: int

    def n_units(self, site: str) -> int | None:
        """Heads or neurons per layer of ``site`` (None for d_model sites)."""
        return {"head": self.n_heads, "q": self.n_heads, "k": self.n_kv_heads, "v": self.n_kv_heads,
                "neuron": self.d_mlp}.get(site)

    def n_layers_of(self, site: str) -> int:
        return 1 if site == "embed" else self.n_layers


@dataclass
class ModelSpec:
    """A model bound to its family table: modules and dimensions, found once."""

    model: nn.Module
    arch: Arch
    dims: Dims
    blocks: list[nn.Module] = field(repr=False)

    @property
    def name(self) -> str:
        return type(self.model).__name__

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first parameter's device, or an offloaded model's execution device."""
        device = next(self.model.parameters()).device
        if device.type == "meta" and hasattr(self.model, "hf_device_map"):  # offloaded by accelerate
            from .hf_compat import execution_device
            return execution_device(self.model)
        return device

    def module(self, path: str, layer: int | None = None) -> nn.Module:
        root = self.model if layer is None else self.blocks[layer]
        mod = _get(root, path)
        if mod is None:
            where = "the model" if layer is None else f"block {layer}"
            raise UnsupportedModel(f"{self.name}: no module {path!r} in {where}; check the Arch table entry")
        return mod

    def unembedding(self) -> nn.Module:
        """The LM head: the Arch row's module, else HF's ``get_output_embeddings()`` (GPT-NeoX's head is
        ``embed_out`` before transformers 5 and ``lm_head`` from it)."""
        found = _get(self.model, self.arch.unembed)
        return found if found is not None else self.model.get_output_embeddings() or self.module(self.arch.unembed)

    def final_modules(self) -> list[nn.Module]:
        return [m for m in (_get(self.model, p) for p in self.arch.final) if m is not None]

    def hook_point(self, site: str, layer: int) -> "HookPoint":
        check_site(site, self)
        check_layer(site, layer, self)
        a, d = self.arch, self.dims
        if site == "embed":
            return HookPoint(self.module(a.embed), "output", _plain)
        if site == "resid_pre":
            return HookPoint(self.blocks[layer], "input", _plain)
        if site in ("attn_out", "mlp_out"):
            return HookPoint(self.module(getattr(a, site), layer), "output", _plain)
        if site == "head":
            return HookPoint(self.module(a.head, layer), "input", _heads(0, d.n_heads, d.d_head))
        if site == "neuron":
            return HookPoint(self.module(a.neuron, layer), "input", _plain)
        return self._qkv_point(site, layer)

    def _qkv_point(self, site: str, layer: int) -> "HookPoint":
        a, d = self.arch, self.dims
        n, kv, h = d.n_heads, d.n_kv_heads, d.d_head
        units = n if site == "q" else kv
        if a.qkv_layout == "separate":
            return HookPoint(self.module(getattr(a, site), layer), "output", _heads(0, units, h))
        mod = self.module(a.q, layer)
        idx = "qkv".index(site)
        if a.qkv_layout == "gpt2":
            return HookPoint(mod, "output", _heads(idx * n * h, n, h))
        if a.qkv_layout == "phi3":
            start = {"q": 0, "k": n * h, "v": n * h + kv * h}[site]
            return HookPoint(mod, "output", _heads(start, units, h))
        return HookPoint(mod, "output", _neox(idx, n, h))


Reader = Callable[[Tensor, int, int], Tensor]


def _plain(raw: Tensor, batch: int, pos: int) -> Tensor:
    """[batch, pos, d] or flattened [batch*pos, d] (OPT) -> [batch, pos, d] view."""
    return raw if raw.ndim == 3 else raw.view(batch, pos, raw.shape[-1])


def _heads(start: int, n: int, d_head: int) -> Reader:
    def read(raw: Tensor, batch: int, pos: int) -> Tensor:
        cols = _plain(raw, batch, pos)[..., start:start + n * d_head]
        return cols.unflatten(-1, (n, d_head))  # [batch, pos, head, d_head]
    return read


def _neox(idx: int, n: int, d_head: int) -> Reader:
    def read(raw: Tensor, batch: int, pos: int) -> Tensor:
        per_head = _plain(raw, batch, pos).unflatten(-1, (n, 3 * d_head))  # [batch, pos, head, 3*d_head]
        return per_head[..., idx * d_head:(idx + 1) * d_head]  # [batch, pos, head, d_head]
    return read


@dataclass(frozen=True)
class HookPoint:
    """One site at one layer: ``module``'s ``io`` tensor, read through ``read`` into a normalised view."""

    module: nn.Module
    io: Literal["input", "output"]
    read: Reader


def model_spec(model: nn.Module) -> ModelSpec:
    """Bind ``model`` to its family table and read its dimensions; clear error for unknown families."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        known = ", ".join(sorted(ARCHS))
        raise UnsupportedModel(
            f"Unsupported model family {model_type!r} ({type(model).__name__}); supported: {known}.\n"
            + how_to_add(str(model_type)))
    arch = ARCHS[model_type]
    blocks = _get(model, arch.layers)
    if blocks is None:
        raise UnsupportedModel(f"{type(model).__name__}: no block list at {arch.layers!r}; is this a *ForCausalLM "
                       "model? attrpatch needs the model with its LM head (AutoModelForCausalLM).")
    spec = ModelSpec(model=model, arch=arch, dims=None, blocks=list(blocks))  # type: ignore[arg-type]
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_width = _in_features(spec.module(arch.head, 0))
    spec.dims = Dims(
        n_layers=len(spec.blocks), n_heads=n_heads, n_kv_heads=n_kv, d_head=head_width // n_heads,
        d_model=spec.module(arch.embed).weight.shape[1], d_mlp=_in_features(spec.module(arch.neuron, 0)),
    )
    return spec


def check_site(site: str, spec: ModelSpec | None = None) -> None:
    if site not in SITES:
        model = f" for {spec.name}" if spec is not None else ""
        raise ValueError(f"Unknown site {site!r}{model}; known: {', '.join(SITES)}.")


def check_layer(site: str, layer: int, spec: ModelSpec) -> None:
    n = spec.dims.n_layers_of(site)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer {layer!r} out of range for site {site!r} of {spec.name}: valid 0..{n - 1}.")


def site_shape(site: str, dims: Dims, n_pos: int) -> tuple[int, ...]:
    """Shape of the per-position score tensor of ``site``: [layer, pos] or [layer, pos, head|d_mlp]."""
    units = dims.n_units(site)
    base = (dims.n_layers_of(site), n_pos)
    return base if units is None else (*base, units)


def unit_reduce(site: str, prod: Tensor) -> Tensor:
    """Sum an elementwise product over the component's own dimensions.

    [batch, pos, d_model] -> [batch, pos]; [batch, pos, head, d_head] -> [batch, pos, head];
    [batch, pos, d_mlp] -> [batch, pos, d_mlp] (a neuron is a scalar).
    """
    return prod if site == "neuron" else prod.sum(-1)


@dataclass(frozen=True, order=True)
class Component:
    """One scored unit: a site at a layer, at one position (``pos``) or all (None), and for head-like and
    neuron sites one ``unit`` (head index, or neuron index). ``embed`` has layer 0. A ``feature`` or
    ``sae_error`` component names its dictionary's ``slot`` (``mlp_out``, ``resid_mid>mlp_out``) when its
    layer has several dictionaries (model/dictionaries.py), else None."""

    site: str
    layer: int
    pos: int | None = None
    unit: int | None = None
    dictionary: str | None = None

    @property
    def head(self) -> int | None:
        return self.unit if self.site in HEAD_LIKE else None

    @property
    def neuron(self) -> int | None:
        return self.unit if self.site == "neuron" else None

    def __str__(self) -> str:
        if self.site == "embed":
            name = "embed"
        elif self.site in HEAD_LIKE:
            name = f"L{self.layer}H{self.unit}" + ("" if self.site == "head" else f".{self.site}")
        elif self.site == "neuron":
            name = f"L{self.layer}N{self.unit}"
        elif self.site == "feature":
            slot = "" if self.dictionary is None else f".{self.dictionary}:"
            name = f"L{self.layer}{slot}F{self.unit}"
        elif self.site == "sae_error" and self.dictionary is not None:
            name = f"L{self.layer}.{self.dictionary}:sae_error"
        else:
            name = f"L{self.layer}.{self.site}"
        return name if self.pos is None else f"{name}@{self.pos}"

    def index(self) -> tuple:
        """Index into the per-position score tensor [layer, pos, (unit)] of the site (pos=None: all)."""
        pos = slice(None) if self.pos is None else self.pos
        return (self.layer, pos) if self.unit is None else (self.layer, pos, self.unit)


def check_component(c: Component, spec: ModelSpec, n_pos: int) -> None:
    """Raise a ValueError naming what is out of range in ``c`` for this model and prompt length."""
    check_site(c.site, spec)
    check_layer(c.site, c.layer, spec)
    if c.pos is not None and not 0 <= c.pos < n_pos:
        raise ValueError(f"{c}: position {c.pos} out of range; the prompts have {n_pos} tokens (0..{n_pos - 1})")
    units = spec.dims.n_units(c.site)
    if (units is None) != (c.unit is None):
        need = "no unit" if units is None else f"a unit index (0..{units - 1})"
        raise ValueError(f"{c}: site {c.site!r} takes {need}, got unit={c.unit!r}")
    if units is not None and not 0 <= c.unit < units:
        raise ValueError(f"{c}: unit {c.unit} out of range for site {c.site!r} of {spec.name}: valid 0..{units - 1}")


def components(site: str, dims: Dims, n_pos: int, *, per_position: bool) -> list[Component]:
    """Every component of ``site``: per layer (x position if ``per_position``) (x head or neuron)."""
    return list(_components(site, dims, n_pos, per_position))


@functools.lru_cache(maxsize=64)  # a screen asks for each site's list many times (46k neurons in SmolLM2)
def _components(site: str, dims: Dims, n_pos: int, per_position: bool) -> tuple[Component, ...]:
    units = dims.n_units(site)
    positions = range(n_pos) if per_position else [None]
    return tuple(Component(site, layer, pos, unit)
                 for layer in range(dims.n_layers_of(site))
                 for pos in positions
                 for unit in ([None] if units is None else range(units)))


def as_spec(model: nn.Module | ModelSpec) -> ModelSpec:
    """A ModelSpec, from a model or as it is."""
    return model if isinstance(model, ModelSpec) else model_spec(model)
