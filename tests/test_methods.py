"""Methods registry and the loss of every method against a direct per-sample computation
on random data; Sinkhorn marginals; mixup, logit adjustment and RECORDS plumbing."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rable_nb import config, methods
from rable_nb.engine import engine, networks
from rable_nb.stages import s04_training as training
from rable_nb.methods import corr, mixup, solar

B, C, D = 12, 5, 6


class StubNet(torch.nn.Module):
    """A linear 'network' on raw pixels: features = x·W (then BatchNorm with ``bn``),
    logits = classifier(features). ``forward`` is the trainer's (``rows``: see
    ``networks.batch_statistics_of``)."""

    def __init__(self, seed=0, bn=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(3 * 4 * 4, D, generator=g) / 8
        self.norm = torch.nn.BatchNorm1d(D) if bn else None
        self.classifier = torch.nn.Linear(D, C)
        self.backbone = SimpleNamespace(feat_dim=D)
        torch.nn.init.normal_(self.classifier.weight, generator=g)
        torch.nn.init.normal_(self.classifier.bias, generator=g)

    def features(self, images):
        feats = images.flatten(1) @ self.w
        return feats if self.norm is None else self.norm(feats)

    def forward(self, inputs, need="logits", rows=None):
        names = list(inputs)
        with networks.batch_statistics_of(self, rows):
            feats = self.features(torch.cat([inputs[n] for n in names]))
        logits = self.classifier(feats)
        sizes = [len(inputs[n]) for n in names]
        proj = F.normalize(feats, dim=1)
        return methods.Outputs(*(dict(zip(names, t.split(sizes))) for t in (logits, feats, proj)))


def make(name, epoch=3, weight=None, seed=0, bn=False, **cfg):
    """(method, batch, net) on random data: B images of 3×4×4 pixels, C classes."""
    g = torch.Generator().manual_seed(seed)
    cand = torch.rand(B, C, generator=g) < 0.4
    labels = torch.randint(0, C, (B,), generator=g)
    cand[torch.arange(B), labels] = True
    conf = torch.rand(B, C, generator=g) * cand
    conf = conf / conf.sum(1, keepdim=True)
    tcfg = engine.TrainConfig(method=name, num_classes=C, batch_size=B, epochs=800, **cfg)
    method = methods.build(tcfg)
    net = StubNet(seed, bn)
    trainer = SimpleNamespace(dev=torch.device("cpu"), net=net, conf=conf, cand=cand,
                              labels=labels, method=method)
    method.init_state(trainer)
    x = torch.rand(B, 3, 4, 4, generator=g)
    batch = methods.Batch(idx=torch.arange(B), x=x, cand=cand, conf=conf.clone(),
                          conf_table=conf, labels=labels, weight=weight, gen=g, epoch=epoch,
                          step=0, stage="train", net=net, forward=net,
                          schedule=method.schedule(epoch, 0))
    # fixed "augmentations" so that expected values can be recomputed outside the method
    batch._views = {"weak": x.flip(3), "strong": 1 - x}
    return method, batch, net, trainer


def logits_of(net, images):
    return net.classifier(net.features(images))


# -- registry ------------------------------------------------------------------------------
def test_names_cover_the_published_combinations():
    names = methods.names()
    for name in ("able", "able+records", "proden", "supervised", "rable", "corr",
                 "corr+records", "corr+records+mixup", "able+records+mixup", "solar",
                 "solar+mixup", "solar+la+mixup", "proden+la", "supervised+la+mixup"):
        assert name in names
    for name in ("solar+records", "supervised+records", "corr+records+la"):
        assert name not in names
    assert training.METHODS == tuple(names)


@pytest.mark.parametrize("name, message", [
    ("pico", "unknown base method 'pico'"),
    ("corr+mixup+records", "write 'corr+records+mixup'"),
    ("corr+records+records", "write 'corr+records'"),
    ("corr+cutmix", "unknown modifier"),
    ("supervised+records", "no confidence update"),
    ("solar+records", "no confidence update"),
    ("able+records+la", "rebalance the same logits"),
])
def test_invalid_names_get_one_clear_error(name, message):
    with pytest.raises(ValueError, match="METHODS=") as err:
        training.validate({"METHODS": ["able", name]})
    assert message in str(err.value) and "Valid names" in str(err.value)


def test_method_params_defaults_overrides_and_errors():
    cfg = engine.TrainConfig(method="solar+mixup", epochs=800)
    assert cfg.method_params["solar"]["est_epochs"] == 100      # the paper's 100 of 800
    assert cfg.method_params["solar"]["warmup_epochs"] == 50
    assert cfg.method_params["mixup"] == {"weight": 1.0, "alpha": 4.0}
    short = engine.TrainConfig(method="solar", epochs=16,
                                 method_params={"solar": {"lamd": 5.0}, "corr": {"upd_start": 2}})
    assert short.method_params == {"solar": {**solar.Solar.params, "lamd": 5.0,
                                             "est_epochs": 2, "warmup_epochs": 1}}
    with pytest.raises(ValueError, match="unknown parameter"):
        engine.TrainConfig(method="corr", method_params={"corr": {"upd_begin": 2}})
    with pytest.raises(ValueError, match="unknown piece"):
        engine.TrainConfig(method="corr", method_params={"cor": {}})
    with pytest.raises(ValueError, match="METHOD_PARAMS"):
        training.validate({"METHODS": ["corr"], "METHOD_PARAMS": [1]})
    with pytest.raises(ValueError, match=r"mixup.alpha must be a whole number >= 1"):
        engine.TrainConfig(method="proden+mixup", method_params={"mixup": {"alpha": 0.4}})
    able = engine.TrainConfig(method="rable+records", method_params={"rable": {"tau": 0.2}})
    assert able.method_params["rable"]["tau"] == 0.2 and able.method_params["records"] == {"m": 0.9}
    P = {"METHOD_PARAMS": {"ssp": {"lr": 0.05}}, "SSP_EPOCHS": 7, "FAITHFUL_BUG": True}
    assert training.method_params(P)["ssp"] == {"lr": 0.05, "epochs": 7, "faithful_bug": True}


# -- bases against per-sample loops ---------------------------------------------------------
def test_proden_loss_and_update_per_sample():
    method, batch, net, _ = make("proden")
    loss, terms, new = method.step(batch)
    logits = logits_of(net, batch.view("weak")).detach()
    expected, rows = 0.0, []
    for i in range(B):
        p = torch.softmax(logits[i], 0)
        expected += -sum(float(batch.conf[i, j]) * math.log(float(p[j])) for j in range(C)) / B
        s = [float(p[j]) if batch.cand[i, j] else 0.0 for j in range(C)]
        rows.append([v / sum(s) for v in s])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(new, torch.tensor(rows), atol=1e-6)


def corr_by_hand(lw, ls, targets):
    neg = cons = 0.0
    for i in range(len(targets)):
        for logits in (lw[i], ls[i]):
            p = torch.softmax(logits, 0)
            for j in range(C):
                t = float(targets[i, j])
                if t == 0:
                    neg += -math.log(abs(1 - float(p[j])) + 1e-9)
                else:
                    cons += t * (math.log(t) - math.log(float(p[j])))
    return neg / len(targets), cons / len(targets)


def test_corr_loss_and_update_per_sample():
    method, batch, net, _ = make("corr", epoch=1)
    loss, terms, new = method.step(batch)
    lw = logits_of(net, batch.view("weak")).detach()
    ls = logits_of(net, batch.view("strong")).detach()
    neg, cons = corr_by_hand(lw, ls, batch.conf)
    assert terms["loss_neg"].item() == pytest.approx(neg, rel=1e-5)
    assert terms["loss_cls"].item() == pytest.approx(cons, rel=1e-5)
    assert loss.item() == pytest.approx(neg + cons, rel=1e-5)
    for i in range(B):
        pw, ps = torch.softmax(lw[i], 0), torch.softmax(ls[i], 0)
        s = [math.sqrt(float(pw[j] * ps[j])) if batch.cand[i, j] else 0.0 for j in range(C)]
        assert new[i].tolist() == pytest.approx([v / sum(s) for v in s], abs=1e-6)
    first_epoch = make("corr", epoch=0)
    assert first_epoch[0].step(first_epoch[1])[2] is None     # updates start at epoch 1


def test_plain_corr_update_normalises_twice_where_the_reference_normalises_once():
    """A documented difference: the reference's plain CORR computes
    sqrt(Y p^w p^s) / (Σ + 1e-9), its RECORDS variant (and every variant here) normalises
    before the square root too. Equal on ordinary rows; on rows whose candidates have tiny
    probability the reference's rows sum to less than 1; the argmax never changes."""
    g = torch.Generator().manual_seed(0)
    n = 200
    cand = torch.rand(n, 10, generator=g) < 0.3
    cand[:, 0] = False
    cand[torch.arange(n), torch.randint(1, 10, (n,), generator=g)] = True
    for boost, differs in ((0.0, False), (15.0, True)):   # boost: a non-candidate's logit
        lw, ls = torch.randn(n, 10, generator=g), torch.randn(n, 10, generator=g)
        lw[:, 0] += boost
        ls[:, 0] += boost
        ours = corr.corr_confidence(lw, ls, cand)
        p = F.softmax(lw, 1) * F.softmax(ls, 1) * cand
        twice = p / (p.sum(1, keepdim=True) + 1e-9)
        assert torch.allclose(ours, twice.sqrt() / (twice.sqrt().sum(1, keepdim=True) + 1e-9))
        assert torch.allclose(ours.sum(1), torch.ones(n), atol=1e-5)
        once = p.sqrt() / (p.sqrt().sum(1, keepdim=True) + 1e-9)      # CORR_loss
        assert ((ours - once).abs().max() > 1e-3) == differs
        assert torch.equal(ours.argmax(1), once.argmax(1))
    assert "normalises twice" in corr.__doc__                        # on record


