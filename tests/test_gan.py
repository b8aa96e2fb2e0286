"""The ``gan`` backend: exact resume of its two-phase fit (after an exception, and split by a
step budget), slot-determined samples, the class Gaussians of rare and missing classes, the
SCDL-GAN terms, greyscale 28×28 data through every image backend and the audit, and
notebooks 01/03/04 on a greyscale ImageFolder."""
import json

import numpy as np
import pytest
import torch

from rable_nb.parts import audit, candidates
from rable_nb.data import images as data, longtail
from rable_nb import generators
from rable_nb.stages import s03_rebalance as rebalance
from rable_nb.rundir import runfiles
from rable_nb.generators import gan

COUNTS = [12, 7, 3]
LABELS = np.repeat(np.arange(3), COUNTS)
# smoke settings made smaller still: 3 autoencoder + 4 GAN steps, a state file every 2 steps
FAST = dict(SEED=0, DEVICE="cpu", GAN_CHANNELS=[4, 8], GAN_LATENT=4, GAN_AE="bagan",
            GAN_AE_STEPS=3, GAN_STEPS=4, GAN_BATCH=6, GAN_LR=2e-4, GAN_GP=10.0, GAN_CRITIC=1,
            GAN_CHECKPOINT_EVERY=2)


def images(shape=(32, 32, 3), seed=0):
    """Class-dependent images: class c is brighter by 60·c, plus noise."""
    rng = np.random.default_rng(seed)
    x = 40 + 60 * LABELS[:, None, None, None] + rng.normal(0, 20, (len(LABELS), *shape))
    return np.clip(x, 0, 255).astype(np.uint8)


def weights(gen) -> dict:
    return {**gen.dec.state_dict(), "means": gen.means, "chol": gen.chol}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(fit: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in fit["log"]]


class Stop(Exception):
    pass


def test_gan_fit_resumes_exactly_after_an_exception_and_across_step_budgets(tmp_path,
                                                                           monkeypatch):
    x = images()
    whole = generators.get("gan")
    info = whole.fit(x, LABELS, COUNTS, FAST, tmp_path / "whole")
    assert info["done"] and info["steps"] == 7 and not info["resumed"]
    assert {"ae_mse"} <= set(info["log"][0]) and {"d_ce", "gp", "g_ce"} <= set(info["log"][-1])
    assert [r["step"] for r in info["log"]] == [2, 3, 4, 6, 7]  # every 2 + end of phase 1

    step = gan.GanTrainer.step  # an exception in the GAN phase, after the state of step 4

    def failing(self):
        if self.step_no == 5:
            raise Stop
        return step(self)
    monkeypatch.setattr(gan.GanTrainer, "step", failing)
    with pytest.raises(Stop):
        generators.get("gan").fit(x, LABELS, COUNTS, FAST, tmp_path / "crash")
    monkeypatch.setattr(gan.GanTrainer, "step", step)
    resumed = generators.get("gan")
    rest = resumed.fit(x, LABELS, COUNTS, FAST, tmp_path / "crash")
    assert rest["resumed"] and rest["steps_this_call"] == 3
    assert same(weights(resumed), weights(whole)) and losses(rest) == losses(info)

    split = generators.get("gan")  # a step budget inside phase 1, then one inside phase 2
    for budget, done in ((2, False), (5, False), (None, True)):
        out = split.fit(x, LABELS, COUNTS, {**FAST, "GEN_STOP_AFTER": budget}, tmp_path / "split")
        assert out["done"] is done and out["steps"] == (budget or 7)
    assert same(weights(split), weights(whole))

    again = generators.get("gan")  # a finished fit is loaded, not retrained
    assert again.fit(x, LABELS, COUNTS, FAST, tmp_path / "whole")["loaded"]
    assert (again.sample(2, 5, seed=3) == whole.sample(2, 5, seed=3)).all()
    other = generators.get("gan")  # other settings: trained again, from scratch
    assert "loaded" not in other.fit(x, LABELS, COUNTS, {**FAST, "GAN_GP": 1.0}, tmp_path / "whole")


def test_a_sample_depends_only_on_its_slot(tmp_path):
    gen = generators.get("gan")
    gen.fit(images(), LABELS, COUNTS, FAST, tmp_path)
    seeds = [generators.slot_seed(0, 1, k) for k in range(4)]
    batch, extras = gen.generate(1, seeds)
    alone = np.concatenate([gen.generate(1, [s])[0] for s in seeds])
    assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.uint8 and len(extras) == 4
    assert np.abs(batch.astype(int) - alone).max() <= 1  # batching changes no sample
    assert len({b.tobytes() for b in batch}) == 4  # different seeds, different images


def test_class_gaussians_cover_rare_classes_and_refuse_missing_ones(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(31, 8))
    labels = np.array([0] * 27 + [1] * 3 + [3])  # class 1: fewer images than dimensions;
    means, chol, present = gan.class_gaussians(codes, labels, 4)  # 2: none; 3: one image
    assert present.tolist() == [True, True, False, True]
    for c in (0, 1, 3):
        cov = chol[c] @ chol[c].T
        assert np.all(np.linalg.eigvalsh(cov) > 0)
        assert np.allclose(means[c], codes[labels == c].mean(0))
    assert np.allclose(means[3], codes[30])
    gen = generators.get("gan")
    gen.fit(images(), np.where(LABELS == 2, 0, LABELS), COUNTS, FAST, tmp_path)
    with pytest.raises(ValueError, match="class 2 has no training image"):
        gen.sample(2, 1)


