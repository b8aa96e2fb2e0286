"""Synthetic-data audit on planted cases: copies are memorised, one repeated image shows as
one column of the confusion matrix, Fréchet distance sanity."""
import json

import numpy as np
import pytest

from rable_nb.parts import audit, candidates
from rable_nb.data import images as data, longtail
from rable_nb import generators


@pytest.fixture(scope="module")
def setup(cifar_dir):
    cifar = data.load_cifar10(cifar_dir)
    judge, _ = candidates.clean_classifier(cifar, "tiny_cnn", 1, 0, "cpu", 50)
    idx = longtail.long_tail_indices(cifar.train_y, [30, 20, 12, 8, 6, 5, 4, 3, 3, 2], 0)
    test = longtail.balanced_subset(cifar.test_y, 20, 0)
    return cifar, judge, idx, test


def test_copy_backend_is_fully_memorised(setup, tmp_path):
    cifar, judge, idx, test = setup
    x, y = cifar.train_x[idx], cifar.train_y[idx]
    gen = generators.get("copy")
    gen.fit(x, y, np.bincount(y), {}, tmp_path)
    syn = [(gen.sample(c, 10, seed=0), c) for c in (5, 8, 9)]
    sx, sy = np.concatenate([s for s, _ in syn]), np.repeat([c for _, c in syn], 10)
    result = audit.audit(sx, sy, x, y, cifar.test_x[test], cifar.test_y[test], judge,
                         cifar.classes, device="cpu")
    for row in result["per_class"]:
        assert row["memorisation"] == 1.0 and row["median_nn_distance"] == pytest.approx(0, abs=1e-3)
        assert row["tau"] > 0.01  # fresh test images are not that close to training images
        assert row["fd_judge"] is not None and row["fd_judge_real_train"] is not None
    assert result["overall"]["memorisation"] == 1.0
    assert all(p["distance"] < 1e-3 for p in result["closest"])
    json.dumps(result)  # JSON-able


def test_one_repeated_image_shows_as_one_column_of_the_confusion_matrix(setup):
    cifar, judge, idx, test = setup
    x, y = cifar.train_x[idx], cifar.train_y[idx]
    sx = np.repeat(cifar.test_x[test][:1], 30, axis=0)  # "mode collapse": one image, 3 labels
    sy = np.repeat([3, 6, 9], 10)
    result = audit.audit(sx, sy, x, y, cifar.test_x[test], cifar.test_y[test], judge,
                         cifar.classes, device="cpu")
    conf = np.asarray(result["confusion"])
    assert conf.sum() == 30 and (conf.sum(0) > 0).sum() == 1  # a single predicted class
    assert conf[[3, 6, 9]].sum(1).tolist() == [10, 10, 10]
    assert all(r["diversity"] == pytest.approx(0, abs=1e-6) for r in result["per_class"])
    accs = sorted(r["judge_accuracy"] for r in result["per_class"])
    assert accs[:2] == [0.0, 0.0]  # at most one of the three intended classes is "right"


def test_frechet_distance_of_shifted_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert audit.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert audit.frechet_distance(a, a + 2.0) == pytest.approx(12.0, rel=1e-6)
    assert audit.frechet_distance(a[:1], a) is None


def test_confusion_matrix_of_gan_samples_counts_the_judges_predictions(setup, tmp_path):
    """The SCDL-GAN study's check on the ``gan`` backend: row c holds the judge's predictions
    for the samples meant as class c; a collapsed generator fills a single column."""
    import torch

    from rable_nb.engine.networks import batched_logits
    cifar, judge, idx, test = setup
    x, y = cifar.train_x[idx], cifar.train_y[idx]
    gen = generators.get("gan")
    params = dict(SEED=0, DEVICE="cpu", GAN_CHANNELS=[4, 8], GAN_LATENT=4, GAN_AE="bagan",
                  GAN_AE_STEPS=4, GAN_STEPS=2, GAN_BATCH=8, GAN_LR=2e-4, GAN_GP=10.0,
                  GAN_CRITIC=1, GAN_CHECKPOINT_EVERY=5)
    assert gen.fit(x, y, np.bincount(y), params, tmp_path)["done"]

    def audited():
        sx = np.concatenate([gen.sample(c, 10, seed=0) for c in (5, 8, 9)])
        sy = np.repeat([5, 8, 9], 10)
        return sx, sy, audit.audit(sx, sy, x, y, cifar.test_x[test], cifar.test_y[test], judge,
                                   cifar.classes, device="cpu")
    sx, sy, result = audited()
    pred = batched_logits(judge, sx).argmax(1).numpy()
    conf = np.asarray(result["confusion"])
    for c in (5, 8, 9):
        assert conf[c].tolist() == np.bincount(pred[sy == c], minlength=10).tolist()
    assert conf.sum() == 30 and conf[[0, 1, 2, 3, 4, 6, 7]].sum() == 0
    real_pred = batched_logits(judge, cifar.test_x[test]).argmax(1).numpy()
    real = np.zeros((10, 10), int)
    np.add.at(real, (cifar.test_y[test], real_pred), 1)
    assert np.asarray(result["confusion_real"]).tolist() == real.tolist()
    with torch.no_grad():  # collapse: the generator ignores its code (one image for all)
        last = gen.dec.up[-2]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    _, _, collapsed = audited()
    conf = np.asarray(collapsed["confusion"])
    assert (conf.sum(0) > 0).sum() == 1 and conf.sum() == 30
    assert all(r["diversity"] == pytest.approx(0, abs=1e-6) for r in collapsed["per_class"])
    assert audit.confusion_figure(collapsed, cifar.classes).axes
