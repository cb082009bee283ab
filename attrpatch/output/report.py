"""Writing a screen's results: report.json, report.md, results.csv (the long table), scores.safetensors,
manifest.json; every file atomically (files.py). ``result``: the node screen's ScreenResult (analysis/results.py).
"""

import json
from pathlib import Path

import torch

from ..analysis.groups import group_components
from ..analysis.results import ScreenResult
from ..config import ScreenConfig, config_dict
from . import report_md
from .files import safetensors_bytes, write_atomic, write_csv, write_json

REPORT_VERSION = 1


def report_dict(result: ScreenResult, *, model: str, task: str, tokens: list[str] | None = None) -> dict:
    c: ScreenConfig = result.config
    o = config_dict(c)  # the options report.json states, as the manifest states them
    return {
        "version": REPORT_VERSION, "model": model, "model_class": result.model, "task": task,
        "n_prompts": result.n_prompts, "n_pos": result.n_pos, "tokens": tokens,
        "direction": o["direction"], "directions": list(c.directions), "metric": o["metric"],
        "metrics": list(o["metrics"]), "sites": list(o["sites"]),
        "positions": {s: ("each" if c.per_position(s) else "all") for s in c.sites},
        "top_k": o["top_k"], "random_k": o["random_k"], "verify_budget": o["verify_budget"],
        "measure_causes": o["measure_causes"],
        "clean_metric": result.clean_metric, "corrupt_metric": result.corrupt_metric,
        "components": result.components, "groups": group_components(result.components),
        "agreement": result.agreement,
        "false_negatives": result.false_negatives, "verification": result.verification,
        "attention": result.attention,
        "estimator": o["estimator"], "estimators": result.estimators, "numerical": result.numerical,
        "timing": result.timing, "sanity": result.sanity,
    }


def write_scores(path: Path, result: ScreenResult) -> None:
    """Every AtP score as float32 tensors named ``{direction}/{metric}/{site}``; the axis names of each
    (``layer pos``, ``layer pos head``, ``layer pos neuron``) are in the file's metadata."""
    tensors, axes = {}, {}
    for direction, scores in result.scores.items():
        for m, per_site in scores.values.items():
            for site, t in per_site.items():
                name = f"{direction}/{m}/{site}"
                tensors[name] = t.detach().float().cpu().contiguous()
                unit = {"neuron": " neuron", "head": " head", "q": " head", "k": " kv_head", "v": " kv_head"}
                axes[name] = ("batch " if scores.per_prompt else "") + "layer pos" + unit.get(site, "")
    meta = {"axes": json.dumps(axes), "note": "AtP scores per position, mean over prompts"}
    data = safetensors_bytes(tensors, meta)
    write_atomic(path, lambda f: f.write(data), binary=True)


def load_scores(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, axes) from a scores.safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        axes = json.loads(f.metadata()["axes"])
    return load_file(str(path)), axes


def write_run(out: Path, result: ScreenResult, *, model_name: str, task: str, tokens, manifest: dict) -> dict:
    """Write every output file into ``out``; returns the report dict."""
    out = Path(out)
    report = report_dict(result, model=model_name, task=task, tokens=tokens)
    report["corruption"] = manifest.get("corruption")  # its label: several corruptions run side by side
    report["dtype"], report["accumulation_dtype"] = manifest.get("dtype"), manifest.get("accumulation_dtype")
    write_scores(out / "scores.safetensors", result)
    label = (report["corruption"] or {}).get("method")  # one name a row: the csvs of several runs concatenate
    write_csv(out / "results.csv", [{"corruption": label, **row} for row in result.rows])
    write_json(out / "manifest.json", manifest)
    write_json(out / "report.json", report)
    write_atomic(out / "report.md", lambda f: f.write(markdown(report)))
    return report


def markdown(report: dict) -> str:
    """The human summary a researcher reads first (see report_md.py)."""
    return report_md.render(report)


def long_table(comps: list[dict], metrics, primary: str) -> list[dict]:
    """One row per verified component x direction x metric."""
    rows = []
    for e in comps:
        for m in metrics:
            rows.append({
                "direction": e["direction"], "site": e["site"], "layer": e["layer"], "head": e["head"],
                "neuron": e["neuron"], "pos": e["pos"], "name": e["name"], "selected": e["selected"],
                "metric": m, "primary": m == primary, "approx": e["approx_metrics"][m],
                "exact": e["exact_metrics"][m], "exact_norm": e["exact_norm"][m],
                "rank_approx": e["rank_approx"], "rank_exact": e["rank_exact"], "flags": ";".join(e["flags"]),
            })
    return rows
