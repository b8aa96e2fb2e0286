"""The ``feature`` backend, method ``rable-feature`` and ``SYNTH_WEIGHT``: fit → top-up →
exact counts → resume after an interruption; a split fit equals an uninterrupted one;
pseudo conditioning never reads the hidden labels; the feature audit on a planted case;
weights enter the loss as specified (weight 0 = real data only); the head fine-tuning keeps
the backbone frozen; notebooks 03-04 end to end with the generator recorded."""
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from rable_nb.parts import audit, candidates, conditioning
from rable_nb.engine import backbone, engine
from rable_nb import generators, methods
from rable_nb.rundir import jsonl, runfiles
from rable_nb.data import longtail
from rable_nb.stages import s03_rebalance as rebalance, s04_training as training
from rable_nb.generators import feature
from test_conditioning import conditioning_settings
from rable_nb.methods import Outputs
from rable_nb.engine.networks import PLLNet

CLASSES = ("cat", "dog", "frog")
COUNTS = [9, 6, 3]  # target 8 → 0, 2 and 5 synthetic features
LABELS = np.repeat(np.arange(3), COUNTS)
TARGET, PLANNED = 8, {1: 2, 2: 5}
FAST = dict(SEED=0, DEVICE="cpu", TARGET_PER_CLASS=TARGET, FEATURE_HIDDEN=16, FEATURE_DEPTH=1,
            FEATURE_STEPS=4, FEATURE_BATCH=8, FEATURE_CHECKPOINT_EVERY=2, FEATURE_SAMPLE_STEPS=3)
PARAMS = {**rebalance.PROFILE_DEFAULTS["smoke"], **FAST, "GENERATOR": "feature"}


class Stop(Exception):
    pass


