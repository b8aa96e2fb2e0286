"""Label-free rebalancing: SSP's rotation pre-training and the real unlabeled
images of ``+unlabeled`` — rotation labels and loss, the cached and resumable pre-training,
the unlabeled pool, hidden labels never read, and a smoke run of both methods."""
import json
import shutil

import numpy as np
import pytest
import torch

from rable_nb.parts import candidates, unlabeled
from rable_nb.data import images as data, longtail
from rable_nb.engine import engine
from rable_nb import methods
from rable_nb.rundir import runfiles
from rable_nb.stages import s04_training as training
from rable_nb.methods import able, ssp
from rable_nb.engine.networks import standardize, to_unit


@pytest.fixture(scope="module")
def cifar(cifar_dir):
    return data.load_cifar10(cifar_dir)


# -- rotations -------------------------------------------------------------------------------
def test_rotation_labels_take_a_quarter_each_in_random_order():
    gen = torch.Generator().manual_seed(0)
    labels = ssp.rotation_labels(30, gen, "cpu")
    counts = torch.bincount(labels, minlength=4).tolist()
    assert sorted(counts) == [7, 7, 8, 8] and labels.min() >= 0 and labels.max() <= 3
    again = ssp.rotation_labels(30, torch.Generator().manual_seed(0), "cpu")
    other = ssp.rotation_labels(30, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(labels, again) and not torch.equal(labels, other)


def test_rotate_turns_each_image_by_its_label():
    x = torch.arange(5 * 3 * 4 * 4, dtype=torch.float32).reshape(5, 3, 4, 4)
    labels = torch.tensor([0, 1, 2, 3, 1])
    out = ssp.rotate(x, labels)
    for i, k in enumerate(labels.tolist()):
        assert torch.equal(out[i], torch.rot90(x[i], k, (1, 2)))
    full = x
    for _ in range(4):
        full = ssp.rotate(full, torch.ones(5, dtype=torch.long))
    assert torch.equal(full, x)  # four quarter turns: the image again


def test_rotation_loss_is_cross_entropy_over_the_four_rotations():
    labels = torch.tensor([0, 3, 2])
    assert ssp.rotation_loss(torch.zeros(3, 4), labels).item() == pytest.approx(np.log(4))
    sure = torch.nn.functional.one_hot(labels, 4).float() * 50
    assert ssp.rotation_loss(sure, labels).item() < 1e-6
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.0, 0.0, 3.0], [0.0, 0.0, 1.0, 0.0]])
    expected = -torch.log_softmax(logits, 1)[torch.arange(3), labels].mean()
    assert ssp.rotation_loss(logits, labels).item() == pytest.approx(expected.item())


@pytest.mark.slow  # ~17 s under load
def test_rotation_prediction_is_learnable_from_the_labels_it_draws(cifar):
    """Fresh rotations every step: only labels that match the rotations can be learnt
    (chance 0.25; 960 predictions in the last 20 steps, binomial sd 0.014)."""
    x = standardize(to_unit(torch.as_tensor(
        cifar.train_x[longtail.balanced_subset(cifar.train_y, 5, 0)[:48]])))
    torch.manual_seed(0)
    net = ssp._RotationNet("tiny_cnn")
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen, hits = torch.Generator().manual_seed(0), []
    for _ in range(80):
        r = ssp.rotation_labels(len(x), gen, "cpu")
        logits = net(ssp.rotate(x, r))
        loss = ssp.rotation_loss(logits, r)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hits.append((logits.argmax(1) == r).float().mean().item())
    assert np.mean(hits[-20:]) > 0.33


