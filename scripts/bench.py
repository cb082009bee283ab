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

CPU threads default to 1 (--threads): on a shared 2-core machine two threads mostly add spin-waiting and
noise (a forward took 5.4-7.5 s wall with 2 threads vs 2.4-3.0 s with 1 under the same load).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
import attrpatch as ap  # noqa: E402
from attrpatch.methods.passes import default_rows, same_prefix  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ATP_SITES = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")
TOPK_SITES = ("head", "neuron", "resid_pre")
TARGETS = {"atp": ("<=", 2.5), "atp_memory": ("<=", 1.5), "patch_pos": (">=", 4.0), "patch_all": (">=", 1.8), "eap": ("<=", 4.0),
           "edge_patch": ("<=", 0.35)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

PRESETS = {
    "gpt2-small": dict(
        config=lambda: tf.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
        batch=8, seq=64, dtype="float32", device="cpu"),
    "llama3-8b": dict(
        config=lambda: tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                      max_position_embeddings=8192, rope_theta=500000.0),
        batch=16, seq=128, dtype="bfloat16", device="cuda"),
    # the real model (float32 safetensors from `attrpatch fetch smollm2`), on the IOI screen's own prompts
    # (16 pairs, one template); adds the measurement of the default screen in both directions
    "smollm2": dict(folder="smollm2", task="ioi", batch=16, seq=None, dtype="float32", device="cpu"),
    "tiny": dict(
        config=lambda: tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=256,
                                      bos_token_id=0, eos_token_id=0),
        batch=8, seq=64, dtype="float32", device="cpu"),
}


# ---------------------------------------------------------------------------------------------- helpers

class Pair:
    def __init__(self, clean, corrupt, answer, wrong):
        self.clean_ids, self.corrupt_ids, self.answer_id, self.wrong_id = clean, corrupt, answer, wrong


def make_pairs(n: int, n_pos: int, vocab: int, seed: int = 0, n_changed: int = 3) -> list[Pair]:
    """Random prompts of n_pos tokens; corrupt differs from clean at n_changed random positions."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        clean = torch.randint(0, vocab, (n_pos,), generator=g).tolist()
        corrupt = list(clean)
        for p in torch.randperm(n_pos, generator=g)[:n_changed].tolist():
            corrupt[p] = (clean[p] + 1 + int(torch.randint(0, vocab - 1, (1,), generator=g))) % vocab
        answer, wrong = torch.randperm(vocab, generator=g)[:2].tolist()
        pairs.append(Pair(clean, corrupt, answer, wrong))
    return pairs


def build_model(preset: dict, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    if "folder" in preset:  # a real model: ~/.cache/attrpatch/<name>, built by attrpatch's fetch if missing
        from attrpatch.model.fetch import fetch

        folder = fetch(preset["folder"])
        model = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        return model.eval().requires_grad_(False), tf.AutoTokenizer.from_pretrained(folder)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(preset["config"](), dtype=dtype)
    return model.eval().requires_grad_(False), None


def task_batch(model, tokenizer, task: str, n: int):
    """The prompt batch the CLI's default screen of ``task`` runs on (pipeline.prepare_pairs)."""
    from attrpatch.pipeline import _pad, prepare_pairs

    pairs, _ = prepare_pairs(model, tokenizer, task=task, n_prompts=n, per_position=True)
    return ap.make_batch(pairs, pad_id=_pad(tokenizer))


def bench_screen(b: Bench) -> dict:
    """The default screen (ap.screen, both directions, no files) on the bench batch: each phase as a ratio to
    the unit, and verification's forward-equivalents as attrpatch counts them against its own clock."""
    b.forward()
    t, peak, result = b.timed(lambda: ap.screen(b.model, b.batch, ap.ScreenConfig(direction="both", progress=False)))
    b.log(f"  screen {fmt(t)}")
    timing = dict(result.timing)
    counted = timing["forward_equivalents_verification"]
    clock = {"wall": timing["verification_s"] / timing["forward_s"],
             "cpu": timing["verification_cpu_s"] / timing["forward_cpu_s"]}
    return dict(seconds=t, peak_bytes=peak, timing=timing, rows=len(result.rows), counted_fwd=counted,
                clock_fwd=clock, count_over_clock={c: counted / v for c, v in clock.items()})


