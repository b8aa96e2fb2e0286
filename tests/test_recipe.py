"""The short-budget recipe (rable_nb/engine/recipe.py): schedules, light views, label smoothing,
their parameter rules, and that the published protocols' settings stay the defaults."""
import dataclasses

import numpy as np
import pytest
import torch

from rable_nb.parts import candidates, warmup
from rable_nb import config
from rable_nb.engine import engine, recipe
from rable_nb.stages import s04_training as training
from rable_nb.methods import _losses as losses


def test_protocol_recipe_is_the_trainconfig_defaults():
    defaults = {f.name: f.default for f in dataclasses.fields(engine.TrainConfig)}
    assert config.RECIPES["protocol"] == {}
    assert set(config.RECIPES["short"]) <= set(defaults)
    assert (defaults["schedule"], defaults["augment"], defaults["label_smoothing"],
            defaults["nesterov"]) == ("cosine", "protocol", 0.0, False)
    assert config.PROFILE_DEFAULTS["smoke"]["RECIPE"] == "protocol"
    assert config.PROFILE_DEFAULTS["paper"]["RECIPE"] == "protocol"
    assert config.PROFILE_DEFAULTS["quick"]["RECIPE"] == "short"


def test_onecycle_warms_up_then_decays_to_lr_min_and_cosine_is_per_epoch():
    cfg = engine.TrainConfig(epochs=4, lr=0.1, lr_min=0.0, schedule="onecycle", warmup_frac=0.25)
    lrs = [recipe.lr_at(cfg, e, s, 10) for e in range(4) for s in range(10)]
    peak = int(np.argmax(lrs))
    assert peak == 10 and lrs[peak] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] == pytest.approx(0.1 / 30)
    cos = engine.TrainConfig(epochs=4, lr=0.1)
    assert recipe.lr_at(cos, 2, 7, 10) == recipe.lr_at(cos, 2, 0, 10) == recipe.lr_at(cos, 2, 0, 1)


def test_light_view_flips_and_shifts_whole_pixels():
    x = torch.rand(64, 3, 32, 32)
    out = recipe.light_view(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    values = set(x.unique().tolist())
    assert set(out.unique().tolist()) <= values            # nearest: pixels copied, not mixed
    centre = out[:, :, 4:28, 4:28]                          # never from outside the image
    for img, src in zip(centre, x):
        found = any(torch.equal(img, cand[:, 4 + dy:28 + dy, 4 + dx:28 + dx])
                    for cand in (src, src.flip(2)) for dy in range(-4, 5) for dx in range(-4, 5))
        assert found


@pytest.mark.parametrize("bad", [dict(schedule="step"), dict(augment="heavy"),
                                 dict(strong_augment="x"), dict(label_smoothing=1.0),
                                 dict(warmup_frac=0.0)])
def test_bad_recipe_settings_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        engine.TrainConfig(**bad)


def test_recipe_and_warmup_method_rules():
    with pytest.raises(ValueError, match="RECIPE"):
        config.validate({"RECIPE": "fast"})
    with pytest.raises(ValueError, match="WARMUP_METHOD"):
        config.check({"WARMUP_METHOD": "rable"}, warmup.WARMUP_RULES)
    assert "proden+la" in warmup.WARMUP_METHODS and "supervised" not in warmup.WARMUP_METHODS


def test_short_recipe_reaches_the_config_and_names_its_protocol():
    P = dict(ARCH="tiny_cnn", EPOCHS=1, BATCH_SIZE=16, LR=0.05, SEED=0, RECIPE="short")
    cfg = training.config_from_params("able", P)
    assert (cfg.schedule, cfg.augment, cfg.nesterov) == ("onecycle", "light", True)
    assert training.protocol_name(P, {}) == "short"
    assert training.config_from_params("able", {**P, "RECIPE": None}).schedule == "cosine"


def test_label_smoothing_is_the_uniform_mixture_for_cross_entropy():
    logits, labels = torch.randn(8, 10), torch.arange(8)
    eps = 0.1
    ours = losses.smoothed(torch.nn.functional.cross_entropy(logits, labels), logits, eps)
    assert ours == pytest.approx(torch.nn.functional.cross_entropy(
        logits, labels, label_smoothing=eps).item(), rel=1e-6)


def test_short_recipe_trains_and_changes_the_numbers():
    rng = np.random.default_rng(0)
    y = np.arange(64) % 10
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    cand = candidates.uniform_candidates(y, 10, 0.3, 0)
    rows = {}
    for name, fields in config.RECIPES.items():
        tr = engine.Trainer(engine.TrainConfig(method="able", epochs=2, batch_size=16, **fields),
                            x, cand, y, "cpu")
        rows[name] = [tr.train_epoch(progress=False) for _ in range(2)]
        assert all(np.isfinite(r["loss_cls"]) for r in rows[name])
    assert rows["short"][0]["loss_cls"] != rows["protocol"][0]["loss_cls"]
    assert rows["short"][0]["lr"] < rows["short"][1]["lr"]   # warming up, then decaying
