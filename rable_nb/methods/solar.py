"""SoLar: Sinkhorn label refinery for imbalanced partial-label learning (Wang et al.,
NeurIPS 2022; official code hbzju/SoLar, the same file as RECORDS-LTPLL's train_solar.py).

Reference: hbzju/SoLar train.py — two stages (lines 427-429), the step (lines 257-349),
the prior estimate (lines 378-394); utils/utils_algo.py ``sinkhorn`` (lines 8-47);
CIFAR-10 settings from its README and RECORDS-LTPLL's README ("Run SoLar"): 800 epochs,
lr 0.01, wd 1e-3, cosine, batch 256, ``--est_epochs 100 --rho_range 0.2,0.6
--gamma 0.1,0.01``, defaults ``lamd 3, eta 0.9, tau 0.99, warmup_epoch 50,
queue_length 64``.

Every step (weak and strong view, each through its own forward pass as in the reference):

- p = softmax(f(x^w)); cost M_i = p_i ⊙ Y_i; stored confidences S (PRODEN-style).
- Sinkhorn: Q = argmin over plans with sample marginals 1/N and class marginals r̂ (the
  estimated prior) of ⟨Q, −log M⟩ − H(Q)/λ, λ = 3, over the queue of the last 64
  batches' costs plus this batch (once the queue is full); Q·N rows are the pseudo-labels
  q_i of the batch.
- Selection: per pseudo-class j (argmax q_i), the ⌈B·r̂_j·ρ⌉ (at least 1) images with the
  smallest loss −Σ q_i log p_i, plus every image with Σ_j q_ij p_ij > τ = 0.99.
- From epoch 1: L = η·(L_sink + L_cons [+ L_mix]) + (1−η)·L_rn, with L_sink = CE(p^w, q)
  and L_cons = CE(p^s, q) over the selected images, L_rn = −Σ S log p^w over the others,
  L_mix the ``+mixup`` term (selected images only: their mixes alone form its pass's
  BatchNorm statistics, as in the reference, which forwards only them; see
  ``methods/mixup.py``); epoch 0: L = L_rn over all images.
  η = 0.9 and ρ = 0.2 → 0.6 ramp up linearly over the warm-up epochs.
- S_i ← normalise(Y_i ⊙ p_i) after the step.

After every epoch: r̂ ← γ·r̂_train + (1−γ)·r̂, r̂_train = frequencies of argmax(p ⊙ Y) over
the training set (evaluation mode, no augmentation). Stage 1 ("estimate", ``est_epochs``,
γ = 0.1) starts from the uniform prior; stage 2 ("train", ``cfg.epochs``, γ = 0.01) starts
a fresh network, optimizer and confidences from the estimated prior. The warm-up and
estimation epochs are given at 800 epochs and scale with ``cfg.epochs``.

The published SoLar number (CIFAR-10-LT, ρ = 100, q = 0.3: 75.38, RECORDS-LTPLL README)
includes the mixup term: it is ``solar+mixup`` here; ``solar`` leaves L_mix out.

Differences from the reference, for a synchronisation-free step: the Sinkhorn loop runs a
fixed 50 iterations (the reference stops on a criterion, ``err < 0.1`` with err the sum of
its scalings, that cannot fire: in effect 50 too) and guards its divisions instead of
re-running on NaN — the guards act only where the reference's numbers leave the normal
fp32 range (a denominator below 1.2e−38, a kernel row below 1e−30, which is then divided
by its largest cost first); elsewhere the iterations are the reference's, on its
kernel cost^λ (tested: equal to its fp32 loop to 1e−6); the per-class selection
is vectorised (ties broken by batch position); the mixup partner of a selected image is
drawn among the selected images of the whole batch forward (see ``mixup.pairing``).

Sinkhorn is the short loop below rather than POT: it is faster at SoLar's size, needs no
host-side convergence check, and agrees with POT's pseudo-labels to 2e−3 (tested); the
timings are in docs/decisions.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import config
from ..engine.networks import batched_logits
from ._losses import class_counts, updated_confidence, weighted_mean
from .base import Base, Stage

# guards the Sinkhorn divisions against exact zeros (a class or an image without mass):
# the smallest normal fp32 number, so that the scalings, which drift over many decades
# with a long-tailed prior, are not cut short (a guard of 1e-30 was: up to 0.74 per entry)
TINY = torch.finfo(torch.float32).tiny
# A kernel row whose largest entry falls below this is divided by it first (fp32 normal
# numbers end at 1.2e-38: cost^λ would lose its digits or flush to zero)
KERNEL_FLOOR = 1e-30


def sinkhorn(cost: torch.Tensor, prior: torch.Tensor, lamd: float = 3.0, iters: int = 50
             ) -> torch.Tensor:
    """Pseudo-labels: N·Q for the entropic transport plan Q between the N samples (mass
    1/N each) and the classes (mass ``prior``) with kernel cost^λ (zeros stay zero).

    ``cost`` N×K non-negative (masked probabilities), ``prior`` K summing to 1. Rows of the
    result sum to 1; its column sums approach N·prior. The iterations are the reference's
    (equal to its fp32 loop wherever its numbers stay normal fp32 numbers); the guards act
    only outside that range (see ``TINY``, ``KERNEL_FLOOR``).
    """
    cost = cost.float()
    # The reference's kernel: cost^λ as it is. 50 iterations stop short of convergence,
    # so rescaling a row — which leaves the converged plan unchanged, the row's factor
    # absorbing it — would start elsewhere and end elsewhere (dividing every row by its
    # maximum did: up to 0.74 per entry at batch 64 with a long-tailed prior). Only a row
    # whose kernel would leave the normal fp32 range (largest entry < KERNEL_FLOOR) is
    # divided by its largest cost first: another start for that row, where the
    # reference computes with subnormal numbers or divides by zero and re-runs on a
    # relaxed cost when it sees the NaN.
    kernel = cost.pow(lamd)
    rescaled = (cost / cost.amax(1, keepdim=True).clamp_min(TINY)).pow(lamd)
    kernel = torch.where(kernel.amax(1, keepdim=True) < KERNEL_FLOOR, rescaled, kernel)
    n = len(kernel)
    c = torch.full((n,), 1.0 / n, device=kernel.device)
    prior = prior.float()
    for _ in range(iters):
        r = prior / (kernel.T @ c).clamp_min(TINY)
        c = (1.0 / n) / (kernel @ r).clamp_min(TINY)
    return kernel * c[:, None] * r[None, :] * n


def small_loss_selection(losses: torch.Tensor, classes: torch.Tensor, quota: torch.Tensor
                         ) -> torch.Tensor:
    """Mask of the ``quota[classes[i]]`` lowest-loss images of each class (ties: position)."""
    n = len(losses)
    pos = torch.arange(n, device=losses.device)
    before = (losses[None, :] < losses[:, None]) | (
        (losses[None, :] == losses[:, None]) & (pos[None, :] < pos[:, None]))
    rank = ((classes[None, :] == classes[:, None]) & before).sum(1)
    return rank < quota[classes]


def _ramp(epoch: int, length: int) -> float:
    return 1.0 if epoch >= length else epoch / length


class Solar(Base):
    name = "solar"
    views = ("weak", "strong")
    joint_forward = False
    records_compatible = False
    mixup_after_forward = True
    params = {"lamd": 3.0, "eta": 0.9, "tau": 0.99, "rho_start": 0.2, "rho_end": 0.6,
              "gamma_estimate": 0.1, "gamma_train": 0.01, "queue_batches": 64,
              "sinkhorn_iters": 50, "est_epochs": None, "warmup_epochs": None}
    tiny = {"queue_batches": 2, "est_epochs": 1}
    rules = {"lamd": config.number(0, low_open=True), "eta": config.number(0, 1),
             "tau": config.number(0, 1), "rho_start": config.number(0, 1),
             "rho_end": config.number(0, 1), "gamma_estimate": config.number(0, 1),
             "gamma_train": config.number(0, 1), "queue_batches": config.integer(1),
             "sinkhorn_iters": config.integer(1), "est_epochs": config.integer(1),
             "warmup_epochs": config.integer(0)}

    @classmethod
    def default_params(cls, cfg):
        p = dict(cls.params)
        p["est_epochs"] = max(1, round(cfg.epochs * 100 / 800))
        p["warmup_epochs"] = round(cfg.epochs * 50 / 800)
        return p

    def stages(self):
        return [Stage("estimate", self.p["est_epochs"]),
                Stage("train", self.cfg.epochs, fresh_model=True, fresh_confidence=True)]

    def init_state(self, trainer):
        k = self.cfg.num_classes
        self.prior = torch.full((k,), 1.0 / k, device=trainer.dev)
        self.queue = torch.zeros(self.p["queue_batches"] * self.cfg.batch_size, k,
                                 device=trainer.dev)

    def state(self):
        return {"prior": self.prior, "queue": self.queue}

    def start_stage(self, trainer, stage):
        self.queue.zero_()

    def variant(self, epoch, step):
        # the full loss from epoch 1; Sinkhorn over the queue once it is full
        return epoch >= 1, step >= self.p["queue_batches"]

    def schedule(self, epoch, step):
        """η and ρ (ramped up over the warm-up epochs) and the queue row this batch fills."""
        ramp = _ramp(epoch, self.p["warmup_epochs"])
        return {"eta": self.p["eta"] * ramp,
                "rho": self.p["rho_start"] + (self.p["rho_end"] - self.p["rho_start"]) * ramp,
                "queue_at": (step % self.p["queue_batches"]) * self.cfg.batch_size}

    def _pseudo_labels(self, cost: torch.Tensor, batch) -> torch.Tensor:
        """Sinkhorn over (full queue +) this batch; then the batch joins the queue."""
        b = len(cost)
        queue_full = self.variant(batch.epoch, batch.step)[1]
        rows = torch.cat([self.queue, cost]) if queue_full else cost
        labels = sinkhorn(rows, self.prior, self.p["lamd"], self.p["sinkhorn_iters"])[-b:]
        rows_at = self.value(batch, "queue_at") + torch.arange(b, device=cost.device)
        self.queue.index_copy_(0, rows_at, cost)
        return labels

    def losses(self, batch, out, log_prior):
        eta, rho = self.value(batch, "eta"), self.value(batch, "rho")
        logits_w, logits_s = out.logits["weak"], out.logits["strong"]
        probs = F.softmax(logits_w.detach().float(), 1)
        cand = batch.cand.float()
        pseudo = self._pseudo_labels(probs * cand, batch)
        log_p = F.log_softmax(logits_w.float(), 1)
        rn = -(log_p * batch.conf).sum(1)
        sink = -(log_p * pseudo).sum(1)
        b = len(batch.idx)
        quota = torch.ceil(b * self.prior * rho).clamp_min(1)
        chosen = (small_loss_selection(sink.detach(), pseudo.argmax(1), quota)
                  | ((pseudo * probs).sum(1) > self.p["tau"]))
        w = torch.ones(b, device=rn.device) if batch.weight is None else batch.weight
        l_rn = weighted_mean(rn, batch.weight)
        terms = {"loss_cls": l_rn, "loss_sinkhorn": sink.mean().detach(),
                 "selected": chosen.float().mean()}
        self._mix = (pseudo, chosen, eta)
        if not self.variant(batch.epoch, batch.step)[0]:
            loss = l_rn
        else:
            l_sin = weighted_mean(sink, w * chosen)
            cons = -(F.log_softmax(logits_s.float(), 1) * pseudo).sum(1)
            l_cons = weighted_mean(cons, w * chosen)
            l_unrel = weighted_mean(rn, w * ~chosen)
            loss = eta * (l_sin + l_cons) + (1 - eta) * l_unrel
            terms["loss_cons"] = l_cons
        return loss, terms, updated_confidence(probs, batch.cand)

    # +mixup: the selected images with their Sinkhorn pseudo-labels, scaled by η
    def mixup_active(self, batch):
        return self.variant(batch.epoch, batch.step)[0]

    def mixup_targets(self, batch, out):
        return self._mix

    def end_epoch(self, trainer):
        """r̂ ← γ·(frequencies of argmax p ⊙ Y over the training set) + (1 − γ)·r̂."""
        logits = trainer.method.train_logits(
            batched_logits(trainer.net, trainer.x, precision=self.cfg.precision))
        guess = (F.softmax(logits, 1) * trainer.cand.float()).argmax(1)
        freq = class_counts(guess, self.cfg.num_classes) / len(guess)
        gamma = self.p["gamma_estimate" if trainer.stage.name == "estimate" else "gamma_train"]
        self.prior.copy_(gamma * freq + (1 - gamma) * self.prior)

    def class_prior(self, trainer):
        return self.prior

