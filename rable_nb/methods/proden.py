"""PRODEN (Lv et al., ICML 2020): progressive identification of true labels.

Weak view only. L = −mean_i Σ_j s_ij log softmax(f(x_i))_j; after the forward pass
s_i ← normalise(Y_i ⊙ softmax(f(x_i))) (the PRODEN loss of the RECORDS code,
MediaBrain-SJTU/RECORDS-LTPLL utils/utils_loss.py lines 5-26).
"""
from __future__ import annotations

import torch.nn.functional as F

from ._losses import soft_cross_entropy, updated_confidence
from .base import Base


class Proden(Base):
    name = "proden"

    def losses(self, batch, out, log_prior):
        logits = out.logits[self.views[0]]
        disamb = logits.detach().float()
        if log_prior is not None:
            disamb = disamb - log_prior
        loss = soft_cross_entropy(logits, batch.conf, batch.weight)
        return loss, {"loss_cls": loss}, updated_confidence(F.softmax(disamb, 1), batch.cand)
