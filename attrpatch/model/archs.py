"""Architecture tables: where each model family keeps its activations, one row per family.

Everything about a family lives in its ``Arch`` row; :func:`register_arch` adds a row for a new family.
"""

from dataclasses import dataclass
from typing import Literal

QKV_LAYOUTS = ("separate", "gpt2", "neox", "phi3")


@dataclass(frozen=True, kw_only=True)
class Arch:
    """Where one model family keeps its activations; paths are relative to the ``*ForCausalLM`` model,
    and the block-level ones relative to one block.

    qkv_layout says how q, k, v sit in ``q``/``k``/``v`` module outputs:
      separate  three modules, outputs [.., n_heads*d_head], [.., n_kv*d_head], [.., n_kv*d_head]
      gpt2      one module (``q`` path), output [.., 3*n_heads*d_head] = [q | k | v]
      neox      one module, output [.., n_heads, 3*d_head], each head [q | k | v]
      phi3      one module, output [.., n_heads*d_head + 2*n_kv*d_head] = [q | k | v]
    """

    layers: str
    embed: str
    final: tuple[str, ...]  # modules applied after the last block, before lm_head (None ones skipped)
    attn_out: str
    mlp_out: str
    head: str  # input is [.., n_heads*d_head]
    neuron: str  # input is [.., d_mlp]
    q: str
    k: str | None = None
    v: str | None = None
    qkv_layout: Literal["separate", "gpt2", "neox", "phi3"] = "separate"
    unembed: str = "lm_head"
    gated: bool = False  # the ``neuron`` module's input is a product act(gate) * up (RelP's half rule)
    notes: str = ""

    def __post_init__(self):
        if self.qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout={self.qkv_layout!r}; expected one of {QKV_LAYOUTS}")
        if self.qkv_layout == "separate" and (self.k is None or self.v is None):
            raise ValueError("qkv_layout='separate' needs the k= and v= module paths too")


_LLAMA_LIKE = Arch(
    layers="model.layers", embed="model.embed_tokens", final=("model.norm",),
    attn_out="self_attn", mlp_out="mlp", head="self_attn.o_proj", neuron="mlp.down_proj",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", gated=True,
)

ARCHS: dict[str, Arch] = {
    "gpt2": Arch(
        layers="transformer.h", embed="transformer.wte", final=("transformer.ln_f",),
        attn_out="attn", mlp_out="mlp", head="attn.c_proj", neuron="mlp.c_proj",
        q="attn.c_attn", qkv_layout="gpt2",
    ),
    "gpt_neox": Arch(
        layers="gpt_neox.layers", embed="gpt_neox.embed_in", final=("gpt_neox.final_layer_norm",),
        attn_out="attention", mlp_out="mlp", head="attention.dense", neuron="mlp.dense_4h_to_h",
        q="attention.query_key_value", qkv_layout="neox",
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma2": Arch(
        layers="model.layers", embed="model.embed_tokens", final=("model.norm",),
        attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
        head="self_attn.o_proj", neuron="mlp.down_proj",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", gated=True,
        notes="post-attention/post-feedforward norms: attn_out/mlp_out are their outputs",
    ),
    "phi": Arch(
        layers="model.layers", embed="model.embed_tokens", final=("model.final_layernorm",),
        attn_out="self_attn", mlp_out="mlp", head="self_attn.dense", neuron="mlp.fc2",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
    ),
    "phi3": Arch(
        layers="model.layers", embed="model.embed_tokens", final=("model.norm",),
        attn_out="self_attn", mlp_out="mlp", head="self_attn.o_proj", neuron="mlp.down_proj",
        q="self_attn.qkv_proj", qkv_layout="phi3", gated=True,
    ),
    "opt": Arch(
        layers="model.decoder.layers", embed="model.decoder.embed_tokens",
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        attn_out="self_attn", mlp_out="fc2", head="self_attn.out_proj", neuron="fc2",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
        notes="fc2 sees [batch*pos, d] flattened; no MLP submodule",
    ),
}

HOW_TO_ADD = """To describe a new family, register its module paths, e.g.:

    import attrpatch
    attrpatch.register_arch("my_model_type", attrpatch.Arch(
        layers="model.layers", embed="model.embed_tokens", final=("model.norm",),
        attn_out="self_attn", mlp_out="mlp", head="self_attn.o_proj", neuron="mlp.down_proj",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj"))"""


class UnsupportedModel(KeyError):
    """A model family or module path the tables do not describe (message printed as written)."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_arch(model_type: str, arch: Arch) -> None:
    """Add (or replace) the table entry used for models whose ``config.model_type`` is ``model_type``."""
    if not isinstance(arch, Arch):
        raise TypeError(f"register_arch needs an attrpatch.Arch, got {type(arch).__name__}")
    ARCHS[model_type] = arch