def test_supervised_loss_is_cross_entropy_on_true_labels():
    method, batch, net, _ = make("supervised")
    loss, _, new = method.step(batch)
    logits = logits_of(net, batch.view("weak"))
    assert new is None
    assert loss.item() == pytest.approx(F.cross_entropy(logits, batch.labels).item(), rel=1e-6)


def official_sinkhorn(cost, prior, lamd=3.0, iters=50):
    """The reference algorithm in float64 on the raw kernel (hbzju/SoLar utils_algo.py)."""
    ps = cost.double().T ** lamd                  # K×N
    n = ps.shape[1]
    c = torch.full((n, 1), 1.0 / n, dtype=torch.float64)
    r_init = prior.double()[:, None]
    for _ in range(iters):
        r = r_init / (ps @ c)
        c = (1.0 / n) / (r.T @ ps).T
    return (ps * c.squeeze() * r).T * n


def test_solar_loss_per_sample():
    method, batch, net, _ = make("solar", epoch=60)           # after the 50-epoch warm-up
    prior = torch.tensor([0.4, 0.25, 0.15, 0.12, 0.08])
    method.base.prior = prior.clone()
    loss, terms, new = method.step(batch)
    lw = logits_of(net, batch.view("weak")).detach().double()
    ls = logits_of(net, batch.view("strong")).detach().double()
    p = torch.softmax(lw, 1)
    pseudo = official_sinkhorn(p * batch.cand, prior)
    sink = [-(pseudo[i] * torch.log_softmax(lw[i], 0)).sum().item() for i in range(B)]
    rn = [-(batch.conf[i].double() * torch.log_softmax(lw[i], 0)).sum().item() for i in range(B)]
    cls = pseudo.argmax(1).tolist()
    chosen = set()
    for j in range(C):                                       # the reference's per-class loop
        members = [i for i in range(B) if cls[i] == j]
        if members:
            quota = max(min(math.ceil(B * float(prior[j]) * 0.6), len(members)), 1)
            chosen |= set(sorted(members, key=lambda i: sink[i])[:quota])
    chosen |= {i for i in range(B) if float((pseudo[i] * p[i]).sum()) > 0.99}
    others = [i for i in range(B) if i not in chosen]
    cons = [-(pseudo[i] * torch.log_softmax(ls[i], 0)).sum().item() for i in chosen]
    expected = (0.9 * (np.mean([sink[i] for i in chosen]) + np.mean(cons))
                + 0.1 * (np.mean([rn[i] for i in others]) if others else 0.0))
    assert terms["selected"].item() == pytest.approx(len(chosen) / B)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert torch.allclose(new, (p * batch.cand / (p * batch.cand).sum(1, keepdim=True)).float(),
                          atol=1e-6)


