"""The rebalancing study (notebook 09): grids that list their points, the counts a sweep
reads from metrics files, approaches, binomial intervals and the study's table and figure.
Notebook 09 itself runs in the smoke profile in tests/test_notebooks.py (a real one-point sweep)."""
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from rable_nb import config, methods
from rable_nb.stages import s09_study as study, s08_sweep as sweep


def _grid(tmp_path, **spec):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"profile": "smoke", "notebooks": "01,04", **spec}))
    return path


def test_a_grid_may_list_its_points(tmp_path):
    spec = sweep.load_grid(_grid(tmp_path, fixed={"EPOCHS": 1, "Q": 0.3}, points=[
        {"METHODS": ["able", "ssp"]}, {"METHODS": ["able+unlabeled"], "UNLABELED": 100}]))
    assert sweep.points(spec) == [{"METHODS": ["able", "ssp"]},
                                  {"METHODS": ["able+unlabeled"], "UNLABELED": 100}]
    both = dict(spec, grid={"SEED": [0, 1]})
    assert [p["SEED"] for p in sweep.points(both)] == [0, 0, 1, 1] and len(sweep.points(both)) == 4
    shown = sweep.point_columns(spec, sweep.points(spec))
    assert shown == [{"METHODS": ["able", "ssp"], "UNLABELED": None},
                     {"METHODS": ["able+unlabeled"], "UNLABELED": 100}]
    with_fixed = sweep.point_columns({"fixed": {"Q": 0.3}}, [{"Q": 0.5}, {"SEED": 1}])
    assert with_fixed == [{"Q": 0.5, "SEED": None}, {"Q": 0.3, "SEED": 1}]  # fixed fills in


