"""The two directions in two processes (screening.processes, engine/forked.py): the same report as one process,
both processes' work counted, the child's failures raised in the parent with a way on."""

import os
import signal
from dataclasses import replace

import pytest
import torch

import attrpatch as ap
from attrpatch import screening
from attrpatch.config import ScreenConfig
from attrpatch.engine.forked import ChildFailed, Forked
from attrpatch.output.checkpoint import Progress
from conftest import random_pairs, tiny_model

CONFIG = ScreenConfig(sites=("resid_pre", "head", "neuron"), top_k=3, random_k=2, direction="both", progress=False)


def _facts(result) -> dict:
    """The report's content without the clock: seconds differ between any two runs."""
    out = result.to_dict() if hasattr(result, "to_dict") else dict(vars(result))
    out = {k: v for k, v in out.items() if k not in ("timing", "estimators", "scores", "config")}
    out["cost"] = {d: {e: {k: v for k, v in g["cost"].items() if k not in ("seconds", "forward_equivalents")}
                       for e, g in per.items()} for d, per in result.estimators.items()}
    return out


def _close(a, b, path="report"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6, nan_ok=True), path
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    else:
        assert a == b, path


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_two_processes_give_the_one_process_report(family):
    """Every finding, flag, cause, agreement and verification plan equal (float tolerance); the tally of passes
    equal; the clock counts both processes' phases."""
    model, batch = tiny_model(family), ap.make_batch(random_pairs(4))
    one = ap.screen(model, batch, replace(CONFIG, processes=1))
    two = ap.screen(model, batch, replace(CONFIG, processes=2))
    _close(_facts(two), _facts(one))
    assert [c["name"] for c in two.components] == [c["name"] for c in one.components]
    for key in ("forward_passes", "forward_equivalents_verification"):
        assert two.timing[key] == pytest.approx(one.timing[key])
    assert two.timing["attribution_s"] > 0 and two.timing["verification_s"] > 0
    for per in two.estimators.values():  # each process timed its own unit: the cost is in forward-equivalents
        assert all(e["cost"]["forward_equivalents"] > 0 for e in per.values())


def test_a_child_error_is_raised_in_the_parent_as_itself(monkeypatch):
    """A ValueError in the noise direction (the child's) reaches the caller as that ValueError."""
    real = screening.screen_direction

    def failing(run, direction, unit=False):
        if direction == "noise":
            raise ValueError("planted: noise failed")
        return real(run, direction, unit)
    monkeypatch.setattr(screening, "screen_direction", failing)
    with pytest.raises(ValueError, match="planted: noise failed"):
        ap.screen(tiny_model("gpt2"), ap.make_batch(random_pairs(3)), replace(CONFIG, processes=2))


def test_a_killed_child_is_named_with_the_way_on():
    """A child killed by a signal (the OOM killer's SIGKILL): ChildFailed names the signal, --resume and --processes 1."""
    with pytest.raises(ChildFailed, match=r"killed by signal 9.*--resume.*--processes 1"):
        with Forked(lambda: os.kill(os.getpid(), signal.SIGKILL), 1, 1) as child:
            child.result()


def test_the_parent_failing_kills_the_child_and_restores_threads():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="parent"):
        with Forked(lambda: __import__("time").sleep(60), 1, 1) as child:
            pid = child.pid
            raise RuntimeError("parent")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped
    assert torch.get_num_threads() == before


def test_two_processes_need_both_directions_on_a_cpu(capsys):
    with pytest.raises(ValueError, match="direction='both'"):
        replace(CONFIG, direction="denoise", processes=2)
    from attrpatch.cli import main
    assert main(["screen", "--task", "ioi", "--processes", "2", "--direction", "noise", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--direction both" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="processes must be 1 or 2"):
        replace(CONFIG, processes=3)


def test_one_process_unless_two_are_asked_for(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert screening.processes(CONFIG, cpu) == 1
    assert screening.processes(replace(CONFIG, processes=2), cpu) == 2
    with pytest.raises(ValueError, match="a model on the CPU"):
        screening.processes(replace(CONFIG, processes=2), torch.device("meta"))


def test_steps_saved_by_both_processes_resume_in_one(tmp_path, monkeypatch):
    """A two-process run's saved steps (the child's included) serve a one-process resume: nothing recomputed."""
    model, batch = tiny_model("gpt2"), ap.make_batch(random_pairs(3))
    first = ap.screen(model, batch, replace(CONFIG, processes=2), progress=Progress(tmp_path, {"run": 1}))
    saved = {p.stem for p in (tmp_path / ".progress").glob("*.safetensors")}
    assert any("noise" in s for s in saved) and any("denoise" in s for s in saved)
    from attrpatch import steps
    monkeypatch.setattr(steps, "patch", lambda *a, **k: pytest.fail("recomputed a saved patch"))
    monkeypatch.setattr(steps, "attribute", lambda *a, **k: pytest.fail("recomputed saved scores"))
    again = ap.screen(model, batch, replace(CONFIG, processes=1), progress=Progress(tmp_path, {"run": 1}, resume=True))
    _close(_facts(again), _facts(first))


def test_no_fork_off_linux(monkeypatch):
    """macOS's frameworks are not fork-safe: no second process there, asked for (a clear error) or by default."""
    from attrpatch.engine import forked
    monkeypatch.setattr(forked.sys, "platform", "darwin")
    assert forked.available() == 0
    with pytest.raises(ValueError, match="Linux"):
        screening.processes(replace(CONFIG, processes=2), torch.device("cpu"))
    assert screening.processes(CONFIG, torch.device("cpu")) == 1
