"""RECORDS: dynamic rebalancing for long-tailed partial-label learning (Hong et al.,
ICLR 2023; official code MediaBrain-SJTU/RECORDS-LTPLL).

Keeps a momentum mean F of the backbone features (m = 0.9) and subtracts the log-prior
log softmax(g(F)) (g = the linear classifier) from the logits used for disambiguation —
pseudo-labels and the confidence update — and at test time.

As in the official code (RECORDS-LTPLL utils/utils_loss.py lines 183-193 and README
"Quick Preview"): every step F ← m·F + (1 − m)·mean_i of the image's features averaged
over the base's views (weak and strong for ABLE/CORR, weak for PRODEN; mixed images are
left out), then the prior is taken from the updated F with the current classifier. The
official evaluation subtracts the same log-prior from the test logits (train.py lines
368-384), so its published numbers compare with ``accuracy_adjusted``; ``accuracy``
(raw logits) is reported beside it. The official log(softmax + 1e−9) is computed here as
log_softmax (equal unless a class probability falls below ~1e−7).
"""
from __future__ import annotations

import torch

from .. import config
from ._losses import classifier_log_prior
from .base import Modifier


def momentum_mean(feat_mean: torch.Tensor, feats: torch.Tensor, m: float = 0.9) -> torch.Tensor:
    """F ← m·F + (1 − m)·mean(features) (no gradient)."""
    return m * feat_mean + (1 - m) * feats.detach().float().mean(0)


class Records(Modifier):
    name = "records"
    approach = "re-weighting (RECORDS)"
    needs = "features"
    params = {"m": 0.9}   # momentum of the feature mean F
    rules = {"m": config.number(0, 1, high_open=True)}

    @classmethod
    def incompatible(cls, base, others):
        if not (base.disambiguates and base.records_compatible):
            return f"{base.name!r} has no confidence update for RECORDS to rebalance"
        return None

    def init_state(self, trainer):
        self.feat_mean = torch.zeros(trainer.net.backbone.feat_dim, device=trainer.dev)

    def state(self):
        return {"feat_mean": self.feat_mean}

    def observe(self, method, batch, out):
        """Update F with this step's features, then take the prior from the updated F."""
        feats = torch.stack([out.feats[v] for v in method.base.views]).mean(0)
        self.feat_mean.copy_(momentum_mean(self.feat_mean, feats, self.p["m"]))
        self._prior = classifier_log_prior(batch.net.classifier, self.feat_mean)

    def disambiguation_log_prior(self, batch):
        return self._prior

    def test_log_prior(self, trainer):
        return classifier_log_prior(trainer.net.classifier, self.feat_mean)
