"""Full width, shallow depth (issue 22 item 3): the widths of Llama-3-8B, Qwen2.5-7B and Gemma-2-9B at 1, 2 and 4
layers, random weights, bfloat16, on this CPU. Per model and depth: a real screen of every site (neurons included,
screening.screen as the CLI calls it) and a real edges run (edge_screening.screen_edges) on synthetic token-id
prompt pairs, under engine/memory.py's tracker on real tensors; then the memory plan (planning.plan_screen,
edge_planning.plan_edges: what ``attrpatch plan`` calls) of the same depth and of the FULL config, same settings.

Measured per phase (the tracker's peak, and wall seconds of the same call):
  baselines      Steps.check_inputs: three plain forwards (the screen's clock unit, ``forward_s``) and the checks
  attribution    Steps.attribute: AtP over every site                       planned (planning.py)
  verification   Steps.verify: exact patching of the verified components    planned: one chunk of patching
  diagnostics    Steps.diagnose, half and frozen patches                     not planned
  edges          edge_screening.attribute_edges: EAP over every edge         planned (edge_planning.py)
  edge_patching  edge_screening._verify: exact patching of top-k + control   planned
  circuit        edge_screening.faithfulness_curve                           not planned

Then per model and phase a least-squares line a + b * layers over the depths run, extrapolated to the full
depth (32, 28, 42) and compared with the full config's plan. Time ratios are to ``forward_s`` of the same run.

The weights: built on the meta device, then ``to_empty`` and every matrix filled from one seeded block of
WEIGHT_BLOCK normal values (std 0.02) repeated: a prime length, so no two rows of a matrix are equal, and ~0.1 s
per GB where ``normal_`` takes ~30 s for 2.5 GB here. Norm weights are the model's identity (1, Gemma's 0);
the rotary embeddings are rebuilt on the CPU (``to_empty`` leaves their buffers unset).

The prompts: random token ids; each corrupt prompt differs from its clean one at the first position and one
more, so no prefix is shared and the plan's full-length passes (planning.py) are the run's.

    python scripts/bench.py --preset fullwidth [--models llama-3-8b,qwen2.5-7b] [--layers 1,2,4] [--out F.json]
"""

import argparse
import json
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from unittest import mock

import torch

from attrpatch.model.archs import UnsupportedModel

CONFIGS = Path(__file__).resolve().parents[2] / "tests" / "configs"
MODELS = ("llama-3-8b", "qwen2.5-7b", "gemma-2-9b")
WEIGHT_BLOCK = 1_000_003  # a prime: a row of any matrix here starts at a different offset in the block
PLANNED = {"attribution": "screen", "verification": "screen", "edges": "edges", "edge_patching": "edges"}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The run's size. bf16 matmuls run at ~0.3-2.5 GFLOPS on this CPU (no bf16 instructions; fp32: ~23 GFLOPS),
    one forward of 2 x 8 tokens through one Llama-3-8B-wide block took 4.2 s, and a screen of 27 components at
    2 x 6 tokens took 724 s at load ~7: hence 2 x 4 tokens and one verified component per site."""

    n_prompts: int = 2
    seq_len: int = 4
    top_k: int = 1  # per site, with random_k controls: 9 sites x 1 = 9 verified components
    random_k: int = 0
    edge_top_k: int = 2
    edge_random_k: int = 1
    seed: int = 0
    dtype: str = "bfloat16"  # float32: the same run with the CPU's fast kernels (bf16's backward is ~40x slower here)
    metrics: tuple[str, ...] | None = None  # None: every metric (one backward each); fewer: fewer backwards

    def _metrics(self) -> dict:
        return {} if self.metrics is None else {"metrics": self.metrics}

    def screen_config(self):
        from attrpatch.model.sites import SITES
        from attrpatch.config import ScreenConfig
        # verify_budget 0: the top-k and controls, the components the plan traces (planning.verified_components)
        return ScreenConfig(sites=SITES, top_k=self.top_k, random_k=self.random_k, seed=self.seed, progress=False,
                            verify_budget=0, **self._metrics())

    def edge_config(self):
        from attrpatch.config import EdgeConfig
        return EdgeConfig(direction="denoise", top_k=self.edge_top_k, random_k=self.edge_random_k,
                          circuit_points=2, seed=self.seed, **self._metrics())


def model_config(name: str, layers: int | None = None, vocab: int | None = None, intermediate: int | None = None):
    """The transformers config of tests/configs/<name>.json, with ``layers``, ``vocab`` or ``intermediate``
    (the MLP width) replaced where given."""
    from transformers import AutoConfig

    values = json.loads((CONFIGS / f"{name}.json").read_text())
    for key, value in (("num_hidden_layers", layers), ("vocab_size", vocab), ("intermediate_size", intermediate)):
        if value is not None:
            values[key] = value
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build(config, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    """A random model of ``config`` in ``dtype`` on the CPU, filled fast (module docstring), in eval mode."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives each module its own copy of a shared weight (Gemma ties its unembedding)
    g = torch.Generator().manual_seed(seed)
    block = (torch.randn(WEIGHT_BLOCK, generator=g) * config.initializer_range).to(dtype)
    identity = 0.0 if config.model_type.startswith("gemma") else 1.0  # Gemma's norms scale by (1 + weight)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(identity)
                continue
            flat = p.view(-1)
            for at in range(0, flat.numel(), WEIGHT_BLOCK):
                n = min(WEIGHT_BLOCK, flat.numel() - at)
                flat[at:at + n] = block[:n]
    for name, module in list(model.named_modules()):
        if name.endswith("rotary_emb"):  # its inv_freq buffers were left unset by to_empty
            model.set_submodule(name, type(module)(config=config))
        elif hasattr(module, "embed_scale"):  # Gemma's scaled embedding: a buffer to_empty left unset
            module.embed_scale.fill_(config.hidden_size ** 0.5)
    return model.eval().requires_grad_(False)


