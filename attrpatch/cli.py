"""attrpatch command line: parse -> API call -> write files. No logic of its own.

Examples:
  attrpatch demo
  attrpatch screen --task ioi --sites resid_pre,attn_out,mlp_out,head --direction both --out runs/ioi
  attrpatch screen --model path/to/model --task pairs.jsonl --top-k all --metrics logit_diff,prob
  attrpatch figures runs/ioi --format png,pdf
"""

import argparse
import sys
from pathlib import Path

from .engine.metrics import METRICS
from .inputs.corruption import CORRUPTIONS
from .methods.attribution import ESTIMATORS
from .model.sites import RESID_LIKE, SITES
from .screening import DEFAULT_SITES, POSITIONS, ScreenConfig

EPILOG = """examples:
  attrpatch demo                                   # embedded toy model, IOI task, report in runs/demo
  attrpatch screen --task facts --direction both --out runs/facts
  attrpatch screen --model ./my-model --task pairs.jsonl --sites head,neuron --top-k all
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
    p.add_argument("--metric", choices=METRICS, default="logit_diff", help="primary metric: ranks and flags")
    p.add_argument("--metrics", type=_csv(METRICS), default=METRICS, help="metrics read from every patched run")
    p.add_argument("--direction", choices=("denoise", "noise", "both"), default="denoise" if not demo else "both")
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
    p.add_argument("--corruption", choices=CORRUPTIONS, default="str",
                   help="str: the task's corrupt prompts (symmetric token replacement, recommended); noise: "
                        "Gaussian noise on the clean prompt's key-token embeddings (causal tracing)")
    p.add_argument("--noise-std", type=float, default=3.0, help="noise std in units of the embeddings' std")
    p.add_argument("--out", type=Path, default=Path("runs/demo" if demo else "runs/screen"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over GPUs (accelerate)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass (default: all)")
    p.add_argument("--copies", type=int, default=None, help="patched copies of the batch per forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--no-figures", action="store_true", help="skip drawing figures into OUT/figures")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed or interrupted run in OUT from its last completed step")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attrpatch", description=__doc__.split("\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    screen = sub.add_parser("screen", help="AtP on every component, exact patching of the top, report",
                            epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_screen_args(screen)
    demo = sub.add_parser("demo", help="screen the embedded toy model on the IOI task, offline")
    _add_screen_args(demo, demo=True)
    figures = sub.add_parser("figures", help="draw the figures of a screen run")
    figures.add_argument("run_dir", type=Path)
    figures.add_argument("--format", default="png,pdf", type=_csv(("png", "pdf", "svg")))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "figures":
        from .plot import draw_run
        for path in draw_run(args.run_dir, formats=args.format):
            print(path)
        return 0
    if args.command == "demo":
        args.model, args.task = None, "ioi"
    return _screen(args, argv if argv is not None else sys.argv[1:])


def _screen(args, argv) -> int:
    from .engine import distributed
    from .model.loading import DEFAULT_MODEL, load
    from .pipeline import run_screen

    device = distributed.init_from_env(args.device)  # under torchrun: join the group, one device per rank
    config = ScreenConfig(sites=args.sites, metric=args.metric, metrics=args.metrics, direction=args.direction,
                          top_k=args.top_k, random_k=args.random_k, positions=args.positions, seed=args.seed,
                          batch_size=args.batch_size, copies=args.copies, estimator=args.estimator,
                          ig_steps=args.ig_steps, progress=not args.quiet)
    model, tokenizer = load(args.model, device=device, dtype=args.dtype,
                            trust_remote_code=args.trust_remote_code, device_map=args.device_map)
    name = args.model or f"embedded:{DEFAULT_MODEL.name}"
    run_screen(model, tokenizer, task=args.task, config=config, out=args.out, model_name=name,
               n_prompts=args.n_prompts, argv=argv, figures=not args.no_figures, resume=args.resume,
               corruption=args.corruption, noise_std=args.noise_std)
    if distributed.rank() != 0:
        return 0
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out}/report.json, report.md, results.csv, scores.safetensors, manifest.json"
          + ("" if args.no_figures else ", figures/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
