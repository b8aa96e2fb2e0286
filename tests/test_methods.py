"""Methods registry and the loss of every method against a direct per-sample computation
on random data; Sinkhorn marginals; mixup, logit adjustment and RECORDS plumbing."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rable_nb import config, engine, methods, training
from rable_nb.methods import corr, mixup, solar

B, C, D = 12, 5, 6


class StubNet(torch.nn.Module):
    """A linear 'network' on raw pixels: features = x·W, logits = classifier(features)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(3 * 4 * 4, D, generator=g) / 8
        self.classifier = torch.nn.Linear(D, C)
        self.backbone = SimpleNamespace(feat_dim=D)
        torch.nn.init.normal_(self.classifier.weight, generator=g)
        torch.nn.init.normal_(self.classifier.bias, generator=g)

    def forward(self, inputs, need="logits"):
        names = list(inputs)
        feats = torch.cat([inputs[n] for n in names]).flatten(1) @ self.w
        logits = self.classifier(feats)
        sizes = [len(inputs[n]) for n in names]
        proj = F.normalize(feats, dim=1)
        return methods.Outputs(*(dict(zip(names, t.split(sizes))) for t in (logits, feats, proj)))


def make(name, epoch=3, weight=None, seed=0, **cfg):
    """(method, batch, net) on random data: B images of 3×4×4 pixels, C classes."""
    g = torch.Generator().manual_seed(seed)
    cand = torch.rand(B, C, generator=g) < 0.4
    labels = torch.randint(0, C, (B,), generator=g)
    cand[torch.arange(B), labels] = True
    conf = torch.rand(B, C, generator=g) * cand
    conf = conf / conf.sum(1, keepdim=True)
    tcfg = engine.TrainConfig(method=name, num_classes=C, batch_size=B, epochs=800, **cfg)
    method = methods.build(tcfg)
    net = StubNet(seed)
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
    return net.classifier(images.flatten(1) @ net.w)


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
    assert cfg.method_params["mixup"] == {"weight": 1.0}
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
    assert engine.TrainConfig(method="proden", mixup=True).method == "proden+mixup"
    with pytest.raises(ValueError, match="mixup_alpha"):
        engine.TrainConfig(method="proden+mixup", mixup_alpha=0.4)


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
    scaled = solar.sinkhorn(probs * mask * torch.rand(n, 1, generator=g), prior)
    assert torch.allclose(scaled, short, atol=1e-5)           # row scaling does not matter



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
    from rable_nb import runner
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