def screen_lines(r: dict) -> list[str]:
    s = r.get("screen")
    if not s:
        return []
    t, unit = s["timing"], r["unit_seconds"]["wall"]
    ratio = s["count_over_clock"]
    return [f"default screen, both directions, {s['rows']} rows: {s['seconds']['wall'] / unit:.1f}x wall "
            f"({s['seconds']['wall']:.1f} s), {s['seconds']['cpu'] / r['unit_seconds']['cpu']:.1f}x cpu: attribution "
            f"{t['attribution_s'] / unit:.1f}x, verification {t['verification_s'] / unit:.1f}x, diagnostics "
            f"{t['diagnostics_s'] / unit:.1f}x the unit (wall)",
            f"  verification forward-equivalents: counted {s['counted_fwd']:.1f}; by the clock (verification time / "
            f"the screen's own forward_last time) {s['clock_fwd']['wall']:.1f} wall, {s['clock_fwd']['cpu']:.1f} cpu; "
            f"count / clock = {ratio['wall']:.2f} wall, {ratio['cpu']:.2f} cpu (target 0.8-1.2: cpu "
            f"{'PASS' if 0.8 <= ratio['cpu'] <= 1.2 else 'MISS'})"]


def _malloc_trim():
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory growth of one measured call: CUDA allocator stats, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.cuda = device.type == "cuda"
        self.interval = interval
        self._peak = self._base = 0
        self._stop = threading.Event()
        self._proc = None
        if not self.cuda:
            try:
                import psutil
                self._proc = psutil.Process()
            except ImportError:
                print("psutil not installed: CPU peak memory not measured", file=sys.stderr)
                return
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _poll(self):
        while not self._stop.wait(self.interval):
            rss = self._rss()
            if rss > self._peak:
                self._peak = rss

    def reset(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif self._proc is not None:
            _malloc_trim()
            self._base = self._peak = self._rss()

    def growth(self) -> float | None:
        """Peak growth since reset(), in bytes (None where not measurable)."""
        if self.cuda:
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated() - self._base)
        if self._proc is None:
            return None
        self._peak = max(self._peak, self._rss())
        return float(self._peak - self._base)

    def close(self):
        self._stop.set()


CLOCKS = ("wall", "cpu")  # wall: time.perf_counter; cpu: time.process_time (this process, all threads)


def med(samples: list[dict], clock: str) -> float:
    return statistics.median(x[clock] for x in samples)


class Bench:
    def __init__(self, model, batch, device: torch.device, verbose: bool):
        self.model, self.batch, self.device, self.verbose = model, batch, device, verbose
        self.mem = PeakMemory(device)
        self.fwd: list[dict] = []  # {"wall": s, "cpu": s} per plain forward
        self.fwd_peaks: list[float] = []
        self.ids = batch.clean.to(device)
        self.mask = batch.mask.to(device)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn):
        """({"wall": s, "cpu": s}, peak memory growth in bytes, result) of one call."""
        self.mem.reset()
        self.sync()
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        self.sync()
        t = {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}
        return t, self.mem.growth(), out

    def plain_forward(self):
        with torch.no_grad():
            return self.model(input_ids=self.ids, attention_mask=self.mask)

    def forward(self) -> dict:
        """Time one plain forward (the unit of every ratio); interleaved between measurements."""
        t, peak, _ = self.timed(lambda: self.plain_forward().logits.sum().item())
        self.fwd.append(t)
        self.fwd_peaks.append(peak)
        self.log(f"  plain forward {fmt(t)}")
        return t

    def unit(self, clock: str) -> float:
        return med(self.fwd, clock)

    def log(self, msg: str):
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)


def fmt(t: dict) -> str:
    return f"{t['wall']:.2f} s wall, {t['cpu']:.2f} s cpu"


