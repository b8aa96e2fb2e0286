"""ABLE: ambiguity-induced positives selection for contrastive partial-label learning
(Xia et al., IJCAI 2022; official code AlphaXia/ABLE).

A weak and a strong view of the batch go through the network in one pass (2B images).
Candidate masks Y, stored confidences S, weak-view probabilities p, L2-normalised
projections z of both views (2B×d, weak first):

- L_cls = −mean_i Σ_j S_ij log softmax(f(x_i^w))_j.
- Pseudo-labels ŷ_k = argmax_j p_kj Y_kj; P = onehot(ŷ), n_j = Σ_k P_kj.
- Weights M = (Y⊙S)(P/n)ᵀ (B×B), tiled 2×2 over the views, diagonal zeroed, no
  renormalisation: anchor a is pulled towards every b whose pseudo-label is one of a's
  candidates, weighted by a's confidence in that label and shared among the n_j images.
- L_cont = mean over 2B anchors of −(τ/τ₀) Σ_b M_ab log softmax_{c≠a}(z_a·z_c/τ)_b,
  τ = 0.1, τ₀ = 0.07.
- L = L_cls + λ·L_cont (λ = ``loss_weight`` = 1); then s_i ← normalise(Y_i ⊙ p_i).

``faithful_bug``: the official code reads the contrastive weights from rows 0..B−1 of the
confidence table (batch position, not dataset index); the switch reproduces that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import config
from ._losses import one_hot, soft_cross_entropy, updated_confidence, weighted_mean
from .base import Base


def pseudo_labels(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """argmax_j p_kj · Y_kj: the most probable candidate label of each image."""
    return (probs * candidates.float()).argmax(1)


def ambiguity_weights(candidates: torch.Tensor, conf: torch.Tensor, probs: torch.Tensor
                      ) -> torch.Tensor:
    """ABLE weight matrix over both views (2B×2B), diagonal zero.

    ``candidates`` Y, ``conf`` S and ``probs`` p are B×C (p from the weak view).
    """
    onehot = one_hot(pseudo_labels(probs, candidates), probs.shape[1])
    per_class = onehot / onehot.sum(0, keepdim=True).clamp_min(1)     # P / n
    m = (candidates.float() * conf.float()) @ per_class.T             # B×B
    m = m.repeat(2, 2)
    return m.fill_diagonal_(0.0)


def contrastive_loss(z: torch.Tensor, weights: torch.Tensor, tau: float = 0.1,
                     base_tau: float = 0.07, weight: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """ABLE's weighted contrastive loss over 2B projections ``z`` (rows L2-normed);
    ``weight`` (B, optional) weights the anchors of both views of each image."""
    sim = (z.float() @ z.float().T) / tau
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))                  # exclude c = a
    log_prob = F.log_softmax(sim, dim=1).masked_fill(eye, 0.0)
    per_anchor = -(tau / base_tau) * (weights * log_prob).sum(1)
    return weighted_mean(per_anchor, None if weight is None else weight.repeat(2))


class Able(Base):
    name = "able"
    approach = ""
    views = ("weak", "strong")
    needs = "embed"
    # tau: contrastive temperature; base_tau: the SupCon scale τ/τ_base of the official code;
    # loss_weight: λ; faithful_bug: read the contrastive weights by batch position (above)
    params = {"tau": 0.1, "base_tau": 0.07, "loss_weight": 1.0, "faithful_bug": False}
    rules = {"tau": config.number(0, low_open=True), "base_tau": config.number(0, low_open=True),
             "loss_weight": config.number(0), "faithful_bug": config.BOOLEAN}
    shortcuts = {"FAITHFUL_BUG": "faithful_bug"}

    def losses(self, batch, out, log_prior):
        p = self.p
        logits_w = out.logits["weak"]
        z = torch.cat([out.proj["weak"], out.proj["strong"]])
        disamb = logits_w.detach().float()
        if log_prior is not None:
            disamb = disamb - log_prior
        probs = F.softmax(disamb, dim=1)
        contrast_conf = batch.conf_table[:len(batch.idx)] if p["faithful_bug"] else batch.conf
        l_cls = soft_cross_entropy(logits_w, batch.conf, batch.weight)
        l_cont = contrastive_loss(z, ambiguity_weights(batch.cand, contrast_conf, probs),
                                  p["tau"], p["base_tau"], batch.weight)
        return (l_cls + p["loss_weight"] * l_cont, {"loss_cls": l_cls, "loss_cont": l_cont},
                updated_confidence(probs, batch.cand))