def test_solar_first_epoch_trains_on_confidences_only():
    method, batch, net, _ = make("solar", epoch=0)
    loss, terms, _ = method.step(batch)
    assert loss.item() == pytest.approx(terms["loss_cls"].item())
    assert "loss_cons" not in terms


# -- Sinkhorn ---------------------------------------------------------------------------------
def test_sinkhorn_marginals_and_zeros():
    g = torch.Generator().manual_seed(0)
    n = 400
    probs = torch.softmax(torch.randn(n, C, generator=g), 1)
    mask = torch.rand(n, C, generator=g) < 0.7
    mask[torch.arange(n), torch.randint(0, C, (n,), generator=g)] = True
    prior = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08])
    plan = solar.sinkhorn(probs * mask, prior, lamd=3.0, iters=2000)
    assert torch.allclose(plan.sum(1), torch.ones(n), atol=1e-5)          # sample marginals
    assert torch.allclose(plan.sum(0) / n, prior, atol=1e-3)              # class marginals
    assert torch.all(plan[~mask] == 0)                                     # non-candidates
    short = solar.sinkhorn(probs * mask, prior)                            # 50 iterations
    assert torch.allclose(short.sum(1), torch.ones(n), atol=1e-5)
    reference = official_sinkhorn(probs * mask, prior)
    assert torch.allclose(short.double(), reference, atol=1e-4)
    tiny = probs * mask
    tiny[:5] *= 1e-12                     # kernel rows below fp32's normal range (cost³ < 1e-30)
    guarded = solar.sinkhorn(tiny, prior)
    assert torch.isfinite(guarded).all() and torch.allclose(guarded.sum(1), torch.ones(n), atol=1e-5)
    converged = solar.sinkhorn(tiny, prior, iters=2000)
    assert torch.equal(guarded[:5].argmax(1), converged[:5].argmax(1))


