"""The package layout: stages import only from themselves and earlier ones, no circle, small modules."""

import ast
from pathlib import Path

from conftest import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "layout.py"


def _layout():
    return load_script("scripts/layout.py")


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


def test_each_package_docstring_lists_the_modules_it_has():
    """Every stage package's docstring has a line per module (indented, the module's name first), so the
    map a reader starts from names what is there."""
    import re

    package = SCRIPT.parent.parent / "attrpatch"
    for init in sorted(package.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()), clean=False) or ""
        missing = [p.stem for p in sorted(init.parent.glob("*.py")) if p.stem != "__init__"
                   and not re.search(rf"^\s+{p.stem}\b", doc, re.M)]
        assert missing == [], f"{init.relative_to(package.parent)}: no docstring line for {missing}"


def test_the_check_catches_a_backward_import_between_methods_rooms(tmp_path, monkeypatch):
    """methods/ imports in room order (estimators, patching, edges): an estimator importing edges is reported."""
    layout = _layout()
    pkg = tmp_path / "attrpatch"
    for d in (pkg, pkg / "methods", pkg / "methods" / "estimators", pkg / "methods" / "edges"):
        d.mkdir(parents=True, exist_ok=True)
        (d / "__init__.py").write_text("")
    (pkg / "methods" / "estimators" / "a.py").write_text("from ..edges import b\n")
    (pkg / "methods" / "edges" / "b.py").write_text("x = 1\n")
    monkeypatch.setattr(layout, "PACKAGE", pkg)
    problems, _ = layout.check()
    assert any("imports attrpatch.methods.edges.b from the later room edges" in p for p in problems)


def test_the_check_catches_a_config_or_finding_read_by_duck_typing(tmp_path, monkeypatch):
    """A module reading config.top_k without importing ScreenConfig, or e.flags without importing Finding, is
    reported; importing the types clears it."""
    layout = _layout()
    pkg = tmp_path / "attrpatch"
    (pkg / "analysis").mkdir(parents=True)
    for d in (pkg, pkg / "analysis"):
        (d / "__init__.py").write_text("")
    (pkg / "config.py").write_text("class ScreenConfig:\n    top_k: int = 30\n")
    (pkg / "analysis" / "records.py").write_text("class Finding:\n    flags: list\n")
    (pkg / "analysis" / "a.py").write_text("def f(config, e):\n    return config.top_k, e.flags\n")
    monkeypatch.setattr(layout, "PACKAGE", pkg)
    problems, _ = layout.check()
    assert any("attrpatch.analysis.a reads config fields (top_k)" in p for p in problems)
    assert any("attrpatch.analysis.a reads finding fields (flags)" in p for p in problems)
    (pkg / "analysis" / "a.py").write_text("from ..config import ScreenConfig\nfrom .records import Finding\n\n\n"
                                           "def f(config: ScreenConfig, e: Finding):\n    return config.top_k, e.flags\n")
    problems, _ = layout.check()
    assert problems == []


def test_the_check_catches_a_screen_result_read_untyped_or_by_key(tmp_path, monkeypatch):
    """An output module reading result.rows without importing ScreenResult, or result["edges"] /
    getattr(result, "circuit") at all, is reported; importing the type and reading attributes clears it."""
    layout = _layout()
    pkg = tmp_path / "attrpatch"
    (pkg / "analysis").mkdir(parents=True)
    (pkg / "output").mkdir()
    for d in (pkg, pkg / "analysis", pkg / "output"):
        (d / "__init__.py").write_text("")
    (pkg / "analysis" / "results.py").write_text("class ScreenResult:\n    rows: list\n\n\n"
                                                 "class EdgeResult:\n    edges: list\n    circuit: dict\n")
    (pkg / "output" / "a.py").write_text("def f(result):\n    return result.rows\n")
    (pkg / "output" / "b.py").write_text("from ..analysis.results import EdgeResult\n\n\n"
                                         "def g(result: EdgeResult):\n"
                                         "    return result['edges'], getattr(result, 'circuit')\n")
    monkeypatch.setattr(layout, "PACKAGE", pkg)
    problems, _ = layout.check()
    assert any("attrpatch.output.a reads screen result fields (rows) without importing" in p for p in problems)
    assert any("attrpatch.output.b reads screen result fields (circuit, edges) by key or getattr" in p
               for p in problems)
    (pkg / "output" / "a.py").write_text("from ..analysis.results import ScreenResult\n\n\n"
                                         "def f(result: ScreenResult):\n    return result.rows\n")
    (pkg / "output" / "b.py").write_text("from ..analysis.results import EdgeResult\n\n\n"
                                         "def g(result: EdgeResult):\n    return result.edges, result.circuit\n")
    problems, _ = layout.check()
    assert problems == []


def test_the_outputs_read_the_screen_results_as_their_types(tmp_path):
    """output/report.py and output/edge_report.py import ScreenResult and EdgeResult (their reads are typed),
    and the types the screens return are those."""
    from attrpatch.analysis.results import EdgeResult, ScreenResult
    from attrpatch.edge_screening import screen_edges
    from attrpatch.output import edge_report, report
    from attrpatch.screening import screen

    assert report.ScreenResult is ScreenResult and edge_report.EdgeResult is EdgeResult
    assert screen.__annotations__["return"] is ScreenResult and screen_edges.__annotations__["return"] is EdgeResult
    layout = _layout()
    for name in ("report", "edge_report"):
        path = SCRIPT.parent.parent / "attrpatch" / "output" / f"{name}.py"
        untyped = path.read_text().replace("from ..analysis.results import", "from ..analysis.sanity import")
        found = {f for f in layout.imports(path, f"attrpatch.output.{name}") if "results" not in f}
        (tmp_path / f"{name}.py").write_text(untyped)  # the module as it was: results read without their type
        assert layout._untyped_result_reads(f"attrpatch.output.{name}", tmp_path / f"{name}.py", found,
                                            layout.result_fields())
