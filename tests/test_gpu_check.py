"""scripts/gpu_check.sh runs on a CPU with --small (the GPU check's smoke test); its plan matches its measurement."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_small_runs_on_the_cpu_and_its_plan_matches_the_measurement(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["layers"] == 1 and result["device"] == "cpu"
    for phase in ("attribution", "verification", "edges", "edge_patching"):
        real, plan = result["measured"][phase], result["plan"][phase]
        assert abs(plan - real) <= 0.1 * real, (phase, plan, real)
    assert result["screen"]["atp_ratio"] > 0 and result["edges"]["patch_per_edge_ratio"] > 0
