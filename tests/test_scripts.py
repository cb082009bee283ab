"""Every command-line script under scripts/ imports and shows its --help: a move or rename in the package that
breaks a script's imports fails here, not when a reader first runs it (bench_faithfulness.py once imported a
helper that had moved)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.py") if "argparse" in p.read_text(encoding="utf-8"))


def test_the_scripts_are_found():
    assert {p.name for p in SCRIPTS} >= {"bench.py", "bench_faithfulness.py", "make_figures.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_script_shows_its_help(script):
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