def official_sinkhorn_fp32(cost, prior, lamd=3.0, iters=50):
    """The reference loop as it runs (fp32, raw kernel) and whether every denominator
    stayed a normal fp32 number (else the reference computes with subnormals or NaN)."""
    ps = cost.float().T ** lamd
    n = ps.shape[1]
    c = torch.full((n, 1), 1.0 / n)
    normal = True
    for _ in range(iters):
        d = ps @ c
        r = prior.float()[:, None] / d
        e = (r.T @ ps).T
        c = (1.0 / n) / e
        normal &= bool(d.min() >= torch.finfo(torch.float32).tiny) and bool(
            e.min() >= torch.finfo(torch.float32).tiny)
    return (ps * c.squeeze() * r).T * n, normal


def test_sinkhorn_iterates_on_the_reference_kernel_with_a_long_tailed_prior():
    """The reference's 50 iterations stop short of convergence, so the starting point
    matters: the kernel is cost^λ unscaled, as in the reference, and the result its
    (with a prior from 0.49 to 0.003, a per-row rescaled kernel was up to 0.8 off)."""
    g = torch.Generator().manual_seed(0)
    prior = torch.tensor([0.5, 0.25, 0.12, 0.06, 0.03, 0.015, 0.01, 0.008, 0.004, 0.003])
    prior = prior / prior.sum()
    worst, compared = 0.0, 0
    for n in (64, 256) * 5:
        probs = torch.softmax(torch.randn(n, 10, generator=g), 1)
        mask = torch.rand(n, 10, generator=g) < 0.3
        mask[torch.arange(n), torch.randint(0, 10, (n,), generator=g)] = True
        reference, normal = official_sinkhorn_fp32(probs * mask, prior)
        if normal and torch.isfinite(reference).all():   # where the guards do not act
            compared += 1
            worst = max(worst, (solar.sinkhorn(probs * mask, prior) - reference).abs().max().item())
    assert compared >= 5 and worst < 1e-5, (compared, worst)


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")  # 50 iterations on purpose
def test_sinkhorn_agrees_with_pot():
    """The short loop is POT's entropic plan (M = −log cost, reg = 1/λ), scaled by N."""
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(1)
    n = 300
    probs = torch.softmax(torch.randn(n, C, generator=g), 1).double()
    mask = torch.rand(n, C, generator=g) < 0.7
    mask[torch.arange(n), torch.randint(0, C, (n,), generator=g)] = True
    cost = probs * mask
    prior = torch.tensor([0.35, 0.25, 0.2, 0.12, 0.08], dtype=torch.float64)
    plan = ot.sinkhorn(torch.full((n,), 1.0 / n, dtype=torch.float64), prior,
                       -torch.log(cost.clamp_min(1e-30)), reg=1 / 3, numItermax=50, stopThr=0)
    assert torch.allclose(solar.sinkhorn(cost, prior).double(), n * plan, atol=2e-3)

