"""Parameter sweeps: grid checking, results.csv contents and the notebook-08 figure. A sweep
that runs (failed points recorded, reruns skip finished points) is tests/test_sweep_executors.py's
one serial sweep and the executors compared with it."""
import json
import re

import pandas as pd
import pytest
import yaml

from rable_nb.commands import cli
from rable_nb.batch import runner, sweep_executors
from rable_nb.stages import s08_sweep as sweep


def _grid(tmp_path, **spec):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("spec, pattern", [
    (dict(grid={"NOPE": [1, 2]}, notebooks="01"), r"unknown parameter\(s\) \['NOPE'\]"),
    (dict(grid={"Q": 0.3}, notebooks="01"), "non-empty lists"),
    (dict(grid={"Q": [0.1]}, fixed={"Q": 0.2}, notebooks="01"), "both 'grid' and 'fixed'"),
    (dict(grid={"Q": [0.1]}, profile="huge"), "profile 'huge'"),
    (dict(grid={"Q": [0.1]}, notebook="01"), "unexpected: \\['notebook'\\]"),
])
def test_bad_grids_fail_before_anything_runs(tmp_path, spec, pattern, capsys):
    path = _grid(tmp_path, **spec)
    with pytest.raises(ValueError, match=pattern):
        sweep.load_grid(path)
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "o")]) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec, pattern", [
    (dict(grid={"Q": [0.1, 3]}),
     r"grid point 001_Q=3 .*01_dataset_imbalance.ipynb: Q=3 is invalid"),
    (dict(grid={"Q": [0.1]}, points=[{"SEED": -1}]), "SEED=-1 is invalid"),
    (dict(grid={"Q": [0.1]}, fixed={"METHOD_PARAMS": {"solar": {"tau": 5}}}, notebooks="01,04"),
     "solar.tau must be"),
])
def test_a_bad_grid_value_stops_the_sweep_before_any_point_runs(tmp_path, spec, pattern, capsys):
    path = _grid(tmp_path, **{"notebooks": "01", **spec})
    out = tmp_path / "o"
    assert cli.main(["sweep", str(path), "--out", str(out)]) == 1
    assert re.search(pattern, capsys.readouterr().err)
    assert not out.exists()  # no point ran, nothing was written


@pytest.mark.parametrize("notebooks", ["01", 1, [1], ["01"]])
def test_notebook_selection_accepts_yaml_spellings(tmp_path, notebooks):
    spec = sweep.load_grid(_grid(tmp_path, notebooks=notebooks, grid={"Q": [0.1, 0.2]}))
    assert spec["notebooks"] == "01" and spec["profile"] == "smoke"


def test_points_are_the_cartesian_product_with_distinct_directories():
    spec = {"grid": {"IMBALANCE_FACTOR": [0.1, 0.01], "METHODS": [["able"], ["able", "rable"]]}}
    pts = sweep.points(spec)
    assert len(pts) == 4 and pts[1] == {"IMBALANCE_FACTOR": 0.1, "METHODS": ["able", "rable"]}
    names = [sweep.point_name(i, p) for i, p in enumerate(pts)]
    assert len(set(names)) == 4 and all("/" not in n and "[" not in n for n in names)


def _metrics(run, method, last, groups):
    run.mkdir(parents=True, exist_ok=True)
    acc = dict(last=last, best=last + 0.01, many=groups[0], medium=groups[1], few=groups[2],
               per_class=[last] * 10)
    (run / f"metrics-{method}.json").write_text(json.dumps({"method": method, "accuracy": acc}))


def test_results_rows_read_metrics_and_the_figure_uses_the_hardest_point(tmp_path):
    rows = []
    for i, (f, q) in enumerate([(0.1, 0.1), (0.1, 0.3), (0.01, 0.1), (0.01, 0.3)]):
        run = tmp_path / f"p{i}"
        _metrics(run, "able", 0.8 - i / 10, (0.9, 0.8 - i / 10, 0.5 - i / 10))
        _metrics(run, "rable", 0.85 - i / 10, (0.9, 0.8, 0.7 - i / 10))
        (run / "dataset.json").write_text(json.dumps({"mean_candidates": 1 + 9 * q}))
        rows.append(sweep._row({"IMBALANCE_FACTOR": f, "Q": q}, {"status": "done"}, run))
    rows.append(sweep._row({"IMBALANCE_FACTOR": 0.5, "Q": 0.1},
                           {"status": "failed", "error": "boom"}, tmp_path / "p9"))
    res = pd.DataFrame(rows)
    assert res.loc[2, "rable/few"] == pytest.approx(0.5)
    assert res.loc[3, "ambiguity"] == pytest.approx(2.7)
    assert sweep.varying(res) == ["IMBALANCE_FACTOR", "Q"]
    long = sweep.long_format(res)
    assert len(long) == 8 and set(long["method"]) == {"able", "rable"}
    fig = sweep.sweep_figure(res)
    bars = fig.axes[2]
    assert "IMBALANCE_FACTOR=0.01, ambiguity=2.7" in bars.get_title()
    few = [p.get_height() for p in bars.containers[2]]
    assert few == pytest.approx([0.5 - 0.3, 0.7 - 0.3])  # point 3: the hardest
    assert len(fig.axes[0].containers) == 4  # 2 methods × 2 values of Q
    assert all(ax.get_ylim() == (0, 1) for ax in fig.axes)  # no zoom into noise
    assert all(any(line.get_ydata()[0] == 0.1 for line in ax.lines) for ax in fig.axes)  # chance
    with pytest.raises(ValueError, match="No finished point"):
        sweep.sweep_figure(res.iloc[4:])


