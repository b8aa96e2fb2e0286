"""Backend ``remix``: a rare-class image mixed with a head-class image, labelled with the rare
class (Remix's label pushing, Chou et al., ECCV 2020 workshops, "Remix: rebalanced mixup").

Remix mixes two images x = λ·x_i + (1 − λ)·x_j like mixup, but when class i is at least κ
times as frequent as class j and λ < τ, the mixed image takes j's label alone: the minority
label is pushed, so the head image only lends its variety — backgrounds, poses, textures —
to the rare class (CIFAR-10-LT ρ = 100, ResNet-32: 70.4 % ERM → 75.4 % Remix, its Table 1).
As a top-up here, the sample with seed s of class c mixes a real image of class c (drawn as
``copy`` draws it; manifest ``source``: its row, so a dynamic top-up ties the sample to it)
with a real image of a class whose estimated count is at least ``REMIX_KAPPA`` times c's, at
a head share λ ~ U(0, ``REMIX_TAU``) (κ = 3, τ = 0.5 in the paper); with no such class the
sample is the plain copy. Labels, counts and conditioning are the top-up's own, as for every
backend, so ``remix`` compares with ``copy`` at equal counts.
"""
from __future__ import annotations

import numpy as np

from .. import config
from .copy import Copy

PROFILE_DEFAULTS = {p: dict(REMIX_KAPPA=3.0, REMIX_TAU=0.5) for p in ("smoke", "quick", "paper")}


def validate(params: dict) -> None:
    config.check(params, {"REMIX_KAPPA": config.number(1), "REMIX_TAU": config.number(0, 1)})


class Remix(Copy):
    """Label-pushed mixing of each rare-class image with a head-class image."""

    PROFILE_DEFAULTS = PROFILE_DEFAULTS
    validate = staticmethod(validate)
    name, PARAMS, CONTROL = "remix", ("REMIX_KAPPA", "REMIX_TAU"), "copy"

    def fit(self, images_or_features, cond_labels, class_counts, params, run_dir) -> dict:
        info = super().fit(images_or_features, cond_labels, class_counts, params, run_dir)
        counts = np.asarray(class_counts, dtype=np.float64)
        kappa = float(params.get("REMIX_KAPPA", 3.0))
        self.tau = float(params.get("REMIX_TAU", 0.5))
        # the images a class-c sample may borrow from: those of every class kappa times as big
        self.heads = {c: np.concatenate([self.members[h] for h in self.members
                                         if counts[h] >= kappa * max(counts[c], 1)] or
                                        [np.zeros(0, np.int64)])
                      for c in self.members}
        return info

    def generate(self, label, seeds):
        copies, extras = super().generate(label, seeds)
        heads = self.heads.get(int(label), [])
        if not len(heads):
            return copies, extras
        out = copies.copy()
        for i, s in enumerate(seeds):
            rng = np.random.default_rng([s, 2])          # independent of the copy's draw
            head = int(heads[rng.integers(len(heads))])
            lam = rng.uniform(0, self.tau)
            mixed = (1 - lam) * copies[i].astype(np.float64) + lam * self.images[head]
            out[i] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
            extras[i] = {**extras[i], "head": head, "head_share": round(float(lam), 4)}
        return out, extras
