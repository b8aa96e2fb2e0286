"""+drs: dynamic re-sampling — each epoch's batches drawn class-balanced by the learner's
*current* labels.

Under partial labels the class of a training image is not known; it is the learner's
moving estimate (its confidences). A static rebalancing (a top-up planned once from a
warm-up, RABLE's) fixes the class counts of one moment; RECORDS (Hong et al., ICLR 2023)
argues that rebalancing must follow the learner. ``+drs`` does so at the sampler: before
every epoch, with ``S`` the base's current class scores (``Base.class_scores``: the
confidence table, restricted to each candidate set; the true labels for ``supervised``),

    hard labels:  ŷ_i = argmax_j S_ij,   n_c = #{i : ŷ_i = c},   w_i = n_{ŷ_i}^(−power)
    soft labels:  n_c = Σ_i S_ic,                                 w_i = Σ_c S_ic · n_c^(−power)

and the epoch's N draws are taken with replacement with probability w_i / Σ w. ``power``
1 balances the classes (every class as likely as any other), 0 is plain instance
sampling, 0.5 the square-root compromise (Kang et al., ICLR 2020). ``start``: the first
epoch (within the stage, 0-based) that re-samples; earlier epochs shuffle as usual
(deferred re-sampling, Cao et al., NeurIPS 2019). The default 1 lets the first epoch
turn the uniform confidences into real estimates: with hard labels, uniform rows all
point to their lowest candidate index.

**The dynamic top-up.** Where the training set holds samples made from real images (the
manifest's ``source``: ``copy`` names the image it copied), such a sample is counted in its
class, and drawn, only while its source image is still in that class by the learner's current
labels: a copy whose source has moved to another class drops out (weight 0) instead of
keeping the warm-up's label (``tied_scores``). Samples without a source (class-conditional
generators) keep their label and share their class's draw with its real images. Without
``+drs``, ``rable`` trains on the static top-up: the control.

Only the sampler changes: the step, its losses and the confidence update are the base's
own, so ``+drs`` composes with every base and modifier. The draw runs on the device from
the epoch's generator (inverse-CDF ``searchsorted``, no read-back), so a resumed run draws
the same batches and a CUDA-graph step is untouched (it receives the indices).
"""
from __future__ import annotations

import torch

from .. import config
from ._losses import one_hot
from .base import Modifier


def balanced_weights(scores: torch.Tensor, power: float, labels: str = "hard") -> torch.Tensor:
    """Per-image sampling weights (N) that balance the classes of ``scores`` (N×C) to the
    ``power`` (see the module docstring); a row of zeros (a sample that dropped out) gets
    weight 0 and is not counted. No host read."""
    if labels == "hard":
        alive = scores.sum(1) > 0
        hard = scores.argmax(1)
        counts = (one_hot(hard, scores.shape[1]) * alive[:, None]).sum(0)
        return counts.clamp_min(1).pow(-power)[hard] * alive
    counts = scores.sum(0)
    return scores @ counts.clamp_min(1e-8).pow(-power)


def tied_scores(scores: torch.Tensor, source: torch.Tensor, labels: str = "hard") -> torch.Tensor:
    """The dynamic top-up: a sample made from a real image (``source`` ≥ 0, its row) keeps
    its own class only while that image is still in it — its row becomes its own scores ⊙
    the source's current class (hard: the source's argmax as one-hot; soft: the source's
    confidences), zero when the source has moved to another class (the sample drops out).
    Rows with ``source`` −1 (real images; samples not made from one image) are unchanged."""
    ref = scores[source.clamp_min(0)]
    if labels == "hard":
        ref = one_hot(ref.argmax(1), scores.shape[1])
    return torch.where((source >= 0)[:, None], scores * ref, scores)


def draw(weights: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` indices drawn with replacement with probability ∝ ``weights`` (inverse CDF on
    the device from ``gen``: no read-back, unlike ``torch.multinomial``'s checks)."""
    cdf = weights.double().cumsum(0)
    u = torch.rand(n, generator=gen, device=weights.device, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_max(len(weights) - 1)


class DynamicResampling(Modifier):
    name = "drs"
    approach = "dynamic re-sampling"
    params = {"power": 1.0, "start": 1, "labels": "hard"}
    rules = {"power": config.number(0, 2), "start": config.integer(0),
             "labels": config.one_of(("hard", "soft"))}

    def epoch_order(self, trainer, epoch: int, gen: torch.Generator) -> torch.Tensor | None:
        if epoch < self.p["start"]:
            return None
        scores = trainer.method.base.class_scores(trainer).float()
        if trainer.source is not None:
            scores = tied_scores(scores, trainer.source, self.p["labels"])
        return draw(balanced_weights(scores, self.p["power"], self.p["labels"]),
                    len(scores), gen)
