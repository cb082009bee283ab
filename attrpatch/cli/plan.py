"""``attrpatch plan``: the memory plan of a screen (planning.py) and, with --edges, of an edges run
(edge_planning.py), from the screen's options, printed as text or as one JSON object."""

from ..config import ScreenConfig, with_primary_metric
from ..planning import size_text, model_config, parse_bytes, plan_screen


def describe(plan: dict) -> str:
    """The plan as text: weights, peak per phase and device, the largest buffer, the settings and, with a
    memory limit, whether they fit and what does."""
    s = plan["settings"]
    lines = [f"memory plan ({plan.get('model', 'model')}, {s['dtype']}, {s['n_prompts']} prompts x {s['seq_len']} "
             f"tokens, on {s['device']}; traced on the meta device)",
             f"  {'weights':14s} {size_text(plan['weights_bytes']):>10s}"]
    for name, phase in plan["phases"].items():
        devices = ", ".join(f"{d}: {size_text(b)}" for d, b in phase["devices"].items())
        lines.append(f"  {name:14s} {size_text(phase['peak_bytes']):>10s}  peak ({devices})")
    lines.append(f"  {'peak':14s} {size_text(plan['peak_bytes']):>10s}  (" +
                 ", ".join(f"{d}: {size_text(b)}" for d, b in plan["devices"].items()) + ")")
    big = plan.get("largest")
    if big:
        lines.append(f"  largest buffer: {size_text(big['bytes'])}, {big['shape']} {big['dtype']} "
                     f"({big['op']}, {big['phase']})")
    lines.append("  settings: " + ", ".join(f"{k} {v}" for k, v in s.items()
                                            if k not in ("metrics", "edges", "dictionaries")))
    if "dictionaries" in s:
        lines.append("  dictionaries: " + ", ".join(s["dictionaries"]))
    if s["device"] == "cpu":
        lines.append("  one process: --processes 2 (a CPU screen of --direction both) runs the directions in two, "
                     "each holding its own activations beside the shared weights; --max-memory keeps one")
    if "edges" in s:
        lines.append("  edges settings: " + ", ".join(f"{k} {v}" for k, v in s["edges"].items() if k != "metrics"))
    if "max_memory" in plan:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"--max-memory {size_text(plan['max_memory'])}: {verdict}")
        if plan["weights_bytes"] > plan["max_memory"]:
            lines.append("  the weights alone do not fit: --device-map auto spreads them over several devices")
        for phase, tries in plan.get("alternatives", {}).items():
            for t in tries:
                flags = (" --low-memory" if t["low_memory"] else "") + f" --batch-size {t['batch_size']}" + \
                        (f" --copies {t['copies']}" if phase in ("verification", "edges") else "")
                peak = "" if t["peak_bytes"] is None else f" {size_text(t['peak_bytes'])}"
                lines.append(f"  {phase}:{flags}:{peak}" + (" fits" if t["fits"] else ""))
            if not any(t["fits"] for t in tries):
                lines.append(f"  {phase}: nothing tried fits; use --device-map auto over several devices or fewer "
                             "--sites")
        if "edges_fit_error" in plan:
            lines.append(f"  edges: {plan['edges_fit_error']}")
    return "\n".join(lines)


PLAN_EPILOG = """examples:
  attrpatch plan --model ./my-model --task ioi --max-memory 24GB
  attrpatch plan --config config.json --dtype bfloat16 --n-prompts 16 --seq-len 128 --device cuda --json
  attrpatch plan --config config.json --seq-len 128 --edges --max-memory 80GB   # an edges run's phases too
  attrpatch plan --model M --task ioi --sae SAE_L3 --sae SAE_L6                 # a feature screen's phases too
takes screen's options; traces attribution and one chunk of exact patching on meta weights (planning.py), and
with --edges EAP and edge patching (edge_planning.py). screen/edges --max-memory choose settings from it."""


def add_plan_args(p) -> None:
    """``attrpatch plan``'s own options, beside screen's (cli.py adds those)."""
    p.add_argument("--config", default=None, help="a config.json to plan for instead of --model's (no weights read)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per prompt (default: the task's longest prompt, which needs --model's tokenizer)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--sae", action="append", default=[], metavar="PATH[@hook]",
                   help="also plan a feature screen of this dictionary (repeatable; as screen --sae): phases features "
                        "and feature_patching, every latent taken as active (feature_planning.py); only the "
                        "safetensors header is read")
    p.add_argument("--edges", action="store_true",
                   help="also plan an edges run (attrpatch edges: EAP, then patching of its top 50 + 30 control "
                        "edges; --batch-size, --copies, --metric(s), --direction and --estimator ig apply): phases "
                        "edges and edge_patching")


