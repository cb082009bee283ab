"""What every benchmark shares: the presets, the model and prompts, the clock and memory of one measured call
(``Bench``: every time a ratio to one plain forward), the targets and the formatting of numbers."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import transformers as tf

import attrpatch as ap


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
    """The prompt batch the CLI's default screen of ``task`` runs on (prompts.prepare_pairs)."""
    from attrpatch.prompts import pad_token, prepare_pairs

    pairs, _ = prepare_pairs(model, tokenizer, task=task, n_prompts=n, per_position=True)
    return ap.make_batch(pairs, pad_id=pad_token(tokenizer))


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


def site_bytes(site: str, dims, n: int, n_pos: int, itemsize: int) -> int:
    width = {"head": dims.n_heads * dims.d_head, "q": dims.n_heads * dims.d_head, "neuron": dims.d_mlp,
             "k": dims.n_kv_heads * dims.d_head, "v": dims.n_kv_heads * dims.d_head}.get(site, dims.d_model)
    return n * n_pos * width * itemsize


TARGETS = {"atp": ("<=", 2.5), "atp_memory": ("<=", 1.5), "patch_pos": (">=", 4.0), "patch_all": (">=", 1.8), "eap": ("<=", 4.0),
           "edge_patch": ("<=", 0.35)}


def verdict(key: str, value: float) -> str:
    op, target = TARGETS[key]
    ok = value <= target if op == "<=" else value >= target
    return "PASS" if ok else "MISS"


def mb(x):
    if x is None:
        return "n/a"
    x /= 2**20
    return f"{x:.0f} MB" if x >= 10 else f"{x:.1f} MB"


def git_state() -> str:
    import subprocess
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "attrpatch"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" + uncommitted attrpatch changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
