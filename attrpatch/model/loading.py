"""Loading a model and its tokenizer: a hub name or a local folder, safetensors only; the embedded toy
model when no name is given."""

from pathlib import Path

import torch

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "toy-gpt2"  # the embedded toy model
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; known: {', '.join(DTYPES)}.")
    return DTYPES[name]


def load(name: str | Path | None = None, *, device: str = "cpu", dtype: str = "float32",
         trust_remote_code: bool = False, device_map: str | None = None):
    """(model in eval mode, tokenizer or None). ``name``: hub name or folder; None: the embedded model.

    Weights load through safetensors only (no pickle); remote code runs only with ``trust_remote_code``.
    ``device_map="auto"`` (needs accelerate) spreads a model too large for one device over several.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(DEFAULT_MODEL if name is None else name)
    kwargs = dict(dtype=parse_dtype(dtype), use_safetensors=True, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise OSError(f"could not load model {source!r}: {err}\nGive a local folder with config.json and "
                      "*.safetensors weights, or a hub name reachable from this machine.") from err
    if device_map is None:
        model = model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # token-id tasks still work
    return model.eval(), tokenizer
