"""Long runs that stop: a screen or an edges run whose attribution runs out of memory even at one prompt stops with
a clear error, and ``--resume`` (without the failure) recomputes none of the steps saved before and writes the
report of an uninterrupted run; an edges run SIGKILLed mid-way resumes the same way, and a resume with other
options is refused."""

import json
import os
import subprocess
import sys

import pytest
import torch

import attrpatch as ap
import attrpatch.edge_screening as edge_screening
import attrpatch.steps as steps
from attrpatch.cli import main
from attrpatch.config import ScreenConfig
from attrpatch.methods.edges import eap
from attrpatch.methods.estimators import gradients
from conftest import random_pairs, saved_model, tiny_model, write_task
from test_oom import fragile
from test_reliability import _report_without_timing

SCREEN = ["--quiet", "--no-figures", "--top-k", "3", "--random-k", "2", "--direction", "both",
          "--sites", "resid_pre,head"]
EDGES = ["--quiet", "--no-figures", "--top-k", "3", "--random-k", "2", "--direction", "both",
         "--circuit-points", "3", "--metrics", "logit_diff,kl"]


def _counting(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` by a wrapper that records each call's direction."""
    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs.get("direction"))
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def _edge_report(path) -> dict:
    report = json.loads(path.read_text())
    report.pop("timing")
    return report


@pytest.fixture
def inputs(tmp_path):
    _, folder = saved_model(tmp_path / "model")
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=4))
    return ["--model", str(folder), "--task", str(task)]


@pytest.mark.parametrize("command", ["screen", "edges"])
def test_out_of_memory_at_one_prompt_stops_and_resume_recomputes_nothing_saved(command, tmp_path, inputs, monkeypatch,
                                                                               capsys):
    """Attribution of the second direction (noise) runs out of memory at every batch size: the run stops with the
    error and the command that continues it; resumed, only the noise direction's attribution and patching run,
    and the report equals an uninterrupted run's."""
    options, scorer, what, module, names, report = {
        "screen": (SCREEN, gradients.Chunk, "attributing (atp)", steps, ("attribute", "patch"), _report_without_timing),
        "edges": (EDGES, eap._Scorer, "attributing edges (atp)", edge_screening, ("attribute_edges", "patch_edges"),
                  _edge_report)}[command]
    argv = [command, *inputs, *options, "--out", str(tmp_path / "run")]
    assert main([command, *inputs, *options, "--out", str(tmp_path / "whole")]) == 0
    with monkeypatch.context() as m:
        fragile(m, scorer, when=lambda chunk: chunk.direction == "noise")
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"attrpatch: error: out of memory {what} even one prompt at a time" in err
    assert "attrpatch: stopped after" in err and argv[-1] + " --resume" in err and "Traceback" not in err
    saved = {p.stem for p in (tmp_path / "run" / ".progress").glob("*.safetensors")}
    assert saved and all("denoise" in s for s in saved)
    attributed, patched = (_counting(monkeypatch, module, name) for name in names)
    assert main(argv + ["--resume"]) == 0
    assert attributed == ["noise"] and set(patched) == {"noise"}  # nothing of denoise ran again
    assert report(tmp_path / "run" / "report.json") == report(tmp_path / "whole" / "report.json")


def test_screen_report_names_the_batch_an_out_of_memory_retry_ended_with(monkeypatch):
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs(4))
    config = ScreenConfig(sites=("head",), top_k=2, random_k=1, direction="denoise", progress=False)
    fragile(monkeypatch, gradients.Chunk, at_most=1)
    with pytest.warns(UserWarning, match="retrying with 1 prompts per batch"):
        result = ap.screen(model, batch, config)
    assert result.estimators["denoise"]["atp"]["cost"]["batch_size"] == 1


def test_killed_edges_run_resumes_to_the_same_report(tmp_path, inputs, monkeypatch, capsys):
    """SIGKILL right after the 3rd saved step (the noise direction's scores), then --resume in this process: the
    saved steps are not recomputed, the report equals an uninterrupted run's, other options are refused."""
    argv = ["edges", *inputs, *EDGES, "--out", str(tmp_path / "run")]
    assert main(["edges", *inputs, *EDGES, "--out", str(tmp_path / "whole")]) == 0
    killed = subprocess.run([sys.executable, "-m", "attrpatch.cli", *argv], capture_output=True, text=True,
                            env={**os.environ, "ATTRPATCH_KILL_AFTER_STEPS": "3"})
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "run" / "report.json").exists()
    assert {p.stem for p in (tmp_path / "run" / ".progress").glob("*.safetensors")} == {
        "edge-attribution-denoise", "edge-exact-denoise", "edge-attribution-noise"}
    attributed = _counting(monkeypatch, edge_screening, "attribute_edges")
    patched = _counting(monkeypatch, edge_screening, "patch_edges")
    circuits = _counting(monkeypatch, edge_screening, "patch_circuits")
    assert main(argv + ["--resume"]) == 0
    assert attributed == [] and patched == ["noise"] and len(circuits) == 1
    assert _edge_report(tmp_path / "run" / "report.json") == _edge_report(tmp_path / "whole" / "report.json")
    capsys.readouterr()
    assert main(argv[:-2] + ["--top-k", "4", "--out", str(tmp_path / "run"), "--resume"]) == 2
    assert "different options.top_k: 3 then, 4 now;" in capsys.readouterr().err  # names what changed


def test_edge_report_names_the_batch_an_out_of_memory_retry_ended_with(monkeypatch):
    from attrpatch.config import EdgeConfig
    from attrpatch.output.edge_report import edge_report

    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs(4))
    config = EdgeConfig(top_k=2, random_k=1, direction="denoise", metrics=("logit_diff",), circuit_points=3)
    fragile(monkeypatch, eap._Scorer, at_most=2)
    with pytest.warns(UserWarning, match="retrying with 2 prompts per batch"):
        result = edge_screening.screen_edges(model, batch, config)
    assert edge_report(result, model="tiny", task="pairs")["attribution_cost"]["denoise"]["batch_size"] == 2