def features(n=len(LABELS), dim=6, seed=0):
    """Non-negative class-shifted vectors, like post-ReLU backbone features."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.normal(size=(n, dim)) + LABELS[:n, None], 0).astype(np.float32)


def fit_and_top_up(run_dir, on_image=None, **params):
    gen = generators.get("feature")
    assert gen.fit(features(), LABELS, COUNTS, {**PARAMS, **params}, run_dir)["done"]
    settings = rebalance.topup_settings(gen, {**PARAMS, **params},
                                         {"gen_labels": "oracle", "sha1": "test"})
    return generators.top_up(run_dir, gen, generators.topup_plan(COUNTS, TARGET), CLASSES,
                             settings, batch_size=3, on_image=on_image)


def manifest(run_dir):
    return jsonl.read(run_dir / "synthetic" / "manifest.jsonl", repair=False)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_feature_backend_tops_up_exactly_and_resumes_without_duplicates(tmp_path, sampler):
    run, seen = tmp_path / "run", []

    def stop_after_4(row):
        seen.append(row)
        if len(seen) == 4:
            raise Stop
    with pytest.raises(Stop):  # batches of 3: dog [0, 1], frog [0, 1, 2] [3, 4]
        fit_and_top_up(run, stop_after_4, FEATURE_SAMPLER=sampler)
    out = run / "synthetic"
    assert len(manifest(run)) == 5
    np.save(out / "frog" / "frog_00004.npy", np.zeros(6))  # a file without its line
    with open(out / "manifest.jsonl", "a") as f:           # and a torn last line
        f.write('{"file": "frog/frog_00003.npy", "lab')
    stats = fit_and_top_up(run, FEATURE_SAMPLER=sampler)
    assert stats["generated"] == 2 and stats["skipped"] == 5
    rows = manifest(run)
    files = [r["file"] for r in rows]
    assert len(files) == len(set(files)) == 7 and Counter(r["label"] for r in rows) == PLANNED
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.npy")) == sorted(files)
    assert all(r["generator"] == "feature" and r["cond_labels"] == "oracle" for r in rows)
    assert all(r["model_id"].startswith("generator/feature.safetensors@") for r in rows)
    x, y, _ = runfiles.load_synthetic(run)
    assert x.shape == (7, 6) and x.dtype == np.float32 and np.isfinite(x).all()
    real = features()
    assert (x >= real.min(0) - 1e-6).all() and (x <= real.max(0) + 1e-6).all()  # clamped
    fit_and_top_up(tmp_path / "fresh", FEATURE_SAMPLER=sampler)  # one uninterrupted run
    fresh, _, fresh_rows = runfiles.load_synthetic(tmp_path / "fresh")
    key = lambda r: (r["file"], r["seed"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, fresh_rows))
    np.testing.assert_allclose(x[np.argsort(files)],
                               fresh[np.argsort([r["file"] for r in fresh_rows])], atol=1e-5)
    assert runfiles.synthetic_space(run) == "feature"


def test_a_sample_depends_on_its_seed_only_and_a_split_fit_equals_a_whole_one(tmp_path):
    whole = generators.get("feature")
    assert whole.fit(features(), LABELS, COUNTS, PARAMS, tmp_path / "a")["done"]
    part = generators.get("feature")
    first = part.fit(features(), LABELS, COUNTS, {**PARAMS, "GEN_STOP_AFTER": 2}, tmp_path / "b")
    assert not first["done"] and first["steps"] == 2
    rest = part.fit(features(), LABELS, COUNTS, PARAMS, tmp_path / "b")
    assert rest["done"] and rest["resumed"] and rest["steps_this_call"] == 2
    a, b = whole.model.state_dict(), part.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = generators.get("feature")  # a finished fit is loaded, not retrained
    assert again.fit(features(), LABELS, COUNTS, PARAMS, tmp_path / "a")["loaded"]
    for sampler in feature.SAMPLERS:
        again.p["FEATURE_SAMPLER"] = sampler
        three, _ = again.generate(2, [11, 12, 13])
        two, _ = again.generate(2, [13, 11])  # other batch, other order: same samples
        np.testing.assert_allclose(two, three[[2, 0]], atol=1e-5)
    with pytest.raises(ValueError, match="feature vectors"):
        generators.get("feature").fit(np.zeros((18, 32, 32, 3), np.uint8), LABELS, COUNTS,
                                      PARAMS, tmp_path / "c")


def test_validate_rejects_bad_feature_parameters():
    for name, bad in [("FEATURE_SAMPLER", "dpm"), ("FEATURE_SAMPLE_STEPS", 1001),
                      ("FEATURE_HIDDEN", 4), ("FEATURE_BALANCE", 1.5), ("FEATURE_EMA", 1)]:
        with pytest.raises(ValueError, match=name):
            generators.validate({name: bad})
    with pytest.raises(ValueError, match="SYNTH_WEIGHT"):
        training.validate({"SYNTH_WEIGHT": -1})


WARMUP = dict(WARMUP_ARCH="tiny_cnn", WARMUP_EPOCHS=1, WARMUP_BATCH=32, WARMUP_LR=0.01)


def test_pseudo_conditioned_features_never_read_the_hidden_labels(small_long_tail, tmp_path,
                                                                  monkeypatch):
    """The whole chain — warm-up, backbone features, fit, top-up — gives the same samples
    when the hidden labels are shuffled."""
    cifar, ds, x = small_long_tail
    P = {**PARAMS, **WARMUP, "TARGET_PER_CLASS": 12}
    outputs = []
    for name, labels in (("a", ds["labels"]),
                         ("b", np.random.default_rng(1).permutation(ds["labels"]))):
        monkeypatch.setenv("RABLE_CACHE", str(tmp_path / f"cache-{name}"))  # warm up twice
        run = tmp_path / name
        gen = generators.get("feature")
        cond, net, info = conditioning.cond_labels(
            {**ds, "labels": labels}, x, cifar, conditioning_settings("pseudo", P), "cpu",
            need_net=True)
        fit_x = gen.fit_inputs(x, net, run, info["warmup"])
        assert fit_x.shape == (len(x), net.backbone.feat_dim)
        gen.fit(fit_x, cond, np.bincount(cond, minlength=10), P, run)
        plan = generators.topup_plan(np.bincount(cond, minlength=10), 12)
        generators.top_up(run, gen, plan, cifar.classes,
                          rebalance.topup_settings(gen, P, info))
        outputs.append(runfiles.load_synthetic(run))
    (xa, ya, ra), (xb, yb, rb) = outputs
    assert len(ra) > 0 and (ya == yb).all() and (xa == xb).all()
    assert [(r["file"], r["seed"]) for r in ra] == [(r["file"], r["seed"]) for r in rb]
    # oracle conditioning still trains the warm-up: its network is the backbone
    labels, net, info = conditioning.cond_labels(ds, x, cifar, conditioning_settings("oracle", P),
                                                 "cpu",
                                                 need_net=True)
    assert (labels == ds["labels"]).all() and net is not None and "warmup" in info
    with pytest.raises(ValueError, match="backbone"):
        generators.get("feature").fit_inputs(x, None, tmp_path)
    assert generators.get("copy").fit_inputs(x, None, tmp_path) is x


def test_copied_training_features_are_fully_memorised(small_long_tail):
    cifar, ds, x = small_long_tail
    torch.manual_seed(0)
    net = PLLNet("tiny_cnn").eval()
    train_f = backbone.encode(net, x)
    test = longtail.balanced_subset(cifar.test_y, 10, 0)
    test_f = backbone.encode(net, cifar.test_x[test])
    rows = np.flatnonzero(ds["labels"] >= 7)              # "synthetic" = copies of rare ones
    result = audit.feature_audit(train_f[rows], ds["labels"][rows], train_f, ds["labels"],
                                 test_f, cifar.test_y[test], net.classifier, cifar.classes,
                                 device="cpu")
    assert [r["label"] for r in result["per_class"]] == [7, 8, 9]
    for r in result["per_class"]:
        assert r["memorisation"] == 1.0 and r["median_nn_distance"] == pytest.approx(0, abs=1e-5)
        assert r["fd_judge"] is not None and r["diversity"] > 0
    preds = net.classifier(torch.as_tensor(train_f[rows])).argmax(1).numpy()
    assert result["overall"]["judge_accuracy"] == pytest.approx((preds == ds["labels"][rows]).mean())
    json.dumps(result)


# -- SYNTH_WEIGHT and the head fine-tuning ---------------------------------------------------
def feature_trainer(f, cand, y, weight=None, method="rable-feature", batch=None):
    torch.manual_seed(0)
    init = PLLNet("tiny_cnn").state_dict()
    cfg = engine.TrainConfig(method=method, epochs=1, batch_size=batch or len(y), lr=0.1)
    return engine.Trainer(cfg, f, cand, y, "cpu", sample_weight=weight, init_weights=init)


def head_problem(n_real=24, n_synth=12, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n_real + n_synth)
    cand = candidates.uniform_candidates(y, 10, 0.3, seed)
    cand[n_real:] = np.eye(10, dtype=bool)[y[n_real:]]   # synthetic: exact labels
    return rng.normal(size=(len(y), 32)).astype(np.float32), cand, y


def test_synthetic_weight_zero_equals_training_on_the_real_features_only():
    f, cand, y = head_problem()
    weight = np.r_[np.ones(24), np.zeros(12)]
    mixed, real = feature_trainer(f, cand, y, weight), feature_trainer(f[:24], cand[:24], y[:24])
    rows = [t.train_epoch(progress=False) for t in (mixed, real)]  # one full-batch step each
    assert rows[0]["loss_cls"] == pytest.approx(rows[1]["loss_cls"], rel=1e-6)
    for a, b in zip(mixed.net.classifier.parameters(), real.net.classifier.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed.conf[:24], real.conf[:24])


def test_weights_enter_the_loss_as_a_weighted_mean_and_the_backbone_stays_frozen():
    f, cand, y = head_problem()
    w = np.r_[np.ones(24), np.full(12, 0.25)]
    tr = feature_trainer(f, cand, y, w)
    init = {k: v.clone() for k, v in tr.net.state_dict().items()}
    with torch.no_grad():  # what the epoch computes, by hand: confidences, then the loss
        logits = tr.net.classifier(torch.as_tensor(f))
        p = torch.softmax(logits, 1) * torch.as_tensor(cand)
        conf = p / p.sum(1, keepdim=True)
        per = -(conf * torch.log_softmax(logits, 1)).sum(1)
        expected = float((torch.as_tensor(w).float() * per).sum() / w.sum())
    row = tr.train_epoch(progress=False)
    assert row["loss_cls"] == pytest.approx(expected, rel=1e-5)
    now = tr.net.state_dict()
    frozen = [k for k in now if k.startswith(("backbone.", "head."))]
    assert frozen and all(torch.equal(now[k], init[k]) for k in frozen)
    assert not torch.equal(now["classifier.weight"], init["classifier.weight"])
    assert all(p.requires_grad for p in tr._parameters()) and len(tr._parameters()) == 2


def test_able_classification_loss_ignores_synthetic_images_at_weight_zero():
    """ABLE (``rable``): the classification term over the real images alone; the contrastive
    term weighs its anchors, synthetic images remain contrast partners."""
    torch.manual_seed(0)
    b, c = 8, 10
    cand = torch.rand(b, c) < 0.4
    cand[torch.arange(b), torch.arange(b) % c] = True
    conf = cand.float() / cand.float().sum(1, keepdim=True)
    logits = torch.randn(b, c)
    z = torch.nn.functional.normalize(torch.randn(2 * b, 16), dim=1)
    out = Outputs({"weak": logits}, {}, {"weak": z[:b], "strong": z[b:]})

    def losses(weight, rows):
        base = methods.build(engine.TrainConfig(method="rable")).base
        batch = methods.Batch(idx=torch.arange(len(rows)), x=None, cand=cand[rows],
                              conf=conf[rows], conf_table=conf, labels=None, weight=weight,
                              gen=None, epoch=0, step=0, stage="train", net=None, forward=None)
        sub = Outputs({"weak": logits[rows]}, {},
                      {"weak": out.proj["weak"][rows], "strong": out.proj["strong"][rows]})
        return base.losses(batch, sub, None)[1]
    everything, real = torch.arange(b), torch.arange(5)
    zero = losses(torch.tensor([1.0] * 5 + [0.0] * 3), everything)
    assert zero["loss_cls"] == pytest.approx(float(losses(None, real)["loss_cls"]), rel=1e-6)
    half = losses(torch.tensor([1.0] * 5 + [0.5] * 3), everything)
    per = -(conf * torch.log_softmax(logits, 1)).sum(1)
    assert float(half["loss_cls"]) == pytest.approx(float((per[:5].sum() + 0.5 * per[5:].sum())
                                                          / 6.5), rel=1e-6)


def test_rable_feature_steps_read_nothing_back_on_features(monkeypatch):
    from test_host_sync import epoch_guard
    f, cand, y = head_problem(40, 8)
    for name in ("rable-feature", "rable-feature+records+mixup"):
        tr = feature_trainer(f, cand, y, np.linspace(0.5, 1, len(y)), name, batch=16)
        with epoch_guard(monkeypatch) as guard:
            row = tr.train_epoch(progress=False)
        assert guard.host_reads == [] and np.isfinite(row["loss_cls"])


# -- notebooks 03 + 04 ----------------------------------------------------------------------
@pytest.mark.notebook
def test_notebooks_03_04_with_features_train_rable_feature_and_refuse_rable(
        run_notebooks, smoke_dataset_run, tmp_path):
    for name in ("dataset.npz", "dataset.json"):
        shutil.copy(smoke_dataset_run / name, tmp_path / name)
    # METHODS: default; issue 21's options on the way: rule, keep, centre filter, label sets
    run_notebooks("03,04", tmp_path, GENERATOR="feature", SYNTH_WEIGHT=0.5, LABEL_RULE="sinkhorn",
                  LABEL_KEEP=0.5, SYNTH_FILTER="centre", SYNTHETIC_LABELS="plausible")
    settings = runfiles.read_settings(tmp_path)
    assert settings["generator"] == "feature" and settings["cond_labels"] == "pseudo"
    assert settings["rule"] == {"LABEL_RULE": "sinkhorn", "LABEL_EPS": 0.1, "LABEL_KEEP": 0.5}
    assert settings["SYNTH_FILTER"] == "centre" and settings["SYNTH_FILTER_BAND"] == [0.05, 0.95]
    acc = settings["accuracy"]
    assert sum(acc["cond_counts"]) < sum(settings["assigned_counts"])  # the kept half
    assert "precision" in acc and "accuracy_confidence" in settings
    nb03 = (tmp_path / "03_generative_rebalancing.ipynb").read_text()
    assert "precision (sinkhorn)" in nb03 and "recall (confidence)" in nb03
    result = json.loads((tmp_path / "synthetic" / "audit.json").read_text())
    assert result["space"] == "feature" and result["generator"] == "feature"
    assert sum(r["n_synthetic"] for r in result["per_class"]) == len(manifest(tmp_path))
    assert (tmp_path / "fig-audit.png").stat().st_size > 10_000
    assert not (tmp_path / "fig-audit-closest.png").exists()
    m = json.loads((tmp_path / "metrics-rable-feature.json").read_text())
    assert m["params"]["GENERATOR"] == "feature" and m["params"]["GEN_LABELS"] == "pseudo"
    assert m["params"]["METHODS"] == ["able", "rable-feature"]
    assert m["params"]["SYNTH_WEIGHT"] == 0.5 and m["params"]["SYNTHETIC_LABELS"] == "plausible"
    assert m["n_synthetic"] == len(manifest(tmp_path)) > 0
    # the checkpoint is a whole network: the frozen backbone of notebook 03 + the new head
    from rable_nb.engine.networks import load_model
    model, _, _ = load_model(tmp_path / "checkpoints" / "rable-feature.safetensors")
    net, _ = backbone.load_backbone(tmp_path, "cpu")
    mine, theirs = model.state_dict(), net.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if k.startswith("backbone."))
    assert training.default_methods(tmp_path) == ["able", "rable-feature"]
    with pytest.raises(ValueError, match="'rable'.*holds backbone features.*use 'rable-feature'"):
        training.runnable_methods(["able", "rable"], tmp_path)


def test_rable_feature_is_refused_on_images(tmp_path):
    from test_training import write_synthetic
    write_synthetic(tmp_path)
    assert training.default_methods(tmp_path) == ["able", "rable"]
    with pytest.raises(ValueError, match="'rable-feature'.*GENERATOR='feature'"):
        training.runnable_methods(["rable-feature"], tmp_path)
    assert training.default_methods(tmp_path / "empty") == ["able", "rable"]


def test_bench_gen_feature_cli_prints_json(capsys):
    from rable_nb.commands import cli
    assert cli.main(["bench", "gen", "--generator", "feature", "--device", "cpu",
                     "--batch-size", "8"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["generator"] == "feature" and r["feature_dim"] == 32 and r["parameters"] > 0
    assert r["train_features_per_s"] > 0 and r["sample_features_per_s"] > 0
    assert r["projected_topup_s"] == pytest.approx(37594 / r["sample_features_per_s"], rel=1e-2)


def test_the_filter_and_partial_labels_of_synthetic_features():
    class Net(torch.nn.Module):  # what class_filter reads: the classifier head
        def __init__(self):
            super().__init__()
            self.classifier = torch.nn.Linear(6, 3)
    net = Net()
    f = features()
    accept = conditioning.class_filter(net)
    expected = net.classifier(torch.as_tensor(f)).argmax(1).numpy()
    for label in range(3):
        assert (accept(f, label) == (expected == label)).all()
    from types import SimpleNamespace
    cifar = SimpleNamespace(num_classes=3)
    exact = training.synthetic_candidates(LABELS, {"PARTIAL": "instance"}, "exact", cifar, f)
    assert (exact == np.eye(3, dtype=bool)[LABELS]).all()
    with pytest.raises(ValueError, match="SYNTHETIC_LABELS='exact'"):
        training.synthetic_candidates(LABELS, {"PARTIAL": "instance"}, "partial", cifar, f)
    uniform = training.synthetic_candidates(LABELS, {"PARTIAL": "uniform", "Q": 0.5}, "partial",
                                            cifar, f)
    assert uniform[np.arange(len(LABELS)), LABELS].all()
