"""Supervised cross-entropy on the hidden true labels: the upper bound of the table.

Weak view only; no confidences are learned (``pseudo_label_acc`` is not logged). Its class
prior (for ``+la``) is the true label frequency of the training set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._losses import weighted_mean
from .base import Base


class Supervised(Base):
    name = "supervised"
    disambiguates = False
    records_compatible = False

    def losses(self, batch, out, log_prior):
        loss = weighted_mean(F.cross_entropy(out.logits["weak"], batch.labels, reduction="none"),
                             batch.weight)
        return loss, {"loss_cls": loss}, None

    def mixup_targets(self, batch, out):
        return F.one_hot(batch.labels, self.cfg.num_classes).float(), None, 1.0

    def class_prior(self, trainer) -> torch.Tensor:
        counts = torch.bincount(trainer.labels, minlength=self.cfg.num_classes).float()
        return counts / counts.sum()
