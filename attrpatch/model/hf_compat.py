"""The one home of what attrpatch relies on in transformers beyond its documented model API, and which
versions do what (tested: pyproject.toml's range, both ends in CI; HF_NOTES-style facts, read off each).

The key/value cache: a resumed pass (engine/partial.py) computes only the positions from the first one a patch
can change, and reads the earlier positions' keys and values from the receiving run's cache. Masks, positions
and copies are attrpatch's own; what it needs of transformers:

    what                                 4.57.6 - 5.24                     5.25 on
    keyword of the cache, model + block  past_key_values (GPT-NeoX block:  cache (the old name is renamed by
                                         layer_past)                       a shim until 5.40, not looked up)
    the run's cache on the output        out.past_key_values               out.cache
    a layer's keys, values               cache.layers[l].keys, .values: [batch, kv_head, pos, d_head]

A block's rotary (cos, sin) arrive as ``position_embeddings``, in 4.57's Gemma 3 as ``position_embeddings_global``
and ``position_embeddings_local``: a resumed pass slices every ``position_embeddings*`` tuple.

Names are found from the signature and the output object, never from a version number, so a rename that keeps
the meaning works as it is; a block that takes no cache under a known name is refused loudly (passing none
would silently attend over the resumed positions only).

GPT-NeoX's LM head is ``embed_out`` before 5.0 and ``lm_head`` from it: ModelSpec.unembedding falls back to
HF's ``get_output_embeddings()``. Gemma 3's ``base_model`` is the whole CausalLM in 4.57 (its prefix names a
module it lacks): ``base_model`` falls back to ``get_decoder()``.

Configs: transformers 5 saves the rotary settings as ``"rope_parameters": {"rope_theta": ..., "rope_type": ...}``;
4.x reads only top-level ``rope_theta``/``rope_scaling`` and silently builds the model with its default theta
(SmolLM2: 10000 instead of 100000, logits off by ~0.5). ``portable_config`` writes both forms into the folders
attrpatch saves (5.x reads them as one), and ``legacy_rope`` gives 4.x the old keys for any other such folder.
(Gemma 3's per-layer-type rope_parameters have no flat 4.x form and are left as they are.)

Tokenizers: transformers 5 saves a fast tokenizer as ``"tokenizer_class": "TokenizersBackend"``, a class 4.x
does not have; both read ``"PreTrainedTokenizerFast"`` (5.x as an alias of the same class: same ids, same
special tokens). Folders attrpatch writes (the embedded toy model, a fetched SmolLM2) name that one, and
``load_tokenizer`` reads any other such folder from its tokenizer.json. A GGUF file's tokenizer: 4.57 makes a
LlamaTokenizerFast that prepends a BOS even where the file says ``tokenizer.ggml.add_bos_token = false``
(SmolLM2's; 5.x follows the file): ``load_tokenizer`` follows the file in every version.

Planning on the meta device: 4.57's rotary embeddings open ``torch.autocast(device_type=x.device.type,
enabled=False)``, which torch refuses for "meta" ("unsupported scalarType"); ``meta_autocast`` reads it as the
CPU's (disabled: a no-op either way). 5.x does not open one there.

Offloading (``device_map`` with "cpu" or "disk" entries beside an accelerator, or "disk" at all): accelerate's
hooks load an offloaded module's weights for its forward and leave meta tensors outside it. Activations,
gradients and module calls are all attrpatch's node code reads, so screens work as they are; the device the
inputs go to is the map's execution device (``execution_device``), not the first parameter's (meta when
offloaded). Edge code reads weights outside the forward (W_O, q/k/v columns, norms): ``offloaded`` lets it
refuse.
"""

import inspect
from contextlib import contextmanager
import json
from pathlib import Path

import torch
from torch import Tensor, nn

CACHE_NAMES = ("cache", "past_key_values", "layer_past")  # newest first


def cache_name(forward, owner: str) -> str:
    """The keyword under which ``forward`` (a model's or a block's) takes a key/value cache."""
    params = inspect.signature(forward).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    import transformers
    raise TypeError(f"{owner}.forward takes no key/value cache under any name attrpatch knows "
                    f"({', '.join(CACHE_NAMES)}; its parameters: {', '.join(params)}), with transformers "
                    f"{transformers.__version__}. Add the new name to CACHE_NAMES in attrpatch/model/hf_compat.py, "
                    f"or install a transformers version in attrpatch's tested range (pyproject.toml).")


def base_model(model: nn.Module) -> nn.Module:
    """The model without its LM head (whose output has ``last_hidden_state``)."""
    base = model.base_model
    return model.get_decoder() if base is model else base


def recording(model: nn.Module) -> dict:
    """Keyword arguments that make a (base) model forward keep every position's keys and values."""
    from transformers import DynamicCache  # a plain cache keeps every position, also of sliding-window layers
    return {"use_cache": True, cache_name(model.forward, type(model).__name__): DynamicCache()}


