"""+drs: dynamic re-sampling by the learner's current labels (rable_nb/methods/drs.py)."""
import numpy as np
import pytest
import torch

from rable_nb.parts import candidates
from rable_nb.engine import engine
from rable_nb import methods
from rable_nb.methods.drs import balanced_weights, draw


def test_hard_weights_give_every_current_class_the_same_mass():
    # 6 images currently in class 0, 3 in class 1, 1 in class 2 (one-hot-ish confidences)
    hard = torch.tensor([0] * 6 + [1] * 3 + [2])
    scores = torch.eye(4)[hard] * 0.7 + 0.075      # rows sum to 1, argmax = hard
    w = balanced_weights(scores, 1.0)
    mass = [w[hard == c].sum() / w.sum() for c in range(3)]
    assert torch.allclose(torch.stack(mass), torch.full((3,), 1 / 3))
    assert torch.allclose(balanced_weights(scores, 0.0), torch.ones(10))   # power 0: none
    half = balanced_weights(scores, 0.5)                                   # square root
    assert torch.allclose(half[hard == 0][0] / half[hard == 2][0], torch.tensor(6 ** -0.5))


def test_soft_weights_balance_the_expected_counts():
    g = torch.Generator().manual_seed(0)
    scores = torch.softmax(torch.randn(200, 5, generator=g) * 3, 1)
    w = balanced_weights(scores, 1.0, "soft")
    mass = (w[:, None] * scores).sum(0) / w.sum()   # expected share of class c in a draw
    counts = scores.sum(0)
    # each image's weight spreads over its classes: the mass of class c is Σ_i w_i S_ic;
    # with w_i = Σ_c S_ic / n_c it equals 1/C exactly when the scores are one-hot; here it is
    # closer to balanced than the data (ratio of extremes shrinks)
    assert (mass.max() / mass.min()) < (counts.max() / counts.min())
    assert torch.allclose(balanced_weights(torch.eye(3)[[0, 0, 1]], 1.0, "soft"),
                          torch.tensor([0.5, 0.5, 1.0]))


def test_draw_follows_the_weights_and_repeats_with_the_seed():
    w = torch.tensor([1.0, 0.0, 3.0, 6.0])
    idx = draw(w, 100_000, torch.Generator().manual_seed(1))
    freq = torch.bincount(idx, minlength=4).double() / len(idx)
    assert freq[1] == 0                                          # weight 0: never drawn
    assert torch.allclose(freq, w.double() / w.sum(), atol=0.01)
    again = draw(w, 100_000, torch.Generator().manual_seed(1))
    assert torch.equal(idx, again)


def long_tail(n_per=(60, 30, 12, 6), seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(n_per)), n_per)
    x = rng.integers(0, 256, (len(y), 8, 8, 3), dtype=np.uint8)
    return x, candidates.uniform_candidates(y, len(n_per), 0.3, seed), y


def orders(name, epochs=3, **params):
    """The sample order of each epoch of a trainer of ``name`` (recorded from run_step)."""
    x, cand, y = long_tail()
    cfg = engine.TrainConfig(method=name, arch="tiny_cnn", epochs=epochs, batch_size=12,
                             num_classes=4, method_params={"drs": params} if params else {})
    tr = engine.Trainer(cfg, x, cand, y, "cpu")
    seen, run = [], tr.run_step

    def recording(idx, gen, s=0):
        seen[-1].append(idx.clone())
        return run(idx, gen, s)
    tr.run_step = recording
    for _ in range(epochs):
        seen.append([])
        tr.train_epoch(progress=False)
    return tr, [torch.cat(o) for o in seen], y


def test_supervised_drs_draws_the_classes_balanced_after_the_start_epoch():
    tr, seen, y = orders("supervised+drs", epochs=2, start=1)
    n = len(y) // 12 * 12
    assert len(set(seen[0].tolist())) == n          # epoch 0: a plain shuffle (no repeats)
    share = np.bincount(y[seen[1].numpy()], minlength=4) / n
    assert share[3] > 0.15 and share[0] < 0.4       # 6 of 108 images (5.6 %) → about 25 %
    assert len(set(seen[1].tolist())) < n            # drawn with replacement