def test_small_loss_selection_matches_a_loop():
    g = torch.Generator().manual_seed(3)
    losses = torch.rand(30, generator=g).round(decimals=1)   # ties on purpose
    classes = torch.randint(0, 4, (30,), generator=g)
    quota = torch.tensor([1, 3, 0, 5])
    got = solar.small_loss_selection(losses, classes, quota)
    for j in range(4):
        members = sorted((i for i in range(30) if classes[i] == j),
                         key=lambda i: (float(losses[i]), i))
        keep = set(members[:int(quota[j])])
        assert {i for i in members if got[i]} == keep


# -- modifiers ------------------------------------------------------------------------------
def test_beta_draws_on_device_and_pairing_stays_within_the_mask():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([mixup.beta_symmetric(4, g, "cpu") for _ in range(4000)])
    assert draws.mean().item() == pytest.approx(0.5, abs=0.01)
    assert draws.var().item() == pytest.approx(1 / 36, rel=0.1)            # Beta(4, 4)
    mask = torch.tensor([True, False, True, True, False, True, False, True])
    for _ in range(20):
        partner = mixup.pairing(8, mask, g, "cpu")
        assert sorted(partner.tolist()) == list(range(8))
        assert torch.equal(mask[partner], mask)


@pytest.fixture
def fixed_mix(monkeypatch):
    lam = 0.7
    monkeypatch.setattr(mixup, "beta_symmetric", lambda *a: torch.tensor(lam))
    monkeypatch.setattr(mixup, "pairing", lambda n, mask, g, dev: torch.arange(n).flip(0))
    return lam, torch.arange(B).flip(0)


def test_corr_mixup_term_mixes_both_views(fixed_mix):
    lam, perm = fixed_mix
    method, batch, net, _ = make("corr+mixup", epoch=1)
    loss, terms, _ = method.step(batch)
    w, s = batch.view("weak"), batch.view("strong")
    lw, ls = logits_of(net, w).detach(), logits_of(net, s).detach()
    mixed_t = lam * batch.conf + (1 - lam) * batch.conf[perm]
    lwm = logits_of(net, lam * w + (1 - lam) * w[perm]).detach()
    lsm = logits_of(net, lam * s + (1 - lam) * s[perm]).detach()
    mix = sum(corr_by_hand(lwm, lsm, mixed_t))
    assert terms["loss_mix"].item() == pytest.approx(mix, rel=1e-5)
    assert loss.item() == pytest.approx(sum(corr_by_hand(lw, ls, batch.conf)) + mix, rel=1e-5)
    early = make("corr+mixup", epoch=0)
    assert "loss_mix" not in early[0].step(early[1])[1]       # starts with the update


def test_corr_mixup_forwards_the_mixed_images_in_epoch_0_too(fixed_mix):
    """As RECORDS-LTPLL (train.py 320-331, utils_loss.py 237-246): the mixed images join the
    pass whenever mixup is on; before the update starts they get no loss but still enter
    BatchNorm's statistics, so epoch 0's losses are those of the 4B-image pass."""
    lam, perm = fixed_mix
    method, batch, net, _ = make("corr+records+mixup", epoch=0, bn=True)
    official = copy.deepcopy(net)
    loss, terms, new = method.step(batch)
    assert "loss_mix" not in terms and new is None
    w, s = batch.view("weak"), batch.view("strong")
    logits = logits_of(official, torch.cat([w, s, lam * w + (1 - lam) * w[perm],
                                            lam * s + (1 - lam) * s[perm]])).detach()
    expected = sum(corr_by_hand(logits[:B], logits[B:2 * B], batch.conf))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(net.norm.running_mean, official.norm.running_mean, atol=1e-7)
    assert torch.allclose(net.norm.running_var, official.norm.running_var, atol=1e-7)