def recorded(out):
    """The cache a forward made with ``recording`` returns on its output object."""
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    raise TypeError(f"{type(out).__name__} carries no key/value cache (looked for .cache, .past_key_values)")


def layer_keys_values(cache, layer: int) -> tuple[Tensor, Tensor]:
    """Layer ``layer``'s recorded keys and values, each [batch, kv_head, pos, d_head]."""
    return cache.layers[layer].keys, cache.layers[layer].values


def prefix_cache(cache, first_pos: int, copies: list[int]):
    """A fresh cache holding the recorded run's first ``first_pos`` positions at each layer, repeated
    ``copies[layer]`` times (copy-major: one block of rows per copy that computes the layer)."""
    from transformers import DynamicCache

    past = DynamicCache()
    for layer, n in enumerate(copies):
        keys, values = layer_keys_values(cache, layer)
        keys, values = keys[:, :, :first_pos], values[:, :, :first_pos]  # [batch, kv_head, first_pos, d_head]
        if n:  # every copy needs its own rows, even for a batch of one prompt
            keys, values = keys.repeat(n, 1, 1, 1), values.repeat(n, 1, 1, 1)
        past.update(keys, values, layer)
    return past


def offloaded(model: nn.Module) -> bool:
    """Whether accelerate offloads some of ``model``'s weights (meta outside the forward; module docstring)."""
    return any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in model.modules())


def offloaded_value(model: nn.Module, name: str) -> Tensor:
    """The stored value of the state-dict entry ``name`` that accelerate offloaded (meta on the model): read
    from the offload map of the module whose hook holds it."""
    for prefix, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if getattr(hook, "offload", False) and name.startswith(f"{prefix}." if prefix else ""):
            key = name[len(prefix) + 1:] if prefix else name
            if hook.weights_map is not None and key in hook.weights_map:
                return hook.weights_map[key]
    raise KeyError(f"{name} is on the meta device and no accelerate offload hook of the model holds it")


def execution_device(model: nn.Module) -> torch.device:
    """The device a model dispatched with a device map computes on first: its first accelerator in
    ``hf_device_map`` (ints are CUDA indices), else the CPU (a map of "cpu" and "disk" only)."""
    found = [d for d in getattr(model, "hf_device_map", {}).values() if d not in ("cpu", "disk")]
    if not found:
        return torch.device("cpu")
    return torch.device(f"cuda:{found[0]}" if isinstance(found[0], int) else found[0])


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(source: str, **kwargs):
    """``AutoTokenizer.from_pretrained(source)``, falling back to the folder's tokenizer.json when this version of
    transformers does not know the class named in it; None when the source has no tokenizer (token-id tasks).
    A folder with no tokenizer file is not asked at all: 4.x would try to build one from the model type and
    fail on a missing optional package (protobuf) instead. With ``gguf_file``, BOS as the file says."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(source)
    if folder.is_dir() and "gguf_file" not in kwargs and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, TypeError):
        if "gguf_file" in kwargs or not (folder / "tokenizer.json").is_file():
            return None
        return PreTrainedTokenizerFast.from_pretrained(source)
    if "gguf_file" in kwargs and getattr(tokenizer, "add_bos_token", False) \
            and not _gguf_flag(folder / kwargs["gguf_file"], "tokenizer.ggml.add_bos_token", default=True):
        tokenizer.add_bos_token = False  # LlamaTokenizerFast rebuilds its post-processor
    return tokenizer


def _gguf_flag(path: Path, key: str, default: bool) -> bool:
    """A boolean field of a GGUF file's metadata (``default`` when absent)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get(key)
    return default if field is None else bool(field.parts[field.data[0]][0])


def legacy_rope(config: dict) -> dict:
    """The 4.x keys (rope_theta, and rope_scaling unless the type is default) of a 5.x config's flat
    rope_parameters, when the config lacks them; {} otherwise."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or "rope_theta" in config:
        return {}
    keys = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default":
        keys["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return keys


def reads_rope_parameters() -> bool:
    """Whether this transformers reads ``rope_parameters`` (5.x) rather than only the 4.x keys."""
    from transformers import LlamaConfig
    return hasattr(LlamaConfig(), "rope_parameters")


def portable_config(folder: Path) -> None:
    """Add the 4.x rope keys to a config.json saved by 5.x (legacy_rope)."""
    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    if legacy_rope(data):
        path.write_text(json.dumps({**data, **legacy_rope(data)}, indent=2) + "\n")


def portable_tokenizer(folder: Path) -> None:
    """Name the fast tokenizer saved in ``folder`` by the class every tested transformers reads."""
    config = Path(folder) / "tokenizer_config.json"
    data = json.loads(config.read_text())
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.write_text(json.dumps(data, indent=2) + "\n")


@contextmanager
def meta_autocast():
    """While tracing on the meta device: ``torch.autocast(device_type="meta", ...)`` opens the CPU's instead."""
    original = torch.autocast

    class Autocast(original):
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)
    torch.autocast = Autocast
    try:
        yield
    finally:
        torch.autocast = original