def _max(xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


# ------------------------------------------------------------------------------------------ measurements

def site_bytes(site: str, dims, n: int, n_pos: int, itemsize: int) -> int:
    width = {"head": dims.n_heads * dims.d_head, "q": dims.n_heads * dims.d_head, "neuron": dims.d_mlp,
             "k": dims.n_kv_heads * dims.d_head, "v": dims.n_kv_heads * dims.d_head}.get(site, dims.d_model)
    return n * n_pos * width * itemsize


ATP_MODES = {"plain": {}, "recompute": {"recompute": True}}  # mode -> attribute(...) options


def bench_atp(b: Bench, dims, repeats: int, itemsize: int) -> dict:
    """AtP over ATP_SITES, each mode ``repeats`` times, interleaved with plain forwards."""
    res = {mode: {"seconds": [], "peaks": []} for mode in ATP_MODES}
    for _ in range(repeats):
        for mode, options in ATP_MODES.items():
            b.forward()
            t, peak, _ = b.timed(lambda: ap.attribute(b.model, b.batch, sites=ATP_SITES, metrics=["logit_diff"],
                                                      **options))
            res[mode]["seconds"].append(t)
            res[mode]["peaks"].append(peak)
            b.log(f"  AtP {mode} {fmt(t)}")
    n, n_pos = b.batch.n, b.batch.n_pos
    cache = sum(site_bytes(s, dims, n, n_pos, itemsize) * dims.n_layers for s in ATP_SITES)
    return {mode: dict(seconds=r["seconds"], peak_bytes=_max(r["peaks"]), cache_bytes=cache,
                       prompt_bytes=prompt_bytes(dims, n, n_pos)) for mode, r in res.items()}


def atp_live_memory(atp: dict, args) -> None:
    """AtP's peak per mode once more, in a fresh process whose glibc mmap threshold is 64 KiB from the start
    (see the module docstring): ``live_peak_bytes``. CPU only."""
    import subprocess
    if (args.device or PRESETS[args.preset]["device"]) != "cpu":
        return
    argv = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--memory-probe",
            "--threads", str(args.threads), "--seed", str(args.seed)]
    for flag in ("dtype", "batch", "seq"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"live memory probe failed: {done.stderr[-1000:]}", file=sys.stderr)
        return
    for mode, peak in json.loads(done.stdout.strip().splitlines()[-1]).items():
        atp[mode]["live_peak_bytes"] = peak


def memory_probe(b: Bench) -> None:
    """--memory-probe (run by atp_live_memory): each mode's peak RSS growth, after one warm-up call, as JSON."""
    peaks = {}
    for mode, options in ATP_MODES.items():
        def call():
            return ap.attribute(b.model, b.batch, sites=ATP_SITES, metrics=["logit_diff"], **options)
        call()
        peaks[mode] = b.timed(call)[1]
    print(json.dumps(peaks))


def prompt_bytes(dims, n: int, n_pos: int) -> dict[str, int]:
    """Bytes of the per-prompt float32 scores the default screen keeps per direction and estimator (4 graded
    metrics, the default sites): every position (attribute(per_prompt=True), before) or summed over positions
    for the all-position head and neuron sites (prompt_positions, now)."""
    def size(site, per_pos):
        units = dims.n_units(site) or 1
        return n * dims.n_layers * (n_pos if per_pos else 1) * units * 4
    sites = ("resid_pre", "attn_out", "mlp_out", "head", "neuron")
    return {"before": 4 * sum(size(s, True) for s in sites),
            "now": 4 * sum(size(s, s not in ("head", "neuron")) for s in sites)}


def atp_lines(atp: dict) -> list[str]:
    lines = []
    for mode, title in (("plain", "AtP, 5 sites, all layers x pos, 1 metric"),
                        ("recompute", "  the same, recompute=True (--low-memory)")):
        a, goal = atp[mode], mode == "plain"  # the speed goal is the plain backward's; recompute trades time
        lines.append(f"{title:<44}{a['fwd_wall']:>7.2f}x{'':>10}{'<= 2.5x' if goal else '':>9}  "
                     f"{verdict('atp', a['fwd_wall']) if goal else '':<7}{a['fwd_cpu']:>6.2f}x{'':>9}  "
                     f"{verdict('atp', a['fwd_cpu']) if goal else '':<6}{mb(a['peak_bytes']):>9}{mb(a['cache_bytes']):>8}")
    for mode in ATP_MODES:
        a = atp[mode]
        rss = a["peak_bytes"] / a["cache_bytes"] if a["peak_bytes"] is not None else float("nan")
        live = a.get("live_peak_bytes")
        live_text = "" if live is None else (f", live {mb(live)} = {live / a['cache_bytes']:.2f}x "
                                             f"({verdict('atp_memory', live / a['cache_bytes'])})")
        lines.append(f"  AtP {mode} memory / cached site activations (target <= 1.5x): peak RSS {rss:.2f}x "
                     f"({verdict('atp_memory', rss)}){live_text}")
    kept = atp["plain"]["prompt_bytes"]
    lines.append(f"  per-prompt scores the screen keeps per direction and estimator (4 metrics): {mb(kept['now'])}, "
                 f"was {mb(kept['before'])} with every position kept")
    return lines


