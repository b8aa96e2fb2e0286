"""How the notebooks present results: intervals and chance beside accuracies, the results
table, learning curves, per-class bars, confusion matrices, Figure 5.1 and the sample grids
of notebooks 01-02."""
import json

import matplotlib
import numpy as np
import pytest

from rable_nb.stages import s02_captioning as captioning, s01_dataset as dataset, s03_rebalance as rebalance
from rable_nb.data import images as data, longtail
from rable_nb import generators
from rable_nb.rundir import runfiles
from rable_nb.parts import tables, viz

matplotlib.use("Agg")
CLASSES = list(data.CLASSES)


# -- numbers --------------------------------------------------------------------------------
@pytest.mark.parametrize("k, n, lo, hi", [(5, 10, 0.2366, 0.7634), (0, 10, 0.0, 0.2775),
                                          (10, 10, 0.7225, 1.0), (21, 200, 0.0697, 0.1552)])
def test_wilson_interval_matches_the_closed_form(k, n, lo, hi):
    assert tables.wilson_interval(k, n) == pytest.approx((lo, hi), abs=1e-4)


def test_reading_note_states_chance_test_size_noise_and_the_profile():
    note = tables.reading_note("smoke", 200, 10)
    assert "1/10 = 10%" in note and "200 images (20 per class)" in note
    assert "±6.9 points" in note and "say nothing about which method is better" in note
    assert tables.with_interval(0.105, 200) == "0.105 (95 % CI 0.070–0.155, 200 test images)"
    assert tables.with_interval(0.5, None) == "0.500"


def _metrics(method, last, best, n=200, adjusted=None, synthetic=None):
    per_class = n // 10
    correct = round(last * per_class)
    confusion = np.diag([correct] * 10) + np.eye(10, k=1, dtype=int) * (per_class - correct)
    confusion[9, 0] = per_class - correct
    acc = {"last": last, "best": best, "many": 0.5, "medium": 0.4, "few": 0.1,
           "per_class": [last] * 10}
    m = {"method": method, "accuracy": acc, "confusion": confusion.tolist(),
         "comparable_to_published": "accuracy", "stages": [{"name": "train", "epochs": 2}],
         "n_train": 740, "n_synthetic": 0, "wall_s": 1.0, "images_per_s": 100.0,
         "params": {"synthetic": synthetic} if synthetic else {}}
    if adjusted is not None:
        m["accuracy_adjusted"] = dict(acc, last=adjusted)
        m["comparable_to_published"] = "accuracy_adjusted"
    return m


def test_results_table_leads_with_last_and_its_interval_and_labels_best():
    metrics = {"able": _metrics("able", 0.30, 0.35),
               "able+records": _metrics("able+records", 0.50, 0.55, adjusted=0.55)}
    table = tables.results_table(metrics)
    assert list(table.columns[:2]) == ["last", "last 95% CI"]
    assert tables.BEST_LABEL == "best (max over epochs, test set)" in table.columns
    assert table.loc[("able", "raw"), "test images"] == 200
    assert table.loc[("able", "raw"), "last 95% CI"] == "0.241–0.367"
    assert table.loc[("able+records", "test-time adjusted"), "comparable to published"] == "✓"
    notes = tables.difference_notes(metrics)
    assert notes == ["able+records − able: +20.0 points (last epoch); the 95 % intervals "
                     "do not overlap."]
    close = {"able": _metrics("able", 0.30, 0.3), "rable": _metrics("rable", 0.33, 0.33)}
    assert "overlap: no difference shown" in tables.difference_notes(close)[0]


def test_method_label_names_the_top_up_and_marks_oracle():
    oracle = _metrics("rable", 0.3, 0.3, synthetic={"generator": "copy", "cond_labels": "oracle"})
    assert runfiles.method_label("rable", oracle) == "rable [copy, ORACLE labels (ablation)]"
    assert runfiles.method_label("able", _metrics("able", 0.3, 0.3)) == "able"


# -- figures --------------------------------------------------------------------------------
def _history(epochs, adjusted=True, stages=False):
    rng = np.random.default_rng(0)
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "test_acc": 0.5 + rng.normal(0, 0.05), "pseudo_label_acc": 0.6,
               "loss_cls": 1.0 + rng.random(), "loss_cont": 5.0}
        if adjusted:
            row["test_acc_adjusted"] = row["test_acc"] + 0.05
        if stages:
            row["stage"] = "estimation" if e <= epochs // 8 else "train"
        rows.append(row)
    return rows


def test_long_curves_are_smoothed_over_the_faint_raw_curve_and_series_differ_in_style():
    fig = viz.plot_curves({"able+records": _history(800, stages=True),
                                  "able": _history(800, adjusted=False)}, 10, 10_000)
    acc = fig.axes[0]
    raw = [line for line in acc.lines if line.get_alpha() == 0.25]
    smooth = [line for line in acc.lines if line.get_label() and not
              line.get_label().startswith("_")]
    assert len(raw) == 3  # raw, adjusted (able+records), raw (able): faint behind
    labels = [line.get_label() for line in smooth]
    assert labels == ["able+records", "able+records (test-time adjusted)", "able", "chance (10%)"]
    styles = {line.get_label(): (line.get_color(), line.get_linestyle()) for line in smooth}
    assert styles["able+records"][0] == styles["able+records (test-time adjusted)"][0]
    assert styles["able+records"][1] != styles["able+records (test-time adjusted)"][1]
    assert styles["able+records"][0] != styles["able"][0]
    assert np.std(smooth[0].get_ydata()) < np.std(raw[0].get_ydata()) / 2  # smoothed
    assert acc.get_ylim() == (0, 1) and "10000 test images" in acc.get_title()
    losses = {line.get_label(): line.get_linestyle() for line in fig.axes[2].lines
              if not line.get_label().startswith("_")}
    assert losses["able: cls"] != losses["able: cont"]  # one line style per loss term
    assert "smoothed over 21 epochs" in fig._suptitle.get_text()
    assert any("train stage" in t.get_text() for t in fig.axes[1].texts)  # stage boundary


