"""The memory plan of a screen before it runs: trace attrpatch's own code on a model whose weights are on the
meta device, under engine/memory.py's tracker, and read the peak bytes of each phase off it. No weight is
read and nothing is computed: meta tensors carry shapes and dtypes only, so a 32-layer model plans in
seconds on a CPU. The same function on a real model (``trace_screen``) measures instead of planning.

Traced, through the functions the screen calls, with the screen's arguments (steps.attribution_options,
steps.patch_options):
  load          the weights: every parameter and buffer storage, once.
  attribution   methods/attribution.attribute on every prompt, for the first direction, once per estimator
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
    phase); the CPU copies of scores, reports and figures.
  - Inside an op: a fused kernel's workspace, allocator caching and fragmentation (engine/memory.py). sdpa
    attention is planned as the fused CPU flash kernel (engine/memory.fused_attention: no attention
    matrix, as CUDA's flash and memory-efficient kernels); eager attention (Gemma 2) keeps its matrices.
  - Edge screens (attrpatch edges) and several processes (torchrun): not planned.
"""

import re
from dataclasses import replace

import torch
from torch import nn

from .analysis.ranking import plan_verification
from .engine.memory import MemoryTracker, fused_attention
from .engine.metrics import graded
from .inputs.batch import PromptBatch
from .methods.attribution import Scores, attribute
from .methods.passes import default_rows
from .methods.patching import patch
from .model.loading import parse_dtype
from .model.sites import as_spec, site_shape
from .screening import ScreenConfig
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
    return [c for site_plan in plan.values() for c in site_plan["verified"]]


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
    with fused_attention(), tracker:
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
    plan = trace_screen(model, batch, config)
    plan["devices"] = _on(device, plan["devices"])
    for phase in plan["phases"].values():
        phase["devices"] = _on(device, phase["devices"])
    plan["settings"] = _settings(config, n_prompts, seq_len, dtype, device)
    if max_memory is not None:
        plan["max_memory"] = max_memory
        plan["fits"] = plan["peak_bytes"] <= max_memory
        alone = plan["weights_bytes"] > max_memory  # no setting helps: --device-map auto over several devices
        plan["alternatives"] = {} if plan["fits"] or alone else _alternatives(model, batch, config, plan, max_memory)
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


def _halves(n: int) -> list[int]:
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
        tries = [(low, b, config.copies) for low in dict.fromkeys((config.low_memory, True)) for b in _halves(n)
                 if (low, b) != (config.low_memory, n)]  # the planned setting itself did not fit
        found["attribution"] = _try(model, batch, config, tries, "attribution", max_memory)
    if plan["phases"]["verification"]["peak_bytes"] > max_memory:
        tries = [(config.low_memory, n, c) for c in _halves(config.copies)[1:]]
        tries += [(config.low_memory, b, 1) for b in _halves(n)[1:]]
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


