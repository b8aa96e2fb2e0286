"""Long tail and partial labels (notebook 01; docs/algorithms.md, "Partial labels")."""
import numpy as np
import pytest

from rable_nb.parts import candidates
from rable_nb.stages import s01_dataset as dataset
from rable_nb.data import longtail
from rable_nb.rundir import runfiles

C = 10


@pytest.mark.parametrize("factor, expected", [
    (0.01, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]),
    (0.02, [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]),
    (0.1, [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]),
    (1.0, [5000] * 10),
])
def test_long_tail_counts(factor, expected):
    assert longtail.long_tail_counts(5000, C, factor) == expected


def test_rho_100_has_12406_images():
    assert sum(longtail.long_tail_counts(5000, C, 0.01)) == 12406


def test_long_tail_indices_are_seeded_and_within_class():
    labels = np.repeat(np.arange(C), 100)
    counts = longtail.long_tail_counts(100, C, 0.1)
    a = longtail.long_tail_indices(labels, counts, seed=0)
    assert np.array_equal(a, longtail.long_tail_indices(labels, counts, seed=0))
    assert not np.array_equal(a, longtail.long_tail_indices(labels, counts, seed=1))
    assert np.bincount(labels[a], minlength=C).tolist() == counts
    assert len(np.unique(a)) == len(a)


def _lt_labels():
    return np.repeat(np.arange(C), longtail.long_tail_counts(5000, C, 0.01))


@pytest.mark.parametrize("q", [0.1, 0.3, 0.5, 0.7])
def test_uniform_mean_set_size(q):
    labels = _lt_labels()
    cand = candidates.uniform_candidates(labels, C, q, seed=0)
    assert len(labels) == 12406
    assert abs(cand.sum(1).mean() - (1 + 9 * q)) <= 0.05
    assert cand[np.arange(len(labels)), labels].all()


def _random_probs(n, seed=0):
    logits = np.random.default_rng(seed).normal(0, 3, (n, C))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_instance_flip_rates_bounded_by_rate_times_classes():
    labels = _lt_labels()
    flip = candidates.instance_flip_rates(_random_probs(len(labels)), labels, rate=0.4)
    assert (flip[np.arange(len(labels)), labels] == 0).all()
    assert (flip <= 1).all() and (flip >= 0).all()
    assert flip.sum(1).max() <= 4 + 1e-9  # expected false candidates <= r·C = 4


def test_instance_candidates_contain_truth_and_follow_classifier():
    labels = _lt_labels()
    probs = _random_probs(len(labels))
    cand = candidates.instance_candidates(probs, labels, rate=0.4, seed=0)
    assert cand[np.arange(len(labels)), labels].all()
    false = cand.sum(1) - 1
    assert false.mean() <= 4
    # the most confusable wrong label enters far more often than the least confusable one
    p = probs.copy()
    p[np.arange(len(labels)), labels] = -1
    top = cand[np.arange(len(labels)), p.argmax(1)].mean()
    p[np.arange(len(labels)), labels] = 2
    bottom = cand[np.arange(len(labels)), p.argmin(1)].mean()
    assert top > 3 * bottom


def test_same_seed_same_candidates_other_seed_differs():
    labels = _lt_labels()
    a = candidates.uniform_candidates(labels, C, 0.3, seed=0)
    assert np.array_equal(a, candidates.uniform_candidates(labels, C, 0.3, seed=0))
    assert not np.array_equal(a, candidates.uniform_candidates(labels, C, 0.3, seed=1))
    probs = _random_probs(len(labels))
    b = candidates.instance_candidates(probs, labels, 0.4, seed=3)
    assert np.array_equal(b, candidates.instance_candidates(probs, labels, 0.4, seed=3))


@pytest.mark.parametrize("factor", [0, -0.5, 1.5])
def test_bad_imbalance_factor(factor):
    with pytest.raises(ValueError, match="IMBALANCE_FACTOR"):
        longtail.long_tail_counts(5000, C, factor)


@pytest.mark.parametrize("q", [-0.1, 1.0, 2])
def test_bad_q(q):
    with pytest.raises(ValueError, match="Q="):
        candidates.uniform_candidates(_lt_labels()[:10], C, q)


def test_bad_partial_kind():
    with pytest.raises(ValueError, match="PARTIAL='sometimes'.*uniform"):
        dataset.build_dataset(None, 0.01, "sometimes", 0.3, 0.4)


def test_factor_too_small_for_n_max():
    with pytest.raises(ValueError, match="no image"):
        longtail.long_tail_counts(300, C, 0.001)


def test_instance_dataset_trains_and_caches_clean_classifier(tmp_path, monkeypatch):
    from rable_nb.data import images as data
    monkeypatch.setenv("RABLE_CACHE", str(tmp_path / "cache"))
    cifar = data.load_cifar10(data.write_fake_cifar(tmp_path / "fake", n_train=40, n_test=10))
    kw = dict(seed=0, n_max=40, clean_arch="tiny_cnn", clean_epochs=3, device="cpu")
    ds = dataset.build_dataset(cifar, 0.1, "instance", 0.3, 0.4, **kw)
    info = ds["clean_classifier"]
    assert info["arch"] == "tiny_cnn" and 0 <= info["test_accuracy"] <= 1
    assert info["test_accuracy"] > 0.3  # class colours are learnable: far above chance (0.1)
    assert ds["candidates"][np.arange(len(ds["labels"])), ds["labels"]].all()
    assert len(list((tmp_path / "cache").glob("clean-*.safetensors"))) == 1
    again = dataset.build_dataset(cifar, 0.1, "instance", 0.3, 0.4, **kw)  # from the cache
    assert np.array_equal(again["candidates"], ds["candidates"])
    assert again["clean_classifier"] == info


def test_stage_01_is_one_call_that_writes_the_run_directory(tmp_path, monkeypatch):
    """``dataset.run``: what notebook 01 and the campaign call (no copy of its cells)."""
    from rable_nb import config
    from rable_nb.data import images as data
    monkeypatch.setenv("RABLE_CACHE", str(tmp_path / "cache"))
    cifar = data.load_cifar10(data.write_fake_cifar(tmp_path / "fake", n_train=40, n_test=10))
    P = config.resolve("dataset", RUN_DIR=str(tmp_path / "run"), DATA_DIR=str(tmp_path / "fake"),
                       DEVICE="cpu", SEED=0, IMBALANCE_FACTOR=0.1, PARTIAL="uniform", Q=0.3,
                       RATE=0.4, N_MAX=40)
    ds = dataset.run(P, cifar)
    loaded = runfiles.load_dataset(P["RUN_DIR"], cifar)
    assert np.array_equal(loaded["candidates"], ds["candidates"])
    assert {k: loaded["params"][k] for k in dataset.DATASET_KEYS} == {
        k: P[k] for k in dataset.DATASET_KEYS}
    assert loaded["params"]["source"] == cifar.source
    other = data.load_cifar10(data.write_fake_cifar(tmp_path / "other", n_train=41, n_test=10))
    with pytest.raises(runfiles.DataSourceError, match="made from other data"):
        dataset.run(P, other)
