"""The memory plan of a screen before it runs: trace attrpatch's own code on a model whose weights are on the
meta device, under engine/memory.py's tracker, and read the peak bytes of each phase off it. No weight is
read and nothing is computed: meta tensors carry shapes and dtypes only, so a 32-layer model plans in
seconds on a CPU. The same function on a real model (``trace_screen``) measures instead of planning.

Traced, through the functions the screen calls, with the screen's arguments (steps.attribution_options,
steps.patch_options):
  load          the weights: every parameter and buffer storage, once.
  attribution   methods/estimators/attribution.attribute on every prompt, for the first direction, once per estimator
                (the other direction has the same shapes), with --batch-size and --low-memory.
  verification  methods/patching.patch of the first chunk of prompts (--batch-size; later chunks repeat its
                shapes) for every verified component of every site, in one call as Steps.verify makes it,
                its source and receiving runs kept in a shared ``runs`` dict as the screen keeps them.

Not traced, or traced differently from a real run:
  - The prompts are synthetic token ids [n_prompts, seq_len], full length (no padding), clean and corrupt
    differing from the first position: no shared prefix is skipped (engine/memory.py's answers to value
    reads). A real task whose prompts share a prefix computes fewer positions per patched pass.
  - Which components are verified depends on the scores: the plan verifies the same number per site (top-k
    plus the control sample), drawn by the library's ranking (analysis/ranking.plan_verification) from
    seeded random scores.
  - The baseline forwards, diagnostics, half and frozen patches and --fn-subsets: passes no wider than
    verification's (the frozen patches add one RelP attribution per large error, like the attribution
    phase, their source run kept for both freezes: its values and the deltas alive at once, up to twice the
    source cache of the large errors' sites); the CPU copies of scores, reports and figures.
  - Inside an op: a fused kernel's workspace, allocator caching and fragmentation (engine/memory.py). sdpa
    attention is planned as the fused CPU flash kernel (engine/memory.fused_attention: no attention
    matrix, as CUDA's flash and memory-efficient kernels); eager attention (Gemma 2) keeps its matrices.
  - Edge screens: edge_planning.py (``attrpatch plan --edges``). Several processes (torchrun): not planned.

``attrpatch plan`` (cli/plan.py) prints a plan; ``--max-memory`` on screen takes the settings ``fit`` chooses
from one (edge_planning.fit_edges for edges).
"""

import re
from dataclasses import replace

import torch
from torch import nn

from .analysis.ranking import plan_verification
from .config import ScreenConfig
from .engine.memory import MemoryTracker, fused_attention
from .engine.metrics import graded
from .inputs.batch import PromptBatch
from .methods.estimators.attribution import Scores, attribute
from .methods.patching.exact import patch
from .methods.patching.passes import default_rows
from .model import hf_compat
from .model.loading import parse_dtype
from .model.sites import as_spec, site_shape
from .steps import attribution_options, patch_options

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'24GB' -> 24e9, '24GiB' -> 24 * 2**30, '512MB', '1e9' -> bytes."""
    found = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = found and found.group(2).lower()
    if not found or unit not in UNITS:
        raise ValueError(f"memory size {text!r}: expected a number and a unit, one of "
                         f"{', '.join(u.upper() for u in UNITS if u)}, e.g. 24GB or 80GiB")
    return int(float(found.group(1)) * UNITS[unit])


def meta_model(config, dtype: str = "float32") -> nn.Module:
    """The model of ``config`` (a transformers config) with its weights on the meta device, in eval mode."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype))
    return model.eval()


def synthetic_batch(n_prompts: int, seq_len: int, device: str | torch.device = "meta") -> PromptBatch:
    """Prompt pairs of ``seq_len`` tokens: clean all 2, corrupt all 3, answer 2, wrong 3, no padding."""
    if n_prompts < 1 or seq_len < 1:
        raise ValueError(f"a plan needs n_prompts >= 1 and seq_len >= 1, got {n_prompts} and {seq_len}")
    ids = torch.full((n_prompts, seq_len), 2, dtype=torch.long, device=device)
    one = torch.ones(n_prompts, dtype=torch.long, device=device)
    return PromptBatch(clean=ids, corrupt=ids + 1, mask=torch.ones_like(ids), answer=2 * one, wrong=3 * one,
                       last=(seq_len - 1) * one)


def verified_components(spec, n_pos: int, config: ScreenConfig) -> list:
    """Every site's verified components (top-k and control sample, analysis/ranking.py) under seeded random
    scores of the right shapes: as many per site as a screen verifies, with no scores to rank by."""
    g = torch.Generator().manual_seed(config.seed)
    metrics = graded(config.metrics)
    values = {m: {s: torch.randn(site_shape(s, spec.dims, n_pos), generator=g) for s in config.sites} for m in metrics}
    scores = Scores(values=values, direction=config.directions[0], clean_metric={}, corrupt_metric={}, n_prompts=1)
    plan = plan_verification(spec.dims, n_pos, {est: scores for est in config.estimators}, config)
    return [c for site_plan in plan.values() for c in site_plan.verified]


