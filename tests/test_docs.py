"""The documentation cites only files that exist, and the README stays a short front door.

Checked: README.md, every other committed Markdown file (docs/, figures/, results/) and
the markdown cells of every notebook. A citation is a Markdown link ``[text](path)``
(relative to the citing file; ``#anchor`` dropped) or a path written from the project
root that starts with one of the project's top-level folders (``rable_nb/engine/engine.py``,
``tests/test_x.py::test_name``, ``scripts/run.sh``, ``examples/x.yaml``, ``docs/x.md``),
in prose, backticks or code blocks. Module names (``rable_nb.engine``) are not paths.
For ``tests/...py::name`` the test function must exist too.
"""
import itertools
import json
import os
import re
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150

# Paths a doc may cite although they are not in the repository (keep this short):
GENERATED = ("runs/", "results/gpu-")        # prefixes: written by the commands (runs/: ignored)
NOT_COMMITTED: set = set()                    # (none: figures/provenance.json is committed)
PENDING: set = set()                          # announced, written in other branches

TOP = ("rable_nb", "tests", "scripts", "examples", "docs", "notebooks", "results", "figures")
ROOTED = re.compile(r"(?<![\w./-])((?:%s)/[\w./{},-]*[\w/}])(::\w+)?" % "|".join(TOP))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _docs():
    """(name, directory links are relative to, text) of every checked document."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "figures").glob("*.md")), *sorted((ROOT / "results").rglob("*.md"))]
    for f in files:
        yield f.relative_to(ROOT).as_posix(), f.parent, f.read_text()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        text = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        yield nb.relative_to(ROOT).as_posix(), nb.parent, text


def _braces(path):
    """``a-{x,y}.yaml`` -> ``a-x.yaml``, ``a-y.yaml``."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def _exempt(rel):
    return rel.startswith(GENERATED) or rel in NOT_COMMITTED or rel in PENDING


def citations(text, base):
    """(as written, path relative to the root, test name or None) for every citation."""
    for m in LINK.finditer(text):
        target = urllib.parse.unquote(m.group(1).split("#")[0])
        if not target or re.match(r"[a-z]+:", target):          # anchors, URLs, mailto:
            continue
        rel = Path(os.path.normpath(base / target)).relative_to(ROOT).as_posix()
        yield m.group(1), rel, None
    for m in ROOTED.finditer(text):
        rest = re.match(r"[^\s`)\]]*", text[m.end(1):]).group(0)
        if "<" in rest or "*" in rest:                          # a template: runs/<name>/, feature-*
            continue
        for rel in _braces(m.group(1)):
            yield m.group(0), rel, (m.group(2) or "")[2:] or None


def missing(text, base):
    out = []
    for written, rel, test in citations(text, base):
        if _exempt(rel):
            continue
        path = ROOT / rel
        if not path.exists():
            out.append(written)
        elif test and not re.search(rf"^def {test}\(", path.read_text(), re.M):
            out.append(written)
    return out


@pytest.mark.parametrize("name,base,text", [pytest.param(*d, id=d[0]) for d in _docs()])
def test_every_file_a_doc_cites_exists(name, base, text):
    assert missing(text, base) == [], f"{name} cites files that do not exist"


def anchors(markdown):
    """GitHub's heading anchors of a Markdown text (duplicates get -1, -2, ...)."""
    seen, out, fenced = {}, set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6} +(.+?) *#* *$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("name,base,text", [pytest.param(*d, id=d[0]) for d in _docs()])
def test_every_anchor_a_doc_links_to_is_a_heading_there(name, base, text):
    broken = []
    for m in LINK.finditer(text):
        target, _, anchor = m.group(1).partition("#")
        if not anchor or re.match(r"[a-z]+:", target):
            continue
        path = Path(os.path.normpath(base / target)) if target else ROOT / name
        if path.suffix == ".ipynb":
            continue
        if path.suffix == ".md" and path.exists() and anchor not in anchors(path.read_text()):
            broken.append(m.group(1))
    assert broken == [], f"{name} links to headings that do not exist"


def test_anchors_follow_github():
    assert anchors("# Two commands\n## Protocol L (the LT-PLL standard, RECORDS / SoLar)\n"
                   "```\n# not a heading\n```\n### `pixel`: flow matching\n# Two commands") == {
        "two-commands", "protocol-l-the-lt-pll-standard-records--solar",
        "pixel-flow-matching", "two-commands-1"}


def test_the_citation_check_catches_what_it_should_and_nothing_else():
    text = ("see [algorithms](algorithms.md#bases), `tests/test_nothere.py`, "
            "tests/test_docs.py::test_no_such_test, `rable_nb.engine`, "
            "`examples/sweep-{smoke,nothere}.yaml`, `results/x/feature-*`, `docs/<name>.md`, "
            "runs/smoke/fig-cost.png, [web](https://example.org/x.py), `rable_nb/engine/engine.py:12`.")
    assert missing(text, ROOT / "docs") == [
        "tests/test_nothere.py", "tests/test_docs.py::test_no_such_test",
        "examples/sweep-{smoke,nothere}.yaml"]


# Notebooks whose top cell is still being shortened in other branches (the lead empties this)
TOP_CELL_PENDING: set = set()


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_a_notebook_opens_with_at_most_20_lines_of_markdown(path):
    if path.name[:2] in TOP_CELL_PENDING:
        pytest.skip("top cell being shortened in another branch")
    cells = json.loads(path.read_text())["cells"]
    first = "".join(cells[0]["source"]) if cells[0]["cell_type"] == "markdown" else ""
    n = len(first.splitlines())
    assert n <= 20, f"{path.name}: top cell has {n} lines; put explanations beside their cells"


def test_the_readme_is_at_most_150_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/"


def test_the_generator_parameter_table_is_the_registrys():
    from rable_nb import generators
    text = (ROOT / generators.KNOB_TABLE).read_text()
    assert text == generators.knob_table(), (
        f"{generators.KNOB_TABLE} is stale: regenerate it (the command is in its first lines)")
