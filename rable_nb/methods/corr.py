"""CORR: consistency regularisation for deep partial-label learning (Wu, Wang & Zhang,
ICML 2022, "Revisiting consistency regularization for deep partial label learning").

Implemented as in the long-tailed PLL reference code, which produced the published
LT-PLL numbers of CORR, CORR + RECORDS and CORR + RECORDS + mixup
(MediaBrain-SJTU/RECORDS-LTPLL: utils/utils_loss.py ``CORR_loss`` lines 129-158,
``CORR_loss_RECORDS`` lines 160-215; train.py lines 264-272 and 316-348; paper settings:
README "Run CORR", lr 0.01, wd 1e-3, cosine, 800 epochs, batch 256, ``--upd_start 1``).

A weak and a strong view go through the network in one pass; p^w, p^s are their
softmax outputs, S the stored confidences (targets), N_i = {j : S_ij = 0} the labels
the image is known (or has learnt) not to have:

    L_neg  = 1/B Σ_i Σ_{j∈N_i} [ −log(|1 − p^w_ij| + 1e−9) − log(|1 − p^s_ij| + 1e−9) ]
    L_cons = KL(S ‖ p^w) + KL(S ‖ p^s)                    (batch means)
    L      = L_neg + L_cons

From epoch ``upd_start`` = 1 on, after the forward pass (with q = softmax(f − log prior)
when RECORDS supplies a prior, else softmax(f)):

    s_i ← normalise( sqrt( normalise(Y_i ⊙ q^w_i ⊙ q^s_i) ) )

Differences from the reference: the update always masks with the original candidate set
Y (the reference's plain CORR masks with S > 0, which differs only where a confidence has
underflowed to exactly 0); plain CORR's update normalises twice, as the reference's
RECORDS variant does (``CORR_loss_RECORDS``, matched exactly), where the reference's
plain ``CORR_loss`` normalises once, sqrt(Y ⊙ p^w ⊙ p^s) / (Σ + 1e−9) — the same
distribution up to the 1e−9 terms, so they differ only on rows whose candidates all have
tiny probability, never in the argmax: where Σ sqrt(p^w p^s) over the candidates nears
1e−9 the reference's row sums fall below 1 (towards 0), these stay distributions
(≤ 5.8e−2 per entry on the issue's random batches, ~2e−2 at row sums of 0.98; tested); the
original CORR paper's ramp-up weight on the consistency term and its extra augmentations
are not used — the LT-PLL code does not use them either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import config
from ._losses import weighted_mean
from .base import Base

EPS = 1e-9  # the reference code's epsilon in the logs and normalisations


def _normalise(t: torch.Tensor) -> torch.Tensor:
    return t / (t.sum(1, keepdim=True) + EPS)


def corr_loss(logits_w: torch.Tensor, logits_s: torch.Tensor, targets: torch.Tensor,
              weight: torch.Tensor | None = None):
    """(L_neg, L_cons) of both views against soft ``targets``; labels with target 0
    are pushed down in both views."""
    targets = targets.float()
    neg = (targets == 0).float()
    per_image_neg = torch.zeros(len(targets), device=targets.device)
    per_image_kl = torch.zeros(len(targets), device=targets.device)
    for logits in (logits_w, logits_s):
        p = F.softmax(logits.float(), dim=1)
        per_image_neg = per_image_neg - (neg * torch.log((1 - p).abs() + EPS)).sum(1)
        log_p = F.log_softmax(logits.float(), dim=1)
        per_image_kl = per_image_kl + (torch.xlogy(targets, targets) - targets * log_p).sum(1)
    return weighted_mean(per_image_neg, weight), weighted_mean(per_image_kl, weight)


def corr_confidence(logits_w: torch.Tensor, logits_s: torch.Tensor, candidates: torch.Tensor
                    ) -> torch.Tensor:
    """normalise(sqrt(normalise(Y ⊙ softmax(f^w) ⊙ softmax(f^s)))) (no gradient)."""
    p = F.softmax(logits_w.detach().float(), 1) * F.softmax(logits_s.detach().float(), 1)
    return _normalise(_normalise(candidates.float() * p).sqrt())


class Corr(Base):
    name = "corr"
    views = ("weak", "strong")
    mixup_views = ("weak", "strong")
    params = {"upd_start": 1}
    rules = {"upd_start": config.integer(0)}  # epoch (0-based) of the first update

    def updating(self, batch) -> bool:
        return self.variant(batch.epoch, batch.step)

    def variant(self, epoch, step):
        return epoch >= self.p["upd_start"]   # the confidence update and mixup term start

    def losses(self, batch, out, log_prior):
        l_neg, l_cons = self.target_terms(out.logits, batch.conf, batch.weight)
        new = None
        if self.updating(batch):
            shift = 0 if log_prior is None else log_prior
            new = corr_confidence(out.logits["weak"] - shift, out.logits["strong"] - shift,
                                  batch.cand)
        return l_neg + l_cons, {"loss_cls": l_cons, "loss_neg": l_neg}, new

    def target_terms(self, logits, targets, weight):
        return corr_loss(logits["weak"], logits["strong"], targets, weight)

    def target_loss(self, logits, targets, weight):
        return sum(self.target_terms(logits, targets, weight))

    def mixup_active(self, batch):
        # the reference adds the mixup loss with the update; the mixed views go through
        # the network from epoch 0 on (see methods/mixup.py)
        return self.updating(batch)
