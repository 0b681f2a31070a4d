"""The modules of fcdm_lab.models import each other without cycles, counting the package's
__init__.py as a module (`from . import X` depends on it) and counting imports inside functions
too, so a deferred import cannot hide a cycle."""
import ast
from pathlib import Path

import fcdm_lab.models

PACKAGE = "fcdm_lab.models"
ROOT = Path(fcdm_lab.models.__file__).parent


def _module_name(path: Path) -> str:
    return PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"


def _imports(path: Path) -> set:
    """Modules of fcdm_lab.models that the file at `path` imports (anywhere in it)."""
    modules = {_module_name(p) for p in ROOT.glob("*.py")}
    here = _module_name(path)
    package_parts = PACKAGE.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package_parts[: len(package_parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from pkg import name`: the package itself, and the submodule when `name` is one
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != here}
    return found


def test_models_import_graph_is_acyclic():
    graph = {_module_name(p): _imports(p) for p in ROOT.glob("*.py")}
    order, state = [], {}

    def visit(node, stack):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", f"import cycle: {' -> '.join(stack + [node])}"
        state[node] = "open"
        for dep in sorted(graph[node]):
            visit(dep, stack + [node])
        state[node] = "done"
        order.append(node)

    for node in sorted(graph):
        visit(node, [])
    assert len(order) == len(graph)


def test_no_module_of_the_package_imports_the_package_itself():
    for path in ROOT.glob("*.py"):
        if path.name != "__init__.py":
            assert PACKAGE not in _imports(path), f"{path.name} imports {PACKAGE} (its __init__.py)"
