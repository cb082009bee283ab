"""Writing a screen's results: report.json, report.md, results.csv, scores.safetensors, manifest.json.

Every file is written atomically (a temporary file in the same folder, then a rename), so a killed run
never leaves a truncated report.
"""

import csv
import hashlib
import io
import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

import torch

from . import summary
from .screen import ScreenResult

REPORT_VERSION = 1


def write_atomic(path: Path, write: Callable[[io.IOBase], None], binary: bool = False) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": "", "encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(x):
    """JSON-safe: NaN/inf -> None, tensors -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    return x


def write_json(path: Path, obj) -> None:
    write_atomic(path, lambda f: json.dump(_clean(obj), f, indent=2, allow_nan=False))


def report_dict(result: ScreenResult, *, model: str, task: str, tokens: list[str] | None = None) -> dict:
    c = result.config
    return {
        "version": REPORT_VERSION, "model": model, "model_class": result.model, "task": task,
        "n_prompts": result.n_prompts, "n_pos": result.n_pos, "tokens": tokens,
        "direction": c.direction, "directions": list(c.directions), "metric": c.metric, "metrics": list(c.metrics),
        "sites": list(c.sites), "positions": {s: ("each" if c.per_position(s) else "all") for s in c.sites},
        "top_k": c.top_k, "random_k": c.random_k,
        "clean_metric": result.clean_metric, "corrupt_metric": result.corrupt_metric,
        "components": result.components, "agreement": result.agreement,
        "false_negatives": result.false_negatives, "attention": result.attention,
        "estimator": c.estimator, "estimators": result.estimators, "numerical": result.numerical,
        "timing": result.timing,
    }


def write_csv(path: Path, rows: list[dict]) -> None:
    def write(f):
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    write_atomic(path, write)


def write_scores(path: Path, result: ScreenResult) -> None:
    """Every AtP score as float32 tensors named ``{direction}/{metric}/{site}``; the axis names of each
    (``layer pos``, ``layer pos head``, ``layer pos neuron``) are in the file's metadata."""
    from safetensors.torch import save

    tensors, axes = {}, {}
    for direction, scores in result.scores.items():
        for m, per_site in scores.values.items():
            for site, t in per_site.items():
                name = f"{direction}/{m}/{site}"
                tensors[name] = t.detach().float().cpu().contiguous()
                unit = {"neuron": " neuron", "head": " head", "q": " head", "k": " kv_head", "v": " kv_head"}
                axes[name] = ("batch " if scores.per_prompt else "") + "layer pos" + unit.get(site, "")
    meta = {"axes": json.dumps(axes), "note": "AtP scores per position, mean over prompts"}
    data = save(tensors, metadata=meta)
    write_atomic(path, lambda f: f.write(data), binary=True)


def load_scores(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, axes) from a scores.safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        axes = json.loads(f.metadata()["axes"])
    return load_file(str(path)), axes


def weights_hash(model: torch.nn.Module, budget_bytes: int = 1 << 31) -> str:
    """sha256 over parameter names, shapes and bytes; above ``budget_bytes`` only each tensor's first
    and last MiB are hashed (the hash says which)."""
    h = hashlib.sha256()
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    sampled = total > budget_bytes
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8)
        if sampled and raw.numel() > 2 << 20:
            raw = torch.cat([raw[: 1 << 20], raw[-(1 << 20):]])
        h.update(raw.numpy().tobytes())
    return ("sampled-sha256:" if sampled else "sha256:") + h.hexdigest()


def versions() -> dict:
    import transformers

    from . import __version__
    return {"attrpatch": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def manifest_dict(*, model_name: str, model: torch.nn.Module, pairs: list, task: str, options: dict,
                  argv: list[str] | None = None) -> dict:
    prompts = [p.to_dict() if hasattr(p, "to_dict") else vars(p) for p in pairs]
    digest = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()
    return {"model": model_name, "weights": weights_hash(model), "task": task, "prompts_sha256": digest,
            "prompts": prompts if len(prompts) <= 2000 else None, "options": options, "argv": argv,
            "versions": versions()}


def write_run(out: Path, result: ScreenResult, *, model_name: str, task: str, tokens, manifest: dict) -> dict:
    """Write every output file into ``out``; returns the report dict."""
    out = Path(out)
    report = report_dict(result, model=model_name, task=task, tokens=tokens)
    write_scores(out / "scores.safetensors", result)
    write_csv(out / "results.csv", result.rows)
    write_json(out / "manifest.json", manifest)
    write_json(out / "report.json", report)
    write_atomic(out / "report.md", lambda f: f.write(markdown(report)))
    return report


def markdown(report: dict) -> str:
    """The human summary a researcher reads first (see summary.py)."""
    return summary.render(report)
