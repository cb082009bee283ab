"""The benchmark script runs (tiny preset) and writes its JSON; its numbers are not asserted (timing)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tiny_preset_runs(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--preset", "tiny", "--quiet",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny" and "atp" in result
    assert set(result["atp"]) == {"plain", "recompute", "floor"}  # AtP's floor is measured beside it
    assert "AtP / floor" in done.stdout
