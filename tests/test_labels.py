"""Conditioning labels and synthetic samples, PLL-honest (issue 21): the prior estimated
without labels, the assignment rules (``LABEL_RULE``), their purity against the truth, the
centre filter, the feature-space copy control (cRT) and plausible candidate sets of
synthetic samples."""
import numpy as np
import pytest
import torch

from rable_nb.engine import backbone
from rable_nb.parts import conditioning, labelrules
from rable_nb import generators
from rable_nb.stages import s03_rebalance as rebalance, s04_training as training
from rable_nb.rundir import runfiles
from rable_nb.engine.networks import PLLNet
from test_conditioning import conditioning_settings

PRIOR = np.array([0.5, 0.25, 0.12, 0.08, 0.05])


def planted(n=6000, q=0.3, noise=1.5, seed=0):
    """Labels drawn from PRIOR, candidate sets (true label + each other with prob. q) and the
    logits of a *balanced* model (the same signal for every class, no prior)."""
    rng = np.random.default_rng(seed)
    k = len(PRIOR)
    y = rng.choice(k, n, p=PRIOR)
    cand = rng.random((n, k)) < q
    cand[np.arange(n), y] = True
    logits = 2.0 * np.eye(k)[y] + noise * rng.normal(size=(n, k))
    return logits, cand, y


def test_the_em_prior_recovers_the_class_prior_that_the_mean_posterior_misses():
    logits, cand, y = planted()
    est = labelrules.estimate_prior(logits, cand)
    assert est.sum() == pytest.approx(1)
    assert np.abs(est - PRIOR).max() < 0.03
    naive = labelrules._restricted(logits, cand)
    naive = (naive / naive.sum(1, keepdims=True)).mean(0)  # flattened towards uniform
    assert np.abs(naive - PRIOR).max() > 2 * np.abs(est - PRIOR).max()


def test_every_rule_labels_within_the_candidate_set_and_sinkhorn_meets_the_counts():
    logits, cand, y = planted()
    prior = labelrules.estimate_prior(logits, cand)
    conf = np.where(cand, logits + np.log(PRIOR), -np.inf).argmax(1)
    out = {}
    for rule in labelrules.LABEL_RULES:
        out[rule] = labelrules.assign(rule, logits, cand, conf, tau=0.0, prior=prior, eps=0.05)
        assert cand[np.arange(len(y)), out[rule]].all(), rule
    assert (out["confidence"] == conf).all()
    assert (out["adjusted"] == np.where(cand, logits, -np.inf).argmax(1)).all()  # τ = 0
    counts = np.bincount(out["sinkhorn"], minlength=len(PRIOR))
    assert np.abs(counts / (prior * len(y)) - 1).max() < 0.1
    # the balanced argmax over-assigns the rarest class; τ = 1 puts the prior back
    bayes = labelrules.assign("adjusted", logits, cand, tau=1.0, prior=prior)
    rare = len(PRIOR) - 1
    assert (out["adjusted"] == rare).sum() > 1.5 * (y == rare).sum() > (bayes == rare).sum()
    # LABEL_KEEP: the most confident half of each class, more precise than the whole
    kept = labelrules.assign("sinkhorn", logits, cand, prior=prior, eps=0.05, keep=0.5)
    full = out["sinkhorn"]
    for c in range(len(PRIOR)):
        assert (kept == c).sum() == round(0.5 * (full == c).sum())
        assert set(np.flatnonzero(kept == c)) <= set(np.flatnonzero(full == c))
    prec = lambda lab: labelrules.purity(lab, y, len(PRIOR))["precision"]  # noqa: E731
    assert np.mean(prec(kept)) > np.mean(prec(full)) + 0.03
    with pytest.raises(ValueError, match="LABEL_RULE='best'"):
        labelrules.assign("best", logits, cand)


def test_purity_is_precision_per_label_and_recall_per_class():
    pur = labelrules.purity([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2], 4)
    assert pur["precision"] == pytest.approx([0.5, 2 / 3, 1.0, 0.0])
    assert pur["recall"][:3] == pytest.approx([1.0, 2 / 3, 0.5]) and pur["recall"][3] is None
    assert pur["cond_counts"] == [2, 3, 1, 0] and pur["true_counts"] == [1, 3, 2, 0]
    acc = conditioning.accuracy([0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2], 4)
    assert acc["precision"] == pur["precision"] and acc["per_class"] == pur["recall"]


def test_bad_rule_filter_and_plausibility_settings_are_refused_by_name():
    base = {**rebalance.PROFILE_DEFAULTS["smoke"], "GENERATOR": "copy"}
    for key, value in (("LABEL_RULE", "best"), ("LABEL_TAU", -1), ("LABEL_EPS", 0),
                       ("SYNTH_FILTER", "far"), ("SYNTH_FILTER_BAND", [0.9, 0.1])):
        with pytest.raises(ValueError, match=key):
            rebalance.validate({**base, key: value})
    rebalance.validate({**base, "LABEL_RULE": "sinkhorn", "SYNTH_FILTER": "centre"})
    with pytest.raises(ValueError, match="SYNTH_PLAUSIBLE"):
        training.validate({"SYNTH_PLAUSIBLE": 0})
    assert [conditioning.filter_mode(v) for v in (None, False, True, "centre")] == \
        ["none", "none", "class", "centre"]
    assert [conditioning.recorded_filter(v) for v in ("none", "class", "centre")] == \
        [False, True, "centre"]