def bench_edges(b: Bench, repeats: int, n_edges: int, rng: random.Random) -> dict:
    """EAP for every edge (ratio to one forward) and exact patching of random edges, per edge, marginal."""
    times = []
    for _ in range(repeats):
        b.forward()
        t, peak, scores = b.timed(lambda: ap.attribute_edges(b.model, b.batch, metrics=["logit_diff"]))
        times.append(t)
        b.log(f"  EAP, {scores.graph.n_edges} edges: {fmt(t)}")
    edges = rng.sample(scores.graph.edges(), n_edges)
    b.forward()
    empty, _, _ = b.timed(lambda: ap.patch_edges(b.model, b.batch, []))
    b.forward()
    full, _, effects = b.timed(lambda: ap.patch_edges(b.model, b.batch, edges))
    b.log(f"  exact edge patching, {n_edges} edges: {fmt(full)} (fixed cost {fmt(empty)})")
    res = {"n_edges": scores.graph.n_edges, "n_patched": n_edges, "peak_bytes": peak,
           "forward_equivalents_per_edge": effects.passes["forward_equivalents"] / n_edges}
    for clock in CLOCKS:
        res[f"fwd_{clock}"] = med(times, clock) / b.unit(clock)
        res[f"per_edge_fwd_{clock}"] = (full[clock] - empty[clock]) / n_edges / b.unit(clock)
        res[f"fixed_fwd_{clock}"] = empty[clock] / b.unit(clock)
    return res


def edge_lines(e: dict) -> list[str]:
    return [
        f"{'EAP, every edge (' + str(e['n_edges']) + '), 1 metric':<44}{e['fwd_wall']:>7.2f}x{'':>10}{'<= 4x':>9}  "
        f"{verdict('eap', e['fwd_wall']):<7}{e['fwd_cpu']:>6.2f}x{'':>9}  {verdict('eap', e['fwd_cpu']):<6}"
        f"{mb(e['peak_bytes']):>9}",
        f"{'exact edge patching, per edge (marginal)':<44}{e['per_edge_fwd_wall']:>7.3f}x{'':>10}{'<= 0.35x':>9}  "
        f"{verdict('edge_patch', e['per_edge_fwd_wall']):<7}{e['per_edge_fwd_cpu']:>6.3f}x{'':>9}  "
        f"{verdict('edge_patch', e['per_edge_fwd_cpu']):<6}",
        f"  ({e['n_patched']} random edges, {e['forward_equivalents_per_edge']:.2f} forward-equivalents each; "
        f"fixed cost per call {e['fixed_fwd_wall']:.2f} fwd wall)",
    ]


def bench_patch(b: Bench, comps: list, n_naive: int, repeats: int, overhead: list[dict], label: str,
                dims, itemsize: int) -> dict:
    """Batched (copies default, resumed) on all of ``comps``; naive on the first ``n_naive``."""
    naive_comps = comps[:n_naive]
    res = {"n_batched": len(comps), "n_naive": len(naive_comps), "batched_seconds": [], "naive_seconds": []}
    peaks = {"batched": [], "naive": []}
    effects = {}
    for _ in range(repeats):
        b.forward()
        t, peak, eff = b.timed(lambda: ap.patch(b.model, b.batch, comps, metrics=["logit_diff"]))
        res["batched_seconds"].append(t)
        peaks["batched"].append(peak)
        effects["batched"] = eff
        b.log(f"  {label} batched ({len(comps)} components): {fmt(t)}")
        b.forward()
        t, peak, eff = b.timed(lambda: ap.patch(b.model, b.batch, naive_comps, metrics=["logit_diff"],
                                                copies=1, resume=False))
        res["naive_seconds"].append(t)
        peaks["naive"].append(peak)
        effects["naive"] = eff
        b.log(f"  {label} naive ({len(naive_comps)} components): {fmt(t)}")
    batched = effects["batched"].values[:len(naive_comps)]
    res["max_abs_diff_naive_vs_batched"] = float((batched - effects["naive"].values).abs().max())
    passes = effects["batched"].passes  # its count includes the source and receiving runs: left out here
    res["forward_equivalents_per_component"] = (passes["forward_equivalents"] - passes.get("runs", 0)) / len(comps)
    for clock in CLOCKS:
        per = {}
        for mode, n in (("batched", len(comps)), ("naive", len(naive_comps))):
            per[mode] = max(med(res[f"{mode}_seconds"], clock) - med(overhead, clock), 0.0) / n
            res[f"{mode}_per_component_fwd_{clock}"] = per[mode] / b.unit(clock)
        res[f"speedup_own_naive_{clock}"] = per["naive"] / per["batched"] if per["batched"] > 0 else float("inf")
    for mode in peaks:
        res[f"{mode}_peak_bytes"] = _max(peaks[mode])
    n, n_pos = b.batch.n, b.batch.n_pos
    keys = sorted({(c.site, c.layer) for c in comps})
    first = min(c.layer for c in comps)
    res["cache_bytes"] = (sum(site_bytes(s, dims, n, n_pos, itemsize) for s, _ in keys)  # source values
                          + (dims.n_layers - first) * n * n_pos * dims.d_model * itemsize)  # block inputs
    return res


