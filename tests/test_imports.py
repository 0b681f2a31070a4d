"""The package's import graph, read from the source (module level and inside functions): no cycle, and
few of our own modules imported inside functions (outside the CLI and the public API, only where a
heavy import or a start-up time needs it). No import tricks: no `__import__`, no module-class swap,
no module `__getattr__` re-export door."""
import ast
import collections
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "fcdm_lab"
DEFERRED_BUDGET = 30          # our own modules imported inside functions, outside cli.py and api.py
ENTRY_POINTS = ("fcdm_lab.cli", "fcdm_lab.api")


def modules() -> dict:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(mods: dict) -> list:
    """(importer, imported module, inside a function?, line) for every import of ours. Importing
    a.b.c also runs a and a.b (their __init__), so those count as edges too."""
    edges = []
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets = []
                if isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        root = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                        base = ".".join(root + ([base] if base else []))
                    for alias in child.names:
                        full = f"{base}.{alias.name}"
                        targets.append(full if full in mods else base)
                elif isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                for target in targets:
                    if target.startswith("fcdm_lab") and target in mods:
                        edges.append((mod, target, inside, child.lineno))
                visit(child, inside)

        visit(ast.parse(path.read_text()), False)
    return edges


def graph(mods, edges) -> dict:
    g = collections.defaultdict(set)
    for a, b, _, _ in edges:
        parts = b.split(".")
        for i in range(1, len(parts) + 1):  # b and the packages above it
            target = ".".join(parts[:i])
            if target in mods and target != a and not a.startswith(target + "."):
                g[a].add(target)
    return g


def cycles(g) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(g):
        if v not in index:
            strong(v)
    return out


def test_the_package_has_no_import_cycle():
    mods = modules()
    assert cycles(graph(mods, imports(mods))) == []


def test_few_of_our_modules_are_imported_inside_functions():
    mods = modules()
    deferred = sorted({f"{a}:{line} -> {b}" for a, b, inside, line in imports(mods)
                       if inside and a not in ENTRY_POINTS and a != "fcdm_lab"})
    assert len(deferred) <= DEFERRED_BUDGET, "\n".join(deferred)


def test_no_import_tricks():
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__"), path
            assert not (isinstance(node, ast.Attribute) and node.attr == "__class__"
                        and isinstance(getattr(node, "ctx", None), ast.Store)), path  # a module-class swap
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), path


def test_the_graph_reader_sees_a_cycle():
    """The checks above are only as good as the reader: a two-module cycle is found."""
    mods = {"fcdm_lab.a": None, "fcdm_lab.b": None}
    g = graph(mods, [("fcdm_lab.a", "fcdm_lab.b", True, 1), ("fcdm_lab.b", "fcdm_lab.a", False, 1)])
    assert cycles(g) == [["fcdm_lab.a", "fcdm_lab.b"]]