def test_short_curves_are_raw_with_markers():
    fig = viz.plot_curves({"able": _history(2)}, 10)
    line = fig.axes[0].lines[0]
    assert line.get_marker() == "o" and line.get_alpha() is None
    assert "smoothed" not in fig._suptitle.get_text()


def test_per_class_bars_carry_values_a_chance_line_and_a_title():
    counts = longtail.long_tail_counts(300, 10, 0.01)
    per_class = {"able": list(np.linspace(0, 0.9, 10)), "rable": [0.5] * 10}
    fig = viz.plot_per_class(per_class, CLASSES, counts, 20)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert labels.count("0.50") >= 10 and "0.90" in labels  # every bar has its value
    assert any(line.get_ydata()[0] == pytest.approx(0.1) for line in ax.lines)  # chance
    assert ax.get_title() == "per-class test accuracy after the last epoch, 20 test images per class"


def test_confusion_matrices_are_normalised_per_true_class_with_a_colour_bar():
    counts = np.random.default_rng(0).integers(0, 20, (10, 10))
    fig = viz.plot_confusion({"able": counts.tolist(), "rable": np.eye(10).tolist()},
                                    CLASSES)
    shown = fig.axes[0].images[0].get_array()
    assert np.allclose(shown.sum(1), 1) and shown.max() <= 1
    assert len(fig.axes) == 3  # two matrices and one colour bar
    assert "share of the true class" in fig.axes[2].get_ylabel()


def test_training_figures_are_saved_by_the_package(tmp_path):
    metrics = {"able": _metrics("able", 0.3, 0.35), "rable": _metrics("rable", 0.33, 0.4)}
    (tmp_path / "logs").mkdir()
    for m in metrics:
        (tmp_path / "logs" / f"{m}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in _history(3)))
    figs = viz.training_figures(tmp_path, metrics, CLASSES,
                                       longtail.long_tail_counts(300, 10, 0.01))
    assert sorted(figs) == ["fig-confusion.png", "fig-curves.png", "fig-per-class.png"]
    for name in figs:
        assert (tmp_path / name).stat().st_size > 10_000
    assert runfiles.read_history(tmp_path, "able")[2]["epoch"] == 3
    assert runfiles.read_history(tmp_path, "nothing") == []


def test_figure_5_1_names_the_target_and_labels_the_synthetic_counts():
    real = np.array([390, 85, 86, 98, 50, 12, 1, 14, 2, 2])
    synth = np.array(list(generators.topup_plan(real, 16).values()))
    fig = rebalance.rebalanced_figure(real, synth, CLASSES, title="pixel, pseudo labels",
                                       target=16)
    before, after = fig.axes
    assert "topped up to 16" in after.get_title() and "pseudo label" in before.get_title()
    texts = [t.get_text() for t in after.texts]
    assert texts.count("16") == 5 and {"+4", "+15", "+2", "+14"} <= set(texts)
    assert any(line.get_ydata()[0] == 16 for line in after.lines)  # the target line
    assert after.get_yscale() == "log"  # 390 > 5 × 16: the small classes stay visible
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["target 16 per class", "real (740)", "synthetic (49)"]
    assert fig._suptitle.get_text() == "Rebalanced training set — pixel, pseudo labels"
    full = np.array(longtail.long_tail_counts(5000, 10, 0.01))
    fig = rebalance.rebalanced_figure(full, 5000 - full, CLASSES, cond_labels="oracle")
    assert fig.axes[0].get_yscale() == "linear" and "ORACLE" in fig.axes[0].get_title()
    assert fig.axes[1].get_ylim()[1] >= 1.25 * 5000  # headroom: labels clear of the top spine


# -- sample grids of notebooks 01 and 02 ----------------------------------------------------
def test_sample_grids_have_one_row_per_class_with_blank_fill():
    labels = np.repeat(np.arange(3), [10, 5, 2])
    slots = longtail.examples_per_class(labels, 4, seed=1)
    assert len(slots) == 12
    rows = slots.reshape(3, 4)
    for c, row in enumerate(rows):
        assert all(labels[r] == c for r in row if r >= 0)
    assert (rows[2] == -1).sum() == 2 and np.array_equal(
        slots, longtail.examples_per_class(labels, 4, seed=1))
    images = np.zeros((len(labels), 4, 4, 3), np.uint8)
    assert (longtail.take(images, slots)[-1] == 255).all()  # a blank cell is white
    ds = {"labels": labels, "candidates": np.eye(3, dtype=bool)[labels] | np.array([0, 0, 1], bool)}
    grid, titles = dataset.candidate_examples(ds, images, ["cat", "dog", "frog"], 4, seed=1)
    assert grid.shape == (12, 4, 4, 3) and titles[0] == "CAT\nfrog" and titles[-1] == ""
    caps = [{"index": 100 + i, "label": int(y), "caption": f"a photo {i}"}
            for i, y in enumerate(labels)]
    grid, titles = captioning.caption_examples(caps, images, np.arange(100, 117),
                                               ["cat", "dog", "frog"], per_class=3)
    assert grid.shape == (9, 4, 4, 3) and titles[0].startswith("CAT\na photo")
    assert titles[-1] == "" and titles[6].startswith("FROG")
