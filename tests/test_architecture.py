"""The package's shape: no import cycle (function-level imports included), no oversized
module."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rable_nb"


def modules(package: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is a package __init__)} of every module of ``package``."""
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the rable_nb modules it imports anywhere in its file (at module level or
    inside functions). Importing ``a.b.c`` also runs ``a.b``'s ``__init__``, except where
    the importer lives inside ``a.b`` itself (a plug-in package and its members)."""
    mods = modules(package)
    graph = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here[:len(here) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in mods else base)
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(2, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in mods and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_function_level_imports_and_not_plugin_packages(tmp_path):
    pkg = tmp_path / "p"
    (pkg / "plugins").mkdir(parents=True)
    files = {"__init__.py": "", "a.py": "from . import b\n",
             "b.py": "def f():\n    from .c import g\n",          # lazy: still an edge
             "c.py": "import p.a\n", "d.py": "from .plugins import one\n",
             "plugins/__init__.py": "from . import one\n",
             "plugins/one.py": "from .base import X\nfrom .. import d\n",
             "plugins/base.py": "X = 1\n"}
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph["p.d"] == {"p.plugins", "p.plugins.one"}
    assert "p.plugins" not in graph["p.plugins.one"]      # a member does not import its package
    assert cycles(graph) == [["p.a", "p.b", "p.c"], ["p.d", "p.plugins", "p.plugins.one"]]


def test_the_engine_knows_no_stage():
    graph = import_graph()
    assert graph["rable_nb.engine"] <= {"rable_nb.artefacts", "rable_nb.config",
                                        "rable_nb.cuda_graph", "rable_nb.evaluation",
                                        "rable_nb.methods",
                                        "rable_nb.methods._losses", "rable_nb.networks",
                                        "rable_nb.runfiles", "rable_nb.jsonl", "rable_nb.recipe"}
    tree = ast.parse((PACKAGE / "runfiles.py").read_text())   # torch-free readers
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and not n.level}
    # artefacts: the damaged-file helper, a leaf like config (no torch either)
    assert "torch" not in imported and import_graph()["rable_nb.runfiles"] == {
        "rable_nb.artefacts", "rable_nb.config", "rable_nb.jsonl"}
    assert import_graph()["rable_nb.artefacts"] == set()


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_oversized(name):
    path, _ = modules()[name]
    assert len(path.read_text().splitlines()) <= 520, f"{path.name}: split it"
