"""Notebook hygiene and the smoke execution of notebooks 00, 01, 08 and 09 through papermill
(every other notebook runs in the test of its stage)."""
import ast
import json

import nbformat
import numpy as np
import pytest

from rable_nb.data import longtail
from rable_nb.rundir import runfiles
from rable_nb.batch import runner

NOTEBOOKS = runner.list_notebooks()


def test_pipeline_notebooks_present():
    names = [p.name[:2] for p in NOTEBOOKS]
    assert names[:2] == ["00", "01"] and names == sorted(names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_literal_parameters_first(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count]
    assert not dirty, f"{path.name}: code cells {dirty} carry outputs; run nbstripout"
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []), "first code cell must be `parameters`"
    for node in ast.parse(first.source).body:
        assert isinstance(node, ast.Assign), f"{path.name}: parameters cell holds only assignments"
        ast.literal_eval(node.value)  # raises for anything but a literal
    unparsable = [line for line in first.source.splitlines() if line.count("=") > 1]
    assert not unparsable, f"{path.name}: papermill cannot parse (a second '='): {unparsable}"
    assert {"PROFILE", "RUN_DIR"} <= set(runner.parameter_cell(path))


def test_00_cost_analysis_smoke(run_notebooks, tmp_path, capfd):
    out = run_notebooks("00", tmp_path)
    # the kernel's own log lines go to kernel.log, and its transport is encrypted: no
    # "Kernel is running over TCP without encryption" warning reaches the terminal
    assert "without encryption" not in capfd.readouterr().err
    assert "without encryption" not in (out / runner.KERNEL_LOG).read_text()
    assert (out / "fig-cost.png").stat().st_size > 10_000
    nb = nbformat.read(out / "00_cost_analysis.ipynb", as_version=4)
    html = "".join(o.get("data", {}).get("text/html", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
    for figure in ("$1,000,000", "$150,000", "$1,500,000", "$2,650,000"):
        assert figure in html


def test_01_dataset_smoke_writes_the_contract(smoke_dataset_run):
    ds = runfiles.load_dataset(smoke_dataset_run)
    counts = longtail.long_tail_counts(ds["params"]["N_MAX"], 10, 0.01)
    assert ds["class_counts"].tolist() == counts
    assert np.bincount(ds["labels"], minlength=10).tolist() == counts
    assert ds["candidates"].shape == (sum(counts), 10) and ds["candidates"].dtype == bool
    assert ds["candidates"][np.arange(len(ds["labels"])), ds["labels"]].all()
    assert ds["params"]["PARTIAL"] == "uniform" and ds["params"]["PROFILE"] == "smoke"
    for fig in ("fig-distribution.png",):
        assert (smoke_dataset_run / fig).stat().st_size > 10_000


def test_01_instance_partial_labels_smoke(run_notebooks, tmp_path):
    out = run_notebooks("01", tmp_path, PARTIAL="instance", RATE=0.4)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["PARTIAL"] == "instance"
    assert 0 <= meta["clean_classifier"]["test_accuracy"] <= 1
    # expectation <= 1 + r·C = 5; 740 Bernoulli draws per label leave ~0.1 of noise
    assert 1 < meta["mean_candidates"] <= 5.3


def test_documentation_is_self_contained():
    """README, docs/, docstrings and notebooks never send a reader to a document outside the
    repository (the team's internal design notes), and the docs the README links exist."""
    root = runner.config.PROJECT_ROOT
    files = [root / "README.md", *root.glob("docs/*.md"), *root.glob("rable_nb/**/*.py"),
             *NOTEBOOKS, *root.glob("examples/*.yaml")]
    offenders = [f.relative_to(root).as_posix() for f in files
                 if "DESIGN" in f.read_text() or "§" in f.read_text()]
    assert not offenders
    readme = (root / "README.md").read_text()
    for doc in ("docs/architecture.md", "docs/algorithms.md", "docs/protocols.md"):
        assert f"]({doc})" in readme and (root / doc).is_file()


@pytest.mark.notebook
def test_08_09_run_their_smoke_sweeps_and_draw_their_figures(run_notebooks, tmp_path):
    import pandas as pd

    out = run_notebooks("08,09", tmp_path)
    for fig in ("fig-sweep.png", "fig-study.png"):
        assert (out / fig).stat().st_size > 10_000
    sweeps = sorted(out.glob("sweep-*/results.csv"))
    assert len(sweeps) == 2                                  # 08's and 09's own smoke sweeps
    for path in sweeps:
        assert (pd.read_csv(path)["status"] == "done").all()
