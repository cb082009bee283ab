"""Architecture tables: where each model family keeps its activations, one row per family.

Everything about a family lives in its ``Arch`` row. A model whose ``config.model_type`` has no row is bound
to one at run time: :func:`use_arch` to a known family's row (a fine-tune or a renamed copy of one), or a
row read by :func:`arch_from_json` from a file whose keys are Arch's fields (a new family).
"""

import json
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
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
    # the norms whose inputs are the edge receivers' inputs (methods/edges/graph.py); None: the receiver reads
    # the residual stream as it is (no pre-norm: OLMo 2), or, with edges=False, no edges for the family
    attn_norm: str | None = None  # read by q, k, v (block-relative)
    mlp_norm: str | None = None  # read by the MLP: after the attention's write, or beside it when parallel
    gated: bool = False  # the ``neuron`` module's input is a product act(gate) * up (RelP's half rule)
    notes: str = ""
    edges: bool = False  # edges are defined for the family (methods/edges/graph.py: EdgeModel)
    post_norm: bool = False  # attn_out / mlp_out are norms of the attention / MLP outputs (Gemma 2, OLMo 2)
    parallel: bool = False  # attention and MLP read the same residual stream, their writes added together
    parallel_flag: str | None = None  # a config attribute that says ``parallel`` per model (GPT-NeoX)
    mlp_in: str | None = None  # the module whose input is the MLP's (normalised) input; None: the neuron's parent
    edges_flag: str | None = None  # a config attribute that must be true for edges (OPT: do_layer_norm_before)

    def __post_init__(self):
        if self.qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"qkv_layout={self.qkv_layout!r}; expected one of {QKV_LAYOUTS}")
        if self.qkv_layout == "separate" and (self.k is None or self.v is None):
            raise ValueError("qkv_layout='separate' needs the k= and v= module paths too")


_LLAMA_LIKE = Arch(
    layers="model.layers", embed="model.embed_tokens", final=("model.norm",),
    attn_out="self_attn", mlp_out="mlp", head="self_attn.o_proj", neuron="mlp.down_proj",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
    attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", gated=True, edges=True,
)
# Post-norm blocks (Gemma 2 and 3, OLMo 2): each sublayer's output is normalised before the residual add.
# Gemma reads through pre-norms too (input_layernorm, pre_feedforward_layernorm); OLMo 2 reads the residual as is.
_POST_NORM = replace(_LLAMA_LIKE, attn_out="post_attention_layernorm", mlp_out="post_feedforward_layernorm",
                     mlp_norm="pre_feedforward_layernorm", post_norm=True)

ARCHS: dict[str, Arch] = {
    "gpt2": Arch(
        layers="transformer.h", embed="transformer.wte", final=("transformer.ln_f",),
        attn_out="attn", mlp_out="mlp", head="attn.c_proj", neuron="mlp.c_proj",
        q="attn.c_attn", qkv_layout="gpt2", attn_norm="ln_1", mlp_norm="ln_2", edges=True,
    ),
    "gpt_neox": Arch(
        layers="gpt_neox.layers", embed="gpt_neox.embed_in", final=("gpt_neox.final_layer_norm",),
        attn_out="attention", mlp_out="mlp", head="attention.dense", neuron="mlp.dense_4h_to_h",
        q="attention.query_key_value", qkv_layout="neox",
        attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", edges=True,
        parallel=True, parallel_flag="use_parallel_residual",
    ),
    "llama": replace(_LLAMA_LIKE, notes=(
        "Llama 1-3.x: Llama 3.x is model_type llama with rope_scaling {'rope_type': 'llama3'}, which only "
        "changes the rotary frequencies (read by transformers, nothing here)")),
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": replace(_LLAMA_LIKE, notes=(
        "q_norm/k_norm: RMSNorm over each head's d_head after q_proj/k_proj, before rotary; q/k are the "
        "projection outputs (pre-norm), so one head's q or k changes that head alone")),
    "gemma2": replace(_POST_NORM, notes=(
        "post-attention/post-feedforward norms: attn_out/mlp_out are their outputs, what the residual "
        "stream adds; refuses sdpa (runs eager); attention and final logit soft-capping")),
    "gemma3_text": replace(_POST_NORM, notes=(
        "as Gemma 2 (attn_out/mlp_out = post-norm outputs), plus per-head q_norm/k_norm before rotary (q/k "
        "are the pre-norm projection outputs); layer_types alternate sliding_attention and full_attention, "
        "each kind with its own rope base (10k local, 1M global); one KV head (MQA) in the 1B size; "
        "embed_tokens multiplies by sqrt(d_model) inside the module, so embed is the scaled embedding")),
    "olmo2": replace(_POST_NORM, attn_norm=None, mlp_norm=None, notes=(
        "no pre-norms: attention and MLP read the residual stream, their outputs are normalised before "
        "the add (attn_out/mlp_out = post_attention_layernorm/post_feedforward_layernorm outputs); "
        "q_norm/k_norm are ONE RMSNorm over all heads' q_proj/k_proj output (n_heads*d_head), so patching "
        "one head's q or k rescales every head's query or key of that position, which AtP*'s per-head "
        "QK fix does not model")),
    "phi": Arch(
        layers="model.layers", embed="model.embed_tokens", final=("model.final_layernorm",),
        attn_out="self_attn", mlp_out="mlp", head="self_attn.dense", neuron="mlp.fc2",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
        attn_norm="input_layernorm", mlp_norm="input_layernorm", edges=True, parallel=True,
    ),
    "phi3": Arch(
        layers="model.layers", embed="model.embed_tokens", final=("model.norm",),
        attn_out="self_attn", mlp_out="mlp", head="self_attn.o_proj", neuron="mlp.down_proj",
        q="self_attn.qkv_proj", qkv_layout="phi3",
        attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", gated=True, edges=True,
    ),
    "opt": Arch(
        layers="model.decoder.layers", embed="model.decoder.embed_tokens",
        final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
        attn_out="self_attn", mlp_out="fc2", head="self_attn.out_proj", neuron="fc2",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj",
        attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", mlp_in="fc1", edges=True,
        edges_flag="do_layer_norm_before",
        notes="fc2 sees [batch*pos, d] flattened; no MLP submodule; OPT-350m normalises after each residual add "
              "(do_layer_norm_before=False: no edges)",
    ),
}