def plan_command(args) -> int:
    """``attrpatch plan``: the screen's options (as cli._screen reads them) planned, printed as text or JSON;
    --edges adds an edges run's phases (edge_planning.py)."""
    import json

    limit = None if args.max_memory is None else parse_bytes(args.max_memory)
    model_cfg = model_config(args.model, args.config, args.trust_remote_code)
    config = with_primary_metric(ScreenConfig(sites=args.sites, metric=args.metric, metrics=args.metrics, seed=args.seed,
                          direction=args.direction or ("noise" if args.ablation else "denoise"), top_k=args.top_k,
                          random_k=args.random_k, positions=args.positions, batch_size=args.batch_size,
                          copies=args.copies, estimator=args.estimator, ig_steps=args.ig_steps,
                          ablation=args.ablation, low_memory=args.low_memory, progress=False))
    n_prompts, seq_len = args.n_prompts, args.seq_len
    if seq_len is None:
        n_prompts, seq_len = _task_shape(args, model_cfg, any(config.per_position(s) for s in config.sites))
    plan = plan_screen(model_cfg, config, n_prompts=n_prompts, seq_len=seq_len, dtype=args.dtype,
                       device=args.device, max_memory=limit)
    if args.sae:
        _add_features(plan, args, model_cfg, config, n_prompts, seq_len)
    if args.edges:
        _add_edges(plan, args, model_cfg, n_prompts, seq_len, limit)
    plan["model"] = args.config or args.model or "embedded toy model"
    print(json.dumps(plan) if args.json else describe(plan))
    return 0


def _add_features(plan: dict, args, model_cfg, config, n_prompts: int, seq_len: int) -> None:
    """The feature screen's phases of ``--sae``'s dictionaries into ``plan`` (feature_planning.py)."""
    from ..feature_planning import add_features, trace_features
    from ..model.dictionaries import load_dictionary
    from ..planning import meta_model, name_devices, synthetic_batch

    dictionaries = [load_dictionary(path, meta=True) for path in args.sae]
    traced = trace_features(meta_model(model_cfg, args.dtype), synthetic_batch(n_prompts, seq_len), dictionaries,
                            config)
    add_features(plan, name_devices(traced, args.device), dictionaries)
    if "max_memory" in plan:
        plan["fits"] = plan["peak_bytes"] <= plan["max_memory"]


def _add_edges(plan: dict, args, model_cfg, n_prompts: int, seq_len: int, limit: int | None) -> None:
    """The edges run's phases into ``plan``; over ``limit``, the settings edge_planning.fit_edges chooses
    ("alternatives": {"edges": [..]}, or the reason nothing fits)."""
    from ..edge_planning import add_edges, edge_config, fit_edges, plan_edges

    config = edge_config(args)
    add_edges(plan, plan_edges(model_cfg, config, n_prompts=n_prompts, seq_len=seq_len, dtype=args.dtype,
                               device=args.device))
    if limit is None:
        return
    plan["fits"] = plan["peak_bytes"] <= limit
    if max(plan["phases"][p]["peak_bytes"] for p in ("edges", "edge_patching")) > limit >= plan["weights_bytes"]:
        try:
            _, fitted = fit_edges(model_cfg, config, n_prompts=n_prompts, seq_len=seq_len, max_memory=limit,
                                  dtype=args.dtype, device=args.device)
            c = fitted["chosen"]
            plan.setdefault("alternatives", {})["edges"] = [{"batch_size": c["batch_size"], "copies": c["copies"],
                                                             "low_memory": False, "fits": True, "peak_bytes": None}]
        except ValueError as err:
            plan["edges_fit_error"] = str(err)


def fit_to_memory(args, model, tokenizer, config, edges: bool = False):
    """screen / edges --max-memory: ``config`` (a ScreenConfig, or an EdgeConfig with ``edges``) with the
    settings the plan of this model, task and device fits into the limit (planning.fit, edge_planning.fit_edges);
    prints what it chose. The plan is of one device (--device), full-length prompts."""
    from ..edge_planning import fit_edges
    from ..planning import chosen_text, fit

    limit = parse_bytes(args.max_memory)
    per_position = not edges and any(config.per_position(s) for s in config.sites)
    n_prompts, seq_len = _task_shape(args, model.config, per_position, tokenizer)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    device = args.device.split(":")[0]
    config, plan = (fit_edges if edges else fit)(model.config, config, n_prompts=n_prompts, seq_len=seq_len,
                                                 max_memory=limit, dtype=dtype, device=device)
    print(chosen_text(plan), flush=True)
    return config


def _task_shape(args, model_cfg, per_position: bool, tokenizer=False) -> tuple[int, int]:
    """(prompts, tokens of the longest) of the task a run would draw, encoded with ``tokenizer`` (default:
    --model's). --keep-correct is not applied: its pairs are among these."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from ..model.loading import DEFAULT_MODEL
    from ..prompts import prepare_pairs

    if tokenizer is False:
        if args.config is not None and args.model is None:
            raise ValueError("--config gives no tokenizer to encode the task with; pass --seq-len (tokens per prompt)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(args.model or DEFAULT_MODEL))
        except (OSError, ValueError, TypeError):
            tokenizer = None  # a task of token ids needs none
    pairs, _ = prepare_pairs(SimpleNamespace(config=model_cfg), tokenizer, task=args.task, n_prompts=args.n_prompts,
                             seed=args.seed, per_position=per_position, prepend_bos=args.prepend_bos,
                             template=args.template)
    return len(pairs), max(len(p.clean_ids) for p in pairs)
