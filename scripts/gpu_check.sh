#!/usr/bin/env bash
# The GPU check of issue 22 (item 7), one script, no weight download: a random-initialised model of
# Llama-3-8B's shape (tests/configs/llama-3-8b.json, 32 layers) in bfloat16 on 16 prompts x 128 tokens:
#   1. the memory plan (planning.plan_screen, edge_planning.plan_edges; meta weights);
#   2. attribution (AtP, every site) and verification (exact patching of the screen's number of components),
#      each with its peak memory (torch.cuda.max_memory_allocated) against the plan's phase;
#   3. a screen of every site (ap.screen): AtP as a ratio to one forward, exact patching per component as one;
#   4. an edges run: EAP and edge patching, their peaks against the plan, their ratios to one forward.
# Prints one line per measurement and, last, one JSON object (also written to --out).
#
#   bash scripts/gpu_check.sh                   # on a CUDA machine: the full check (goal: under 8 minutes)
#   bash scripts/gpu_check.sh --small           # anywhere: 1 layer, d_model 512, vocab 1024, 4 x 16, float32, CPU
#   bash scripts/gpu_check.sh --layers 4        # the full width at 4 layers
# Needs attrpatch importable (bash scripts/install.sh) or run from the checkout (this script adds it to the path).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" - "$ROOT" "$@" <<'PY'
import argparse
import json
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

import attrpatch as ap
from attrpatch.edge_planning import edge_copies, plan_edges, verified_edges
from attrpatch.config import EdgeConfig
from attrpatch.engine.forward import forward_last
from attrpatch.engine.memory import MemoryTracker
from attrpatch.methods.edges.patching import patch_edges
from attrpatch.methods.edges.eap import attribute_edges
from attrpatch.model.sites import SITES
from attrpatch.planning import model_config, plan_screen, verified_components
from attrpatch.config import ScreenConfig
from attrpatch.steps import attribution_options, patch_options

warnings.filterwarnings("ignore", message="the model solves only")  # random weights do no task
SMALL = dict(num_hidden_layers=1, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1792, vocab_size=1024)

root = Path(sys.argv[1])
parser = argparse.ArgumentParser(prog="gpu_check.sh")
parser.add_argument("--small", action="store_true", help="1 layer, d_model 512, vocab 1024, 4 x 16 tokens, float32, CPU")
parser.add_argument("--layers", type=int, default=None, help="layers (default: the config's 32)")
parser.add_argument("--config", default=str(root / "tests" / "configs" / "llama-3-8b.json"))
parser.add_argument("--prompts", type=int, default=None, help="default 16 (4 with --small)")
parser.add_argument("--seq-len", type=int, default=None, help="default 128 (16 with --small)")
parser.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --small)")
parser.add_argument("--device", default=None, help="default cuda (cpu with --small)")
parser.add_argument("--out", default="gpu_check.json")
args = parser.parse_args(sys.argv[2:])
n_prompts, seq_len = args.prompts or (4 if args.small else 16), args.seq_len or (16 if args.small else 128)
dtype, device = args.dtype or ("float32" if args.small else "bfloat16"), args.device or ("cpu" if args.small else "cuda")
cuda = device.startswith("cuda")
if cuda and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device here; run with --small (CPU) or on a GPU machine")
config = model_config(config_file=args.config)
for key, value in (SMALL if args.small else {}).items():
    setattr(config, key, value)
if args.layers:
    config.num_hidden_layers = args.layers
result = {"layers": config.num_hidden_layers, "d_model": config.hidden_size, "vocab": config.vocab_size,
          "n_prompts": n_prompts, "seq_len": seq_len, "dtype": dtype, "device": device}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def sync() -> None:
    if cuda:
        torch.cuda.synchronize()


def measured(fn) -> tuple[float, int]:
    """(seconds, peak bytes) of fn(): torch.cuda.max_memory_allocated on CUDA, the tracker on a CPU."""
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated()
    tracker = MemoryTracker(model)
    start = time.perf_counter()
    with tracker:
        fn()
    return time.perf_counter() - start, tracker.summary()["peak_bytes"]


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


