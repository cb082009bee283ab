"""Faults: non-finite numbers are named, never ranked; degenerate baselines are refused up front."""

import math
from dataclasses import replace
import sys

import pytest
import torch

import attrpatch as ap
from attrpatch import steps
from attrpatch.config import ScreenConfig
from attrpatch.screening import screen
from conftest import random_pairs, saved_model, tiny_model, write_task

CONFIG = ScreenConfig(sites=("head", "resid_pre"), top_k=3, random_k=2, progress=False)


@pytest.mark.parametrize("budget", [0.0, 20.0])
def test_injected_nan_scores_are_named_and_never_ranked(monkeypatch, budget):
    """budget 0: the top-k and controls, which never rank it in; 20: the site is verified exhaustively, so it is
    verified, but ranked last."""
    screen_module = steps  # the screen's steps call attribute and patch
    real = screen_module.attribute

    def poisoned(*args, **kwargs):
        scores = real(*args, **kwargs)
        scores.values["logit_diff"]["head"][..., 1, :, 2] = float("nan")  # L1H2 at every position (and prompt)
        return scores
    monkeypatch.setattr(screen_module, "attribute", poisoned)
    model = tiny_model("gpt2")
    result = screen(model, ap.make_batch(random_pairs()), replace(CONFIG, verify_budget=budget))
    found = [s for s in result.numerical["scores"] if s["site"] == "head" and s["metric"] == "logit_diff"]
    assert found and found[0]["components"] == ["L1H2"]
    heads = [c for c in result.components if c["site"] == "head"]
    tops = [c["name"] for c in heads if c["selected"] == "top"]
    if budget:
        assert result.verification["denoise"]["head"]["mode"] == "exhaustive"
        assert next(c["rank_approx"] for c in heads if c["name"] == "L1H2") == len(heads)
    else:
        assert "L1H2" not in tops
    assert all(math.isfinite(a["pearson"]) for a in result.agreement["denoise"]["head"].values())


def test_injected_nan_effects_are_flagged(monkeypatch):
    screen_module = steps  # the screen's steps call attribute and patch
    real = screen_module.patch
    calls = []

    def poisoned(*args, **kwargs):
        effects = real(*args, **kwargs)
        if not calls:  # the first site's first component
            effects.values[0, 1] = float("inf")
        calls.append(1)
        return effects
    monkeypatch.setattr(screen_module, "patch", poisoned)
    result = screen(tiny_model("gpt2"), ap.make_batch(random_pairs()), CONFIG)
    flagged = [c for c in result.components if "non_finite" in c["flags"]]
    assert len(flagged) == 1 and result.numerical["effects"][0]["metrics"] == ["logprob"]


def test_non_finite_baseline_is_refused_before_any_work():
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[:, 5] = float("nan")
    with pytest.raises(FloatingPointError, match=r"clean run's logits are not finite for prompts \[0, 1, 2\].*bfloat16"):
        screen(model, ap.make_batch(random_pairs()), CONFIG)


def test_zero_gap_is_refused_with_the_reason():
    pairs = random_pairs()
    for p in pairs:
        p.corrupt_ids = list(p.clean_ids)
    with pytest.raises(ValueError, match=r"same logit_diff .*cannot be\s+normalised"):
        screen(tiny_model("gpt2"), ap.make_batch(pairs), CONFIG)


def _report_without_timing(path):
    import json
    report = json.loads(path.read_text())
    report.pop("timing")
    for per_direction in report["estimators"].values():
        for e in per_direction.values():
            e["cost"].pop("seconds"), e["cost"].pop("forward_equivalents")
    return report


def test_killed_run_resumes_to_the_same_report(tmp_path):
    """SIGKILL right after the 3rd saved step (mid-verification), then --resume: same report as a run
    that was never interrupted, and no truncated report file in between."""
    import os
    import subprocess
    _, folder = saved_model(tmp_path / "model")
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=3))

    def run(out, *extra, env=None):
        cmd = [sys.executable, "-m", "attrpatch.cli", "screen", "--model", str(folder), "--task", str(task),
               "--out", str(out), "--quiet", "--no-figures", "--top-k", "3", "--random-k", "2",
               "--direction", "both", "--sites", "resid_pre,head,neuron", *extra]
        return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True)

    whole = run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    killed = run(tmp_path / "resumed", env={"ATTRPATCH_KILL_AFTER_STEPS": "3"})
    assert killed.returncode == -9
    assert not (tmp_path / "resumed" / "report.json").exists()
    assert len(list((tmp_path / "resumed" / ".progress").glob("*.safetensors"))) == 3
    resumed = run(tmp_path / "resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _report_without_timing(tmp_path / "resumed" / "report.json") == \
        _report_without_timing(tmp_path / "whole" / "report.json")
    other = run(tmp_path / "resumed", "--resume", "--top-k", "4")
    assert other.returncode != 0 and "different options.top_k: 3 then, 4 now;" in other.stderr
