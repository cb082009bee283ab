"""Provenance of a run: the weights' hash, the library versions, and the manifest (model, prompts,
options) that identifies a run for ``--resume``."""

import hashlib
import json
import platform

import torch

from ..engine.metrics import wide
from ..model.hf_compat import offloaded_value


def weights_hash(model: torch.nn.Module, budget_bytes: int = 1 << 31) -> str:
    """sha256 over parameter names, shapes and bytes (offloaded ones read from where accelerate keeps them);
    above ``budget_bytes`` only each tensor's first and last MiB are hashed (the hash says which)."""
    h = hashlib.sha256()
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    sampled = total > budget_bytes
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        t = offloaded_value(model, name) if t.is_meta else t  # weights accelerate offloaded: their stored value
        raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8)
        if sampled and raw.numel() > 2 << 20:
            raw = torch.cat([raw[: 1 << 20], raw[-(1 << 20):]])
        h.update(raw.numpy().tobytes())
    return ("sampled-sha256:" if sampled else "sha256:") + h.hexdigest()


def versions() -> dict:
    import transformers

    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version("attrpatch")
    except PackageNotFoundError:  # run from a source tree that is not installed
        ours = "unknown"
    return {"attrpatch": ours, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def manifest_dict(*, model_name: str, model: torch.nn.Module, pairs: list, task: str, options: dict,
                  argv: list[str] | None = None) -> dict:
    prompts = [p.to_dict() if hasattr(p, "to_dict") else vars(p) for p in pairs]
    digest = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
    dtype = next(model.parameters()).dtype  # the model's; scores and effects accumulate in wide(dtype)
    return {"model": model_name, "weights": weights_hash(model), "task": task, "prompts_sha256": digest,
            "dtype": str(dtype).removeprefix("torch."), "accumulation_dtype": str(wide(dtype)).removeprefix("torch."),
            "prompts": prompts if len(prompts) <= 2000 else None, "options": options, "argv": argv,
            "versions": versions()}
