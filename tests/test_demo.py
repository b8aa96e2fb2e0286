"""Notebook 07's widget app, driven headless: uploads, rejected files, feedback lines."""
import hashlib
import io
import json
import os

import nbformat
import numpy as np
import pytest
from PIL import Image

from rable_nb.data import images as data
from rable_nb.stages import s07_demo as demo, s05_predictions as predictions


@pytest.fixture(scope="module")
def cifar(cifar_dir):
    return data.load_cifar10(cifar_dir)


@pytest.fixture
def app(trained_run, cifar, tmp_path):
    models = predictions.load_models(trained_run, device="cpu")
    return demo.DemoApp(models, cifar.classes, cifar.test_x, cifar.test_y, tmp_path, seed=0)


def _png(size=(64, 48), mode="RGB", colour=(200, 40, 40)):
    buf = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def _upload(app, blob, name="photo.png"):
    app.uploader.set_state({"value": [{"name": name, "type": "image/png", "size": len(blob),
                                       "content": blob, "last_modified": 0}]})


def test_random_test_image_shows_top5_bars(app, cifar):
    app.random_button.click()
    assert app.current["source"].startswith("CIFAR-10 test #")
    i = int(app.current["source"].split("#")[1])
    assert np.array_equal(app.current["image"], cifar.test_x[i])
    assert app.current["true_label"] == cifar.classes[cifar.test_y[i]]
    probs = [p for _, p in app.top5]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert [b.value for b in app.bars] == pytest.approx(probs)
    assert [n.value for n in app.bar_names] == [c for c, _ in app.top5]
    assert app.preview.value[:4] == b"\x89PNG" and not app.save_button.disabled
    assert "able predicts" in app.message.value


def test_upload_is_preprocessed_like_evaluation(app):
    blob = _png()
    _upload(app, blob)
    assert app.current["source"] == "upload: photo.png"
    assert app.current["sha256"] == hashlib.sha256(blob).hexdigest()
    assert app.current["image"].shape == (32, 32, 3)
    assert tuple(app.current["image"][16, 16]) == (200, 40, 40)
    assert app.uploader.value == ()  # reset, so the same file can come again


# -- what is shown stays consistent with the model, the image and the ticks -----------------
def _shown(app):
    return ([n.value for n in app.bar_names], [b.value for b in app.bars],
            [v.value for v in app.bar_values], app.message.value)


def test_switching_the_model_refreshes_every_shown_result(app):
    app.random_button.click()
    image = app.current["image"]
    assert app.model.value == "able" and app.adjust.disabled  # able has no logit prior
    assert "not available for <b>able</b>" in app.adjust_note.value
    before = _shown(app)
    app.model.value = "able+records"
    probs = predictions.predict_proba(app.models["able+records"], image[None])[0]
    order = np.argsort(-probs)[:5]
    names, values, texts, message = _shown(app)
    assert names == [app.classes[c] for c in order]
    assert values == pytest.approx(probs[order].tolist(), abs=1e-6)
    assert texts == [f"{p:.1%}" for p in probs[order]]
    assert "able+records predicts" in message and names[0] in message
    assert (names, values) != before[:2]  # the two models differ on this image
    assert not app.adjust.disabled and "log class prior" in app.adjust_note.value
    app.adjust.value = True  # the adjustment, too, recomputes what is shown
    adjusted = predictions.predict_proba(app.models["able+records"], image[None], adjust=True)[0]
    assert [b.value for b in app.bars] == pytest.approx(np.sort(adjusted)[::-1][:5], abs=1e-6)
    assert "with test-time adjustment" in app.message.value
    app.model.value = "able"  # a model without a prior: adjustment off, and the note says why
    assert app.adjust.disabled and not app.adjusted
    assert "able predicts" in app.message.value


def test_ticks_are_cleared_for_each_new_image(app):
    app.random_button.click()
    app.checks[2].value = app.checks[7].value = True
    app.random_button.click()
    assert not any(box.value for box in app.checks)
    app.checks[1].value = True
    _upload(app, _png())
    assert not any(box.value for box in app.checks)


def test_a_rejected_upload_after_a_good_image_clears_it_and_disables_saving(app, tmp_path):
    _upload(app, _png())
    app.checks[4].value = True
    assert app.current and not app.save_button.disabled
    _upload(app, b"not an image", "notes.txt")
    assert app.current is None and app.save_button.disabled
    assert app.preview.value == demo.PLACEHOLDER and app.top5 == []  # no broken image
    assert [b.value for b in app.bars] == [0] * 5 and not any(c.value for c in app.checks)
    assert "Upload rejected" in app.message.value
    app._on_save()  # even called directly, nothing is saved for the rejected upload
    assert "show an image first" in app.message.value
    assert not (tmp_path / "feedback.jsonl").exists()


