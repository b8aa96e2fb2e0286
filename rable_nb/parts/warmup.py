"""The warm-up: a PLL method (``WARMUP_METHOD``: ABLE in the smoke and paper profiles,
``proden+la`` in quick, see docs/quick-profile.md) trained for ``WARMUP_EPOCHS`` with the
run's ``RECIPE`` on the long-tailed images and their candidate sets, through the training
engine, cached per data set and settings.

Its disambiguated confidences restricted to the candidate sets give the PLL-honest
pseudo-labels that condition the generators (notebook 03, ``rable_nb/parts/conditioning.py``) and
label the ``+unlabeled`` images (notebook 04, ``rable_nb/parts/unlabeled.py``); its network is the
``SYNTH_FILTER`` judge and the ``feature`` backend's backbone. The hidden labels are never
given to it (it receives −1 in their place). An interrupted warm-up resumes from its own
checkpoint in the cache folder.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..rundir import artefacts
from .. import config, methods
from ..engine import engine
from ..data import longtail
from ..engine.networks import BACKBONES, load_model, pick_device, save_model

WARMUP_TEST_PER_CLASS = 100  # the warm-up logs its test accuracy on this many per class
# The warm-up's settings (profile defaults in config.PROFILE_DEFAULTS): shared by notebook 03
# (generator conditioning) and notebook 04 (pseudo-labels of ``+unlabeled`` images).
# Methods that can warm up: they learn confidences from the real images alone.
WARMUP_METHODS = tuple(n for n in methods.names()
                       if methods.BASES[methods.parse(n)[0]].disambiguates
                       and not methods.data_sources(n) and methods.inputs(n) == "images")
WARMUP_RULES = {"WARMUP_ARCH": config.one_of(sorted(BACKBONES)),
                "WARMUP_EPOCHS": config.integer(1), "WARMUP_BATCH": config.integer(1),
                "WARMUP_LR": config.number(0, low_open=True),
                "WARMUP_METHOD": config.one_of(WARMUP_METHODS)}


@dataclass(frozen=True)
class WarmupSettings:
    """The warm-up's settings, read once from a notebook's parameters (:meth:`from_params`)
    and handed to :func:`warmup` by notebook 03's conditioning and notebook 04's
    ``+unlabeled`` images and ``plausible`` synthetic labels."""
    arch: str
    epochs: int
    batch_size: int
    lr: float
    seed: int = 0
    method: str = "able"
    recipe: str = "protocol"   # ``config.RECIPES``

    @classmethod
    def from_params(cls, params: dict) -> WarmupSettings:
        """The run's ``WARMUP_*``, ``RECIPE`` and ``SEED`` settings."""
        return cls(params["WARMUP_ARCH"], params["WARMUP_EPOCHS"], params["WARMUP_BATCH"],
                   params["WARMUP_LR"], int(params.get("SEED") or 0),
                   params.get("WARMUP_METHOD") or "able", params.get("RECIPE") or "protocol")


def _key(train_x: np.ndarray, candidates: np.ndarray, settings: dict) -> str:
    """Cache key of a warm-up: its images, candidate sets and settings (never the labels)."""
    return artefacts.fingerprint(train_x, candidates, settings=settings)[:16]


def _load_entry(folder, done, device: str):
    """(pseudo-labels, network, info) of a complete cache entry; ``None`` when one of its
    files is damaged: that file is moved aside (``artefacts.load``) and the marker removed,
    so the entry is made again (the warm-up resumes from its finished training state)."""
    def pseudo_labels(p):
        with np.load(p) as z:
            return z["labels"]
    parts = [artefacts.load(folder / "pseudo.npz", pseudo_labels, what="warm-up cache entry",
                            resumable=True),
             artefacts.load(folder / "warmup.safetensors",
                            lambda p: load_model(p, pick_device(device))[0],
                            what="warm-up cache entry", resumable=True),
             artefacts.read_json(done, what="warm-up cache entry", resumable=True)]
    if any(part is None for part in parts):
        done.unlink(missing_ok=True)
        return None
    return tuple(parts)


def warmup(train_x, candidates, cifar, settings: WarmupSettings, device: str = "auto"):
    """(pseudo-labels, warm-up network, info) of ``settings.method`` trained for
    ``settings.epochs`` with the training recipe ``settings.recipe`` (cached).

    The training run resumes from its own checkpoint in the cache folder when interrupted.
    """
    s = settings
    recorded = dict(method=s.method, arch=s.arch, epochs=s.epochs, batch_size=s.batch_size,
                    lr=s.lr, seed=s.seed)
    if s.recipe != "protocol":  # (keeps the cache keys of the protocol warm-ups)
        recorded["recipe"] = s.recipe
    folder = config.cache_dir() / f"warmup-{_key(train_x, candidates, recorded)}"
    done = folder / "warmup.json"
    if done.exists():
        cached = _load_entry(folder, done, device)
        if cached is not None:
            return cached
    test = longtail.balanced_subset(cifar.test_y, WARMUP_TEST_PER_CLASS, s.seed)
    data = dict(train_x=train_x, candidates=candidates,
                labels=np.full(len(candidates), -1),  # hidden: never given to the warm-up
                test_x=cifar.test_x[test], test_y=cifar.test_y[test],
                class_counts=np.ones(cifar.num_classes, np.int64))
    cfg = engine.TrainConfig(method=s.method, arch=s.arch, epochs=s.epochs,
                             batch_size=s.batch_size, lr=s.lr, seed=s.seed,
                             num_classes=cifar.num_classes, **config.RECIPES[s.recipe])
    result = engine.train(cfg, data, folder, device, checkpoint_every=1)
    trainer = result["trainer"]
    cand = torch.as_tensor(np.asarray(candidates), device=trainer.conf.device)
    pseudo = (trainer.conf * cand).argmax(1).cpu().numpy()
    info = dict(recorded, test_accuracy=result["final"]["overall"], wall_s=result["wall_s"],
                cache=folder.name,  # the labels' fingerprint tells two trainings of one key apart
                pseudo_sha1=hashlib.sha1(np.ascontiguousarray(pseudo, np.int64)).hexdigest())
    config.write_atomic(folder / "pseudo.npz", lambda t: np.savez(t, labels=pseudo))
    save_model(trainer.net, folder / "warmup.safetensors", meta={"warmup": recorded})
    config.write_json(done, info)  # written last: marks a complete cache entry
    return pseudo, trainer.net.eval(), info