ARCH_JSON_EXAMPLE = """{"layers": "model.layers", "embed": "model.embed_tokens", "final": ["model.norm"],
 "attn_out": "self_attn", "mlp_out": "mlp", "head": "self_attn.o_proj", "neuron": "mlp.down_proj",
 "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
 "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "gated": true, "edges": true}"""

_HOW_TO_ADD = f"""To run it, say where its modules are:
  - it is named like a known family (a fine-tune or renamed copy): --arch KNOWN_FAMILY (e.g. --arch llama),
    in Python attrpatch.use_arch("my_model_type", "llama");
  - otherwise: --arch-file arch.json, a JSON object whose keys are attrpatch.Arch's fields, e.g.
{ARCH_JSON_EXAMPLE}
    in Python attrpatch.use_arch("my_model_type", attrpatch.arch_from_json("arch.json"))
    (or attrpatch.register_arch("my_model_type", attrpatch.Arch(...)))."""


def how_to_add(model_type: str) -> str:
    """What to do about a model whose ``config.model_type`` has no row: the CLI flags and the Python calls."""
    return _HOW_TO_ADD.replace('"my_model_type"', repr(model_type).replace("'", '"'))


class UnsupportedModel(KeyError):
    """A model family or module path the tables do not describe (message printed as written)."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_arch(model_type: str, arch: Arch) -> None:
    """Add (or replace) the table entry used for models whose ``config.model_type`` is ``model_type``."""
    if not isinstance(arch, Arch):
        raise TypeError(f"register_arch needs an attrpatch.Arch, got {type(arch).__name__}")
    ARCHS[model_type] = arch


def _fields() -> tuple[list[str], list[str]]:
    """Arch's (required, optional) field names."""
    required = [f.name for f in fields(Arch) if f.default is MISSING]
    return required, [f.name for f in fields(Arch) if f.default is not MISSING]


def arch_from_json(source: "str | Path | dict") -> Arch:
    """An Arch from a JSON file (path) or its parsed object, whose keys are Arch's fields; ``final`` is a
    list of module paths. Unknown, missing or mistyped keys raise a ValueError that lists the valid ones."""
    where = "arch JSON" if isinstance(source, dict) else str(source)
    if isinstance(source, dict):
        data = source
    else:
        try:
            data = json.loads(Path(source).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err}); expected an object like\n{ARCH_JSON_EXAMPLE}") from err
    required, optional = _fields()
    valid = f"required: {', '.join(required)}; optional: {', '.join(optional)}"
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object of Arch fields, got {type(data).__name__}; {valid}")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {valid}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(map(repr, missing))}; {valid}")
    final = data["final"]
    if not isinstance(final, list) or not all(isinstance(p, str) for p in final):
        raise ValueError(f"{where}: 'final' must be a list of module paths, e.g. [\"model.norm\"], got {final!r}")
    flags = {f.name for f in fields(Arch) if isinstance(f.default, bool)}
    for key, value in data.items():
        if key in flags:
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {key!r} must be true or false, got {value!r}")
        elif key != "final" and not (isinstance(value, str) or (value is None and key in optional)):
            raise ValueError(f"{where}: {key!r} must be a string, got {value!r}")
    try:
        return Arch(**{**data, "final": tuple(final)})
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def use_arch(model_type: str, family_or_arch: "str | Arch") -> Arch:
    """Bind models whose ``config.model_type`` is ``model_type`` to a known family's row (by name, a key
    of ``ARCHS``) or to an Arch (e.g. from :func:`arch_from_json`); returns the row bound."""
    if isinstance(family_or_arch, str):
        if family_or_arch not in ARCHS:
            raise ValueError(f"Unknown family {family_or_arch!r} for model_type {model_type!r}; known: "
                             f"{', '.join(sorted(ARCHS))}. For a family none of them describes, use "
                             "--arch-file arch.json (attrpatch.arch_from_json).")
        family_or_arch = ARCHS[family_or_arch]
    register_arch(model_type, family_or_arch)
    return family_or_arch
