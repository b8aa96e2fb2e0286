"""``python -m rable_nb report --run runs/NAME``: a run's executed notebooks as one HTML page.

The page is made with nbconvert's JupyterLab template from the executed copies the runner
keeps in the run directory (in the order ``run.json`` lists them): first the run's
provenance (profile, commit, device, each notebook's parameters and time, from
``figures.run_provenance`` and ``run.json``) and a table of contents, then every notebook's
text, printed results and figures, without the code (the notebooks hold it). Everything is
inside the one file, so it opens offline: figures are embedded, formulas are turned into
MathML (which browsers draw themselves) instead of loading MathJax from the web, and the
static copy of an interactive widget is replaced by a note saying where it runs.
"""
from __future__ import annotations

import html
import re
import sys
from pathlib import Path

import nbformat

from . import artefacts, config, figures

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ("<p><i>An interactive widget: it runs in a live notebook (JupyterLab) or, for "
               "notebook 07, in the web app of <code>python -m rable_nb demo</code>.</i></p>")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
MATH = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<![\\$])\$(?![\s$])([^$\n]+?)(?<![\\\s])\$",
                  re.S)
HEADING = re.compile(r"^(#{1,3})\s+(.*)$", re.M)


class ReportError(RuntimeError):
    """The report cannot be made; the message says why."""


def _finished(run_dir: Path) -> list[dict]:
    """The notebooks ``run.json`` records as finished (their entries)."""
    return (artefacts.read_json(run_dir / "run.json") or {}).get("notebooks", [])


def executed_notebooks(run_dir: Path) -> list[Path]:
    """The run's executed notebooks: those ``run.json`` records as finished, in its order."""
    names = [e["notebook"] for e in _finished(run_dir)]
    found = [run_dir / n for n in sorted(names) if (run_dir / n).is_file()]
    if not found:
        raise ReportError(f"{run_dir} has no executed notebooks recorded in run.json: make "
                          "one with python -m rable_nb run (e.g. --only 01,04).")
    return found


def to_mathml(markdown: str) -> str:
    """``$…$`` and ``$$…$$`` outside code spans as MathML; a formula the converter cannot
    read stays as TeX."""
    from latex2mathml.converter import convert

    def formula(m):
        tex, display = (m.group(1), "block") if m.group(1) is not None else (m.group(2), "inline")
        try:
            return convert(tex.strip(), display=display)
        except Exception:  # noqa: BLE001 - leave what the converter cannot parse as it is
            return m.group(0)

    parts, last = [], 0
    for code in CODE_SPAN.finditer(markdown):
        parts += [MATH.sub(formula, markdown[last:code.start()]), code.group(0)]
        last = code.end()
    return "".join(parts + [MATH.sub(formula, markdown[last:])])


def _provenance_cell(run_dir: Path, notebooks: list[Path]) -> str:
    info = figures.run_provenance(run_dir)
    log = {e["notebook"]: e for e in _finished(run_dir)}
    device = ", ".join(info["device"]) if info["device"] else "not recorded (no training run)"
    commit = info["commit"] if isinstance(info["commit"], str) else ", ".join(info["commit"])
    rows = "".join(
        f"<tr><td>{html.escape(nb.stem)}</td><td>{log[nb.name].get('seconds', '–')} s</td>"
        f"<td><code>{html.escape(_parameters(log[nb.name].get('parameters', {})))}</code></td>"
        "</tr>" for nb in notebooks)
    return (f"# Report of the run `{info['run']}`\n\n"
            f"**Profile** {info['profile']} · **commit** `{commit}` · **device** {device}\n\n"
            "<table><tr><th>notebook</th><th>time</th><th>parameters given</th></tr>"
            f"{rows}</table>\n\nEvery other parameter is the profile's default "
            "(docs/architecture.md).")


def _parameters(params: dict) -> str:
    shown = {k: v for k, v in params.items() if k not in ("RUN_DIR", "PROFILE")}
    return ", ".join(f"{k}={v!r}" for k, v in shown.items()) or "–"


def combined_notebook(run_dir: Path) -> nbformat.NotebookNode:
    """One notebook: provenance, contents, then each executed notebook's cells (headings
    anchored ``nb-<number>-<i>`` for the contents, widgets replaced by a note)."""
    notebooks = executed_notebooks(run_dir)
    toc, body = [], []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        number = path.name[:2]
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = _anchor_headings(to_mathml(cell.source), number, toc)
            elif cell.cell_type == "code":
                cell.outputs = [_static(o) for o in cell.outputs]
            body.append(cell)
    contents = "\n".join(f"{'    ' * (level - 1)}- [{html.escape(text)}](#{anchor})"
                         for level, text, anchor in toc if level <= 2)
    head = [nbformat.v4.new_markdown_cell(_provenance_cell(run_dir, notebooks)),
            nbformat.v4.new_markdown_cell(f"## Contents\n\n{contents}")]
    merged = nbformat.v4.new_notebook(cells=head + body)
    merged.metadata = {"kernelspec": nb.metadata.get("kernelspec", {}),
                       "language_info": nb.metadata.get("language_info", {})}
    return merged


def _anchor_headings(markdown: str, number: str, toc: list) -> str:
    def anchor(m):
        level, text = len(m.group(1)), m.group(2).strip()
        name = f"nb-{number}-{len(toc)}"
        toc.append((level, re.sub(r"[*`]", "", text), name))
        return f'{m.group(1)} <a id="{name}"></a>{text}'
    return HEADING.sub(anchor, markdown)


def _static(output):
    """A widget's output becomes the note (its saved text would be a Python repr)."""
    data = output.get("data", {})
    if WIDGET_VIEW in data:
        return nbformat.v4.new_output("display_data", data={"text/html": WIDGET_NOTE})
    return output


def build_report(run_dir, out=None) -> Path:
    """Write the run's report (default ``<run>/report.html``) and return its path."""
    from nbconvert import HTMLExporter

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise ReportError(f"Run directory {run_dir} does not exist.")
    nb = combined_notebook(run_dir)
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True)
    body, _ = exporter.from_notebook_node(
        nb, resources={"metadata": {"path": str(run_dir), "name": f"report {run_dir.name}"}})
    body = re.sub(r"<script[^>]*src=\"https?://[^\"]*\"[^>]*>\s*</script>", "", body)
    out = Path(out).resolve() if out else run_dir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    config.write_atomic(out, lambda tmp: tmp.write_text(body, encoding="utf-8"))
    return out


def main_report(args) -> int:
    """``python -m rable_nb report --run runs/NAME [--out FILE]`` entry point."""
    try:
        out = build_report(args.run, args.out)
    except (ReportError, figures.FigureError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"report: {out} (open it in a browser; it needs no network)")
    return 0
