"""The interface every generator backend implements, and the seed of a top-up slot.

A backend is fitted on the long-tailed training data with *conditioning labels* (pseudo-labels
or the hidden truth, see ``rable_nb.parts.conditioning``) and then draws samples of a class:

- ``fit(images_or_features, cond_labels, class_counts, params, run_dir) -> dict`` trains,
  loads or simply stores what it needs (resumable; returns what it did, ``done`` False when
  a step budget stopped it early);
- ``generate(label, seeds) -> (samples, extras)``: one sample per seed; sample i depends only
  on (label, seeds[i]), so a top-up does not depend on batching or interruptions. ``extras``
  holds one dict per sample that goes into its manifest row (e.g. the prompt);
- ``sample(label, n, seed)``: n samples of a class, drawn from the slot seeds of ``seed``.

Samples are uint8 H×W×C images of the data's size and channels (CIFAR-10: 32×32×3;
greyscale: C = 1; written as PNG) or 1-D feature vectors (written as ``.npy``): ``space``
says which (``'image'`` or ``'feature'``). A feature-space backend is fitted on the features
of the run's backbone (its ``fit_inputs`` hook), and its samples serve methods that train
on features (``rable-feature``), whose inputs come from its ``training_inputs`` hook.
``PARAMS`` names the notebook parameters that change a backend's output: they are recorded
in ``synthetic/settings.json``, and a top-up is never extended under other values.

A backend describes itself, so adding one is one file plus one registry line, and nothing
outside its file lists it: its notebook parameters' defaults per profile
(``PROFILE_DEFAULTS``, which are also the parameters the runner and sweep accept for
notebook 03) and their rules (``validate``), the modules it needs (``REQUIRES``), its
control in the paired comparisons (``CONTROL``), the settings of a seconds-long fit for the
campaign's device check (``TINY``) and its benchmark (``bench``, for ``bench gen`` and the
campaign's speed stage).
"""
from __future__ import annotations

import numpy as np


def slot_seed(seed: int, label: int, k: int, attempt: int = 0) -> int:
    """Seed of the k-th synthetic sample of a class (independent of batching); ``attempt``
    > 0 gives the seeds of redraws after a sample was filtered out."""
    key = [seed, label, k] + ([attempt] if attempt else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0])


class Generator:
    """Base class of a generator backend (see the module docstring)."""

    name = ""
    PARAMS: tuple[str, ...] = ()
    space = "image"  # what a sample is: "image" or "feature" (a backbone's feature vector)
    suffix = ".png"  # file type of one sample in synthetic/<class>/
    batch = 64  # samples per ``generate`` call of a top-up (a backend's fit may set it)
    PROFILE_DEFAULTS: dict[str, dict] = {}  # profile -> defaults of this backend's parameters
    REQUIRES: tuple[str, ...] = ()  # modules it imports beyond torch (the campaign skips it
    #                                 where one is missing and says which)
    CONTROL: str | None = None  # the backend it must beat at equal counts and labels
    TINY: dict = {}  # settings for a few steps on 3 classes of random data (device check)
    # ``bench(profile, device, batch_sizes) -> dict``: its throughput (``bench gen``), a
    # staticmethod; None: no benchmark. CAMPAIGN_BENCH: the campaign's speed stage runs it.
    bench = None
    CAMPAIGN_BENCH = True

    @staticmethod
    def validate(params: dict) -> None:
        """``ValueError`` naming a bad value of this backend's parameters (none by default)."""

    @classmethod
    def knobs(cls) -> list[str]:
        """Its notebook parameters: the names its profiles give defaults to."""
        return list(dict.fromkeys(k for d in cls.PROFILE_DEFAULTS.values() for k in d))

    def fit_inputs(self, images, backbone, run_dir, info: dict | None = None):
        """What :meth:`fit` takes: the images themselves (a feature-space backend: their
        features under ``backbone``, the warm-up network)."""
        return images

    @staticmethod
    def training_inputs(run_dir, images, device: str = "auto"):
        """(inputs, starting weights or None) of a method that trains on this backend's
        samples' space: the images themselves (a feature-space backend: their features
        under the run's backbone, and that backbone's weights)."""
        return images, None

    def fit(self, images_or_features, cond_labels, class_counts, params: dict, run_dir) -> dict:
        raise NotImplementedError

    def generate(self, label: int, seeds) -> tuple[np.ndarray, list[dict]]:
        raise NotImplementedError

    def sample(self, label: int, n: int, seed: int = 0) -> np.ndarray:
        """``n`` samples of class ``label``: the first n slots of a top-up with ``seed``."""
        return self.generate(label, [slot_seed(seed, label, k) for k in range(n)])[0]

    def settings(self, params: dict) -> dict:
        """The parameters that define this backend's output (compared on resume)."""
        return {"generator": self.name, **{k: params.get(k) for k in self.PARAMS}}

    def model_id(self) -> str:
        """What produced the samples, for the manifest (a hub id, a checkpoint, 'copy')."""
        return self.name
