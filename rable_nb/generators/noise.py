"""Backend ``noise``: copies with pure-noise images among them (OPeN, Zada et al., ICML 2022,
"Pure noise to the rescue of insufficient data").

OPeN tops the rare classes up by oversampling, but replaces a share δ of the oversampled
images by *pure noise* images labelled with the class: each pixel drawn from a normal
distribution with the training images' per-channel mean and standard deviation, clipped to
the pixel range. The paper reads the noise as a regulariser of the minority decision regions
(CIFAR-10-LT ρ = 100: 79.4 % → 82.1 % over plain oversampling with a ResNet-32, its
Table 1). Each sample here is, with probability ``NOISE_SHARE`` (δ; the paper's ~1/3), a
noise image, otherwise a copy as ``copy`` makes it (manifest ``source``: the copied row, so
a dynamic top-up ties the copy to its image; a noise image has no source). Left out: the
paper's DAR-BN (separate BatchNorm statistics for noise images), which needs a change of the
network, not of the data.
"""
from __future__ import annotations

import numpy as np

from .. import config
from .copy import Copy

PROFILE_DEFAULTS = {p: dict(NOISE_SHARE=0.33) for p in ("smoke", "quick", "paper")}  # ≈ 1/3


def validate(params: dict) -> None:
    config.check(params, {"NOISE_SHARE": config.number(0, 1)})


class Noise(Copy):
    """Random oversampling where a share of the draws are pure-noise images of the class."""

    PROFILE_DEFAULTS = PROFILE_DEFAULTS
    validate = staticmethod(validate)
    name, PARAMS, CONTROL = "noise", ("NOISE_SHARE",), "copy"

    def fit(self, images_or_features, cond_labels, class_counts, params, run_dir) -> dict:
        info = super().fit(images_or_features, cond_labels, class_counts, params, run_dir)
        x = self.images.reshape(-1, self.images.shape[-1]).astype(np.float64)
        self.mean, self.std = x.mean(0), x.std(0)
        self.share = float(params.get("NOISE_SHARE", 0.33))
        return info

    def generate(self, label, seeds):
        copies, extras = super().generate(label, seeds)
        out = copies.copy()
        for i, s in enumerate(seeds):
            rng = np.random.default_rng([s, 1])          # independent of the copy's draw
            if rng.random() < self.share:
                noise = rng.normal(self.mean, self.std, copies.shape[1:])
                out[i] = np.clip(np.rint(noise), 0, 255).astype(np.uint8)
                extras[i] = {"noise": True}
        return out, extras
