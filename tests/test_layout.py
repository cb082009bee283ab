"""The package layout: stages import only from themselves and earlier ones, no circle, small modules."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "layout.py"


def _layout():
    spec = importlib.util.spec_from_file_location("layout", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stages_import_only_earlier_stages_and_modules_stay_small():
    problems, graph = _layout().check()
    assert problems == []
    assert len(graph) > 30  # it saw the package


def test_the_check_catches_a_backward_import(tmp_path, monkeypatch):
    """A module of an early stage that imports a later one is reported (the check can fail)."""
    layout = _layout()
    pkg = tmp_path / "attrpatch"
    (pkg / "inputs").mkdir(parents=True)
    (pkg / "methods").mkdir()
    for d in (pkg, pkg / "inputs", pkg / "methods"):
        (d / "__init__.py").write_text("")
    (pkg / "inputs" / "a.py").write_text("from ..methods import b\n")
    (pkg / "methods" / "b.py").write_text("from ..inputs import a\n")
    monkeypatch.setattr(layout, "PACKAGE", pkg)
    problems, _ = layout.check()
    assert any("imports attrpatch.methods.b from the later stage methods" in p for p in problems)
    assert any(p.startswith("import circle") for p in problems)