def test_scdl_terms_and_switch(tmp_path):
    torch.manual_seed(0)
    labels = torch.arange(4).repeat(8)
    centres = torch.nn.functional.normalize(torch.randn(4, 16), dim=1) * 5
    clustered = centres[labels] + 0.1 * torch.randn(32, 16)
    assert gan.supcon(clustered, labels) < gan.supcon(torch.randn(32, 16), labels)
    prior = torch.randn(400, 4)
    assert abs(float(gan.mmd_imq(torch.randn(400, 4), prior))) < 0.01
    assert float(gan.mmd_imq(torch.randn(400, 4) + 2, prior)) > 0.1
    info = generators.get("gan").fit(images(), LABELS, COUNTS, {**FAST, "GAN_AE": "scdl"},
                                     tmp_path)
    assert {"ae_mse", "supcon", "mmd"} <= set(info["log"][0])


# --- greyscale 28×28 -------------------------------------------------------------------
@pytest.fixture(scope="module")
def grey_folder(tmp_path_factory):
    """A Fashion-MNIST-like ImageFolder: 28×28 greyscale PNGs written with PIL."""
    return data.write_fake_cifar(tmp_path_factory.mktemp("grey"), n_train=40, n_test=12,
                                 size=28, channels=1)


def test_greyscale_28x28_through_every_image_backend_and_the_audit(grey_folder, tmp_path):
    grey = data.load_cifar10(grey_folder)
    assert grey.image_shape == (28, 28, 1) and grey.test_x.shape[1:] == (28, 28, 1)
    idx = longtail.long_tail_indices(grey.train_y, [40, 30, 20, 14, 10, 8, 6, 5, 4, 3], 0)
    x, y = grey.train_x[idx], grey.train_y[idx]
    counts = np.bincount(y, minlength=10)
    plan = generators.topup_plan(counts, 12)
    P = {**rebalance.PROFILE_DEFAULTS["smoke"], **FAST, "PIXEL_CHANNELS": [8, 16],
         "PIXEL_STEPS": 2, "PIXEL_BATCH": 4, "PIXEL_SAMPLE_STEPS": 2, "PIXEL_CHECKPOINT_EVERY": 2}
    for name in ("gan", "pixel", "copy"):
        run = tmp_path / name
        gen = generators.get(name)
        assert gen.fit(x, y, counts, P, run)["done"]
        settings = rebalance.topup_settings(gen, P, {"gen_labels": "oracle", "sha1": "t"})
        generators.top_up(run, gen, plan, grey.classes, settings)
        sx, sy, _ = runfiles.load_synthetic(run)
        assert sx.shape == (sum(plan.values()), 28, 28, 1) and sx.dtype == np.uint8, name
    judge, _ = candidates.clean_classifier(grey, "tiny_cnn", 1, 0, "cpu", 20)
    test = longtail.balanced_subset(grey.test_y, 5, 0)
    sx, sy, _ = runfiles.load_synthetic(tmp_path / "gan")
    result = audit.audit(sx, sy, x, y, grey.test_x[test], grey.test_y[test], judge, grey.classes,
                         device="cpu")
    assert sum(r["n_synthetic"] for r in result["per_class"]) == len(sy)
    assert np.asarray(result["confusion_real"]).sum() == len(test)
    for fig in (audit.audit_figure(result, grey.classes),
                audit.confusion_figure(result, grey.classes),
                audit.closest_figure(result, sx, x, grey.classes)):
        assert fig.axes


@pytest.mark.notebook
def test_notebooks_01_03_04_on_a_greyscale_folder_with_gan_and_a_comparison(
        run_notebooks, grey_folder, tmp_path):
    common = dict(DATA_DIR=str(grey_folder), N_MAX=40, IMBALANCE_FACTOR=0.1,
                  TARGET_PER_CLASS=20, BATCH_SIZE=16)
    # GAN_STEPS: a backend's parameter, which notebook 03's cell does not list, reaches it
    run = run_notebooks("01,03,04", tmp_path / "gan", GENERATOR="gan", METHODS=["rable"],
                        GAN_STEPS=10, GEN_LABELS="oracle", **common)  # 2 warm-up epochs may
    assert runfiles.read_settings(run)["GAN_STEPS"] == 10             # miss a rare class
    m = json.loads((run / "metrics-rable.json").read_text())
    assert m["params"]["GENERATOR"] == "gan" and m["params"]["GEN_LABELS"] == "oracle"
    x, _, _ = runfiles.load_synthetic(run)
    assert x.shape[1:] == (28, 28, 1) and m["n_synthetic"] == len(x) > 0
    result = json.loads((run / "synthetic" / "audit.json").read_text())
    assert result["generator"] == "gan" and np.asarray(result["confusion"]).sum() == len(x)
    for fig in ("fig-audit.png", "fig-audit-confusion.png", "fig-samples.png"):
        assert (run / fig).stat().st_size > 10_000
    import shutil  # the same data topped up by `copy`, shown beside the GAN's samples
    (tmp_path / "copy").mkdir()
    for name in ("dataset.npz", "dataset.json"):
        shutil.copy(run / name, tmp_path / "copy" / name)
    other = run_notebooks("03", tmp_path / "copy", GENERATOR="copy", COMPARE_RUNS=[str(run)],
                          GEN_LABELS="oracle", **common)
    cells = json.loads((other / "03_generative_rebalancing.ipynb").read_text())["cells"]
    printed = "".join("".join(o.get("text", "")) for c in cells if c["cell_type"] == "code"
                      for o in c.get("outputs", []))
    assert "samples beside those of: gan" in printed
    table = audit.compare([other, run])  # the audit table notebook 03 shows beside them
    assert table["generator"].tolist() == ["copy", "gan"]
    assert table.loc[other.name, "memorisation"] == 1.0  # copies are memorised
    from PIL import Image  # 3 × (real, copy, gan) columns instead of 4 × (real, gan)
    assert Image.open(other / "fig-samples.png").width > Image.open(run / "fig-samples.png").width
