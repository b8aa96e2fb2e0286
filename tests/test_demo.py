"""Notebook 07's widget app, driven headless: uploads, rejected files, feedback lines."""
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from rable_nb import data, demo, predictions


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
    assert "predicted" in app.message.value


def test_upload_is_preprocessed_like_evaluation_and_model_switch_repredicts(app):
    blob = _png()
    _upload(app, blob)
    assert app.current["source"] == "upload: photo.png"
    assert app.current["sha256"] == hashlib.sha256(blob).hexdigest()
    assert app.current["image"].shape == (32, 32, 3)
    assert tuple(app.current["image"][16, 16]) == (200, 40, 40)
    assert app.uploader.value == ()  # reset, so the same file can come again
    expected = predictions.predict_proba(app.models["able+records"], app.current["image"][None])
    app.model.value = "able+records"
    assert app.top5[0][1] == pytest.approx(float(expected.max()), abs=1e-6)


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
    assert app.current is before  # the previous image stays
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
    assert not any(box.value for box in app.checks)  # cleared after saving
    fb = demo.load_feedback(tmp_path)
    assert fb["candidates"].tolist()[0] == [c in (3, 5) for c in range(10)]
    assert np.array_equal(fb["images"][0], first["image"])
    assert tuple(fb["images"][1][0, 0]) == (10, 90, 200)


# -- issue 17: 16-bit greyscale is scaled; only the listed raster formats are opened ---------
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