def test_solar_mixup_pass_has_the_batch_statistics_of_the_selected_images(fixed_mix):
    """SoLar forwards only the selected images' mixes (SoLar train.py 321-328). The pass
    keeps B rows (static shapes) and masks the others out of the loss and out of
    BatchNorm: L_mix and the running statistics equal those of the indexed pass."""
    lam, perm = fixed_mix
    method, batch, net, _ = make("solar+mixup", epoch=25, bn=True)
    official = copy.deepcopy(net)
    _, terms, _ = method.step(batch)
    pseudo, chosen, _ = method.base._mix
    assert 0 < chosen.sum() < B                               # a real selection
    w = batch.view("weak")
    for view in ("weak", "strong"):                           # the two passes before it
        logits_of(official, batch.view(view))
    mixed = (lam * w + (1 - lam) * w[perm])[chosen]           # what the official forwards
    targets = (lam * pseudo + (1 - lam) * pseudo[perm])[chosen]
    expected = -(targets * torch.log_softmax(logits_of(official, mixed), 1)).sum(1).mean()
    assert terms["loss_mix"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(net.norm.running_mean, official.norm.running_mean, atol=1e-6)
    assert torch.allclose(net.norm.running_var, official.norm.running_var, atol=1e-6)
    assert torch.equal(net.norm.num_batches_tracked, official.norm.num_batches_tracked)


@pytest.mark.parametrize("arch", ["tiny_cnn", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_batch_statistics_of_selected_rows_equal_a_pass_over_those_rows(arch):
    """In float64 (float32 gradients of a deep ReLU network differ between any two
    summation orders): outputs of the selected rows, running statistics and gradients
    (the other rows out of the loss) equal a pass over the selected rows alone."""
    torch.manual_seed(0)
    net = networks.PLLNet(arch, 10).double().train()
    official = copy.deepcopy(net)
    x = torch.randn(10, 3, 32, 32, dtype=torch.float64)
    rows = torch.tensor([1, 0, 0, 1, 1, 0, 1, 1, 0, 1]).bool()
    y = torch.arange(10)
    with networks.batch_statistics_of(net, rows):
        logits = net(x)
    per_image = F.cross_entropy(logits, y, reduction="none")
    ((per_image * rows).sum() / rows.sum()).backward()
    ref = official(x[rows])
    F.cross_entropy(ref, y[rows]).backward()
    assert torch.allclose(logits[rows], ref, rtol=1e-9, atol=1e-12)
    for (name, a), b in zip(net.state_dict().items(), official.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name
    for a, b in zip(net.parameters(), official.parameters()):
        if b.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-7, atol=1e-12)
    assert not any("forward" in vars(m) for m in net.modules())   # plain modules again


def test_the_trainer_forward_limits_batch_statistics_to_rows():
    rng = np.random.default_rng(0)
    n = 10
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = np.arange(n) % 10
    tr = engine.Trainer(engine.TrainConfig(batch_size=n, epochs=1), x, np.eye(10, dtype=bool)[y],
                        y, "cpu")
    tr._train_mode()
    official = copy.deepcopy(tr.net)
    images = tr.batch_inputs(torch.arange(n))
    rows = torch.tensor([1, 0, 0, 1, 1, 0, 1, 1, 0, 1]).bool()
    logits = tr.forward({"mix": images}, "logits", rows=rows).logits["mix"]
    assert torch.allclose(logits[rows], official(networks.standardize(images[rows])), atol=1e-5)
    for (name, a), b in zip(tr.net.state_dict().items(), official.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), atol=1e-6), name


def test_solar_mixup_term_uses_selected_pseudo_labels_scaled_by_eta(fixed_mix):
    lam, _ = fixed_mix
    method, batch, net, _ = make("solar+mixup", epoch=25)     # halfway up the warm-up
    loss, terms, _ = method.step(batch)
    pseudo, chosen, eta = method.base._mix
    assert eta == pytest.approx(0.9 * 25 / 50)
    perm = torch.arange(B).flip(0)
    w = batch.view("weak")
    logits = logits_of(net, lam * w + (1 - lam) * w[perm]).detach()
    targets = lam * pseudo + (1 - lam) * pseudo[perm]
    per_image = -(targets * torch.log_softmax(logits, 1)).sum(1)
    mask = chosen.float()
    assert terms["loss_mix"].item() == pytest.approx(
        ((per_image * mask).sum() / mask.sum()).item(), rel=1e-5)


def test_logit_adjustment_shifts_training_logits_by_the_prior():
    method, batch, net, trainer = make("supervised+la")
    method.start_epoch(trainer)
    prior = torch.bincount(trainer.labels, minlength=C).float().clamp_min(1e-8)
    prior = prior / prior.sum()
    loss, _, _ = method.step(batch)
    logits = logits_of(net, batch.view("weak")) + prior.log()
    assert loss.item() == pytest.approx(F.cross_entropy(logits, batch.labels).item(), rel=1e-5)
    assert method.test_log_prior(trainer) is None              # test time: raw logits
    method, batch, net, trainer = make("proden+la")
    method.start_epoch(trainer)
    assert torch.allclose(method.modifiers[0].shift, trainer.conf.mean(0).log(), atol=1e-6)


def test_records_feature_mean_over_views_and_adjusted_update():
    method, batch, net, trainer = make("proden+records")
    _, _, new = method.step(batch)
    feats = batch.view("weak").flatten(1) @ net.w
    mean = 0.1 * feats.mean(0)
    assert torch.allclose(method.modifiers[0].feat_mean, mean, atol=1e-6)
    log_prior = torch.log_softmax(net.classifier(mean), 0).detach()
    probs = torch.softmax(logits_of(net, batch.view("weak")).detach() - log_prior, 1) * batch.cand
    assert torch.allclose(new, probs / probs.sum(1, keepdim=True), atol=1e-6)
    assert torch.allclose(method.test_log_prior(trainer), log_prior, atol=1e-6)
    method, batch, net, _ = make("corr+records")
    method.step(batch)
    both = torch.stack([batch.view(v).flatten(1) @ net.w for v in ("weak", "strong")]).mean(0)
    assert torch.allclose(method.modifiers[0].feat_mean, 0.1 * both.mean(0), atol=1e-6)


def subset(batch, keep):
    """The same batch restricted to the images ``keep`` (views included)."""
    sub = methods.Batch(idx=batch.idx[keep], x=batch.x[keep], cand=batch.cand[keep],
                        conf=batch.conf[keep], conf_table=batch.conf_table, labels=batch.labels[keep],
                        weight=None, gen=batch.gen, epoch=batch.epoch, step=0, stage="train",
                        net=batch.net, forward=batch.forward, schedule=batch.schedule)
    sub._views = {k: v[keep] for k, v in batch._views.items()}
    return sub


@pytest.mark.parametrize("name", ["proden", "corr", "supervised", "able", "solar"])
def test_per_image_weights(name):
    """Weights of one change nothing; weights 1/0 equal training on the weighted images
    (SoLar: its Sinkhorn step sees the whole batch, so only the first holds)."""
    ones = make(name, epoch=60, weight=torch.ones(B))
    plain = make(name, epoch=60)
    assert ones[0].step(ones[1])[0].item() == pytest.approx(plain[0].step(plain[1])[0].item(),
                                                            rel=1e-6)
    if name in ("solar", "able"):   # ABLE's contrastive term pairs images across the batch
        return
    half = (torch.arange(B) < B // 2).float()
    weighted = make(name, epoch=60, weight=half)
    keep = torch.arange(B // 2)
    alone = make(name, epoch=60)
    assert weighted[0].step(weighted[1])[0].item() == pytest.approx(
        alone[0].step(subset(alone[1], keep))[0].item(), rel=1e-5)


def test_runner_refuses_an_unknown_method_before_running_anything(tmp_path):
    from rable_nb.batch import runner
    with pytest.raises(runner.RunError, match=r"METHODS=\[.*\] is invalid: 'corr\+mixup\+records': modifiers"):
        runner.run("smoke", "01,04", str(tmp_path / "r"),
                   {"METHODS": ["corr", "corr+mixup+records"]})
    assert not (tmp_path / "r").exists()


class Toy(methods.Base):
    """A new base written as another engineer would: PRODEN plus an auxiliary head of its
    own on the features, one hyper-parameter and one state tensor."""

    name = "toy"
    needs = "features"
    params = {"aux_weight": 0.5}
    rules = {"aux_weight": config.number(0)}  # every parameter has a rule
    shortcuts = {"TOY_AUX": "aux_weight"}  # a notebook parameter that sets it

    def modules(self, net):
        self.head = torch.nn.Linear(net.backbone.feat_dim, 2)
        return {"head": self.head}

    def init_state(self, trainer):
        self.steps = torch.zeros((), device=trainer.dev)

    def state(self):
        return {"steps": self.steps}

    def losses(self, batch, out, log_prior):
        base = methods.BASES["proden"].losses(self, batch, out, log_prior)
        aux = self.head(out.feats["weak"]).logsumexp(1).mean()
        self.steps = self.steps + 1
        return base[0] + self.p["aux_weight"] * aux, {**base[1], "loss_aux": aux}, base[2]


def test_a_new_method_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    monkeypatch.setitem(methods.BASES, "toy", Toy)
    monkeypatch.setitem(methods.PIECES, "toy", Toy)
    assert "toy+records+mixup" in methods.names()
    from test_training import tiny_data
    data = tiny_data(128)
    cfg = engine.TrainConfig(method="toy+mixup", epochs=2, batch_size=32,
                               method_params={"toy": {"aux_weight": 0.25}})
    whole = engine.train(cfg, data, tmp_path / "a", "cpu", progress=False)
    engine.train(cfg, data, tmp_path / "b", "cpu", stop_after=1, progress=False)
    rest = engine.train(cfg, data, tmp_path / "b", "cpu", progress=False)
    assert rest["resumed"]
    a, b = whole["trainer"], rest["trainer"]
    assert torch.equal(a.extra["toy_head"].weight, b.extra["toy_head"].weight)
    assert a.method.base.steps.item() == b.method.base.steps.item() == 8
    assert whole["history"][-1]["loss_aux"] == rest["history"][-1]["loss_aux"]
    untrained = engine.Trainer(cfg, data["train_x"], data["candidates"], data["labels"], "cpu")
    assert not torch.equal(a.extra["toy_head"].weight, untrained.extra["toy_head"].weight)
    # notebook 04 takes its shortcut though its parameters cell does not list it
    from rable_nb.batch import runner
    from rable_nb.stages import s04_training as training
    nb04 = runner.select("04", runner.list_notebooks())
    base = {"PROFILE": "smoke", "RUN_DIR": str(tmp_path / "run")}
    given = {"METHODS": ["toy"], "TOY_AUX": 0.25}
    assert runner.check_parameters(given, nb04, base)[nb04[0]]["TOY_AUX"] == 0.25
    assert training.method_params(given) == {"toy": {"aux_weight": 0.25}}
    with pytest.raises(runner.RunError, match="TOY_AUX=-1 is invalid"):
        runner.check_parameters({**given, "TOY_AUX": -1}, nb04, base)
    # the campaign's device check lists it and runs it with its own tiny settings
    from rable_nb.commands import campaign_stages
    assert "toy" in campaign_stages.check_methods(SimpleNamespace(methods=[]))
    monkeypatch.setattr(Toy, "tiny", {"aux_weight": -1})               # reaches the check
    with pytest.raises(ValueError, match="aux_weight"):
        campaign_stages.train_check("toy", "cpu", graph=False)
    monkeypatch.setattr(Toy, "tiny", {"aux_weight": 0.5})
    assert methods.tiny_params()["toy"] == {"aux_weight": 0.5}
    check = campaign_stages.train_check("toy", "cpu", graph=False)
    assert check["epochs"] == 2 and all(math.isfinite(v) for v in check["losses"]["loss_aux"])
