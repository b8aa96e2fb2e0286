"""``python -m rable_nb report --run runs/NAME``: a run's executed notebooks as one HTML page.

The page is made with nbconvert's JupyterLab template from the executed copies the runner
keeps in the run directory (in the order ``run.json`` lists them): first the run's
provenance (profile, commit, device, each notebook's parameters and time, from
``figures.run_provenance`` and ``run.json``) and a table of contents, then every notebook's
text, printed results and figures, without the code (the notebooks hold it). Everything is
inside the one file, so it opens offline: figures are embedded, formulas are turned into
MathML (which browsers draw themselves) instead of loading MathJax from the web, and the
static copy of an interactive widget is replaced by a note saying where it runs. Progress
bars (tqdm's widgets) are left out: they are not content. Links the notebooks make into the
project (``../docs/usage.md#data``, relative to ``notebooks/``) are rewritten relative to
wherever the report is written, so they resolve from ``runs/NAME/report.html`` or any
``--out``. Each cell's id is prefixed with its notebook's number: every executed notebook
has a papermill ``parameters`` cell of the same id, and duplicate ids in one notebook are
invalid (nbformat's ``DuplicateCellId``).
"""
from __future__ import annotations

import html
import os
import re
import sys
from pathlib import Path

import jinja2
import nbformat

from .. import config
from . import figures
from ..rundir import runfiles
from ..batch.runner import NOTEBOOK_DIR

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ("<p><i>An interactive widget: it runs in a live notebook (JupyterLab) or, for "
               "notebook 07, in the web app of <code>python -m rable_nb demo</code>.</i></p>")
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
MATH = re.compile(r"(?<!\\)\$\$(.+?)(?<!\\)\$\$|(?<![\\$])\$(?![\s$])([^$\n]+?)(?<![\\\s])\$",
                  re.S)
HEADING = re.compile(r"^(#{1,3})\s+(.*)$", re.M)
# a Markdown link's target or an HTML href: what the notebooks link to
LINK = re.compile(r"(\]\(|href=\")([^)\s\"]+)")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|#|/)", re.I)  # a scheme, an anchor, absolute
# the end of tqdm's text of a progress bar: "desc: 40%|####  | 2/5 [00:01<00:02, 1.5it/s]",
# "desc: 3it [00:00, 2.5it/s]" (unknown total)
PROGRESS_BAR = re.compile(r"\[(?:\d+:)?\d\d:\d\d(?:<[^\]]*)?, [^\]]*\]\s*$")


class ReportError(RuntimeError):
    """The report cannot be made; the message says why."""


def executed_notebooks(run_dir: Path) -> list[Path]:
    """The run's executed notebooks: those ``run.json`` records as finished, in its order
    (one started again and not ended — killed, failed or running — is left out, named)."""
    log = runfiles.read_run_log(run_dir)
    names = list(runfiles.finished_notebooks(log))
    unfinished = sorted({e["notebook"] for e in log.get("notebooks", [])} - set(names))
    if unfinished:
        print(f"note: left out {', '.join(unfinished)}: started again and not finished "
              f"(killed or failed); rerun with --resume to finish.", file=sys.stderr)
    found = [run_dir / n for n in sorted(names) if (run_dir / n).is_file()]
    if not found:
        raise ReportError(f"{run_dir} has no executed notebooks recorded in run.json: make "
                          f"some, e.g. {runfiles.rerun_command(run_dir, '01,04')}.")
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
    log = runfiles.finished_notebooks(runfiles.read_run_log(run_dir))
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


def combined_notebook(run_dir: Path, link_base: Path | None = None) -> nbformat.NotebookNode:
    """One notebook: provenance, contents, then each executed notebook's cells (headings
    anchored ``nb-<number>-<i>`` for the contents, widgets replaced by a note, progress
    bars left out, links into the project made relative to ``link_base``, the folder the
    report is written to; default: the run directory)."""
    notebooks = executed_notebooks(run_dir)
    link_base = Path(link_base or run_dir)
    toc, body = [], []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        number = path.name[:2]
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                cell.source = _anchor_headings(
                    to_mathml(relink(cell.source, link_base)), number, toc)
            elif cell.cell_type == "code":
                cell.outputs = [_static(o) for o in cell.outputs if not is_progress_bar(o)]
                section = next((text for _, text, a in reversed(toc)
                                if a.startswith(f"nb-{number}-")), path.stem)
                for output in cell.outputs:  # alt text of a figure: where it stands
                    if {"image/png", "image/jpeg"} & set(output.get("data", {})):
                        output.setdefault("metadata", {})["alt"] = (
                            f"Figure of notebook {number}, section “{section}”")
            if "id" in cell:
                cell.id = f"nb{number}-{cell.id}"[:64]  # nbformat's limit
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


def relink(markdown: str, link_base: Path) -> str:
    """Relative link targets (written from ``notebooks/``) rewritten relative to
    ``link_base``; web addresses, anchors and absolute paths stay as they are."""
    def target(m):
        link = m.group(2)
        if EXTERNAL.match(link):
            return m.group(0)
        path, hash_, anchor = link.partition("#")
        moved = Path(os.path.relpath((NOTEBOOK_DIR / path).resolve(), link_base)).as_posix()
        return f"{m.group(1)}{moved}{hash_}{anchor}"
    return LINK.sub(target, markdown)


def is_progress_bar(output) -> bool:
    """A tqdm progress bar: a widget whose text is tqdm's meter (not the run's content)."""
    data = output.get("data", {})
    return WIDGET_VIEW in data and bool(PROGRESS_BAR.search(str(data.get("text/plain", ""))))


def _static(output):
    """A widget's output becomes the note (its saved text would be a Python repr)."""
    data = output.get("data", {})
    if WIDGET_VIEW in data:
        return nbformat.v4.new_output("display_data", data={"text/html": WIDGET_NOTE})
    return output


# nbconvert's lab page, with each figure's alt text (output metadata "alt"): without one,
# nbconvert writes a placeholder and warns
TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{% block data_png scoped %}{{ super() | replace('<img src=', '<img alt="'
   ~ (output.metadata.get('alt', '') | escape) ~ '" src=', 1) }}{% endblock data_png %}
{% block data_jpg scoped %}{{ super() | replace('<img src=', '<img alt="'
   ~ (output.metadata.get('alt', '') | escape) ~ '" src=', 1) }}{% endblock data_jpg %}
"""


def build_report(run_dir, out=None) -> Path:
    """Write the run's report (default ``<run>/report.html``) and return its path."""
    from nbconvert import HTMLExporter

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise ReportError(f"Run directory {run_dir} does not exist.")
    out = Path(out).resolve() if out else run_dir / "report.html"
    nb = combined_notebook(run_dir, out.parent)
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, embed_images=True,
                            extra_loaders=[jinja2.DictLoader({"report.html.j2": TEMPLATE})],
                            template_file="report.html.j2")
    body, _ = exporter.from_notebook_node(
        nb, resources={"metadata": {"path": str(run_dir), "name": f"report {run_dir.name}"}})
    body = re.sub(r"<script[^>]*src=\"https?://[^\"]*\"[^>]*>\s*</script>", "", body)
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
