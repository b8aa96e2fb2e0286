"""Backend ``feature-copy``: the feature-space control — random oversampling of each
class's real *features*, for ``rable-feature``.

Fine-tuning the classifier head of a frozen backbone on class-balanced resampled real
features is classifier re-training (cRT, Kang et al., ICLR 2020): the oversampling
control in feature space. The sample with seed s of class c is the backbone feature of a
real training image drawn uniformly with replacement from the images whose conditioning
label is c — as ``copy`` does with images — under the same backbone (the warm-up network,
saved to ``generator/backbone.safetensors``), the same labels and the same counts as the
``feature`` backend, so ``rable-feature`` with ``feature`` counts as a gain only where it
beats ``rable-feature`` with ``feature-copy``.
"""
from __future__ import annotations

from .copy import Copy
from .feature import Feature


class FeatureCopy(Copy):
    """Random oversampling of the real backbone features of each conditioning class."""

    name, space, suffix = "feature-copy", "feature", ".npy"
    fit_inputs = Feature.fit_inputs
    training_inputs = staticmethod(Feature.training_inputs)