def pool_naive(b: Bench, overhead: list[dict], *cases: dict) -> None:
    """Speed-ups against the naive cost per component pooled over all cases: naive patching is one full
    forward per component whatever the component, so pooling only averages out noise."""
    for clock in CLOCKS:
        fixed = med(overhead, clock)
        total = sum(max(med(p["naive_seconds"], clock) - fixed, 0.0) for p in cases)
        naive = total / sum(p["n_naive"] for p in cases) / b.unit(clock)
        for p in cases:
            p[f"pooled_naive_per_component_fwd_{clock}"] = naive
            batched = p[f"batched_per_component_fwd_{clock}"]
            p[f"speedup_{clock}"] = naive / batched if batched > 0 else float("inf")


def per_position_sample(dims, n_pos: int, copies: int, same: int = 0) -> list:
    """Two whole patched passes of the per-position ``head`` sweep: ``copies`` consecutive components in
    (layer, position, head) order, at layers a = L//4 and L-1-a, starting at the same position p.

    A resumed pass costs ~ f(layer) * g(first position), f = (L - l)/L and, where positions before the
    patch are reused, g = (P - p)/P, both affine. The two layers average f over all layers exactly, and p
    is the chunk start with g(p) closest to the mean of g over every component's own position, so the pair
    costs about what the average component of the full sweep does (however attrpatch groups it, as long as
    it never mixes layers and its passes start at their earliest position).

    same: the prompts' shared prefix (passes.same_prefix): heads there change nothing and cost no pass, so
    the sample is drawn from positions ``same`` on (the speed-up is then that of the sweep's real work)."""
    sweep = [c for c in ap.components("head", dims, n_pos, per_position=True) if c.pos >= same]  # layer, pos, head
    per_layer = len(sweep) // dims.n_layers
    starts = range(0, per_layer - copies + 1, copies) if per_layer >= copies else [0]
    mean_g = statistics.mean((n_pos - c.pos) / n_pos for c in sweep[:per_layer])  # same's heads: no pass
    k = min(starts, key=lambda i: abs((n_pos - sweep[i].pos) / n_pos - mean_g))
    a = dims.n_layers // 4
    return [sweep[layer * per_layer + i] for layer in sorted({a, dims.n_layers - 1 - a})
            for i in range(k, min(k + copies, per_layer))]


def topk_sample(dims, n_pos: int, k: int, rng: random.Random) -> list:
    """k random all-position components, as even a mix of TOPK_SITES as k allows (uniform over the pooled
    components would be almost all neurons), at uniformly random layers."""
    pools = {s: ap.components(s, dims, n_pos, per_position=False) for s in TOPK_SITES}
    out, i = [], 0
    while len(out) < k and any(pools.values()):
        pool = pools[TOPK_SITES[i % len(TOPK_SITES)]]
        i += 1
        if pool:  # a small model runs out of resid_pre (one per layer) first
            out.append(pool.pop(rng.randrange(len(pool))))
    rng.shuffle(out)
    return out


def git_state() -> str:
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "attrpatch"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" + uncommitted attrpatch changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------ TransformerLens

