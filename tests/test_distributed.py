"""Data parallelism: torchrun with 2 CPU processes (gloo) gives the single-process report."""

import json
import os
import subprocess
import sys

import pytest

from conftest import random_pairs, saved_model, write_task


def test_two_ranks_equal_one_process(tmp_path):
    _, folder = saved_model(tmp_path / "model", "llama")
    task = write_task(tmp_path / "task.jsonl", random_pairs(n=5))
    args = ["screen", "--model", str(folder), "--task", str(task), "--quiet", "--no-figures", "--top-k", "3",
            "--random-k", "2", "--sites", "resid_pre,head,neuron,k", "--estimator", "atp_star"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "attrpatch.cli", *args, "--out", str(tmp_path / "one")],
                            env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "-m", "attrpatch.cli", *args, "--out", str(tmp_path / "two")],
                           env=env, capture_output=True, text=True)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["n_prompts"] == one["n_prompts"] == 5
    assert [c["name"] for c in two["components"]] == [c["name"] for c in one["components"]]
    for a, b in zip(one["components"], two["components"]):
        assert b["approx"] == pytest.approx(a["approx"], abs=1e-5)
        for m, v in a["exact_metrics"].items():
            assert b["exact_metrics"][m] == pytest.approx(v, abs=1e-5)
    for m, v in one["clean_metric"].items():
        assert two["clean_metric"][m] == pytest.approx(v, abs=1e-5)