def _results(points, accuracy):
    """results.csv rows of finished points (parameters + able/last, groups, ambiguity)."""
    rows = []
    for point in points:
        acc = accuracy(point)
        rows.append({**point, "status": "done", "error": "", "seconds": 1.0, "run_dir": "x",
                     "ambiguity": 9 * point.get("Q", 0.3), "able/last": acc,
                     "able/best": acc, "able/many": acc, "able/medium": acc, "able/few": acc})
    return pd.DataFrame(rows)


def test_sweep_figure_averages_seeds_and_leaves_out_a_panel_with_one_value():
    points = [{"IMBALANCE_FACTOR": f, "Q": 0.3, "SEED": s} for f in (0.1, 0.01) for s in (0, 1, 2)]
    res = _results(points, lambda p: 0.5 + 0.01 * p["SEED"] - (p["IMBALANCE_FACTOR"] < 0.1) / 10)
    fig = sweep.sweep_figure(res)
    assert len(fig.axes) == 2  # imbalance + groups; ambiguity has one level (one Q)
    note = " ".join(t.get_text() for t in fig.texts)
    assert "accuracy vs ambiguity left out" in note and "mean ± s.d. over 3 seeds" in note
    (curve,) = fig.axes[0].containers  # one line for able, seeds averaged into one point each
    x, y = curve.lines[0].get_data()
    assert list(x) == [10, 100] and list(y) == pytest.approx([0.51, 0.41])
    assert curve.has_yerr  # ± s.d. over the seeds
    one_f = _results([{"IMBALANCE_FACTOR": 0.01, "Q": q} for q in (0.1, 0.3)], lambda p: 0.4)
    fig = sweep.sweep_figure(one_f)
    assert [ax.get_title() for ax in fig.axes][0] == "accuracy vs ambiguity"
    assert "accuracy vs imbalance left out" in " ".join(t.get_text() for t in fig.texts)


def test_notebook_08_reads_a_given_sweep_and_tolerates_a_missing_default(tmp_path, monkeypatch):
    (tmp_path / "s").mkdir()
    pd.DataFrame([{"Q": 0.1, "status": "failed", "error": "x"}]).to_csv(
        tmp_path / "s" / "results.csv", index=False)
    P = {"PROFILE": "paper", "RUN_DIR": str(tmp_path), "SWEEP_DIR": str(tmp_path / "s")}
    results, where = sweep.notebook_results(P)
    assert where == tmp_path / "s" and results["status"].tolist() == ["failed"]
    with pytest.raises(FileNotFoundError, match="run a sweep first"):
        sweep.notebook_results(dict(P, SWEEP_DIR=str(tmp_path / "nothing")))
    monkeypatch.setitem(sweep.DEFAULT_SWEEP_DIRS, "paper", str(tmp_path / "none-yet"))
    assert sweep.notebook_results(dict(P, SWEEP_DIR=None)) == (None, tmp_path / "none-yet")


@pytest.mark.parametrize("name", ["sweep-smoke.yaml", "sweep-smoke-4.yaml", "sweep-quick.yaml",
                                  "sweep-paper.yaml"])
def test_shipped_example_grids_are_valid(name):
    needed = {"01", "04"}
    if not needed <= {p.name[:2] for p in runner.list_notebooks()}:
        pytest.skip("notebook 04 is not in this checkout")
    spec = sweep.load_grid(sweep.config.PROJECT_ROOT / "examples" / name)
    # sweep-smoke.yaml is notebook 08's smoke sweep: one point (the machinery, in seconds)
    assert len(sweep.points(spec)) >= (1 if name == "sweep-smoke.yaml" else 2)


def test_the_paper_grid_compares_rable_with_able():
    spec = sweep.load_grid(sweep.config.PROJECT_ROOT / "examples" / "sweep-paper.yaml")
    assert {"able", "rable"} <= set(spec["fixed"]["METHODS"])
    assert "03" in spec["notebooks"]  # rable needs the top-up of notebook 03 in every point