def test_rules_read_no_hidden_label_and_record_their_purity(small_long_tail, tmp_path,
                                                            monkeypatch):
    cifar, ds, x = small_long_tail
    monkeypatch.setenv("RABLE_CACHE", str(tmp_path))
    P = dict(WARMUP_ARCH="tiny_cnn", WARMUP_EPOCHS=1, WARMUP_BATCH=32, WARMUP_LR=0.01,
             LABEL_RULE="sinkhorn", LABEL_EPS=0.1)
    shuffled = {**ds, "labels": np.random.default_rng(1).permutation(ds["labels"])}
    settings = conditioning_settings("pseudo", P)
    a, _, info = conditioning.cond_labels(ds, x, cifar, settings, "cpu")
    b, _, _ = conditioning.cond_labels(shuffled, x, cifar, settings, "cpu")
    assert (a == b).all() and ds["candidates"][np.arange(len(a)), a].all()
    assert info["rule"] == {"LABEL_RULE": "sinkhorn", "LABEL_EPS": 0.1}
    assert sum(info["estimated_counts"]) == pytest.approx(len(x), abs=10)
    assert len(info["confidence_labels"]) == len(x)
    settings = rebalance.topup_settings(generators.get("copy"), {**P, "SEED": 0}, info)
    assert settings["rule"]["LABEL_RULE"] == "sinkhorn" and "estimated_counts" in settings
    assert runfiles.describe({**settings, "generator": "copy"}) == \
        "copy, pseudo labels (sinkhorn)"


class Head(torch.nn.Module):  # what the filters read of a network: its classifier head
    def __init__(self, dim=2, k=2):
        super().__init__()
        self.classifier = torch.nn.Linear(dim, k)


def test_the_centre_filter_keeps_the_band_of_real_distances():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 2)).astype(np.float32)
    cond = np.repeat([0, 1], 200)
    real[cond == 1] += 10
    accept = conditioning.sample_filter("centre", Head(), real, cond, (0.05, 0.95))
    centre0 = real[cond == 0].mean(0)
    d = np.linalg.norm(real[cond == 0] - centre0, axis=1)
    lo, hi = np.quantile(d, [0.05, 0.95])
    probe = np.array([centre0, centre0 + [(lo + hi) / 2, 0], centre0 + [hi * 2, 0]], np.float32)
    assert accept(probe, 0).tolist() == [False, True, False]  # too typical, in band, too far
    assert accept(probe, 1).tolist() == [False, False, False]  # class 1's centre is far away
    assert 0.85 <= accept(real[cond == 0], 0).mean() <= 0.95
    assert conditioning.sample_filter("none", Head(), real, cond) is None


def test_feature_copy_draws_real_features_of_the_class_through_the_backbone(small_long_tail,
                                                                            tmp_path):
    cifar, ds, x = small_long_tail
    torch.manual_seed(0)
    net = PLLNet("tiny_cnn").eval()
    gen = generators.get("feature-copy")
    assert gen.space == "feature" and gen.suffix == ".npy"
    f = gen.fit_inputs(x, net, tmp_path, {"method": "test"})
    assert np.allclose(f, backbone.encode(net, x)) and (tmp_path / "generator" /
                                                        backbone.BACKBONE).is_file()
    gen.fit(f, ds["labels"], ds["class_counts"], {}, tmp_path)
    samples, extras = gen.generate(9, [1, 2, 3])
    assert all((samples[i] == f[e["source"]]).all() and ds["labels"][e["source"]] == 9
               for i, e in enumerate(extras))
    back, _ = generators.GENERATORS["feature-copy"].training_inputs(tmp_path, x, "cpu")
    assert np.allclose(back, f, atol=1e-5)


def test_plausible_candidate_sets_add_the_classes_the_backbone_finds_likely(tmp_path):
    torch.manual_seed(0)
    net = PLLNet("tiny_cnn").eval()
    backbone.save_backbone(net, tmp_path)
    f = np.abs(np.random.default_rng(0).normal(size=(50, net.backbone.feat_dim))).astype(
        np.float32) * 3
    labels = np.arange(50) % 10
    from types import SimpleNamespace
    cand = training.synthetic_candidates(labels, {}, "plausible", SimpleNamespace(num_classes=10),
                                         f, "cpu", tmp_path, {"SYNTH_PLAUSIBLE": 0.2})
    with torch.inference_mode():
        probs = torch.softmax(net.classifier(torch.as_tensor(f)), 1).numpy()
    expected = probs >= 0.2
    expected[np.arange(50), labels] = True
    assert (cand == expected).all() and cand.sum() > 50  # some sets hold more than c