def test_a_non_square_upload_is_centre_cropped_not_squashed(app):
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, :32] = (250, 0, 0)
    wide[:, 32:64] = (0, 250, 0)  # the centred square
    wide[:, 64:] = (0, 0, 250)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, format="PNG")
    _upload(app, buf.getvalue(), "wide.png")
    image = app.current["image"]
    assert image.shape == (32, 32, 3)
    assert (image[:, 2:-2] == (0, 250, 0)).all()  # squashing would show red and blue bands
    tall = demo.read_image(_png((40, 200), colour=(10, 20, 30)))
    assert tall.shape == (32, 32, 3) and (tall == (10, 20, 30)).all()


def test_an_rgba_upload_is_composited_on_white(app):
    rgba = np.zeros((32, 64, 4), np.uint8)
    rgba[:, :, 0] = 200  # red where opaque
    rgba[:, :32, 3] = 0  # left half transparent (its colour must not show)
    rgba[:, 32:, 3] = 255
    rgba[:, 16:48, 3] = 128  # the middle half-transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    _upload(app, buf.getvalue(), "logo.png")
    image = app.current["image"]  # centre crop: columns 16..48, half-transparent red
    assert image.shape == (32, 32, 3)
    assert tuple(image[16, 16]) == pytest.approx((228, 127, 127), abs=2)  # 50 % red on white
    transparent = demo.read_image(_rgba_png(alpha=0))
    assert (transparent == 255).all()  # fully transparent: white, not black
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0] + [0] * 765)
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)  # a transparent palette colour
    assert (demo.read_image(buf.getvalue()) == 255).all()