def test_pll_drs_follows_the_confidences_not_the_truth(monkeypatch):
    """The weights come from the base's class_scores (the confidences), read each epoch."""
    x, cand, y = long_tail()
    cfg = engine.TrainConfig(method="proden+drs", arch="tiny_cnn", epochs=2, batch_size=12,
                             num_classes=4, method_params={"drs": {"start": 0}})
    tr = engine.Trainer(cfg, x, cand, y, "cpu")
    fake = torch.zeros(len(y), 4)
    fake[:, 1] = 1                               # the learner puts everything in class 1 ...
    fake[:5, 1], fake[:5, 2] = 0, 1              # ... but the first 5 images in class 2
    monkeypatch.setattr(type(tr.method.base), "class_scores", lambda self, trainer: fake)
    order = tr.method.epoch_order(tr, 0, torch.Generator().manual_seed(0))
    assert (order < 5).float().mean().item() == pytest.approx(0.5, abs=0.12)


def test_drs_resumes_with_the_same_draws(tmp_path):
    x, cand, y = long_tail()
    cfg = engine.TrainConfig(method="proden+drs", arch="tiny_cnn", epochs=3, batch_size=12,
                             num_classes=4, method_params={"drs": {"start": 0}})
    data = dict(train_x=x, candidates=cand, labels=y, test_x=x[:20], test_y=y[:20],
                class_counts=np.bincount(y))
    whole = engine.train(cfg, data, tmp_path / "a", "cpu", progress=False)
    engine.train(cfg, data, tmp_path / "b", "cpu", progress=False, stop_after=1)
    resumed = engine.train(cfg, data, tmp_path / "b", "cpu", progress=False)
    assert resumed["resumed"]
    assert torch.equal(whole["trainer"].conf, resumed["trainer"].conf)
    assert whole["final"]["overall"] == resumed["final"]["overall"]


@pytest.mark.parametrize("params, message", [({"power": 3}, "drs.power"),
                                             ({"start": -1}, "drs.start"),
                                             ({"labels": "argmax"}, "drs.labels")])
def test_drs_parameters_have_rules(params, message):
    with pytest.raises(ValueError, match=message):
        engine.TrainConfig(method="corr+la+drs", method_params={"drs": params})


def test_drs_composes_with_every_base():
    names = methods.names()
    for base in methods.BASES:
        assert f"{base}+drs" in names
    assert {"corr+records+mixup+drs", "solar+la+drs", "able+records+drs"} <= set(names)


def test_a_copy_drops_out_when_its_source_leaves_its_class():
    # rows 0-2 real; rows 3-5 copies of rows 0, 1, 2 labelled class 0 at the warm-up
    conf = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4],
                         [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    source = torch.tensor([-1, -1, -1, 0, 1, 2])
    from rable_nb.methods.drs import tied_scores
    hard = tied_scores(conf, source, "hard")
    assert torch.equal(hard[3:], torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(hard[:3], conf[:3])
    w = balanced_weights(hard, 1.0)
    assert w[4] == 0                                  # row 1 moved to class 1: its copy is out
    assert w[0] == w[3] == pytest.approx(1 / 4)       # class 0: rows 0, 2 and their copies
    assert w[1] == pytest.approx(1.0)                 # class 1: row 1 alone
    soft = tied_scores(conf, source, "soft")
    assert torch.allclose(soft[3:, 0], torch.tensor([0.9, 0.2, 0.6]))


def test_stage_04_ties_copies_to_their_sources():
    """prepare_data hands the trainer each copy's source row from the manifest (−1 for the
    real images and for samples made from no one image)."""
    from rable_nb.stages import s04_training as training
    rows = [{"label": 0, "source": 3}, {"label": 1}, {"label": 1, "source": 0}]
    assert training.sources(5, rows).tolist() == [-1] * 5 + [3, -1, 0]
    assert training.sources(5, [{"label": 0}]) is None


@pytest.mark.parametrize("name, labels", [("rable+drs", "hard"), ("supervised+drs", "soft")])
def test_the_draws_and_the_dynamic_top_up_read_nothing_back(monkeypatch, name, labels):
    """+drs's names are left out of test_host_sync (one draw per epoch, before the steps)."""
    from test_host_sync import epoch_guard
    x, cand, y = long_tail()
    source = np.r_[np.full(len(y) - 6, -1), np.arange(6)]   # the last 6 "copies" of rows 0-5
    cfg = engine.TrainConfig(method=name, arch="tiny_cnn", epochs=1, batch_size=12,
                             num_classes=4,
                             method_params={"drs": {"start": 0, "labels": labels}})
    tr = engine.Trainer(cfg, x, cand, y, "cpu", source=source)
    with epoch_guard(monkeypatch) as guard:
        tr.train_epoch(progress=False)
    assert guard.host_reads == [] and guard.ops > 0