def _size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def describe(plan: dict) -> str:
    """The plan as text: weights, peak per phase and device, the largest buffer, the settings and, with a
    memory limit, whether they fit and what does."""
    s = plan["settings"]
    lines = [f"memory plan ({plan.get('model', 'model')}, {s['dtype']}, {s['n_prompts']} prompts x {s['seq_len']} "
             f"tokens, on {s['device']}; traced on the meta device)",
             f"  {'weights':14s} {_size(plan['weights_bytes']):>10s}"]
    for name, phase in plan["phases"].items():
        devices = ", ".join(f"{d}: {_size(b)}" for d, b in phase["devices"].items())
        lines.append(f"  {name:14s} {_size(phase['peak_bytes']):>10s}  peak ({devices})")
    lines.append(f"  {'peak':14s} {_size(plan['peak_bytes']):>10s}  (" +
                 ", ".join(f"{d}: {_size(b)}" for d, b in plan["devices"].items()) + ")")
    big = plan.get("largest")
    if big:
        lines.append(f"  largest buffer: {_size(big['bytes'])}, {big['shape']} {big['dtype']} "
                     f"({big['op']}, {big['phase']})")
    lines.append("  settings: " + ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("metrics",)))
    if "max_memory" in plan:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"--max-memory {_size(plan['max_memory'])}: {verdict}")
        if plan["weights_bytes"] > plan["max_memory"]:
            lines.append("  the weights alone do not fit: --device-map auto spreads them over several devices")
        for phase, tries in plan.get("alternatives", {}).items():
            for t in tries:
                flags = (" --low-memory" if t["low_memory"] else "") + f" --batch-size {t['batch_size']}" + \
                        (f" --copies {t['copies']}" if phase == "verification" else "")
                lines.append(f"  {phase}:{flags}: {_size(t['peak_bytes'])}" + (" fits" if t["fits"] else ""))
            if not any(t["fits"] for t in tries):
                lines.append(f"  {phase}: nothing tried fits; use --device-map auto over several devices or fewer "
                             "--sites")
    return "\n".join(lines)


PLAN_EPILOG = """examples:
  attrpatch plan --model ./my-model --task ioi --max-memory 24GB
  attrpatch plan --config config.json --dtype bfloat16 --n-prompts 16 --seq-len 128 --device cuda --json
takes screen's options; traces attribution and one chunk of exact patching on meta weights (planning.py)."""


def add_plan_args(p) -> None:
    """``attrpatch plan``'s own options, beside screen's (cli.py adds those)."""
    p.add_argument("--config", default=None, help="a config.json to plan for instead of --model's (no weights read)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per prompt (default: the task's longest prompt, which needs --model's tokenizer)")
    p.add_argument("--max-memory", default=None, help="memory of one device, e.g. 24GB or 80GiB: says what fits")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def plan_command(args) -> int:
    """``attrpatch plan``: the screen's options (as cli._screen reads them) planned, printed as text or JSON."""
    import json

    limit = None if args.max_memory is None else parse_bytes(args.max_memory)
    model_cfg = model_config(args.model, args.config, args.trust_remote_code)
    config = ScreenConfig(sites=args.sites, metric=args.metric, metrics=args.metrics, seed=args.seed,
                          direction=args.direction or ("noise" if args.ablation else "denoise"), top_k=args.top_k,
                          random_k=args.random_k, positions=args.positions, batch_size=args.batch_size,
                          copies=args.copies, estimator=args.estimator, ig_steps=args.ig_steps,
                          ablation=args.ablation, low_memory=args.low_memory, progress=False)
    n_prompts, seq_len = args.n_prompts, args.seq_len
    if seq_len is None:
        n_prompts, seq_len = _task_shape(args, model_cfg, config)
    plan = plan_screen(model_cfg, config, n_prompts=n_prompts, seq_len=seq_len, dtype=args.dtype,
                       device=args.device, max_memory=limit)
    plan["model"] = args.config or args.model or "embedded toy model"
    print(json.dumps(plan) if args.json else describe(plan))
    return 0


def _task_shape(args, model_cfg, config: ScreenConfig) -> tuple[int, int]:
    """(prompts, tokens of the longest) of the task a screen would draw, encoded with --model's tokenizer."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from .model.loading import DEFAULT_MODEL
    from .pipeline import prepare_pairs

    if args.config is not None and args.model is None:
        raise ValueError("--config gives no tokenizer to encode the task with; pass --seq-len (tokens per prompt)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(args.model or DEFAULT_MODEL))
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a task of token ids needs none
    pairs, _ = prepare_pairs(SimpleNamespace(config=model_cfg), tokenizer, task=args.task, n_prompts=args.n_prompts,
                             seed=args.seed, per_position=any(config.per_position(s) for s in config.sites),
                             prepend_bos=args.prepend_bos, template=args.template)
    return len(pairs), max(len(p.clean_ids) for p in pairs)
