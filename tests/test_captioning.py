"""Captioning stage: selection, rescale, resumable captions.jsonl, clear model errors."""
import json

import numpy as np
import pytest

from rable_nb.stages import s02_captioning as captioning
from rable_nb.rundir import jsonl
from rable_nb.parts.tiny_models import ModelNotFoundError

COUNTS = [6, 3, 1]
LABELS = np.repeat(np.arange(3), COUNTS)


def test_select_rows_all_or_classes_below_target():
    assert captioning.select_rows(LABELS, COUNTS, "all", None).tolist() == list(range(10))
    assert captioning.select_rows(LABELS, COUNTS, "below_target", None).tolist() == [6, 7, 8, 9]
    assert captioning.select_rows(LABELS, COUNTS, "below_target", 2).tolist() == [9]
    with pytest.raises(ValueError, match="CAPTION_WHICH"):
        captioning.select_rows(LABELS, COUNTS, "some", None)


def test_minmax_rescale_stretches_each_image_to_full_range():
    x = np.stack([np.full((4, 4, 3), 100, np.uint8), np.zeros((4, 4, 3), np.uint8)])
    x[0, 0, 0] = [50, 60, 70]
    y = captioning.minmax_rescale(x)
    assert y[0].min() == 0 and y[0].max() == 255
    assert (y[1] == 0).all()  # constant image stays finite


def test_captions_are_appended_and_reruns_skip_done_indices(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    labels, indices = np.array([0, 0, 1, 2, 2]), np.array([10, 11, 20, 30, 31])
    first = captioning.caption_images(tmp_path, images[:3], labels[:3], indices[:3], "tiny",
                                      "cpu", batch_size=2, max_new_tokens=4)
    assert first["captioned"] == 3 and first["skipped"] == 0
    # A torn last line (interrupted write) is dropped and that image captioned again.
    with open(tmp_path / "captions.jsonl", "a") as f:
        f.write('{"index": 30, "label": 2, "capt')
    second = captioning.caption_images(tmp_path, images, labels, indices, "tiny", "cpu",
                                       batch_size=2, max_new_tokens=4)
    assert second["captioned"] == 2 and second["skipped"] == 3
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == indices.tolist()
    assert all(isinstance(r["caption"], str) for r in rows)
    assert {r["index"]: r["label"] for r in rows} == dict(zip(indices.tolist(), labels.tolist()))

    with pytest.raises(ValueError, match="other settings"):  # never mix caption settings
        captioning.caption_images(tmp_path, images, labels, indices, "tiny", "cpu",
                                  max_new_tokens=4, rescale=True)

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded when everything is captioned")
    monkeypatch.setattr(captioning, "load_blip2", no_model)
    third = captioning.caption_images(tmp_path, images, labels, indices, "tiny", "cpu",
                                      max_new_tokens=4)
    assert third["captioned"] == 0 and third["skipped"] == 5
    assert len(jsonl.read(tmp_path / "captions.jsonl")) == 5


def test_unknown_model_id_names_the_id_and_the_local_path_option(tmp_path):
    images = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ModelNotFoundError) as err:
        captioning.caption_images(tmp_path, images, np.array([0]), np.array([0]),
                                  "nobody/no-such-blip2", "cpu")
    msg = str(err.value)
    assert "nobody/no-such-blip2" in msg and "CAPTION_MODEL_ID=" in msg and "local" in msg
    assert not (tmp_path / "captions.jsonl").exists() and not (tmp_path / "captions.json").exists()


def test_validate_rejects_bad_parameters():
    with pytest.raises(ValueError, match="CAPTION_BATCH"):
        captioning.validate({"CAPTION_BATCH": 0})
    with pytest.raises(ValueError, match="TARGET_PER_CLASS"):
        captioning.validate({"TARGET_PER_CLASS": -3})


def test_tiny_models_are_built_once_and_reused():
    from rable_nb.parts import tiny_models
    path = tiny_models.build_tiny_blip2()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny_models.resolve_model_id("tiny", "CAPTION_MODEL_ID") == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert tiny_models.resolve_model_id("org/model", "SD_MODEL_ID") == "org/model"


@pytest.mark.slow  # builds each tiny model twice: ~25 s under load
def test_tiny_models_are_byte_identical_across_fresh_caches(tmp_path):
    """Smoke runs reproduce exactly only if every fresh cache builds the same files."""
    from rable_nb.parts import tiny_models
    for build in (tiny_models.build_tiny_sd, tiny_models.build_tiny_blip2):
        a, b = build(tmp_path / build.__name__ / "a"), build(tmp_path / build.__name__ / "b")
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
        different = [str(f) for f in files if (a / f).read_bytes() != (b / f).read_bytes()]
        assert not different, f"{build.__name__}: {different} differ between two builds"