def prompt_batch(n_prompts: int, seq_len: int, vocab: int, seed: int = 0):
    """Random token-id pairs; corrupt differs at position 0 and at seq_len // 2 (no shared prefix)."""
    from types import SimpleNamespace

    from attrpatch.inputs.batch import make_batch

    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n_prompts):
        clean = torch.randint(2, vocab, (seq_len,), generator=g).tolist()
        corrupt = list(clean)
        for p in {0, seq_len // 2}:
            corrupt[p] = 2 + (clean[p] - 2 + 1 + i) % (vocab - 2)
        answer, wrong = (torch.randperm(vocab - 2, generator=g)[:2] + 2).tolist()
        pairs.append(SimpleNamespace(clean_ids=clean, corrupt_ids=corrupt, answer_id=answer, wrong_id=wrong))
    return make_batch(pairs)


class Phases:
    """Each wrapped call's peak (the tracker's phase) and wall seconds, summed over calls."""

    def __init__(self, tracker):
        self.tracker, self.seconds = tracker, {}

    def wrap(self, owner, attr: str, phase: str):
        plain = getattr(owner, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            with self.tracker.phase(phase):
                out = plain(*args, **kwargs)
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start
            return out
        return mock.patch.object(owner, attr, timed)


@contextmanager
def tracked(model, wraps: list[tuple]):
    """A MemoryTracker over ``model`` with ``wraps`` (owner, attribute, phase) timed into phases."""
    from attrpatch.engine.memory import MemoryTracker

    tracker = MemoryTracker(model)
    phases = Phases(tracker)
    with ExitStack() as stack:
        for owner, attr, phase in wraps:
            stack.enter_context(phases.wrap(owner, attr, phase))
        stack.enter_context(tracker)
        yield tracker, phases


def measure_screen(model, batch, config) -> dict:
    """A screen of ``model`` on ``batch`` (screening.screen) with each step's peak bytes and seconds."""
    from attrpatch import screening
    from attrpatch.steps import Steps

    wraps = [(Steps, "check_inputs", "baselines"), (Steps, "attribute", "attribution"),
             (Steps, "verify", "verification"), (Steps, "diagnose", "diagnostics"), (Steps, "half", "diagnostics"),
             (Steps, "frozen", "diagnostics")]
    with tracked(model, wraps) as (tracker, phases):
        result = screening.screen(model, batch, config)
    n_verified = sum(1 for c in result.components)
    return {"memory": tracker.summary(), "seconds": phases.seconds, "forward_s": result.timing["forward_s"],
            "n_verified": n_verified, "timing": result.timing}


def measure_edges(model, batch, config) -> dict:
    """An edges run (edge_screening.screen_edges) with each step's peak bytes and seconds."""
    from attrpatch import edge_screening as es

    wraps = [(es, "_baselines", "baselines"), (es, "attribute_edges", "edges"), (es, "_verify", "edge_patching"),
             (es, "faithfulness_curve", "circuit")]
    with tracked(model, wraps) as (tracker, phases):
        result = es.screen_edges(model, batch, config)
    return {"memory": tracker.summary(), "seconds": phases.seconds, "forward_s": result.timing["forward_s"],
            "n_verified": len(result.edges), "n_edges": result.n_edges}


def plan(model_cfg, settings: Settings, screen_config, edge_config) -> dict:
    """planning.plan_screen and edge_planning.plan_edges (``attrpatch plan [--edges]``) of ``model_cfg`` in
    the run's dtype on the CPU with its settings; {phase: peak bytes, "weights": bytes, "largest": ..}."""
    from attrpatch.edge_planning import plan_edges
    from attrpatch.planning import plan_screen

    kw = dict(n_prompts=settings.n_prompts, seq_len=settings.seq_len, dtype=settings.dtype, device="cpu")
    screen = plan_screen(model_cfg, screen_config, **kw)
    try:
        edges = plan_edges(model_cfg, edge_config, **kw)
    except UnsupportedModel:  # a family edges refuse (post-norm Gemma 2: issue 25): its edge phases are None
        edges = {"phases": {p: {"peak_bytes": None} for p in PLANNED}, "largest": None, "settings": {"copies": 1}}
    out = {p: (screen if src == "screen" else edges)["phases"][p]["peak_bytes"] for p, src in PLANNED.items()}
    out.update(weights=screen["weights_bytes"], largest={"screen": screen["largest"], "edges": edges["largest"]},
               copies={"screen": screen["settings"]["copies"], "edges": edges["settings"]["copies"]})
    return out


def run_depth(name: str, layers: int, settings: Settings, vocab: int | None = None,
              intermediate: int | None = None, log=print) -> dict:
    """Build, plan, screen and edges-run one model at one depth; the plan's copies per pass are the run's."""
    cfg = model_config(name, layers, vocab, intermediate)
    start = time.perf_counter()
    model = build(cfg, getattr(torch, settings.dtype), seed=settings.seed)
    build_s = time.perf_counter() - start
    planned = plan(cfg, settings, settings.screen_config(), settings.edge_config())
    screen_config = replace(settings.screen_config(), copies=planned["copies"]["screen"])
    edge_config = replace(settings.edge_config(), copies=planned["copies"]["edges"])
    batch = prompt_batch(settings.n_prompts, settings.seq_len, cfg.vocab_size, settings.seed)
    log(f"{name} x{layers}: built in {build_s:.0f} s; screening")
    screen = measure_screen(model, batch, screen_config)
    log(f"{name} x{layers}: screen {sum(screen['seconds'].values()):.0f} s; edges run")
    try:
        edges = measure_edges(model, batch, edge_config)
    except UnsupportedModel as e:
        log(f"{name} x{layers}: edges refused: {str(e).splitlines()[0][:100]}")
        edges = {"memory": {"phases": {p: {"peak_bytes": None} for p in (*PLANNED, "circuit")}, "largest": None},
                 "seconds": {"edges": None, "edge_patching": None}, "forward_s": None, "n_verified": 0, "n_edges": 0}
    del model
    measured = {p: (screen if src == "screen" else edges)["memory"]["phases"][p]["peak_bytes"]
                for p, src in PLANNED.items()}
    for extra in ("baselines", "diagnostics"):
        measured[extra] = screen["memory"]["phases"][extra]["peak_bytes"]
    measured["circuit"] = edges["memory"]["phases"]["circuit"]["peak_bytes"]
    seconds = {**screen["seconds"], **{k: v for k, v in edges["seconds"].items() if k != "baselines"}}
    fwd = screen["forward_s"]
    ratios = {"atp_all_sites": seconds["attribution"] / fwd,
              "exact_per_component": seconds["verification"] / screen["n_verified"] / fwd,
              "eap_all_edges": seconds["edges"] / fwd if seconds["edges"] is not None else None,
              "edge_patching_per_edge": seconds["edge_patching"] / edges["n_verified"] / fwd if edges["n_verified"] else None}
    return {"model": name, "layers": layers, "build_s": build_s, "weights_bytes": screen["memory"]["weights_bytes"],
            "measured": measured, "planned": planned, "seconds": seconds, "forward_s": fwd,
            "edges_forward_s": edges["forward_s"], "ratios": ratios, "n_verified": screen["n_verified"],
            "n_edges": edges["n_edges"], "n_verified_edges": edges["n_verified"],
            "largest": {"screen": screen["memory"]["largest"], "edges": edges["memory"]["largest"]}}


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b x; with one point, b = 0."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def extrapolate(rows: list[dict], full_plans: dict, vocab=None, intermediate=None) -> dict:
    """Per model and phase: the fit of measured peak bytes and seconds in depth, its worst residual, the
    extrapolation to the full depth, and the full config's plan with the relative difference."""
    out = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        full = model_config(name, None, vocab, intermediate).num_hidden_layers
        xs = [r["layers"] for r in mine]
        entry = {"full_layers": full, "memory": {}, "seconds": {}}
        for phase in [*PLANNED, "weights"]:
            ys = [r["weights_bytes"] if phase == "weights" else r["measured"][phase] for r in mine]
            if None in ys:  # edges refused for this family
                continue
            a, b = fit_line(xs, ys)
            at_full = a + b * full
            planned = full_plans[name][phase]
            entry["memory"][phase] = {"a": a, "b": b, "residual": max(abs(a + b * x - y) / y for x, y in zip(xs, ys)),
                                      "extrapolated": at_full, "planned_full": planned,
                                      "difference": (planned - at_full) / at_full}
        for phase in ("baselines", "attribution", "verification", "edges", "edge_patching"):
            ys = [r["seconds"][phase] for r in mine]
            if None in ys:
                continue
            a, b = fit_line(xs, ys)
            entry["seconds"][phase] = {"a": a, "b": b, "extrapolated": a + b * full}
        out[name] = entry
    return out


def gb(n: float) -> str:
    return f"{n / 1e9:.3f}"


def table(result: dict) -> str:
    """The plan-vs-measured rows, the fits with their extrapolation, and the time ratios, as text."""
    lines = ["plan vs measured (GB; diff = (plan - measured) / measured)",
             f"{'model':12s} {'L':>2s} {'weights':>8s} " + " ".join(f"{p:>22s}" for p in PLANNED)]
    for r in result["rows"]:
        cells = [f"{gb(r['planned'][p])}/{gb(r['measured'][p])} {100 * (r['planned'][p] / r['measured'][p] - 1):+5.1f}%"
                 if r["measured"][p] is not None else "refused" for p in PLANNED]
        lines.append(f"{r['model']:12s} {r['layers']:2d} {gb(r['weights_bytes']):>8s} " +
                     " ".join(f"{c:>22s}" for c in cells))
    lines += ["", "fit a + b * layers of the measured peak (GB), extrapolated vs the full config's plan"]
    for name, e in result["fits"].items():
        for phase, f in e["memory"].items():
            lines.append(f"{name:12s} {phase:14s} a {gb(f['a'])} b {gb(f['b'])} (worst residual "
                         f"{100 * f['residual']:.2f}%)  at {e['full_layers']} layers {gb(f['extrapolated'])}  "
                         f"plan {gb(f['planned_full'])}  {100 * f['difference']:+.1f}%")
    lines += ["", "time (s) and ratios to one plain forward (forward_s of the same screen)"]
    for r in result["rows"]:
        s, q = r["seconds"], r["ratios"]
        lines.append(f"{r['model']:12s} {r['layers']:2d} fwd {r['forward_s']:.2f}  atp {s['attribution']:.1f} "
                     f"({q['atp_all_sites']:.2f}x)  exact {s['verification']:.1f} / {r['n_verified']} "
                     f"({q['exact_per_component']:.3f}x each)  " +
                     (f"eap {s['edges']:.1f} ({q['eap_all_edges']:.2f}x)  edge patching {s['edge_patching']:.1f} / "
                      f"{r['n_verified_edges']} ({q['edge_patching_per_edge']:.3f}x each)" if s["edges"] is not None
                      else "edges refused for this family"))
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bench.py --preset fullwidth", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--layers", default="1,2,4", help="depths to run (default 1,2,4)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default="fullwidth_results.json", help="JSON results path")
    for field_ in (f for f in fields(Settings) if f.type is int):
        p.add_argument(f"--{field_.name.replace('_', '-')}", type=int, default=field_.default)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="bfloat16 (the benchmark); float32: the CPU's fast kernels, for time ratios on a CPU without bf16 units")
    p.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (a quick check; not the benchmark)")
    p.add_argument("--intermediate", type=int, default=None, help="a smaller MLP (a quick check; not the benchmark)")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings) if f.type is int}, dtype=args.dtype)
    load_before, start = os.getloadavg(), time.perf_counter()
    rows = []
    for name in models:
        for layers in (int(x) for x in args.layers.split(",")):
            rows.append(run_depth(name, layers, settings, args.vocab, args.intermediate, log=lambda m: print(m, flush=True)))
            Path(args.out).write_text(json.dumps({"partial": True, "rows": rows, "load_before": load_before,
                                                  "load_now": os.getloadavg()}, indent=1))  # a cut-off run keeps these
    full_plans = {name: plan(model_config(name, None, args.vocab, args.intermediate), settings, settings.screen_config(), settings.edge_config())
                  for name in models}
    result = {"settings": asdict(settings), "vocab": args.vocab, "intermediate": args.intermediate, "rows": rows,
              "full_plans": full_plans, "fits": extrapolate(rows, full_plans, args.vocab, args.intermediate), "torch": torch.__version__,
              "threads": args.threads, "load_before": load_before, "load_after": os.getloadavg(),
              "wall_s": time.perf_counter() - start}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"load average (1, 5, 15 min) before {load_before}, after {result['load_after']}; "
          f"wall {result['wall_s']:.0f} s; results in {args.out}")
    return result


if __name__ == "__main__":
    main()
