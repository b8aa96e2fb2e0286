"""Conditioning labels: 'pseudo' never reads the hidden labels, 'oracle' is the truth."""
import numpy as np
import pytest

from rable_nb.parts import conditioning
from rable_nb.engine import engine

PARAMS = dict(WARMUP_ARCH="tiny_cnn", WARMUP_EPOCHS=1, WARMUP_BATCH=32, WARMUP_LR=0.01, SEED=0)


def conditioning_settings(kind: str, params: dict):
    """Conditioning settings of ``params`` with ``GEN_LABELS=kind``."""
    return conditioning.ConditioningSettings.from_params({**params, "GEN_LABELS": kind})


@pytest.fixture
def small(small_long_tail):
    return small_long_tail


def test_pseudo_labels_never_read_the_hidden_labels(small, tmp_path, monkeypatch):
    cifar, ds, x = small
    given = []
    real_train = engine.train

    def spy(cfg, data_, *args, **kwargs):
        given.append(np.asarray(data_["labels"]).copy())
        return real_train(cfg, data_, *args, **kwargs)
    monkeypatch.setattr(engine, "train", spy)
    runs = []
    for name, labels in (("a", ds["labels"]),
                         ("b", np.random.default_rng(1).permutation(ds["labels"]))):
        monkeypatch.setenv("RABLE_CACHE", str(tmp_path / name))  # no shared cache: train twice
        runs.append(conditioning.cond_labels({**ds, "labels": labels}, x, cifar,
                                             conditioning_settings("pseudo", PARAMS), "cpu"))
    assert len(given) == 2 and all((g == -1).all() for g in given)  # truth never handed over
    (a, _, info_a), (b, _, info_b) = runs
    assert (a == b).all() and info_a["sha1"] == info_b["sha1"]
    assert ds["candidates"][np.arange(len(a)), a].all()  # always a candidate
    assert info_a["warmup"]["epochs"] == 1 and info_a["gen_labels"] == "pseudo"
    # a second call is served from the cache (no training)
    monkeypatch.setattr(engine, "train", lambda *a, **k: pytest.fail("retrained"))
    again, net, _ = conditioning.cond_labels(ds, x, cifar,
                                             conditioning_settings("pseudo", PARAMS), "cpu")
    assert (again == b).all() and net is not None


def test_oracle_is_the_hidden_truth_and_accuracy_is_reported(small):
    cifar, ds, x = small
    labels, net, info = conditioning.cond_labels(ds, x, cifar,
                                                 conditioning_settings("oracle", PARAMS), "cpu")
    assert (labels == ds["labels"]).all() and net is None and info["gen_labels"] == "oracle"
    acc = conditioning.accuracy(labels, ds["labels"], 10)
    assert acc["overall"] == 1 and acc["cond_counts"] == acc["true_counts"]
    wrong = conditioning.accuracy((ds["labels"] + 1) % 10, ds["labels"], 10)
    assert wrong["overall"] == 0 and wrong["per_class"] == [0.0] * 10
    with pytest.raises(ValueError, match="GEN_LABELS"):
        conditioning.cond_labels(ds, x, cifar, conditioning_settings("truth", PARAMS), "cpu")