screen_config = ScreenConfig(sites=tuple(SITES), progress=False)  # every site, neurons included; defaults otherwise
edge_config = EdgeConfig(direction="denoise")
start_all = time.perf_counter()
say(f"plan: {config.num_hidden_layers} layers, d_model {config.hidden_size}, {dtype}, {n_prompts} x {seq_len}, {device}")
plan = plan_screen(config, screen_config, n_prompts=n_prompts, seq_len=seq_len, dtype=dtype, device=device.split(":")[0])
edge_plan = plan_edges(config, edge_config, n_prompts=n_prompts, seq_len=seq_len, dtype=dtype, device=device.split(":")[0])
result["plan"] = {name: p["peak_bytes"] for name, p in {**plan["phases"], **edge_plan["phases"]}.items()}
result["plan_largest"] = edge_plan["largest"]
say("plan: " + ", ".join(f"{k} {gb(v)}" for k, v in result["plan"].items()))

say("random-init model")
torch.manual_seed(0)
with torch.device(device):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
g = torch.Generator().manual_seed(0)
ids = torch.randint(10, config.vocab_size, (n_prompts, seq_len), generator=g)
corrupt = ids.clone()
corrupt[:, seq_len // 2] = torch.randint(10, config.vocab_size, (n_prompts,), generator=g)  # one token changed
batch = ap.PromptBatch(clean=ids, corrupt=corrupt, mask=torch.ones_like(ids), answer=ids[:, -1] % 7 + 3,
                       wrong=ids[:, -1] % 7 + 4, last=torch.full((n_prompts,), seq_len - 1)).to(device)
corrupt_full = replace(batch, corrupt=torch.where(batch.clean == 11, 12, 11))  # differs everywhere, as planned
spec = ap.model_spec(model)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
say(f"weights {gb(weights)} (plan {gb(plan['weights_bytes'])})")

with torch.no_grad():
    forwards = []
    for _ in range(4):
        seconds, _ = measured(lambda: forward_last(spec, batch.clean, batch.mask, batch.last))
        forwards.append(seconds)
forward_s = statistics.median(forwards[1:])  # the first warms up
result["forward_s"] = forward_s
say(f"one forward: {forward_s:.3f} s")

direction = screen_config.directions[0]
comps = verified_components(spec, seq_len, replace(screen_config, copies=plan["settings"]["copies"]))
checks = {
    "attribution": lambda: ap.attribute(spec, corrupt_full, **attribution_options(screen_config, direction, "atp")),
    "verification": lambda: ap.patch(spec, corrupt_full, comps, metrics=screen_config.metrics, runs={},
                                     **patch_options(replace(screen_config, copies=plan["settings"]["copies"]), direction)),
    "edges": lambda: attribute_edges(spec, corrupt_full, metrics=edge_config.metrics, direction="denoise"),
    "edge_patching": lambda: patch_edges(spec, corrupt_full, verified_edges(spec, edge_config, seq_len), metrics=edge_config.metrics,
                                         direction="denoise",
                                         copies=edge_copies(edge_config, device.split(":")[0], n_prompts).copies),
}
result["measured"], result["seconds"] = {}, {}
for name, fn in checks.items():
    seconds, peak = measured(fn)
    result["measured"][name], result["seconds"][name] = peak, seconds
    planned = result["plan"][name]
    say(f"{name}: peak {gb(peak)}, plan {gb(planned)} ({100 * (planned - peak) / peak:+.1f}%), {seconds:.2f} s")

say("screen of every site")
start = time.perf_counter()
screened = ap.screen(model, batch, screen_config)
timing = screened.timing
n_verified = sum(1 for c in screened.components)
result["screen"] = {"seconds": time.perf_counter() - start, "verified": n_verified,
                    "atp_ratio": timing["attribution_s"] / timing["forward_s"],
                    "patch_per_component_ratio": timing["verification_s"] / max(n_verified, 1) / timing["forward_s"]}
say(f"AtP over all sites: {result['screen']['atp_ratio']:.2f}x one forward (goal <= 3); exact patching per component: "
    f"{result['screen']['patch_per_component_ratio']:.3f}x (goal <= 0.25), {n_verified} verified")
n_edges = len(verified_edges(spec, edge_config, seq_len))
result["edges"] = {"eap_ratio": result["seconds"]["edges"] / forward_s,
                   "patch_per_edge_ratio": result["seconds"]["edge_patching"] / n_edges / forward_s, "verified": n_edges}
say(f"edges: EAP {result['edges']['eap_ratio']:.2f}x one forward ({len(edge_config.metrics)} metrics), edge patching "
    f"{result['edges']['patch_per_edge_ratio']:.3f}x per edge ({n_edges} edges)")
result["total_s"] = time.perf_counter() - start_all
Path(args.out).write_text(json.dumps(result, indent=1))
say(f"done in {result['total_s']:.0f} s; wrote {args.out}")
print(json.dumps(result))
PY
