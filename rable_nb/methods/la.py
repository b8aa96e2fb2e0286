"""+la: train-time logit adjustment (Menon et al., ICLR 2021, "Long-tail learning via
logit adjustment", the logit-adjusted loss) with an estimated class prior.

During training every logit the base method sees — in its losses, its disambiguation
and its mixup term — is f(x) + ζ·log π̂; at test time the network's own logits f(x) are
used. With the training-set posterior modelled as softmax(f + log π), f itself learns the
class-balanced scores. In partial-label learning the prior is unknown, so π̂ is the base
method's estimate, refreshed before every epoch: the mean of the stored confidences
(PRODEN, ABLE, CORR), SoLar's moving-average prior (its SoLar-LA variant, Wang et al.,
NeurIPS 2022, Table 6: ζ = 1 best on CIFAR-10-LT), or the true label frequencies for
``supervised``. ζ = ``zeta`` (default 1). Not combined with RECORDS, which rebalances the
same logits after the fact.
"""
from __future__ import annotations

import torch

from .. import config
from .base import Modifier


class LogitAdjustment(Modifier):
    name = "la"
    approach = "logit adjustment"
    params = {"zeta": 1.0}
    rules = {"zeta": config.number(0, 3)}  # 1: the Bayes-consistent adjustment

    @classmethod
    def incompatible(cls, base, others):
        if "records" in others:
            return "RECORDS and +la both rebalance the same logits; use one of them"
        return None

    def init_state(self, trainer):
        self.shift = torch.zeros(self.cfg.num_classes, device=trainer.dev)

    def state(self):
        return {"shift": self.shift}

    def start_epoch(self, trainer):
        prior = trainer.method.base.class_prior(trainer).float().clamp_min(1e-8)
        self.shift.copy_(self.p["zeta"] * (prior / prior.sum()).log())

    def adjust_logits(self, logits):
        return logits + self.shift