def trace_screen(model: nn.Module, batch: PromptBatch, config: ScreenConfig, *,
                 phases: tuple[str, ...] = ("attribution", "verification")) -> dict:
    """The memory of a screen's attribution and verification (module docstring) of ``model`` on ``batch``:
    planned on a meta model and batch, measured on real ones. Returns MemoryTracker.summary() with a
    "load" phase (the weights)."""
    spec = as_spec(model)
    config = replace(config, progress=False)
    direction = config.directions[0]
    comps = verified_components(spec, batch.n_pos, config) if "verification" in phases else []  # not traced
    tracker = MemoryTracker(model)
    with fused_attention(), hf_compat.meta_autocast(), tracker:
        with tracker.phase("load"):
            pass
        if "attribution" in phases:
            with tracker.phase("attribution"):
                for est in config.estimators:
                    scores = attribute(spec, batch, **attribution_options(config, direction, est))
                    del scores
        if "verification" in phases:
            chunk = batch.rows(slice(0, config.batch_size or batch.n))
            runs: dict = {}  # the screen keeps its runs for the diagnostics and the half patches
            with tracker.phase("verification"):
                effects = patch(spec, chunk, comps, metrics=config.metrics, runs=runs,
                                **patch_options(config, direction))
                del effects
            del runs
    return tracker.summary()


def plan_screen(model_config, config: ScreenConfig, *, n_prompts: int, seq_len: int, dtype: str = "float32",
                device: str = "cuda", max_memory: int | None = None) -> dict:
    """The memory plan of ``attrpatch screen`` (module docstring) for the model of ``model_config`` on
    ``device`` (its type sets the default copies per patched pass, methods/passes.default_rows).

    Returns {"peak_bytes", "weights_bytes", "devices", "phases": {name: {"peak_bytes", ..}}, "largest",
    "settings": the settings planned}; with ``max_memory`` (bytes) also "max_memory", "fits" and
    "alternatives": for each phase that does not fit, the settings tried, largest first, with their peaks."""
    model = meta_model(model_config, dtype)
    batch = synthetic_batch(n_prompts, seq_len)
    config = _with_copies(config, device, n_prompts, seq_len)
    plan = name_devices(trace_screen(model, batch, config), device)
    plan["settings"] = _settings(config, n_prompts, seq_len, dtype, device)
    if max_memory is not None:
        plan["max_memory"] = max_memory
        plan["fits"] = plan["peak_bytes"] <= max_memory
        alone = plan["weights_bytes"] > max_memory  # no setting helps: --device-map auto over several devices
        plan["alternatives"] = {} if plan["fits"] or alone else _alternatives(model, batch, config, plan, max_memory)
    return plan


def name_devices(plan: dict, device: str) -> dict:
    """A meta trace's devices (in all and per phase) by name, in place: meta is ``device`` (_on)."""
    plan["devices"] = _on(device, plan["devices"])
    for phase in plan["phases"].values():
        phase["devices"] = _on(device, phase["devices"])
    return plan


def _on(device: str, devices: dict) -> dict:
    """A meta trace's devices by name: meta is ``device``; a real CPU tensor is a copy off it to the host."""
    return {device if d == "meta" else "cpu (host copies)" if d == "cpu" else d: b for d, b in devices.items()}


