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
otherwise (SoLar) they take a second pass. The base decides when the mixup *loss* starts
(CORR and SoLar: once confidences are updated, epoch ≥ 1, ``Base.mixup_active``).

When the mixed images join the main pass, they join it in every step, also before their
loss starts — as in the RECORDS code, which forwards them whenever mixup is on (train.py
lines 320-331) and gates only their loss (utils/utils_loss.py lines 237-246). They carry
no loss then, but they enter BatchNorm's batch statistics (and its running statistics),
so CORR + RECORDS + mixup's epoch 0 is the official one, not CORR + RECORDS'.

A second pass (SoLar's) forwards the mixes of the base's masked images only — SoLar
forwards those of the selected images alone (train.py lines 321-328). Indexing them would
give the pass a shape that changes every step and read the count back to the host, so
the CUDA graph could not capture it; instead the pass keeps all B rows and the others are
masked out of the loss and, by ``networks.batch_statistics_of``, out of BatchNorm's batch
and running statistics, which the selected rows alone determine. Every other layer treats
rows independently, so outputs, running statistics and gradients are those of the
indexed pass (equal in float64; in float32 to rounding), at the cost of B rather than
k ≤ B rows of compute. (A masked base whose mixes joined the main pass would have them in
BatchNorm's statistics; no base does.)

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
    params = {"weight": 1.0, "alpha": 4.0}   # loss weight; λ ~ Beta(alpha, alpha)
    rules = {"weight": config.number(0),
             "alpha": (lambda v: config.is_number(v) and float(v).is_integer() and v >= 1,
                       "a whole number >= 1 (λ is drawn as a ratio of Gamma sums)")}

    def __init__(self, cfg, params):
        super().__init__(cfg, params)
        self.alpha = int(params["alpha"])  # a whole number: its rule is checked up front

    def _mix(self, method, batch, out):
        """Mixed views {view_mix: images}, (mixed targets, per-image loss weight, scale)
        and the base's per-image mask (or None)."""
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
        return images, (mixed_targets, weight, scale), mask

    def extra_inputs(self, method, batch):
        """The mixed images, in every step (also before their loss starts; see the module
        docstring), unless the base's targets need this step's outputs."""
        self._pending = None
        if method.base.mixup_after_forward:
            return {}
        images, self._pending, _ = self._mix(method, batch, None)
        return images

    def extra_loss(self, method, batch, out):
        base = method.base
        if not base.mixup_active(batch):
            return None
        if base.mixup_after_forward:   # a pass of its own: only masked rows in BatchNorm
            images, (targets, weight, scale), mask = self._mix(method, batch, out)
            out = method.adjust(batch.forward(images, "logits", rows=mask))
        else:
            targets, weight, scale = self._pending
        logits = {v: out.logits[f"{v}_mix"] for v in base.mixup_views}
        loss = base.target_loss(logits, targets, weight)
        return self.p["weight"] * scale * loss, {"loss_mix": loss}
