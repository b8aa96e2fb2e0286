"""Supervised cross-entropy on the hidden true labels: the upper bound of the table.

Weak view only; no confidences are learned (``pseudo_label_acc`` is not logged). Its class
prior (for ``+la``) is the true label frequency of the training set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._losses import class_counts, one_hot, weighted_mean
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
        return one_hot(batch.labels, self.cfg.num_classes), None, 1.0

    def class_scores(self, trainer) -> torch.Tensor:
        return one_hot(trainer.labels, self.cfg.num_classes)

    def class_prior(self, trainer) -> torch.Tensor:
        counts = class_counts(trainer.labels, self.cfg.num_classes)
        return counts / counts.sum()