def _with_copies(config: ScreenConfig, device: str, n_prompts: int, seq_len: int) -> ScreenConfig:
    """``config`` with the copies per patched pass a screen on ``device`` uses for full-length passes."""
    if config.copies is not None:
        return config
    chunk = min(config.batch_size or n_prompts, n_prompts)
    return replace(config, copies=max(1, default_rows(torch.device(device), seq_len) // chunk))


def _settings(config: ScreenConfig, n_prompts: int, seq_len: int, dtype: str, device: str) -> dict:
    return {"n_prompts": n_prompts, "seq_len": seq_len, "dtype": dtype, "device": device, "sites": list(config.sites),
            "top_k": config.top_k, "random_k": config.random_k, "batch_size": config.batch_size or n_prompts,
            "copies": config.copies, "low_memory": config.low_memory, "estimator": config.estimator,
            "metrics": list(config.metrics)}


def halves(n: int) -> list[int]:
    """n, n/2, n/4, .., 1."""
    out = [n]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _alternatives(model, batch, config: ScreenConfig, plan: dict, max_memory: int) -> dict:
    """For each phase over ``max_memory``: settings with less memory, tried in order until one fits:
    attribution (--low-memory, then smaller --batch-size), verification (fewer --copies, then smaller
    --batch-size at one copy). Each entry: {"batch_size", "copies", "low_memory", "peak_bytes", "fits"}."""
    found = {}
    n = config.batch_size or batch.n
    if plan["phases"]["attribution"]["peak_bytes"] > max_memory:
        tries = [(low, b, config.copies) for low in dict.fromkeys((config.low_memory, True)) for b in halves(n)
                 if (low, b) != (config.low_memory, n)]  # the planned setting itself did not fit
        found["attribution"] = _try(model, batch, config, tries, "attribution", max_memory)
    if plan["phases"]["verification"]["peak_bytes"] > max_memory:
        tries = [(config.low_memory, n, c) for c in halves(config.copies)[1:]]
        tries += [(config.low_memory, b, 1) for b in halves(n)[1:]]
        found["verification"] = _try(model, batch, config, tries, "verification", max_memory)
    return found


def _try(model, batch, config, tries, phase: str, max_memory: int) -> list[dict]:
    out = []
    for low, size, copies in tries:
        trial = replace(config, low_memory=low, batch_size=size, copies=copies)
        peak = trace_screen(model, batch, trial, phases=(phase,))["peak_bytes"]
        out.append({"batch_size": size, "copies": copies, "low_memory": low, "peak_bytes": peak,
                    "fits": peak <= max_memory})
        if peak <= max_memory:
            break
    return out


def model_config(model: str | None = None, config_file: str | None = None, trust_remote_code: bool = False):
    """The transformers config to plan for: ``config_file`` (a config.json), else the config of ``model`` (a
    folder, hub name or .gguf file; None: the embedded toy model). Reads no weights."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from .model.loading import DEFAULT_MODEL

    if config_file is not None:
        values = json.loads(Path(config_file).read_text())
        if "model_type" not in values:
            raise ValueError(f"{config_file} has no \"model_type\"; a config.json names its family, e.g. "
                             "\"model_type\": \"llama\"")
        return AutoConfig.for_model(values.pop("model_type"), **values)
    source = str(DEFAULT_MODEL if model is None else model)
    if source.endswith(".gguf"):
        return AutoConfig.from_pretrained(str(Path(source).parent), gguf_file=Path(source).name)
    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def fit(model_config, config: ScreenConfig, *, n_prompts: int, seq_len: int, max_memory: int,
        dtype: str = "float32", device: str = "cuda") -> tuple[ScreenConfig, dict]:
    """``config`` with the --batch-size, --copies and --low-memory that fit ``max_memory`` by the plan
    (``plan_screen``'s alternatives: the first that fits, per phase), and the plan, its choice in
    ``plan["chosen"]``. The copies are set even when the planned ones fit: a run left to choose takes more
    copies for passes that skip a shared prefix. Raises ValueError when nothing tried fits."""
    plan = plan_screen(model_config, config, n_prompts=n_prompts, seq_len=seq_len, dtype=dtype, device=device,
                       max_memory=max_memory)
    if plan["weights_bytes"] > max_memory:
        raise ValueError(f"--max-memory {size_text(max_memory)}: the weights alone take {size_text(plan['weights_bytes'])}; "
                         "spread them with --device-map auto, or choose a smaller --dtype")
    chosen = {"batch_size": plan["settings"]["batch_size"], "copies": plan["settings"]["copies"],
              "low_memory": config.low_memory}
    for phase, tries in plan["alternatives"].items():
        found = next((t for t in tries if t["fits"]), None)
        if found is None:
            least = min(tries, key=lambda t: t["peak_bytes"])
            raise ValueError(f"--max-memory {size_text(max_memory)}: the {phase} of this screen does not fit in any "
                             f"setting tried (the least: {size_text(least['peak_bytes'])} at --batch-size "
                             f"{least['batch_size']}{' --low-memory' if least['low_memory'] else ''}); use fewer "
                             "--sites, --device-map auto, or a larger limit")
        chosen["batch_size"] = min(chosen["batch_size"], found["batch_size"])
        if phase == "attribution":
            chosen["low_memory"] = found["low_memory"]
        else:
            chosen["copies"] = found["copies"]
    plan["chosen"] = chosen
    return replace(config, **chosen), plan


def size_text(n: int) -> str:
    """Bytes as text: 1.23 GB, 4.56 MB, 7.89 kB, 12 B."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def chosen_text(plan: dict) -> str:
    """What ``fit`` chose, with the plan's peak per phase under the limit: one line."""
    c, peaks = plan["chosen"], ", ".join(f"{n} {size_text(p['peak_bytes'])}" for n, p in plan["phases"].items())
    return (f"attrpatch: --max-memory {size_text(plan['max_memory'])}: chose --batch-size {c['batch_size']} --copies "
            f"{c['copies']}{' --low-memory' if c['low_memory'] else ''} (planned peaks at the settings asked for: "
            f"{peaks}; {'fits' if plan['fits'] else 'did not fit'} as asked)")
