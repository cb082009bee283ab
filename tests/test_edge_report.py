"""An edge screen's report: a bootstrap interval per verified edge (against a naive bootstrap of one patch
per prompt), the control edges in report.md, and the edge, windows and corruptions figures titled with the
model, task, direction and metric as the node figures are."""

import json

import matplotlib
import numpy as np
import pytest
import torch

import attrpatch as ap
from attrpatch.analysis.intervals import N_BOOT, resamples
from attrpatch.edge_screening import EdgeConfig, screen_edges
from attrpatch.methods.edges.graph import Edge
from attrpatch.output.edge_report import edge_report, edge_summary
from conftest import random_pairs, tiny_model
from edge_reference import edge_patch_reference

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def screened():
    model = tiny_model("llama", dtype=torch.float64)
    pairs = random_pairs(4)
    config = EdgeConfig(top_k=4, random_k=3, direction="denoise", circuit_points=3)
    result = screen_edges(model, ap.make_batch(pairs), config)
    report = edge_report(result, model="tiny-llama", task="ioi")
    return model, pairs, report


def test_each_verified_edge_s_interval_equals_a_naive_bootstrap_and_contains_its_effect(screened):
    model, pairs, report = screened
    idx = resamples(len(pairs), N_BOOT, 0).numpy()  # the bootstrap's draws of prompt pairs
    for e in report["edges"]:
        per_prompt = np.array([edge_patch_reference(model, ap.make_batch([p]), Edge(e["sender"], e["receiver"]))
                               for p in pairs])
        means = [per_prompt[row].mean() for row in idx]
        low, high = np.percentile(means, [2.5, 97.5])
        assert e["exact_ci"] == pytest.approx([low, high], abs=1e-6), e["name"]
        assert e["exact"] == pytest.approx(per_prompt.mean(), abs=1e-6)
        assert e["exact_ci"][0] <= e["exact"] <= e["exact_ci"][1]


def test_report_md_shows_intervals_and_the_control_edges(screened):
    _, _, report = screened
    md = "\n".join(edge_summary(report))
    assert "| edge | atp | exact [95% CI] |" in md and "## Control edges" in md
    controls = sorted((e for e in report["edges"] if e["selected"] == "control"), key=lambda e: -abs(e["exact"]))
    assert f"- denoise: {len(controls)} controls; the largest |exact| {abs(controls[0]['exact']):.3g} " \
           f"({controls[0]['name']})" in md
    assert f"| {controls[0]['name']} |" in md.split("## Control edges")[1]
    from attrpatch.output.markdown import num
    low, high = controls[0]["exact_ci"]
    assert f"{num(controls[0]['exact'])} [{num(low)}, {num(high)}]" in md
    assert "forward-equivalents of patched passes" in md


def _title(fig) -> str:
    return fig._suptitle.get_text().replace(":\n", ": ") if fig._suptitle else ""


def test_edge_figures_name_model_task_direction_and_metric(screened):
    from attrpatch.plot.circuit import plot_edge_scatter, plot_faithfulness

    _, _, report = screened
    circuit = {**report["circuit"], "edges": []}
    assert _title(plot_edge_scatter(report, "denoise")) == "tiny-llama, ioi: denoising, logit diff"
    assert _title(plot_faithfulness(circuit, report=report)) == "tiny-llama, ioi: noising, logit diff"


def test_windows_and_corruptions_figures_name_model_task_direction_and_metric():
    from attrpatch.methods.patching.windows import sweep_windows
    from attrpatch.plot.corruptions import plot_corruptions
    from attrpatch.plot.windows import plot_windows

    model = tiny_model("gpt2")
    sweep = sweep_windows(model, ap.make_batch(random_pairs(3)), site="mlp_out", widths=[1], pos=3).to_dict()
    fig = plot_windows({"STR": sweep | {"model": "/models/tiny-gpt2", "task": "facts"}})
    assert _title(fig) == "tiny-gpt2, facts: denoising, logit diff"
    assert not _title(plot_windows({"STR": sweep}))  # a sweep file that names no model: no title
    comp = {"corruptions": ["str", "noise"], "model": "tiny-gpt2", "task": "ioi", "metric": "logit_diff",
            "key_position": 3, "tokens": None,
            "components": [{"site": "mlp_out", "layer": layer, "pos": 3, "direction": "noise", "flags": [],
                            "exact_norm": {"str": 0.1 * layer, "noise": 0.2}} for layer in range(3)]}
    assert _title(plot_corruptions(comp, "noise")) == "tiny-gpt2, ioi: noising, logit diff"


def test_cli_windows_sweeps_name_their_model_and_task(tmp_path):
    from attrpatch.cli import main
    from conftest import write_task

    tiny_model("gpt2").save_pretrained(tmp_path / "model")
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=2))
    assert main(["windows", "--model", str(tmp_path / "model"), "--task", str(task), "--site", "mlp_out",
                 "--window", "1", "--position", "3", "--no-figures", "--quiet", "--out", str(tmp_path / "run")]) == 0
    sweeps = json.loads((tmp_path / "run" / "windows.json").read_text())
    assert {(s["model"], s["task"]) for s in sweeps.values()} == {(str(tmp_path / "model"), str(task))}
