"""Check attrpatch's layout: stages import only from themselves and earlier stages, no import circle, and
modules and functions stay small. Prints the stage graph and the largest module and function.

    python scripts/layout.py          # exit 1 on a violation
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "attrpatch"
# The stages in the order data flows; a module may import from its own stage and earlier ones.
STAGES = ("inputs", "model", "engine", "methods", "config", "analysis", "output", "plot", "steps", "screening", "edge_screening",
          "prompts", "pipeline", "planning", "edge_planning", "cli", "__init__", "__main__")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
EXEMPT = {}  # "module:function" -> why it may be longer (none today)


def stage_of(module: str) -> str:
    """'attrpatch.methods.atp' -> 'methods'; 'attrpatch.cli' -> 'cli'; 'attrpatch' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


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
        deps = {d for d in imports(path, module) if d in modules and d != module}
        graph[module] = deps
        for dep in deps:
            dep_stage = stage_of(dep)
            if stage != "__init__" and STAGES.index(dep_stage) > STAGES.index(stage):
                problems.append(f"{module} ({stage}) imports {dep} from the later stage {dep_stage}")
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
    (mod_lines, mod), (fn_lines, fn) = largest()
    print(f"largest module: {mod} ({mod_lines} lines); largest function: {fn} ({fn_lines} lines)")
    for p in problems:
        print("PROBLEM:", p)
    print("layout ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
