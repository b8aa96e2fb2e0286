"""Backend ``copy``: the control — random oversampling of each class's real images.

The sample with seed s of class c is a copy of a real training image drawn uniformly (with
replacement, as imbalanced-learn's ``RandomOverSampler``) from the images whose
*conditioning* label is c. The synthetic labels follow the same conditioning labels as every
other backend, so a generator is compared with ``copy`` at equal counts and equal labels;
a generator's gain counts only where it beats this control. Manifest rows name the copied
image (``source``: its row in ``dataset.npz``).
"""
from __future__ import annotations

import numpy as np

from .base import Generator


class Copy(Generator):
    """Random oversampling of the real images of each conditioning class."""

    name = "copy"
    batch = 1024

    def fit(self, images_or_features, cond_labels, class_counts, params, run_dir) -> dict:
        """Remembers the images of every conditioning class (nothing to train)."""
        self.images = np.asarray(images_or_features)
        cond = np.asarray(cond_labels)
        self.members = {int(c): np.flatnonzero(cond == c) for c in np.unique(cond)}
        return dict(done=True, classes=len(self.members))

    def generate(self, label, seeds):
        members = self.members.get(int(label), [])
        if not len(members):
            raise ValueError(f"class {label} has no real image to copy (no training image "
                             "carries it as conditioning label).")
        rows = [int(members[np.random.default_rng(s).integers(len(members))]) for s in seeds]
        return self.images[rows], [{"source": r} for r in rows]