def _rgba_png(alpha):
    buf = io.BytesIO()
    Image.new("RGBA", (50, 50), (0, 0, 0, alpha)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb(side=8_000):
    """A few-kB PNG that declares side × side pixels (8000² = 64 MP: under Pillow's own
    89 MP warning, over the demo's 40 MP cap; 12000² = 144 MP: over both)."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("blob, limits, pattern", [
    (b"this is a text file, not a picture", {}, "not an image format"),
    (b"", {}, "the file is empty"),
    (b"\0" * (10 * 2**20 + 1), {}, "the limit is 10 MB"),
    (_bomb(), {}, "megapixel limit"),
    (_bomb(12_000), {"max_pixels": 10**12}, "decompression bomb"),  # Pillow's own guard
    (_png()[:60], {}, "damaged or truncated"),
])
def test_rejected_uploads_show_a_message_and_the_app_survives(app, blob, limits, pattern):
    app.limits.update(limits)
    app.random_button.click()
    before = app.current
    _upload(app, blob, "evil.png")  # must not raise
    assert "Upload rejected" in app.message.value and pattern in app.message.value
    assert "#b00020" in app.message.value  # shown in red
    assert before is not None and app.current is None  # the previous image is gone
    _upload(app, _png())  # and the app still works
    assert app.current["source"] == "upload: photo.png"


def test_read_image_refuses_bombs_before_decoding():
    assert len(_bomb()) < 20_000
    with pytest.raises(demo.RejectedImage, match="8000×8000 pixels"):
        demo.read_image(_bomb())


def test_feedback_is_appended_as_candidate_sets(app, cifar, tmp_path):
    app._on_save()  # nothing shown yet: message, no file
    assert "show an image first" in app.message.value
    app.random_button.click()
    app._on_save()  # nothing ticked
    assert "tick at least one" in app.message.value
    assert not (tmp_path / "feedback.jsonl").exists()
    app.checks[3].value = app.checks[5].value = True
    app.save_button.click()
    first = dict(app.current)
    _upload(app, _png(colour=(10, 90, 200)), "sky.png")
    app.checks[0].value = True
    app.save_button.click()
    lines = [json.loads(s) for s in (tmp_path / "feedback.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["candidates"] == [cifar.classes[3], cifar.classes[5]]
    assert lines[0]["candidate_ids"] == [3, 5] and lines[0]["sha256"] == first["sha256"]
    assert lines[0]["true_label"] == first["true_label"] and len(lines[0]["top5"]) == 5
    assert lines[1]["source"] == "upload: sky.png" and lines[1]["model"] == "able"
    assert lines[0]["adjusted"] is False
    assert not any(box.value for box in app.checks)  # cleared after saving
    assert demo.load_feedback(tmp_path / "nothing saved")["images"].shape == (0, 32, 32, 3)
    fb = demo.load_feedback(tmp_path)
    assert fb["candidates"].tolist()[0] == [c in (3, 5) for c in range(10)]
    assert np.array_equal(fb["images"][0], first["image"])
    assert tuple(fb["images"][1][0, 0]) == (10, 90, 200)


def test_the_feedback_record_says_whether_the_adjustment_was_on(app, tmp_path):
    app.model.value = "able+records"
    app.adjust.value = True
    app.random_button.click()
    app.checks[1].value = True
    app.save_button.click()
    entry = json.loads((tmp_path / "feedback.jsonl").read_text())
    assert entry["adjusted"] is True and entry["model"] == "able+records"


# -- 16-bit greyscale is scaled; only the listed raster formats are opened -----------------
def test_16_bit_greyscale_is_scaled_not_clipped():
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40), 32896, np.uint16)).save(buf, format="PNG")  # mid-grey
    image = demo.read_image(buf.getvalue())
    assert image.shape == (32, 32, 3) and (image == 128).all()  # 32896 / 257; clipped: 255


def test_postscript_is_refused_without_running_ghostscript(monkeypatch):
    from PIL import EpsImagePlugin

    def ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was called")
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n%%EndComments\n"
           b"0 0 moveto 32 32 lineto stroke\nshowpage\n%%EOF\n")
    with pytest.raises(demo.RejectedImage, match=r"not an image format the demo accepts \(PNG"):
        demo.read_image(eps)


# -- issue 24: which run the demo opens; the server lets a too-big upload reach the demo ----
def _fake_run(root, name, mtime, trained=True):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    if trained:
        (run / "checkpoints" / "able.safetensors").write_bytes(b"x")
        (run / "metrics-able.json").write_text(json.dumps(
            {"method": "able", "params": {"METHODS": ["able"]}, "accuracy": {"last": 0.1}}))
        os.utime(run / "checkpoints" / "able.safetensors", (mtime, mtime))
    return run


def test_the_newest_trained_run_is_found_and_a_missing_one_named(tmp_path):
    _fake_run(tmp_path, "old", 1_000)
    new = _fake_run(tmp_path, "quick", 2_000)
    _fake_run(tmp_path, "sweep-x", 3_000, trained=False)  # newer, but nothing trained in it
    assert demo.find_run(root=tmp_path) == new
    assert demo.find_run(tmp_path / "old", root=tmp_path) == tmp_path / "old"
    with pytest.raises(demo.NoTrainedModel, match=r"sweep-x has no trained model.*runs with "
                       r"one: .*old, .*quick"):
        demo.find_run(tmp_path / "sweep-x", root=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(demo.NoTrainedModel, match="No trained model: looked at .*empty"):
        demo.find_run(root=empty)


def test_demo_refuses_in_one_line_and_notebook_07_creates_no_run_dir(tmp_path, monkeypatch,
                                                                      capsys):
    from rable_nb.commands import cli, webapp
    from rable_nb import config  # noqa: F401 - webapp (and runner) read the
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path)  # project root when imported
    (tmp_path / "runs" / "smoke").mkdir(parents=True)
    assert cli.main(["demo"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No trained model: looked at runs/smoke" in err
    assert cli.main(["demo", "--run", str(tmp_path / "nope")]) == 1
    assert "nope has no trained model" in capsys.readouterr().err
    monkeypatch.delenv("RABLE_RUN_DIR", raising=False)  # notebook 07 without a RUN_DIR
    with pytest.raises(demo.NoTrainedModel):
        config.resolve("demo", create=False, PROFILE="smoke")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["smoke"]  # no interactive


def test_servers_accept_a_message_bigger_than_the_largest_upload():
    from rable_nb import config
    from rable_nb.commands import webapp
    lab = json.loads((config.PROJECT_ROOT / "jupyter-config" / "jupyter_server_config.json")
                     .read_text())["ServerApp"]["tornado_settings"]["websocket_max_message_size"]
    assert lab == demo.SERVER_MESSAGE_LIMIT > 100 * 2**20 + 2**20  # MAX_UPLOAD_MB <= 100
    with pytest.raises(ValueError, match="MAX_UPLOAD_MB"):
        demo.validate({"MAX_UPLOAD_MB": 101})
    nb = webapp.without_notebook_only_cells(nbformat.read(webapp.NOTEBOOK, as_version=4))
    assert nb.cells and not any("app.random_button.click()" in c.source for c in nb.cells)


def test_each_app_draws_its_own_random_images_unless_seeded(trained_run, cifar, tmp_path):
    models = predictions.load_models(trained_run, device="cpu")

    def draws(seed):
        app = demo.DemoApp(models, cifar.classes, cifar.test_x, cifar.test_y, tmp_path, seed=seed)
        return [int(app.rng.integers(len(cifar.test_x))) for _ in range(8)]
    assert draws(None) != draws(None)  # a fresh stream per kernel, i.e. per web visitor
    assert draws(3) == draws(3)


def test_the_save_message_names_the_file_relative_to_the_project(app, tmp_path, monkeypatch):
    from rable_nb import config
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path.parent)
    app.random_button.click()
    app.checks[2].value = True
    app.save_button.click()
    assert f"to {tmp_path.name}/feedback.jsonl." in app.message.value
    assert str(tmp_path.parent) not in app.message.value


def test_the_app_says_how_many_feedback_images_the_model_was_trained_on(trained_run, cifar,
                                                                        tmp_path):
    import shutil
    run = shutil.copytree(trained_run, tmp_path / "run")
    metrics = json.loads((run / "metrics-able+records.json").read_text())
    (run / "metrics-able+records.json").write_text(json.dumps({**metrics, "n_feedback": 3}))
    app = demo.DemoApp(predictions.load_models(run, device="cpu"), cifar.classes,
                       cifar.test_x, cifar.test_y, run)
    assert "trained on 0 feedback images" in app.trained.value
    app.model.value = "able+records"
    assert "trained on 3 feedback images" in app.trained.value


def _feedback_line(folder, pixels, ids, classes, **change):
    entry = demo.append_feedback(folder, pixels, hashlib.sha256(pixels.tobytes()).hexdigest(),
                                 ids, classes)
    return json.dumps({**entry, **change})


def test_feedback_files_are_checked_line_by_line(cifar, tmp_path):
    from rable_nb.stages import s04_training as training
    classes, train = list(cifar.classes), cifar.train_x[:5]
    new = [np.full((32, 32, 3), v, np.uint8) for v in (7, 77, 177, 250)]
    a, b = tmp_path / "a", tmp_path / "b"
    lines = [_feedback_line(a, new[0], [1, 2], classes),                       # 1 kept
             "{not json",                                                      # 2 damaged
             json.dumps({"sha256": "x"}),                                      # 3 damaged
             _feedback_line(a, new[1], [0], classes, candidates=["dog"]),      # 4 foreign
             _feedback_line(a, new[1], [0], classes, candidate_ids=[12]),      # 5 foreign
             _feedback_line(a, new[1], [0], classes, image="../evil.png"),     # 6 foreign
             _feedback_line(a, cifar.test_x[4], [0], classes),                 # 7 test image
             _feedback_line(a, train[2], [3], classes),                        # 8 duplicate
             _feedback_line(a, new[2], [4], classes),                          # 9 damaged png
             _feedback_line(a, new[0], [5, 6], classes)]                       # 10 replaces 1
    (a / "feedback" / f"{hashlib.sha256(new[2].tobytes()).hexdigest()}.png").write_bytes(b"\x89PNG")
    (a / "feedback.jsonl").write_text("\n".join(lines) + "\n")
    other = _feedback_line(b, new[0], [9], classes)  # the same image in a second file
    (b / "feedback.jsonl").write_text(other + "\n" + _feedback_line(b, new[3], [8], classes))
    fb = training.feedback_data([str(a / "feedback.jsonl"), str(b / "feedback.jsonl")],
                                cifar, train)
    refused = "\n".join(fb["info"]["refused"])
    for n, reason in [(2, "damaged: not a JSON line"), (3, "damaged: not a feedback record"),
                      (4, "foreign: candidates ['dog']"), (5, "foreign: candidate_ids [12]"),
                      (6, "foreign: its image '../evil.png'"), (7, "CIFAR-10 test image #4"),
                      (8, "duplicate: the same image as the training set"),
                      (9, "damaged: its image feedback/")]:
        assert f"a/feedback.jsonl line {n}: {reason}" in refused
    assert "b/feedback.jsonl line 1: duplicate: the same image as " in refused
    assert len(fb["info"]["refused"]) == 9 and fb["info"]["n"] == 2
    assert np.array_equal(fb["x"], np.stack([new[0], new[3]]))
    assert fb["candidates"][0].nonzero()[0].tolist() == [5, 6]  # line 10 replaced line 1
    assert fb["candidates"][1].nonzero()[0].tolist() == [8]
    with pytest.raises(ValueError, match="FEEDBACK=.*no such file"):
        training.feedback_data(str(tmp_path / "nope.jsonl"), cifar, train)


def test_a_busy_port_is_refused_with_a_clear_message(trained_run, capsys):
    import socket

    from rable_nb.commands import cli
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["demo", "--run", str(trained_run), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"error: port {port} on 127.0.0.1 is in use" in err and "--port" in err
