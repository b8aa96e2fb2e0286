"""Notebooks 05-06 and the figures/ copy: prediction grids coloured by correctness,
t-SNE panels, model discovery, provenance."""
import json
import shutil

import matplotlib
import numpy as np
import pytest

from rable_nb.commands import cli, figures
from rable_nb.data import images as data
from rable_nb.stages import s06_embedding as embedding, s05_predictions as predictions

matplotlib.use("Agg")
CLASSES = data.CLASSES


def _solid_images(n=100):
    """Saturated single-colour images, so a rendered cell's centre pixel is exactly known."""
    colours = np.array([(220, 30, 30), (30, 200, 40), (40, 60, 230)], np.uint8)
    return np.stack([np.broadcast_to(colours[i % 3], (32, 32, 3)) for i in range(n)])


def _rendered(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def _pixel(buf, ax, x, y):
    """Rendered RGB at data coordinates (x, y) of ``ax``."""
    dx, dy = ax.transData.transform((x, y))
    return buf[int(buf.shape[0] - dy), int(dx)]


def test_greyscale_only_where_the_prediction_is_wrong():
    images = _solid_images(6)
    correct = np.array([True, False, True, False, True, True])
    out = predictions.greyscale_wrong(images, correct)
    assert np.array_equal(out[correct], images[correct])
    wrong = out[~correct]
    assert (wrong[..., 0] == wrong[..., 1]).all() and (wrong[..., 1] == wrong[..., 2]).all()
    assert out[1, 0, 0, 0] == round(0.299 * 30 + 0.587 * 200 + 0.114 * 40)


def test_rendered_grid_has_grey_wrong_cells_and_coloured_correct_cells():
    images = _solid_images()
    truth = np.repeat(np.arange(10), 10)
    preds = truth.copy()
    wrong = [3, 17, 58]
    preds[wrong] = (truth[wrong] + 1) % 10
    fig = predictions.grid_figure(images, preds, truth, CLASSES, "able", captions=True)
    ax = fig.axes[0]
    assert ax.get_title().startswith("able: 97 correct of 100\n(95 % CI 92%–99%")
    origins = predictions.mosaic(images, caption=predictions.CAPTION_PX)[1]
    buf = _rendered(fig)
    for i, (x, y) in enumerate(origins):
        r, g, b = _pixel(buf, ax, x + 16, y + 16)  # centre of the 32×32 cell
        if i in wrong:
            assert r == g == b, f"wrong cell {i} should be grey, got {(r, g, b)}"
        else:
            assert max(r, g, b) - min(r, g, b) > 100, f"correct cell {i} lost its colour"
    assert len(ax.texts) == 100
    assert ax.texts[3].get_color() == "tab:red" and ax.texts[4].get_color() == "tab:green"
    assert ax.texts[3].get_text() == CLASSES[preds[3]]  # the full class name
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CLASSES)  # one row per true class


@pytest.mark.parametrize("per_class", [1, 4, 13])
def test_grid_has_one_row_per_true_class_for_any_grid_per_class(per_class):
    truth = np.repeat(np.arange(10), per_class)
    images = _solid_images(len(truth))
    preds = (truth + (np.arange(len(truth)) % 2)) % 10  # every second image wrong
    fig = predictions.grid_figure(images, preds, truth, CLASSES, "able")
    ax = fig.axes[0]
    origins = predictions.draw_grid(ax, images, preds, truth, CLASSES, "able")
    rows = {int(y) for _, y in origins}
    assert len(rows) == 10  # a row per class, whatever GRID_PER_CLASS is
    for c in range(10):  # each class's images share one row, at its label's height
        ys = {int(y) for (_, y), t in zip(origins, truth) if t == c}
        assert len(ys) == 1
        top = ys.pop()
        assert top < ax.get_yticks()[c] < top + 32
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CLASSES)


def test_side_by_side_titles_count_correct_predictions():
    images = _solid_images()
    truth = np.repeat(np.arange(10), 10)
    other = truth.copy()
    other[:25] = (other[:25] + 3) % 10
    fig = predictions.side_by_side(images, truth, {"able": truth, "rable": other}, CLASSES,
                                   captions=False)
    titles = [ax.get_title() for ax in fig.axes]
    assert [t.split("\n")[0] for t in titles] == ["able: 100 correct of 100",
                                                  "rable: 75 correct of 100"]
    table = predictions.error_table(truth, {"able": truth, "rable": other}, CLASSES)
    assert table["able wrong"].sum() == 0 and table["rable wrong"].sum() == 25
    assert table.loc["airplane", "rable mistaken for"] == "cat ×10"


def test_fixed_test_set_is_seeded_and_balanced():
    y = np.repeat(np.arange(10), 50)
    a, b = predictions.fixed_test_set(y, 10, 3), predictions.fixed_test_set(y, 10, 3)
    assert np.array_equal(a, b) and np.bincount(y[a]).tolist() == [10] * 10
    assert not np.array_equal(a, predictions.fixed_test_set(y, 10, 4))
    with pytest.raises(ValueError, match="GRID_PER_CLASS=51 is invalid"):
        predictions.fixed_test_set(y, 51)


