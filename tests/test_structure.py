"""The project's shape: dependencies run one way, core <- export <- recipes, with no import
cycle anywhere, function-level imports included."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> import name (pyproject's package-dir)
PACKAGES = {"brevitas_ana": "brevitas_ana", "export": "brevitas_ana.export",
            "recipes": "brevitas_ana.recipes"}


def modules():
    """{import name: path} of every module of the three packages."""
    found = {}
    for folder, name in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[name if path.stem == "__init__" else f"{name}.{path.stem}"] = path
    return found


def imports(path: Path, known) -> set:
    """Project modules ``path`` imports, at any depth of its code (function bodies too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # ``from pkg import mod`` depends on pkg.mod; ``from pkg import name`` on pkg
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known
                     else node.module for a in node.names]
        else:
            continue
        for name in names:
            # the longest project module the name refers to
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def layer(module: str) -> str:
    for part in ("export", "recipes"):
        if module == f"brevitas_ana.{part}" or module.startswith(f"brevitas_ana.{part}."):
            return part
    return "core"


def graph():
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def test_the_walk_sees_every_kind_of_import():
    g = graph()
    assert "brevitas_ana.export.graphs" in g["brevitas_ana.export.int_only"]
    assert "brevitas_ana.recipes.checkpoint" in g["brevitas_ana.recipes.export_run"]
    # a function-level import counts: graphs.qonnx_from_torch imports the core inside it
    assert "brevitas_ana" in g["brevitas_ana.export.graphs"]
    # and a cycle would be found: add the edge the project once had (export -> recipes)
    g["brevitas_ana.recipes.checkpoint"].add("brevitas_ana.recipes.export_run")
    assert find_cycles(g)


def test_dependencies_run_one_way():
    allowed = {"core": {"core"}, "export": {"core", "export"},
               "recipes": {"core", "export", "recipes"}}
    wrong = [(m, i) for m, deps in graph().items() for i in deps
             if layer(i) not in allowed[layer(m)]]
    assert wrong == []


def test_no_import_cycle():
    assert find_cycles(graph()) == []


def find_cycles(g) -> list:
    """Cycles of the module graph, by depth-first search over every edge as written."""
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    return cycles
