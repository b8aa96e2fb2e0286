"""ABLE loss math against direct per-sample loops, the confidence update by hand,
the faithful_bug switch and the RECORDS helpers (augmentations: test_augment.py)."""
import math

import numpy as np
import pytest
import torch

from rable_nb.engine import engine
from rable_nb.methods import _losses as losses
from rable_nb.methods import able, records


def random_batch(b=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cand = torch.rand(b, c, generator=g) < 0.5
    cand[torch.arange(b), torch.randint(0, c, (b,), generator=g)] = True
    conf = torch.rand(b, c, generator=g) * cand
    conf = conf / conf.sum(1, keepdim=True)
    probs = torch.softmax(torch.randn(b, c, generator=g), 1)
    z = torch.nn.functional.normalize(torch.randn(2 * b, 5, generator=g), dim=1)
    return cand, conf, probs, z


def loop_weights(cand, conf, probs):
    b = len(cand)
    yhat = [max(range(cand.shape[1]), key=lambda j: float(probs[k, j] * cand[k, j]))
            for k in range(b)]
    n = {j: yhat.count(j) for j in set(yhat)}
    m = torch.zeros(2 * b, 2 * b)
    for a in range(2 * b):
        for o in range(2 * b):
            if a != o:
                j = yhat[o % b]
                m[a, o] = float(cand[a % b, j]) * float(conf[a % b, j]) / n[j]
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_matrix_matches_per_sample_loop(seed):
    cand, conf, probs, _ = random_batch(seed=seed)
    got = able.ambiguity_weights(cand, conf, probs)
    assert torch.allclose(got, loop_weights(cand, conf, probs), atol=1e-6)
    assert torch.all(got.diagonal() == 0)
    assert got.sum() > 0


@pytest.mark.parametrize("seed", [0, 3])
def test_contrastive_loss_matches_per_sample_loop(seed):
    cand, conf, probs, z = random_batch(seed=seed)
    m = loop_weights(cand, conf, probs)
    tau, total = 0.1, 0.0
    for a in range(len(z)):
        sims = {c: float(z[a] @ z[c]) / tau for c in range(len(z)) if c != a}
        log_den = math.log(sum(math.exp(s) for s in sims.values()))
        total += -(tau / 0.07) * sum(float(m[a, b]) * (sims[b] - log_den) for b in sims)
    expected = total / len(z)
    got = able.contrastive_loss(z, able.ambiguity_weights(cand, conf, probs), tau=tau)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_confidence_update_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    cand = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    got = losses.updated_confidence(probs, cand)
    expected = torch.tensor([[0.5 / 0.7, 0.0, 0.2 / 0.7], [0.0, 0.6 / 0.9, 0.3 / 0.9]])
    assert torch.allclose(got, expected)
    assert torch.allclose(losses.uniform_confidence(cand),
                          torch.tensor([[0.5, 0, 0.5], [0, 0.5, 0.5]]))


def test_soft_cross_entropy_reduces_to_cross_entropy_on_one_hot():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 2, 2])
    onehot = torch.nn.functional.one_hot(y, 4).float()
    assert losses.soft_cross_entropy(logits, onehot).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)


def test_records_prior_and_update():
    lin = torch.nn.Linear(3, 4)
    mean = records.momentum_mean(torch.zeros(3), torch.ones(8, 3), m=0.9)
    assert torch.allclose(mean, torch.full((3,), 0.1))
    prior = losses.classifier_log_prior(lin, mean)
    assert prior.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(prior, torch.log_softmax(lin(mean), 0).detach())


def _trainer(faithful_bug):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 64)
    cand = rng.random((64, 10)) < 0.5
    cand[np.arange(64), y] = True
    cfg = engine.TrainConfig(method="able", batch_size=16,
                             method_params={"able": {"faithful_bug": faithful_bug}})
    tr = engine.Trainer(cfg, x, cand, y, "cpu")
    scores = torch.rand(64, 10, generator=torch.Generator().manual_seed(1))
    tr.conf = losses.updated_confidence(scores, tr.cand)
    return tr


@pytest.mark.parametrize("start, differs", [(0, False), (16, True)])
def test_faithful_bug_uses_batch_positions(start, differs):
    results = []
    for bug in (False, True):
        tr = _trainer(bug)
        idx = torch.arange(start, start + 16)
        results.append(tr.step(idx, tr.epoch_generator(0))["loss_cont"].item())
    assert (results[0] != results[1]) is differs