def test_find_models_skips_training_state_and_explains_absence(trained_run, tmp_path):
    assert sorted(predictions.find_models(trained_run)) == ["able", "able+records"]
    with pytest.raises(FileNotFoundError, match="run notebook 04_training first"):
        predictions.find_models(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for \['rable'\]"):
        predictions.find_models(trained_run, ["able", "rable"])


def test_models_predict_and_adjustment_subtracts_the_prior(trained_run, cifar_dir):
    models = predictions.load_models(trained_run, device="cpu")
    cifar = data.load_cifar10(cifar_dir)
    idx = predictions.fixed_test_set(cifar.test_y, 10)
    probs = predictions.predict_proba(models["able"], cifar.test_x[idx])
    assert probs.shape == (100, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert len(np.unique(probs.argmax(1))) > 1  # trained: not a constant prediction
    m = models["able+records"]
    m_shifted = dict(m, prior=m["prior"] + 5.0)  # a constant shift leaves softmax unchanged
    assert np.allclose(predictions.predict_proba(m, cifar.test_x[idx], adjust=True),
                       predictions.predict_proba(m_shifted, cifar.test_x[idx], adjust=True),
                       atol=1e-5)
    m_skew = dict(m, prior=m["prior"].clone())
    m_skew["prior"][0] = 50.0  # subtracting a huge prior for class 0 rules it out
    assert (predictions.predict_proba(m_skew, cifar.test_x[idx], adjust=True)
            .argmax(1) != 0).all()


def test_tsne_is_seeded_and_features_have_the_right_shape(trained_run, cifar_dir):
    models = predictions.load_models(trained_run, device="cpu")
    cifar = data.load_cifar10(cifar_dir)
    idx = predictions.fixed_test_set(cifar.test_y, 6)
    feats = embedding.features(models["able"], cifar.test_x[idx])
    proj = embedding.features(models["able"], cifar.test_x[idx], "projection")
    assert feats.shape == (60, 32) and proj.shape == (60, 128)
    assert np.allclose(np.linalg.norm(proj, axis=1), 1, atol=1e-4)
    a, b = embedding.tsne(feats, seed=1), embedding.tsne(feats, seed=1)
    assert a.shape == (60, 2) and np.allclose(a, b)
    assert -1 <= embedding.separation(feats, cifar.test_y[idx]) <= 1
    coords, scores = embedding.embed_all(models, cifar.test_x[idx], cifar.test_y[idx],
                                         ["penultimate", "projection"], seed=1)
    assert np.allclose(coords["able", "penultimate"], a) and len(coords) == 4
    assert scores.loc[("able", "projection"), "dim"] == 128
    fig = embedding.panels({"able": a, "other": b}, cifar.test_y[idx], CLASSES)
    assert len(fig.axes) == 2 and len(fig.legends[0].get_texts()) == 10
    with pytest.raises(ValueError, match="EMBEDDINGS"):
        embedding.validate({"EMBEDDINGS": ["logits"], "N_TSNE": 100, "PERPLEXITY": 30})


def test_notebooks_05_06_07_on_trained_checkpoints(run_notebooks, trained_run, tmp_path):
    # into a copy: the session's trained run stays as the demo and browser tests expect it,
    # whichever of them a pytest-xdist worker runs first
    out = run_notebooks("05,06,07", shutil.copytree(trained_run, tmp_path / "run"))
    for method in ("able", "able+records"):
        assert (out / f"fig-grid-{method}.png").stat().st_size > 20_000
        assert (out / f"fig-tsne-{method}.png").stat().st_size > 20_000
    assert (out / "fig-grids.png").exists() and (out / "07_interactive_demo.ipynb").exists()
    assert not (out / "feedback.jsonl").exists()  # the executed demo records no feedback


def _fake_run(tmp_path, profile):
    run = tmp_path / f"runs-{profile}"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"profile": profile, "notebooks": [
        {"notebook": "01_dataset_imbalance.ipynb", "parameters": {"PROFILE": profile}}]}))
    (run / "metrics-able.json").write_text(json.dumps(
        {"method": "able", "commit": "abc123", "device": "cuda: H100", "params": {"EPOCHS": 800}}))
    (run / "fig-grid-able.png").write_bytes(b"\x89PNG fake figure")
    return run


def test_figures_refuses_non_paper_runs_without_force(tmp_path, capsys):
    run = _fake_run(tmp_path, "smoke")
    assert cli.main(["figures", "--run", str(run)]) == 1
    err = capsys.readouterr().err
    assert "is a 'smoke' run" in err and "--force" in err
    dest = tmp_path / "figures"
    with pytest.raises(figures.FigureError, match="only 'paper' runs"):
        figures.copy_figures(run, dest)
    assert not dest.exists()
    copied = figures.copy_figures(run, dest, force=True)
    assert [p.name for p in copied] == ["fig-grid-able.png"]
    prov = json.loads((dest / "provenance.json").read_text())["fig-grid-able.png"]
    assert prov["profile"] == "smoke" and prov["forced"] and prov["commit"] == "abc123"


def test_figures_copies_paper_runs_with_provenance(tmp_path):
    run = _fake_run(tmp_path, "paper")
    dest = tmp_path / "figures"
    figures.copy_figures(run, dest)
    assert (dest / "fig-grid-able.png").read_bytes() == b"\x89PNG fake figure"
    prov = json.loads((dest / "provenance.json").read_text())["fig-grid-able.png"]
    assert prov["device"] == ["cuda: H100"] and not prov["forced"]
    assert prov["parameters"]["training"]["able"] == {"EPOCHS": 800}
    assert {"date", "sha256", "run"} <= set(prov)
    with pytest.raises(figures.FigureError, match="not a run directory"):
        figures.copy_figures(tmp_path / "figures", tmp_path / "elsewhere", force=True)