def bench_transformer_lens(b: Bench, pos_comps: list, n_naive: int, repeats: int) -> dict | None:
    """TransformerLens on the same weights (GPT-2 family only): naive hook patching of the per-position head
    subset, and hook-based AtP (cache fwd + bwd). Optional: never a dependency of attrpatch."""
    try:
        import transformer_lens as tl
    except ImportError:
        b.log("TransformerLens not installed: skipped")
        return None
    if b.model.config.model_type != "gpt2":
        print("TransformerLens comparison only wired for the GPT-2 family: skipped", file=sys.stderr)
        return None
    try:
        return _tl_run(tl, b, pos_comps[:n_naive], repeats)
    except Exception as e:  # an optional comparison must never sink the benchmark
        print(f"TransformerLens comparison failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {"error": f"{type(e).__name__}: {e}"}


def _tl_run(tl, b: Bench, comps: list, repeats: int) -> dict:
    try:
        from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    except ImportError:
        from transformer_lens.loading_from_pretrained import convert_gpt2_weights
    c = b.model.config
    cfg = tl.HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
        normalization_type="LN", eps=c.layer_norm_epsilon, device=str(b.device),
        dtype=next(b.model.parameters()).dtype, default_prepend_bos=False)
    htm = tl.HookedTransformer(cfg)
    htm.load_state_dict(convert_gpt2_weights(b.model, cfg), strict=False)
    htm.eval()
    batch = b.batch.to(b.device)
    rows = torch.arange(batch.n, device=b.device)

    def logit_diff(logits):
        last = logits[rows, batch.last]
        return last[rows, batch.answer] - last[rows, batch.wrong]

    z = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]

    def patch_sweep():
        with torch.no_grad():
            _, clean = htm.run_with_cache(batch.clean, names_filter=lambda n: n.endswith("hook_z"))
            base = logit_diff(htm(batch.corrupt)).mean()
            out = []
            for comp in comps:
                def hook(act, hook, comp=comp):
                    act[:, comp.pos, comp.unit] = clean[hook.name][:, comp.pos, comp.unit]
                    return act
                out.append(float(logit_diff(htm.run_with_hooks(
                    batch.corrupt, fwd_hooks=[(z[comp.layer], hook)])).mean() - base))
        return out

    names = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_z", "mlp.hook_post")
    filt = lambda n: n.endswith(names)  # noqa: E731

    def attribution():  # the usual TransformerLens AtP recipe: clean cache, corrupt cache + grad cache
        with torch.no_grad():
            _, clean = htm.run_with_cache(batch.clean, names_filter=filt)
        acts, grads = {}, {}
        htm.reset_hooks()
        htm.add_hook(filt, lambda t, hook: acts.__setitem__(hook.name, t.detach()), "fwd")
        htm.add_hook(filt, lambda g, hook: grads.__setitem__(hook.name, g.detach()), "bwd")
        htm.requires_grad_(True)
        try:
            with torch.enable_grad():
                logit_diff(htm(batch.corrupt)).sum().backward()
        finally:
            htm.reset_hooks()
            htm.requires_grad_(False)
            htm.zero_grad(set_to_none=True)
        return {k: ((clean[k] - acts[k]) * grads[k]).sum(0) for k in grads}

    res = {"n_patch": len(comps), "patch_seconds": [], "atp_seconds": []}
    for _ in range(repeats):
        b.forward()
        res["patch_seconds"].append(b.timed(patch_sweep)[0])
        b.forward()
        res["atp_seconds"].append(b.timed(attribution)[0])
        b.log(f"  TransformerLens: patch {fmt(res['patch_seconds'][-1])}; AtP {fmt(res['atp_seconds'][-1])}")
    for clock in CLOCKS:
        res[f"patch_per_component_fwd_{clock}"] = med(res["patch_seconds"], clock) / len(comps) / b.unit(clock)
        res[f"atp_fwd_{clock}"] = med(res["atp_seconds"], clock) / b.unit(clock)
    return res


# -------------------------------------------------------------------------------------------- report

def verdict(key: str, value: float) -> str:
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return "PASS" if ok else "MISS"


def mb(x):
    if x is None:
        return "n/a"
    x /= 2**20
    return f"{x:.0f} MB" if x >= 10 else f"{x:.1f} MB"