@pytest.mark.parametrize("spec, pattern", [
    (dict(points=[]), "'points' must be a non-empty list"),
    (dict(points=[{"Q": 0.1}, "able"]), "'points' must be a non-empty list"),
    (dict(points=[{"NOPE": 1}]), r"unknown parameter\(s\) \['NOPE'\]"),
    (dict(grid={"Q": [0.1]}, points=[{"Q": 0.2}]), "both 'grid' and 'points'"),
    (dict(), "'grid' must map"),
])
def test_bad_point_lists_fail_before_anything_runs(tmp_path, spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        sweep.load_grid(_grid(tmp_path, **spec))


@pytest.mark.parametrize("name", ["smoke", "quick", "paper"])
def test_shipped_study_grids_are_valid(name):
    spec = sweep.load_grid(config.PROJECT_ROOT / "examples" / f"sweep-study-{name}.yaml")
    names = {m for p in sweep.points(spec) for m in p["METHODS"]}
    assert {"able", "able+records", "ssp", "able+unlabeled", "rable"} <= names
    if name != "smoke":  # several sizes: accuracy against the number of added images
        assert len({p.get("TARGET_PER_CLASS") for p in sweep.points(spec)}) >= 2
        assert {p.get("GENERATOR", spec["fixed"].get("GENERATOR"))
                for p in sweep.points(spec)} == {"copy", "pixel"}


def _metrics(run, method, last, few, n_test=200, params=None, **fields):
    run.mkdir(parents=True, exist_ok=True)
    confusion = np.diag([n_test // 10] * 10).tolist()
    acc = dict(last=last, best=last, many=0.5, medium=0.4, few=few, per_class=[last] * 10)
    (run / f"metrics-{method}.json").write_text(json.dumps({
        "method": method, "accuracy": acc, "confusion": confusion,
        "params": dict(params or {}), **fields}))


def _results(tmp_path):
    """A two-point sweep as results.csv shows it."""
    one, two = tmp_path / "p0", tmp_path / "p1"
    _metrics(one, "able", 0.50, 0.10, n_synthetic=0, n_unlabeled=0, wall_s=10)
    _metrics(one, "ssp+records", 0.60, 0.30, n_synthetic=0, n_unlabeled=0,
             preparation={"ssp": {"epochs": 2, "wall_s": 3.0, "rotation_acc_last": 0.4}})
    _metrics(one, "rable", 0.55, 0.20, n_synthetic=300, n_unlabeled=0,
             params={"GENERATOR": "copy", "GEN_LABELS": "pseudo"})
    _metrics(two, "able+unlabeled", 0.58, 0.25, n_synthetic=0, n_unlabeled=400,
             unlabeled={"confident": 400, "accuracy": {"overall": 0.7, "confident_overall": 0.7}})
    _metrics(two, "rable", 0.52, 0.15, n_synthetic=150, n_unlabeled=0,
             params={"GENERATOR": "pixel", "GEN_LABELS": "oracle"})
    rows = [sweep._row({"METHODS": "a", "Q": 0.3}, {"status": "done"}, one),
            sweep._row({"METHODS": "b", "Q": 0.3}, {"status": "done"}, two),
            sweep._row({"METHODS": "c", "Q": 0.3}, {"status": "failed", "error": "x"},
                       tmp_path / "p2")]
    return pd.DataFrame(rows)


def test_a_sweep_reads_the_counts_and_the_generator_of_every_method(tmp_path):
    row = sweep.read_metrics(_results(tmp_path).loc[0, "run_dir"])
    assert row["rable/n_synthetic"] == 300 and row["rable/generator"] == "copy"
    assert row["able/n_test"] == 200 and row["able/n_unlabeled"] == 0
    assert "able/generator" not in row


def test_approaches_are_named_by_their_parts():
    assert study.approach("able") == "none (ABLE)"
    assert study.approach("ssp+records") == "self-supervision (SSP) + re-weighting (RECORDS)"
    assert study.approach("able+unlabeled") == "real unlabeled"
    assert study.approach("rable", "pixel", "pseudo") == "generated (pixel, pseudo labels)"
    assert "ORACLE" in study.approach("rable", "copy", "oracle")
    assert study.approach("corr+records") == "corr (another learner) + re-weighting (RECORDS)"
    assert study.approach("rable-feature", "feature", "pseudo") == \
        "generated (feature, pseudo labels)"
    assert study.approach("proden+la+mixup") == "proden (another learner) + logit adjustment + mixup"


def test_a_new_piece_names_its_own_approach(monkeypatch):
    class Sharpen(methods.Modifier):
        name, approach = "sharpen", "sharpened confidences"
    monkeypatch.setitem(methods.MODIFIERS, "sharpen", Sharpen)
    monkeypatch.setitem(methods.PIECES, "sharpen", Sharpen)
    assert study.approach("able+sharpen") == "sharpened confidences"


def test_binomial_intervals_are_wilson_intervals():
    low, high = study.binomial_interval(0.5, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = study.binomial_interval(0.0, 60)
    assert low == pytest.approx(0.0, abs=1e-12) and 0.05 < high < 0.07
    assert np.isnan(study.binomial_interval(0.5, 0)[0])
    assert study.few_share() == pytest.approx(0.3)


def test_the_study_table_and_figure(tmp_path):
    res = _results(tmp_path)
    tab = study.table(res)
    assert tab["approach"].tolist() == [
        "none (ABLE)", "generated (copy, pseudo labels)",
        "generated (pixel, ORACLE labels (ablation))",
        "self-supervision (SSP) + re-weighting (RECORDS)",
        "real unlabeled"]
    row = tab.set_index("method").loc["able+unlabeled"]
    assert row["added"] == 400 and row["chance"] == 0.1 and row["n_test"] == 200
    assert (row["last_low"], row["last_high"]) == pytest.approx(
        study.binomial_interval(0.58, 200))
    assert (row["few_low"], row["few_high"]) == pytest.approx(study.binomial_interval(0.25, 60))
    fig = study.study_figure(tab, "test")
    assert len(fig.axes[0].patches) == 2 * len(tab)            # overall and few per row
    assert len(fig.axes[1].containers) == 3                     # copy, pixel, unlabeled lines
    info = study.details(tab).set_index("method")
    assert info.loc["ssp+records", "ssp epochs"] == 2
    assert info.loc["ssp+records", "pre-training s"] == 3.0          # every piece's, summed
    assert info.loc["able+unlabeled", "pseudo-label acc"] == 0.7
    varied = res.assign(Q=[0.3, 0.5, 0.3])
    with pytest.raises(ValueError, match=r"\['Q'\] vary"):
        study.table(varied)
    with pytest.raises(ValueError, match="No finished point"):
        study.table(res.iloc[2:])


def test_notebook_09_runs_the_study_grid_in_smoke_and_reads_defaults_elsewhere(
        tmp_path, monkeypatch):
    ran = []

    def fake_sweep(spec, out, *args, **kwargs):  # what run_sweep leaves: results.csv
        ran.append(spec["points"])
        out.mkdir(parents=True)
        _results(tmp_path).to_csv(out / "results.csv", index=False)
    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    P = {"PROFILE": "smoke", "RUN_DIR": str(tmp_path / "run")}
    results, where = study.notebook_results(P)
    assert where == tmp_path / "run" / "sweep-sweep-study-smoke" and len(results) == 3
    assert ran == [sweep.load_grid(config.PROJECT_ROOT / study.SMOKE_GRID)["points"]]
    monkeypatch.setitem(study.DEFAULT_SWEEP_DIRS, "quick", str(tmp_path / "none-yet"))
    assert study.notebook_results(dict(P, PROFILE="quick")) == (None, tmp_path / "none-yet")
