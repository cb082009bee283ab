#!/usr/bin/env python
"""Benchmark attrpatch: AtP over every site, and exact patching naive vs batched/layer-resumed.

Every time is reported as a RATIO to one plain no-grad forward pass, ``model(input_ids, attention_mask)``
(full-vocab logits at every position), measured in the same run, interleaved with the other
measurements; ratios use the median of those forwards. Two clocks: wall (perf_counter) and cpu
(process_time, all threads of this process), which is far less sensitive to other users of a shared
machine. Models are random-weight, built from configs (no hub access needed).

    python scripts/bench.py                      # GPT-2-small shape, batch 8 x 64, float32, CPU (2.5-6 min on 2 shared cores)
    python scripts/bench.py --preset tiny        # 2-layer d_model 64 smoke run (~10 s)
    python scripts/bench.py --preset llama3-8b   # Llama-3-8B shape, batch 16 x 128, bf16, CUDA
    python scripts/bench.py --preset smollm2     # the real SmolLM2-135M on its IOI screen prompts, + the screen
    python scripts/bench.py --preset fullwidth   # Llama-3-8B / Qwen2.5-7B / Gemma-2-9B widths at 1, 2, 4 layers, bf16 (benchmarks/fullwidth.py)

Measured:
  atp         ap.attribute over resid_pre, attn_out, mlp_out, head, neuron (per position), one metric; the
              plain backward and the block-wise one (recompute=True, the CLI's --low-memory), interleaved.
  patch_pos   exact patching of per-position ``head`` components (the layer x head x position sweep), on two
              whole passes of that sweep (see per_position_sample: representative of the full sweep's
              average pass). Naive (copies=1, resume=False) on the first --naive of them.
  eap         ap.attribute_edges: every edge's score (EAP), one metric.
  edge_patch  exact edge patching of --edges random edges, per edge, marginal (as for components below).
  patch_all   top-k verification: --topk random all-position ``head``/``neuron``/``resid_pre`` components,
              batched (copies default) vs naive (on the first --naive of them).
Patching costs are per component, marginal: (time of patch(...) - time of patch(..., components=[])) / n,
i.e. without the source and receiver runs every patch call pays once (reported separately). The naive
cost per component does not depend on the component (one full forward each), so a subset suffices.
Both patching modes' effects are compared (max |naive - batched|) as a sanity check.

Memory: on CUDA, peak allocated growth (torch.cuda.max_memory_allocated); on CPU, peak RSS growth over the
RSS just before the call (psutil, sampling thread, after malloc_trim), next to the analytic size of the
site activations the call caches (batch * pos * width * itemsize summed over its hook points). glibc keeps
freed tensors below its (dynamic, up to 32 MiB) mmap threshold in the heap, so RSS overstates what is alive;
AtP's peak is measured once more in a fresh process started with MALLOC_MMAP_THRESHOLD_=65536 (after one
warm-up call), where freed tensors go back to the OS and RSS follows the live tensors ("live").

The benchmarks live in scripts/benchmarks/, one module each (atp, patching, edges, lens, screen), with what
they share in common.py and the table in report.py; this file is the entry point.

CPU threads default to 1 (--threads): on a shared 2-core machine two threads mostly add spin-waiting and
noise (a forward took 5.4-7.5 s wall with 2 threads vs 2.4-3.0 s with 1 under the same load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks package beside this file
import attrpatch as ap  # noqa: E402
from attrpatch.methods.patching.passes import default_rows, same_prefix  # noqa: E402
from benchmarks.atp import atp_live_memory, atp_ratios, bench_atp, memory_probe, only_atp  # noqa: E402
from benchmarks.common import (CLOCKS, DTYPES, PRESETS, TARGETS, Bench, _max, build_model, fmt, git_state,  # noqa: E402
                               make_pairs, med, task_batch, verdict)
from benchmarks.edges import bench_edges, edge_lines  # noqa: E402
from benchmarks.lens import bench_transformer_lens  # noqa: E402
from benchmarks.patching import bench_patch, per_position_sample, pool_naive, topk_sample  # noqa: E402
from benchmarks.report import table  # noqa: E402
from benchmarks.screen import bench_growth, bench_screen, growth_lines, screen_lines  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _parser() -> argparse.ArgumentParser:
    ap_ = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap_.add_argument("--preset", choices=sorted(PRESETS), default="gpt2-small")
    ap_.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the preset's")
    ap_.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the preset's")
    ap_.add_argument("--batch", type=int, default=None)
    ap_.add_argument("--seq", type=int, default=None)
    ap_.add_argument("--repeats", type=int, default=3, help="AtP repeats (default 3)")
    ap_.add_argument("--patch-repeats", type=int, default=1,
                     help="patching repeats (default 1: each patching run is tens of forwards long)")
    ap_.add_argument("--topk", type=int, default=30, help="all-position components to verify")
    ap_.add_argument("--naive", type=int, default=12, help="components run naively in each patching case")
    ap_.add_argument("--threads", type=int, default=1,
                     help="torch CPU threads (default 1: on a shared machine, more threads mostly add "
                          "spin-waiting and noise; 0 = torch's default)")
    ap_.add_argument("--seed", type=int, default=0)
    ap_.add_argument("--out", default="bench_results.json", help="JSON results path")
    ap_.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap_.add_argument("--edges", type=int, default=40, help="random edges patched exactly in the edge measurement")
    ap_.add_argument("--only", choices=("all", "edges", "atp", "screen", "growth"), default="all",
                     help="edges: only the edge measurements (EAP, exact edge patching), ~1 min; atp: only AtP "
                          "(plain and recompute, time and memory); screen: only the default screen (a preset "
                          "with a task: smollm2), its phases and the two-process run; growth: the default screen "
                          "at 16 and at 64 prompt pairs, phase by phase, one process (~20 min on 2 cores)")
    ap_.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)  # atp_live_memory's child
    return ap_


def _setup(args, t_start: float) -> Bench:
    """The model, prompts and clock of the run, warmed up (first-call costs: allocator, kernels, hooks)."""
    preset = PRESETS[args.preset]
    device = torch.device(args.device or preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available (use --device cpu)")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or preset["dtype"]]
    n, n_pos = args.batch or preset["batch"], args.seq or preset["seq"]
    model, tokenizer = build_model(preset, str(device), dtype)
    if preset.get("task"):
        batch = task_batch(model, tokenizer, preset["task"], n)
    else:
        batch = ap.make_batch(make_pairs(n, n_pos, model.config.vocab_size, seed=args.seed))
    b = Bench(model, batch, device, not args.quiet)
    b.tokenizer, b.task = tokenizer, preset.get("task")  # the screen benchmark runs the CLI's pipeline
    b.log(f"model built in {time.perf_counter() - t_start:.1f} s; warm-up")
    # the patch call resumes at the last block
    b.plain_forward()
    ap.patch(model, batch, ap.components("head", ap.model_spec(model).dims, batch.n_pos, per_position=False)[-1:])
    b.forward()
    return b


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--preset" in argv and argv[argv.index("--preset") + 1:][:1] == ["fullwidth"]:  # benchmarks/fullwidth.py
        from benchmarks import fullwidth
        return fullwidth.main([a for i, a in enumerate(argv) if a != "--preset" and argv[i - 1:i] != ["--preset"]])
    args = _parser().parse_args(argv)
    t_start = time.perf_counter()
    code = git_state()  # at start: the code this process imported
    b = _setup(args, t_start)
    model, batch, device = b.model, b.batch, b.device
    dims, n_pos, dtype = ap.model_spec(model).dims, batch.n_pos, next(model.parameters()).dtype
    itemsize = torch.finfo(dtype).bits // 8
    n = args.batch or PRESETS[args.preset]["batch"]
    copies = max(1, default_rows(device, n_pos) // n)  # attrpatch's default rows per pass
    rng = random.Random(args.seed)
    if args.memory_probe:
        return memory_probe(b)
    if args.only == "atp":
        return only_atp(b, dims, args, itemsize, t_start)
    if args.only in ("screen", "growth"):
        if not PRESETS[args.preset].get("task"):
            sys.exit(f"--only {args.only} needs a preset with a task (smollm2), not {args.preset}")
        result = {"screen": bench_screen(b)} if args.only == "screen" else {"growth": bench_growth(b)}
        b.forward()
        result["unit_seconds"] = {c: b.unit(c) for c in CLOCKS}
        print("\n".join(screen_lines(result) if args.only == "screen" else growth_lines(result["growth"])))
        Path(args.out).write_text(json.dumps(result, indent=1))
        return result
    edges = bench_edges(b, args.repeats, args.edges, rng)
    if args.only == "edges":
        b.forward()
        print("\n".join(edge_lines(edges)))
        print(f"unit: 1 plain forward, median {b.unit('wall'):.3f} s wall; total {time.perf_counter() - t_start:.0f} s")
        return {"edges": edges}
    atp = bench_atp(b, dims, args.repeats, itemsize)

    overhead = []
    for _ in range(2):
        b.forward()
        overhead.append(b.timed(lambda: ap.patch(model, batch, [], metrics=["logit_diff"]))[0])
        b.log(f"  patch fixed cost (no components): {fmt(overhead[-1])}")

    same = same_prefix(batch)  # heads before it cost nothing: the sample is drawn after it
    if same:
        b.log(f"  shared prefix: positions 0..{same - 1} of {n_pos} are the same in every clean and corrupt prompt; "
              "the head x pos sample is drawn after them")
    pos_comps = per_position_sample(dims, n_pos, max(copies, 2 * dims.n_heads), same)  # >= 2 positions
    patch_pos = bench_patch(b, pos_comps, args.naive, args.patch_repeats, overhead, "head x pos", dims, itemsize)
    top_comps = topk_sample(dims, n_pos, args.topk, rng)
    patch_all = bench_patch(b, top_comps, args.naive, args.patch_repeats, overhead, "top-k all-pos",
                            dims, itemsize)
    tl_res = bench_transformer_lens(b, pos_comps, args.naive, args.patch_repeats)
    screen_res = bench_screen(b) if PRESETS[args.preset].get("task") else None
    b.forward()
    atp_ratios(b, atp)
    atp_live_memory(atp, args)
    b.mem.close()
    pool_naive(b, overhead, patch_pos, patch_all)
    measured = dict(overhead=overhead, atp=atp, patch_pos=patch_pos, patch_all=patch_all, transformer_lens=tl_res,
                    edges=edges, screen=screen_res, pos_comps=pos_comps, top_comps=top_comps)
    result = _result(args, b, code, n, copies, measured)
    result["total_seconds"] = time.perf_counter() - t_start
    print(table(result))
    Path(args.out).write_text(json.dumps(result, indent=1))
    b.log(f"wrote {args.out}")
    return result


def _result(args, b: Bench, code: str, n: int, copies: int, m: dict) -> dict:
    """The JSON results: the run's settings, the unit, and every measurement."""
    model, device, dims = b.model, b.device, ap.model_spec(b.model).dims
    atp, patch_pos, patch_all, overhead = m["atp"], m["patch_pos"], m["patch_all"], m["overhead"]
    return dict(
        preset=args.preset, model=type(model).__name__, n_layers=dims.n_layers, d_model=dims.d_model,
        n_heads=dims.n_heads, d_mlp=dims.d_mlp, vocab=model.config.vocab_size, batch=n, seq=b.batch.n_pos,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."), device=device.type, copies=copies,
        attrpatch=code, torch=torch.__version__, transformers=tf.__version__, threads=torch.get_num_threads(),
        machine=(torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"{platform.machine()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}"),
        forward_seconds=b.fwd, forward_peak_bytes=_max(b.fwd_peaks),
        unit_seconds={c: b.unit(c) for c in CLOCKS},
        patch_overhead_seconds=overhead,
        patch_overhead_fwd={c: med(overhead, c) / b.unit(c) for c in CLOCKS},
        atp=atp, patch_pos=patch_pos, patch_all=patch_all, transformer_lens=m["transformer_lens"], edges=m["edges"],
        screen=m["screen"], targets={k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        verdicts={c: {"atp": verdict("atp", atp["plain"][f"fwd_{c}"]),
                      "patch_pos": verdict("patch_pos", patch_pos[f"speedup_{c}"]),
                      "patch_all": verdict("patch_all", patch_all[f"speedup_{c}"])} for c in CLOCKS},
        components={"patch_pos": [str(c) for c in m["pos_comps"]], "patch_all": [str(c) for c in m["top_comps"]]},
    )

if __name__ == "__main__":
    main()
