"""The package's shape: no import cycle (function-level imports included), folders in floors
that import only downwards, a module map in docs/architecture.md that matches the tree, no
oversized module."""
import ast
import re
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


def test_the_run_files_import_no_torch():
    """The engine knows no stage and the run files no torch: the floors below say the first;
    here the readers of the run directory stay importable without torch."""
    tree = ast.parse((PACKAGE / "rundir" / "runfiles.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and not n.level}
    # artefacts: the damaged-file helper, a leaf like config (no torch either)
    assert "torch" not in imported and import_graph()["rable_nb.rundir.runfiles"] == {
        "rable_nb.rundir.artefacts", "rable_nb.config", "rable_nb.rundir.jsonl"}
    assert import_graph()["rable_nb.rundir.artefacts"] == set()


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_oversized(name):
    path, _ = modules()[name]
    assert len(path.read_text().splitlines()) <= 520, f"{path.name}: split it"


# Folders from the bottom up (``FLOORS``): a module imports only its own floor and those
# below it, lazy imports included — the run files and the data know nothing of torch
# training, the engine nothing of a stage, a stage nothing of a command.
FLOORS = {"config": 0, "rundir": 1, "data": 1, "engine": 2, "methods": 2, "parts": 3,
          "generators": 4, "batch": 5, "stages": 6, "commands": 7, "__main__": 8}


def floor(module: str) -> int | None:
    """The floor of ``rable_nb.<folder or top-level module>[...]``; None for the package."""
    parts = module.split(".")
    return FLOORS[parts[1]] if len(parts) > 1 else None


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if None not in (floor(m), floor(d)) and floor(d) > floor(m))


def test_every_module_lives_on_a_floor():
    assert [m for m in modules() if m != "rable_nb" and m.split(".")[1] not in FLOORS] == []


def test_no_module_imports_from_a_higher_floor():
    assert upward(import_graph()) == []


def test_the_floor_check_sees_an_import_from_above():
    graph = {"rable_nb.engine.engine": {"rable_nb.stages.s04_training", "rable_nb.config"},
             "rable_nb.stages.s04_training": {"rable_nb.engine.engine"}}
    assert upward(graph) == ["rable_nb.engine.engine -> rable_nb.stages.s04_training"]


PLUGIN_FOLDERS = ("methods", "generators")   # one file per variant: the map names the folder


def _module_map() -> dict[str, set[str]]:
    """{folder: the module names its row of docs/architecture.md's module map lists}."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `rable_nb/([\w/]*)` \|", line)
        if m:
            rows[m.group(1).rstrip("/")] = set(re.findall(r"`(\w+)` \(", line))
    return rows


def test_the_architecture_map_lists_every_module_where_it_is():
    on_disk = {}
    for name, (_, is_pkg) in modules().items():
        parts = name.split(".")[1:]
        if parts and not is_pkg and parts[0] not in PLUGIN_FOLDERS:
            on_disk.setdefault("/".join(parts[:-1]), set()).add(parts[-1])
    mapped = _module_map()
    assert set(mapped) == set(on_disk) | set(PLUGIN_FOLDERS)
    assert {k: v for k, v in mapped.items() if k not in PLUGIN_FOLDERS} == on_disk
