"""Check attrpatch's layout: stages import only from themselves and earlier stages (and methods' rooms only
from themselves and earlier rooms), no import circle, modules and functions stay small, and a module that
reads a config's, a finding's or a screen result's fields imports its type (no duck typing). Prints the stage graph and the largest
module and function.

    python scripts/layout.py          # exit 1 on a violation
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "attrpatch"
# The stages in the order data flows; a module may import from its own stage and earlier ones.
STAGES = ("inputs", "model", "engine", "methods", "config", "analysis", "output", "plot", "steps", "screening", "feature_screening", "edge_mib", "edge_screening",
          "prompts", "pipeline", "planning", "feature_planning", "edge_planning", "cli", "__init__", "__main__")
# methods/ in rooms, in the order they may import one another; modules directly in methods/ come first
ROOMS = ("", "estimators", "patching", "edges")
CONFIG_TYPES = ("ScreenConfig", "EdgeConfig")  # attrpatch/config.py's dataclasses; readers import them
CONFIG_NAMES = ("config", "cfg")  # how the code names a config: config.x, self.config.x, result.config.x
# fields only a Finding (analysis/records.py) has: a module reading them on an object imports Finding
FINDING_ONLY = ("flags", "causes", "evidence", "exact_norm", "exact_metrics", "approx_metrics", "approx_estimators",
                "rank_exact", "exact_ci")
RESULT_TYPES = ("ScreenResult", "EdgeResult")  # attrpatch/analysis/results.py's dataclasses; readers import them
RESULT_NAMES = ("result",)  # how the code names a screen's result: result.rows, self.result.edges
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
EXEMPT = {}  # "module:function" -> why it may be longer (none today)


def stage_of(module: str) -> str:
    """'attrpatch.methods.atp' -> 'methods'; 'attrpatch.cli' -> 'cli'; 'attrpatch' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def room_of(module: str) -> str:
    """'attrpatch.methods.edges.eap' -> 'edges'; 'attrpatch.methods.ablation' -> '' (methods' own modules)."""
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[1] == "methods" else ""


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, module: str) -> set[str]:
    """attrpatch modules imported by the file (relative imports resolved), at any depth of the file."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
            found |= {n for n in names if n.startswith("attrpatch")}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("attrpatch")}
    return found


def check() -> tuple[list[str], dict]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f): f for f in files}
    problems, graph = [], {}
    for module, path in modules.items():
        stage = stage_of(module)
        if stage not in STAGES:
            problems.append(f"{module}: stage {stage!r} is not in scripts/layout.py STAGES; add it in data-flow order")
            continue
        found = imports(path, module)
        deps = {d for d in found if d in modules and d != module}
        graph[module] = deps
        for dep in deps:
            dep_stage = stage_of(dep)
            if stage != "__init__" and STAGES.index(dep_stage) > STAGES.index(stage):
                problems.append(f"{module} ({stage}) imports {dep} from the later stage {dep_stage}")
            elif stage == dep_stage == "methods" and _room_index(dep) > _room_index(module):
                problems.append(f"{module} (methods room {room_of(module) or 'methods'}) imports {dep} from the "
                                f"later room {room_of(dep)}")
        problems += _untyped_config_reads(module, path, found, config_fields())
        problems += _untyped_finding_reads(module, path, found)
        problems += _untyped_result_reads(module, path, found, result_fields())
        lines = path.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            problems.append(f"{module}: {lines} lines (> {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and f"{module}:{node.name}" not in EXEMPT:
                    problems.append(f"{module}:{node.name}: {length} lines (> {MAX_FUNCTION_LINES})")
    problems += [f"import circle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems, graph


def _room_index(module: str) -> int:
    room = room_of(module)
    if room not in ROOMS:
        raise SystemExit(f"{module}: room {room!r} is not in scripts/layout.py ROOMS; add it in import order")
    return ROOMS.index(room)


def config_fields() -> dict[str, set[str]]:
    """Each config type's field names, read from attrpatch/config.py."""
    return _fields(PACKAGE / "config.py", CONFIG_TYPES)


def result_fields() -> dict[str, set[str]]:
    """Each screen result type's field names, read from attrpatch/analysis/results.py."""
    return _fields(PACKAGE / "analysis" / "results.py", RESULT_TYPES)


def _fields(path: Path, types: tuple[str, ...]) -> dict[str, set[str]]:
    if not path.exists():
        return {}
    tree = ast.parse(path.read_text())
    return {node.name: {f.target.id for f in node.body if isinstance(f, ast.AnnAssign)}
            for node in tree.body if isinstance(node, ast.ClassDef) and node.name in types}


