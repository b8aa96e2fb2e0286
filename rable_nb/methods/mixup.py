"""+mixup: the base method's classification loss on mixed images with mixed targets.

As in the LT-PLL reference code (RECORDS-LTPLL train.py lines 320-334 and
utils/utils_loss.py lines 217-250 for CORR + RECORDS; hbzju/SoLar train.py lines 319-329):
λ ~ Beta(α, α) with α = 4, λ ← max(λ, 1 − λ), one random pairing per batch,

    x̃ = λ x + (1 − λ) x_π,   t̃ = λ t + (1 − λ) t_π,   L_mix = w · L_base(f(x̃), t̃),

applied to every view the base mixes (CORR: weak and strong with the same λ and π;
others: weak). The targets t, an optional per-image mask and a scale come from the base
(confidences by default; true labels for ``supervised``; Sinkhorn pseudo-labels of the
selected images, scaled by η, for SoLar). When the targets do not depend on this step's
outputs the mixed images join the main forward pass (as the RECORDS code does);
otherwise (SoLar) they take a second pass. The base decides when mixup starts (CORR and
SoLar: once confidences are updated, epoch ≥ 1).

λ is drawn on the device from the epoch's generator (Gamma(α) as a sum of α
exponentials, so α must be a whole number): no host synchronisation.
"""
from __future__ import annotations

import torch

from .. import config
from .base import Modifier


def beta_symmetric(alpha: int, generator: torch.Generator, device) -> torch.Tensor:
    """One draw of Beta(α, α) for a whole number α, on ``device`` (0-dim tensor)."""
    u = torch.rand(2, alpha, device=device, generator=generator).clamp_min(1e-12)
    gammas = -u.log().sum(1)                       # two Gamma(α, 1) draws
    return gammas[0] / gammas.sum()


def pairing(n: int, mask: torch.Tensor | None, generator: torch.Generator, device
            ) -> torch.Tensor:
    """Partner index of every image: a uniform random permutation, or — with ``mask`` —
    one that pairs masked images only among themselves (static shapes, no sync)."""
    if mask is None:
        return torch.randperm(n, device=device, generator=generator)
    outside = (~mask).float() * 2                  # masked images sort first
    first = torch.argsort(torch.rand(n, device=device, generator=generator) + outside)
    second = torch.argsort(torch.rand(n, device=device, generator=generator) + outside)
    partner = torch.empty_like(first)
    partner[first] = second
    return partner


class Mixup(Modifier):
    name = "mixup"
    params = {"weight": 1.0}
    rules = {"weight": config.number(0)}

    def __init__(self, cfg, params):
        super().__init__(cfg, params)
        alpha = cfg.mixup_alpha
        if not (float(alpha).is_integer() and alpha >= 1):
            raise ValueError(f"mixup_alpha={alpha!r} is invalid: it must be a whole number "
                             "≥ 1 (λ is drawn on the device as a ratio of Gamma sums).")
        self.alpha = int(alpha)

    def _mix(self, method, batch, out):
        """Mixed views {view_mix: images}, mixed targets and the per-image loss weight."""
        base = method.base
        targets, mask, scale = base.mixup_targets(batch, out)
        dev = batch.x.device
        lam = beta_symmetric(self.alpha, batch.gen, dev)
        lam = torch.maximum(lam, 1 - lam)
        perm = pairing(len(batch.idx), mask, batch.gen, dev)
        images = {f"{v}_mix": lam * batch.view(v) + (1 - lam) * batch.view(v)[perm]
                  for v in base.mixup_views}
        weight = None
        if batch.weight is not None:
            weight = lam * batch.weight + (1 - lam) * batch.weight[perm]
        if mask is not None:
            weight = mask.float() if weight is None else weight * mask.float()
        mixed_targets = lam * targets + (1 - lam) * targets[perm]
        return images, (mixed_targets, weight, scale)

    def extra_inputs(self, method, batch):
        self._pending = None
        if method.base.mixup_after_forward or not method.base.mixup_active(batch):
            return {}
        images, self._pending = self._mix(method, batch, None)
        return images

    def extra_loss(self, method, batch, out):
        base = method.base
        if not base.mixup_active(batch):
            return None
        if base.mixup_after_forward:
            images, (targets, weight, scale) = self._mix(method, batch, out)
            out = method.adjust(batch.forward(images, "logits"))
        else:
            targets, weight, scale = self._pending
        logits = {v: out.logits[f"{v}_mix"] for v in base.mixup_views}
        loss = base.target_loss(logits, targets, weight)
        return self.p["weight"] * scale * loss, {"loss_mix": loss}