# -- SSP pre-training ------------------------------------------------------------------------
def _images(cifar, n=96):
    x = cifar.train_x[longtail.balanced_subset(cifar.train_y, n // 10 + 1, 0)[:n]]
    return torch.as_tensor(x).permute(0, 3, 1, 2).contiguous()


def test_pretraining_is_cached_and_resumes_to_the_same_weights(cifar, tmp_path, monkeypatch):
    x = _images(cifar)
    args = ("tiny_cnn", 3, 32, 0.1, 2e-4)
    monkeypatch.setenv("RABLE_CACHE", str(tmp_path / "a"))
    full, info = ssp.pretrain(x, *args, progress=False)
    assert not info["cached"] and len(info["history"]) == 3 and info["epochs"] == 3
    # interrupted after epoch 2, then run again: resumes from its per-epoch state
    monkeypatch.setenv("RABLE_CACHE", str(tmp_path / "b"))
    real_epoch, calls = ssp._epoch, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)
    monkeypatch.setattr(ssp, "_epoch", failing)
    with pytest.raises(KeyboardInterrupt):
        ssp.pretrain(x, *args, progress=False)
    monkeypatch.setattr(ssp, "_epoch", lambda *a, **k: calls.append(1) or real_epoch(*a, **k))
    resumed, rinfo = ssp.pretrain(x, *args, progress=False)
    assert len(calls) == 4  # 2 epochs, the interrupted one, then only the third again
    assert all(torch.equal(full[k], resumed[k]) for k in full)

    def losses(i):
        return [(h["loss_rot"], h["rotation_acc"]) for h in i["history"]]
    assert losses(rinfo) == losses(info)
    # a complete entry is served from the cache, with the record of the run that made it
    monkeypatch.setattr(ssp, "_epoch", lambda *a, **k: pytest.fail("trained again"))
    cached, again = ssp.pretrain(x, *args, progress=False)
    assert again["cached"] and again["history"] == rinfo["history"]
    assert all(torch.equal(full[k], cached[k]) for k in full)
    assert not list((tmp_path / "b").glob("ssp-*/state.safetensors"))  # state removed when done


def test_ssp_trains_able_from_the_pretrained_backbone(cifar, tmp_path, monkeypatch):
    monkeypatch.setenv("RABLE_CACHE", str(tmp_path))
    x = _images(cifar).permute(0, 2, 3, 1).numpy()
    y = np.arange(len(x)) % 10
    cand = candidates.uniform_candidates(y, 10, 0.3, 0)
    cfg = engine.TrainConfig(method="ssp+records", epochs=1, batch_size=32,
                             method_params={"ssp": {"epochs": 2}})
    assert cfg.method_params["ssp"] == {**able.Able.params, "epochs": 2, "lr": 0.1,
                                        "weight_decay": 2e-4, "batch_size": 32}
    tr = engine.Trainer(cfg, x, cand, y, "cpu")
    weights, info = ssp.pretrain(tr.x, "tiny_cnn", 2, 32, 0.1, 2e-4, cfg.lr_min)
    assert info["cached"]  # the trainer's pre-training filled the cache
    state = tr.net.backbone.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    assert tr.preparation["ssp"]["epochs"] == 2 and "rotation_acc_last" in tr.preparation["ssp"]
    scratch = engine.Trainer(engine.TrainConfig(method="able+records", epochs=1,
                                                    batch_size=32), x, cand, y, "cpu")
    assert torch.equal(scratch.net.classifier.weight, tr.net.classifier.weight)  # fresh head
    assert not torch.equal(scratch.net.backbone[0].weight, tr.net.backbone[0].weight)
    assert np.isfinite(tr.train_epoch(progress=False)["loss_cont"])
    with pytest.raises(ValueError, match=r"ssp.epochs must be a positive integer, not 0"):
        engine.TrainConfig(method="ssp", method_params={"ssp": {"epochs": 0}})
    P = {"METHOD_PARAMS": {"ssp": {"lr": 0.05}}, "SSP_EPOCHS": 7}
    assert training.method_params(P) == {"ssp": {"lr": 0.05, "epochs": 7}}


# -- the unlabeled pool ----------------------------------------------------------------------
def test_the_pool_is_what_the_long_tail_left_out(cifar):
    counts = longtail.long_tail_counts(5000, 10, 0.01)
    lt = longtail.long_tail_indices(cifar.train_y, np.minimum(
        counts, np.bincount(cifar.train_y)).tolist(), 0)
    pool = unlabeled.pool(len(cifar.train_y), lt)
    assert np.intersect1d(pool, lt).size == 0
    assert len(pool) + len(lt) == len(cifar.train_y)
    if len(cifar.train_y) == 50_000:  # the real CIFAR-10: the number
        assert len(pool) == 37_594
    chosen = unlabeled.select(pool, len(lt), count=0, ratio=5.0, seed=0)
    assert len(chosen) == min(len(pool), 5 * len(lt)) and np.isin(chosen, pool).all()
    assert np.intersect1d(chosen, lt).size == 0
    assert len(unlabeled.select(pool, 100, count=0, ratio=1.5)) == 150           # RATIO caps
    few = unlabeled.select(pool, len(lt), count=40, ratio=5.0, seed=0)
    assert len(few) == 40 and np.array_equal(few, unlabeled.select(pool, len(lt), 40, 5.0, 0))
    assert not np.array_equal(few, unlabeled.select(pool, len(lt), 40, 5.0, 1))


def test_pseudo_labels_become_candidate_sets_above_the_threshold():
    class Fixed(torch.nn.Module):  # logits from the first pixel: confidences 0.9 and ~0.34
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            first = x[:, 0, 0, 0] > 0
            sure = torch.log(torch.tensor([0.9] + [0.1 / 9] * 9))
            unsure = torch.log(torch.tensor([0.1, 0.34] + [0.56 / 8] * 8))
            return torch.where(first[:, None], sure, unsure) + self.w
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[0, 0, 0, 0] = 255
    labels, conf, cand = unlabeled.pseudo_label(Fixed(), images, 10, threshold=0.5)
    assert labels.tolist() == [0, 1] and conf == pytest.approx([0.9, 0.34], abs=1e-6)
    assert cand[0].tolist() == [True] + [False] * 9 and cand[1].all()
    _, _, everyone = unlabeled.pseudo_label(Fixed(), images, 10, threshold=0.0)
    assert everyone.sum(1).tolist() == [1, 1]  # the reference's rule: every argmax


def _shuffled(cifar, pool):
    """The same data with the pool's hidden labels permuted."""
    y = cifar.train_y.copy()
    y[pool] = np.random.default_rng(7).permutation(y[pool])
    return data.Cifar(cifar.train_x, y, cifar.test_x, cifar.test_y, cifar.classes,
                      cifar.source, cifar.identity)


def test_hidden_labels_are_never_read(cifar, smoke_dataset_run, monkeypatch, tmp_path):
    """Permuting the unlabeled images' labels changes nothing but the report: the same
    images, pseudo-labels, candidate sets, and the same training to the last weight."""
    monkeypatch.setenv("RABLE_CACHE", str(tmp_path))
    ds = runfiles.load_dataset(smoke_dataset_run)
    pool = unlabeled.pool(len(cifar.train_y), ds["indices"])
    shuffled = _shuffled(cifar, pool)
    assert (shuffled.train_y[pool] != cifar.train_y[pool]).mean() > 0.5
    P = {"UNLABELED": 120, "RATIO": 5, "UNLABELED_THRESHOLD": 0.2, "WARMUP_ARCH": "tiny_cnn",
         "WARMUP_EPOCHS": 1, "WARMUP_BATCH": 64, "WARMUP_LR": 0.01}
    runs = []
    for source in (cifar, shuffled):
        d = training.prepare_data(smoke_dataset_run, source, "able+unlabeled", 5, 0,
                                  device="cpu", params=P)
        cfg = engine.TrainConfig(method="able+unlabeled", epochs=1, batch_size=64)
        tr = engine.Trainer(cfg, d["train_x"], d["candidates"], d["labels"], "cpu")
        tr.train_epoch(progress=False)
        runs.append((d, tr))
    (a, ta), (b, tb) = runs
    assert a["fields"]["n_unlabeled"] == 120 == len(a["train_x"]) - len(ds["labels"])
    assert np.array_equal(a["train_x"], b["train_x"])
    assert np.array_equal(a["candidates"], b["candidates"])
    ia, ib = a["fields"]["unlabeled"], b["fields"]["unlabeled"]
    assert {k: v for k, v in ia.items() if k != "accuracy"} == \
        {k: v for k, v in ib.items() if k != "accuracy"}
    assert ia["accuracy"]["true_counts"] != ib["accuracy"]["true_counts"] or \
        ia["accuracy"]["overall"] != ib["accuracy"]["overall"]   # only the report differs
    assert torch.equal(ta.conf, tb.conf)
    assert all(torch.equal(v, tb.net.state_dict()[k]) for k, v in ta.net.state_dict().items())
    assert 0 <= ia["confident"] <= 120 and ia["threshold"] == 0.2
    added = a["candidates"][len(ds["labels"]):]
    assert set(added.sum(1).tolist()) <= {1, 10}  # a pseudo-label, or every class


def test_unlabeled_composes_but_not_with_the_supervised_upper_bound():
    assert {"able+unlabeled", "ssp+unlabeled+records", "corr+unlabeled+records+mixup"} <= \
        set(methods.names())
    assert methods.data_sources("able+unlabeled") == ("unlabeled",)
    assert methods.data_sources("rable+unlabeled") == ("synthetic", "unlabeled")
    with pytest.raises(ValueError, match="'supervised' trains on the hidden true labels"):
        methods.check("supervised+unlabeled")
    with pytest.raises(ValueError, match="write 'able\\+unlabeled\\+records'"):
        methods.check("able+records+unlabeled")
    with pytest.raises(ValueError, match="UNLABELED_THRESHOLD=1.5 is invalid"):
        training.validate({"UNLABELED_THRESHOLD": 1.5})
    with pytest.raises(ValueError, match="RATIO=0 is invalid"):
        training.validate({"RATIO": 0})


# -- both methods end to end ------------------------------------------------------------------
def test_smoke_run_of_ssp_and_able_unlabeled(run_notebooks, smoke_dataset_run, cifar, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_dataset_run, run)
    run_notebooks("04", run, METHODS=["ssp", "able+unlabeled"], EPOCHS=1)
    s = json.loads((run / "metrics-ssp.json").read_text())
    u = json.loads((run / "metrics-able+unlabeled.json").read_text())
    n_lt = len(runfiles.load_dataset(run)["labels"])
    assert s["preparation"]["ssp"]["epochs"] == 1 and s["n_unlabeled"] == 0
    assert s["n_train"] == n_lt and 0 <= s["accuracy"]["last"] <= 1
    assert u["n_unlabeled"] == n_lt and u["n_train"] == 2 * n_lt  # smoke: RATIO 1
    assert u["unlabeled"]["pool"] == len(cifar.train_y) - n_lt
    assert 0 <= u["unlabeled"]["accuracy"]["overall"] <= 1
    assert u["params"]["RATIO"] == 1 and u["params"]["UNLABELED"] == 0


def test_a_run_with_rable_keeps_its_other_methods_current(tmp_path):
    """``rable`` records its generator and top-up in its parameters; trained last, it must
    not make the run's other methods look like results of other parameters."""
    import time
    shared = {"METHODS": ["able", "rable"], "EPOCHS": 1, "dataset": {}}
    for method, own in (("able", {}), ("rable", {"GENERATOR": "copy", "GEN_LABELS": "pseudo",
                                                 "synthetic": {"generator": "copy"}})):
        (tmp_path / f"metrics-{method}.json").write_text(json.dumps(
            {"method": method, "params": {**shared, **own, "train": {"method": method}}}))
        time.sleep(0.01)
    assert sorted(runfiles.current_metrics(tmp_path)) == ["able", "rable"]
    (tmp_path / "metrics-able.json").write_text(json.dumps(
        {"method": "able", "params": {**shared, "EPOCHS": 2, "train": {}}}))
    assert sorted(runfiles.current_metrics(tmp_path)) == ["able"]  # still compared