def _owner(node: ast.expr) -> str:
    """The name an attribute or key is read from: result (result.x), result (self.result.x), ''."""
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def _untyped_result_reads(module: str, path: Path, found: set[str], fields: dict[str, set[str]]) -> list[str]:
    """A module that reads a screen result's fields (result.rows, self.result.edges) without importing
    ScreenResult or EdgeResult, or reads them dict-style (result["rows"], getattr(result, "rows")) at all:
    reported, with the fields it reads. The result's type is imported from wherever it is re-exported."""
    if module == "attrpatch.analysis.results" or not fields:
        return []
    every = set().union(*fields.values())
    read, keyed = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in every and _owner(node.value) in RESULT_NAMES:
            read.add(node.attr)
        elif isinstance(node, ast.Subscript) and _owner(node.value) in RESULT_NAMES \
                and isinstance(node.slice, ast.Constant) and node.slice.value in every:
            keyed.add(node.slice.value)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") \
                and len(node.args) >= 2 and _owner(node.args[0]) in RESULT_NAMES \
                and isinstance(node.args[1], ast.Constant) and node.args[1].value in every:
            keyed.add(node.args[1].value)
    problems = []
    if read and not any(f.rpartition(".")[2] in fields for f in found):
        problems.append(f"{module} reads screen result fields ({', '.join(sorted(read))}) without importing their "
                        f"type ({' or '.join(fields)} from attrpatch.analysis.results)")
    if keyed:
        problems.append(f"{module} reads screen result fields ({', '.join(sorted(keyed))}) by key or getattr; "
                        f"import {' or '.join(fields)} from attrpatch.analysis.results and read them as attributes")
    return problems


def _untyped_config_reads(module: str, path: Path, found: set[str], fields: dict[str, set[str]]) -> list[str]:
    """A module that reads a config's fields (config.top_k, self.config.metric, result.config.sites) without
    importing ScreenConfig or EdgeConfig reads it by duck typing: reported, with the fields it reads."""
    if module == "attrpatch.config" or not fields:
        return []
    every = set().union(*fields.values())
    read = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in every and _owner(node.value) in CONFIG_NAMES:
            read.add(node.attr)
    typed = {f"attrpatch.config.{t}" for t in fields} & found
    if read and not typed:
        return [f"{module} reads config fields ({', '.join(sorted(read))}) without importing their type "
                f"({' or '.join(fields)} from attrpatch.config)"]
    return []


def _untyped_finding_reads(module: str, path: Path, found: set[str]) -> list[str]:
    """A module that reads a Finding's own fields as attributes (e.flags, e.exact_norm) imports Finding (or
    the record helpers beside it); the dicts past the output boundary are read by key, not by attribute."""
    if module == "attrpatch.analysis.records":
        return []
    read = {node.attr for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and node.attr in FINDING_ONLY and isinstance(node.ctx, ast.Load)}
    if read and not any(f.startswith("attrpatch.analysis.records") for f in found):
        return [f"{module} reads finding fields ({', '.join(sorted(read))}) without importing Finding from "
                "attrpatch.analysis.records"]
    return []


def _cycles(graph: dict) -> list[list[str]]:
    """Every import circle found by depth-first search (each reported once, from its smallest member)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycle = path[path.index(dep):] + [dep]
                if min(cycle[:-1]) == cycle[0]:
                    found.append(cycle)
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def largest() -> tuple[tuple[int, str], tuple[int, str]]:
    mods, funcs = [], []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        mods.append((path.read_text().count("\n"), name))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    return max(mods), max(funcs)


def main() -> int:
    problems, graph = check()
    by_stage: dict[str, set[str]] = {}
    for module, deps in graph.items():
        by_stage.setdefault(stage_of(module), set()).update(stage_of(d) for d in deps)
    for stage in STAGES:
        if stage in by_stage:
            deps = sorted(by_stage[stage] - {stage}, key=STAGES.index)
            print(f"{stage:10s} <- {', '.join(deps) or '(nothing)'}")
    by_room: dict[str, set[str]] = {}
    for module, deps in graph.items():
        if stage_of(module) == "methods":
            by_room.setdefault(room_of(module), set()).update(room_of(d) for d in deps if stage_of(d) == "methods")
    for room in ROOMS:
        if room in by_room:
            deps = sorted(by_room[room] - {room}, key=ROOMS.index)
            print(f"  methods/{room or '.':11s} <- {', '.join(f'methods/{d or chr(46)}' for d in deps) or '(nothing)'}")
    (mod_lines, mod), (fn_lines, fn) = largest()
    print(f"largest module: {mod} ({mod_lines} lines); largest function: {fn} ({fn_lines} lines)")
    for p in problems:
        print("PROBLEM:", p)
    print("layout ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