def table(r: dict) -> str:
    fw = r["forward_seconds"]
    walls, cpus = [x["wall"] for x in fw], [x["cpu"] for x in fw]
    w = 110
    lines = [
        f"attrpatch benchmark: {r['preset']} ({r['model']}, {r['n_layers']} layers, d_model {r['d_model']}), "
        f"batch {r['batch']} x {r['seq']} tokens, {r['dtype']}, {r['device']}, copies={r['copies']}",
        f"attrpatch {r['attrpatch']}, torch {r['torch']}, transformers {r['transformers']}, {r['threads']} torch threads, {r['machine']}",
        f"unit = 1 plain no-grad forward model(input_ids, attention_mask), median of {len(fw)}: "
        f"wall {statistics.median(walls):.3f} s (range {min(walls):.3f}-{max(walls):.3f}), "
        f"cpu {statistics.median(cpus):.3f} s (range {min(cpus):.3f}-{max(cpus):.3f}); peak {mb(r['forward_peak_bytes'])}",
        f"patch(...) fixed cost per call (source + receiver runs; subtracted below): "
        f"{r['patch_overhead_fwd']['wall']:.2f} fwd wall, {r['patch_overhead_fwd']['cpu']:.2f} fwd cpu",
        "",
        f"{'measurement (ratios to the unit)':<44}{'wall':>8}{'speed-up':>10}{'target':>9}  {'result':<7}"
        f"{'cpu':>7}{'speed-up':>9}  {'result':<6}{'peak mem':>9}{'cache':>8}",
        "-" * w,
    ]
    lines += atp_lines(r["atp"])
    for key, title in (("patch_pos", "head x pos sweep"), ("patch_all", "top-k all-position")):
        p = r[key]
        target = f">= {TARGETS[key][1]}x"
        lines.append(f"{'patch ' + title + ': naive, per comp':<44}{p['naive_per_component_fwd_wall']:>7.3f}x"
                     f"{'':>10}{'':>9}  {'':<7}{p['naive_per_component_fwd_cpu']:>6.3f}x{'':>9}  {'':<6}"
                     f"{mb(p['naive_peak_bytes']):>9}")
        lines.append(f"{'patch ' + title + ': batched, per comp':<44}{p['batched_per_component_fwd_wall']:>7.3f}x"
                     f"{p['speedup_wall']:>9.2f}x{target:>9}  {verdict(key, p['speedup_wall']):<7}"
                     f"{p['batched_per_component_fwd_cpu']:>6.3f}x{p['speedup_cpu']:>8.2f}x  "
                     f"{verdict(key, p['speedup_cpu']):<6}{mb(p['batched_peak_bytes']):>9}{mb(p['cache_bytes']):>8}")
    lines += edge_lines(r["edges"])
    lines.append(f"{'patch naive, per comp, pooled (= 1x base)':<44}"
                 f"{r['patch_pos']['pooled_naive_per_component_fwd_wall']:>7.3f}x{'':>10}{'':>9}  {'':<7}"
                 f"{r['patch_pos']['pooled_naive_per_component_fwd_cpu']:>6.3f}x")
    lines.append("-" * w)
    for key, title in (("patch_pos", "head x pos"), ("patch_all", "top-k all-pos")):
        p = r[key]
        lines.append(f"{title}: batched on {p['n_batched']} components ({p['forward_equivalents_per_component']:.2f}"
                     f" forward-equivalents each, attrpatch's count), naive on {p['n_naive']}; "
                     f"max |naive - batched| = {p['max_abs_diff_naive_vs_batched']:.1e}")
    t = r.get("transformer_lens")
    if t is None:
        lines.append("TransformerLens not installed: skipped")
    elif "error" in t:
        lines.append(f"TransformerLens: failed ({t['error']})")
    else:
        lines.append(f"TransformerLens, same weights: naive hook patching {t['patch_per_component_fwd_wall']:.3f}x "
                     f"per comp (cpu {t['patch_per_component_fwd_cpu']:.3f}x; {t['n_patch']} comps, its 2 setup runs "
                     f"included); "
                     f"hook AtP (cache fwd+bwd) {t['atp_fwd_wall']:.2f}x (cpu {t['atp_fwd_cpu']:.2f}x)")
    lines += screen_lines(r)
    lines.append("wall = perf_counter, cpu = process_time; patching per comp = (time - fixed cost) / components; "
                 "speed-up = pooled naive / batched")
    lines.append(f"peak mem = peak {'allocated' if r['device'] == 'cuda' else 'RSS'} growth during the call; "
                 "cache = analytic bytes of the site activations it caches from one run")
    lines.append(f"total benchmark time {r['total_seconds']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if "--preset" in argv and argv[argv.index("--preset") + 1:][:1] == ["fullwidth"]:  # scripts/benchmarks/fullwidth.py
        from benchmarks import fullwidth
        return fullwidth.main([a for i, a in enumerate(argv) if a != "--preset" and argv[i - 1:i] != ["--preset"]])
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
    ap_.add_argument("--only", choices=("all", "edges", "atp"), default="all",
                     help="edges: only the edge measurements (EAP, exact edge patching), ~1 min; atp: only AtP "
                          "(plain and recompute, time and memory)")
    ap_.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)  # atp_live_memory's child
    args = ap_.parse_args(argv)

    t_start = time.perf_counter()
    code = git_state()  # at start: the code this process imported
    preset = PRESETS[args.preset]
    device = torch.device(args.device or preset["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available (use --device cpu)")
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or preset["dtype"]]
    n, n_pos = args.batch or preset["batch"], args.seq or preset["seq"]
    verbose = not args.quiet

    model, tokenizer = build_model(preset, str(device), dtype)
    spec = ap.model_spec(model)
    dims = spec.dims
    if preset.get("task"):
        batch = task_batch(model, tokenizer, preset["task"], n)
        n_pos = batch.n_pos
    else:
        batch = ap.make_batch(make_pairs(n, n_pos, model.config.vocab_size, seed=args.seed))
    b = Bench(model, batch, device, verbose)
    itemsize = torch.finfo(dtype).bits // 8
    copies = max(1, default_rows(device, n_pos) // n)  # attrpatch's default rows per pass
    rng = random.Random(args.seed)
    b.log(f"model built in {time.perf_counter() - t_start:.1f} s; warm-up")

    # warm-up (first-call costs: allocator, kernels, hook machinery); the patch call resumes at the last block
    b.plain_forward()
    ap.patch(model, batch, ap.components("head", dims, n_pos, per_position=False)[-1:])
    b.forward()

    if args.memory_probe:
        return memory_probe(b)
    if args.only == "atp":
        return only_atp(b, dims, args, itemsize, t_start)
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
    screen_res = bench_screen(b) if preset.get("task") else None
    b.forward()
    atp_ratios(b, atp)
    atp_live_memory(atp, args)
    b.mem.close()
    pool_naive(b, overhead, patch_pos, patch_all)
    result = dict(
        preset=args.preset, model=type(model).__name__, n_layers=dims.n_layers, d_model=dims.d_model,
        n_heads=dims.n_heads, d_mlp=dims.d_mlp, vocab=model.config.vocab_size, batch=n, seq=n_pos,
        dtype=str(dtype).removeprefix("torch."), device=device.type, copies=copies,
        attrpatch=code, torch=torch.__version__, transformers=tf.__version__, threads=torch.get_num_threads(),
        machine=(torch.cuda.get_device_name(device) if device.type == "cuda"
                 else f"{platform.machine()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}"),
        forward_seconds=b.fwd, forward_peak_bytes=_max(b.fwd_peaks),
        unit_seconds={c: b.unit(c) for c in CLOCKS},
        patch_overhead_seconds=overhead,
        patch_overhead_fwd={c: med(overhead, c) / b.unit(c) for c in CLOCKS},
        atp=atp, patch_pos=patch_pos, patch_all=patch_all, transformer_lens=tl_res, edges=edges, screen=screen_res,
        targets={k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        verdicts={c: {"atp": verdict("atp", atp["plain"][f"fwd_{c}"]),
                      "patch_pos": verdict("patch_pos", patch_pos[f"speedup_{c}"]),
                      "patch_all": verdict("patch_all", patch_all[f"speedup_{c}"])} for c in CLOCKS},
        components={"patch_pos": [str(c) for c in pos_comps], "patch_all": [str(c) for c in top_comps]},
    )
    result["total_seconds"] = time.perf_counter() - t_start
    print(table(result))
    Path(args.out).write_text(json.dumps(result, indent=1))
    b.log(f"wrote {args.out}")
    return result


def atp_ratios(b: Bench, atp: dict) -> None:
    for a in atp.values():
        for clock in CLOCKS:
            a[f"fwd_{clock}"] = med(a["seconds"], clock) / b.unit(clock)


def only_atp(b: Bench, dims, args, itemsize: int, t_start: float) -> dict:
    """--only atp: the AtP rows (both modes, time and memory) and the unit."""
    atp = bench_atp(b, dims, args.repeats, itemsize)
    b.forward()
    atp_ratios(b, atp)
    atp_live_memory(atp, args)
    b.mem.close()
    print(f"AtP on {args.preset}, batch {b.batch.n} x {b.batch.n_pos}; unit: 1 plain forward, median of {len(b.fwd)}: "
          f"{b.unit('wall'):.3f} s wall, {b.unit('cpu'):.3f} s cpu; attrpatch {git_state()}; load avg "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'measurement (ratios to the unit)':<44}{'wall':>8}{'':>10}{'target':>9}  {'result':<7}{'cpu':>7}{'':>9}  "
          f"{'result':<6}{'peak mem':>9}{'cache':>8}")
    print("\n".join(atp_lines(atp)))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    result = {"preset": args.preset, "atp": atp, "unit_seconds": {c: b.unit(c) for c in CLOCKS},
              "forward_seconds": b.fwd}
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
