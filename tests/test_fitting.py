"""The fit shared by the backends trained here (``generators/fitting.py``): one step loop for
``pixel`` (images, here greyscale 12×12), ``feature`` (vectors) and ``gan`` (two phases).
Its checkpoint holds every network and optimizer (plus EMA weights or class Gaussians), and
a state file or a finished fit made from other data is neither resumed nor loaded. (Exact
resume of each backend: tests/test_generators.py, test_feature.py, test_gan.py.)"""
import numpy as np
import pytest
from safetensors import safe_open

from rable_nb import generators
from rable_nb.stages import s03_rebalance as rebalance

COUNTS = [6, 4, 2]
LABELS = np.repeat(np.arange(3), COUNTS)
FAST = dict(SEED=0, DEVICE="cpu", PIXEL_CHANNELS=[8, 16], PIXEL_STEPS=4, PIXEL_BATCH=4,
            PIXEL_CHECKPOINT_EVERY=2, PIXEL_SAMPLE_STEPS=1, FEATURE_HIDDEN=16, FEATURE_DEPTH=1,
            FEATURE_STEPS=4, FEATURE_BATCH=4, FEATURE_CHECKPOINT_EVERY=2, FEATURE_SAMPLE_STEPS=2,
            GAN_CHANNELS=[4, 8], GAN_LATENT=4, GAN_AE_STEPS=2, GAN_STEPS=2, GAN_BATCH=4,
            GAN_CHECKPOINT_EVERY=2)
STATE = {"pixel": {"model", "optim", "ema"}, "feature": {"model", "optim", "ema"},
         "gan": {"enc", "dec", "head", "optim_ae", "optim_d", "optim_g", "means", "chol",
                 "present"}}


def data(name: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if name == "feature":
        return rng.normal(size=(len(LABELS), 8)).astype(np.float32)
    return rng.integers(0, 256, (len(LABELS), 12, 12, 1), dtype=np.uint8)


@pytest.mark.parametrize("name", ["pixel", "feature", "gan"])
def test_a_fit_of_other_data_is_neither_resumed_nor_loaded(tmp_path, capsys, name):
    P = {**rebalance.PROFILE_DEFAULTS["smoke"], **FAST}
    x, other = data(name, 0), data(name, 1)
    first = generators.get(name).fit(x, LABELS, COUNTS, {**P, "GEN_STOP_AFTER": 3}, tmp_path)
    assert not first["done"] and first["steps"] == 3  # gan: inside its GAN phase
    with safe_open(str(tmp_path / "generator" / f"{name}-state.safetensors"), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == STATE[name]

    fit = generators.get(name).fit(other, LABELS, COUNTS, P, tmp_path)
    assert fit["done"] and not fit["resumed"] and fit["steps_this_call"] == fit["steps"] == 4
    assert "made with other settings or data" in capsys.readouterr().out
    gen = generators.get(name)
    assert "loaded" in gen.fit(other, LABELS, COUNTS, P, tmp_path)
    assert gen.sample(1, 2, seed=0).shape == (2, *x.shape[1:])
    again = generators.get(name).fit(x, LABELS, COUNTS, P, tmp_path)
    assert again["done"] and "loaded" not in again and not again["resumed"]
