"""Loss math of ABLE, RECORDS and PRODEN (pure tensor functions, no training loop).

Notation (DESIGN §5): a batch of B images with candidate masks Y (B×C, 0/1), stored
confidences S (B×C, rows sum to 1), weak-view probabilities p (B×C) and L2-normalised
projections z of both views (2B×d, weak first).

- Soft cross-entropy  L_cls = −mean_i Σ_j S_ij log softmax(logits_i)_j.
- Pseudo-labels ŷ_k = argmax_j p_kj Y_kj; P = onehot(ŷ), n_j = Σ_k P_kj.
- Ambiguity-induced weights M = (Y⊙S)(P/n)ᵀ (B×B), tiled 2×2 over the views, diagonal
  zeroed, no renormalisation: anchor a is pulled towards every b whose pseudo-label is one
  of a's candidates, weighted by a's confidence in that label, shared among the n_j images.
- L_cont = mean over 2B anchors of −(τ/τ₀) Σ_b M_ab log softmax_{c≠a}(z_a·z_c/τ)_b.
- Confidence update (full replacement): s_i ← normalise(Y_i ⊙ p_i).
- RECORDS: F ← m F + (1−m) mean(features); disambiguation uses softmax(logits − log prior)
  with prior = softmax(classifier(F)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def uniform_confidence(candidates: torch.Tensor) -> torch.Tensor:
    """Initial confidences: uniform over each candidate set (rows sum to 1)."""
    y = candidates.float()
    return y / y.sum(1, keepdim=True).clamp_min(1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−mean_i Σ_j targets_ij log softmax(logits_i)_j."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def pseudo_labels(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """argmax_j p_kj · Y_kj: the most probable candidate label of each image."""
    return (probs * candidates.float()).argmax(1)


def ambiguity_weights(candidates: torch.Tensor, conf: torch.Tensor, probs: torch.Tensor
                      ) -> torch.Tensor:
    """ABLE weight matrix over both views (2B×2B), diagonal zero.

    ``candidates`` Y, ``conf`` S and ``probs`` p are B×C (p from the weak view).
    """
    onehot = F.one_hot(pseudo_labels(probs, candidates), probs.shape[1]).float()
    per_class = onehot / onehot.sum(0, keepdim=True).clamp_min(1)     # P / n
    m = (candidates.float() * conf.float()) @ per_class.T             # B×B
    m = m.repeat(2, 2)
    return m.fill_diagonal_(0.0)


def contrastive_loss(z: torch.Tensor, weights: torch.Tensor, tau: float = 0.1,
                     base_tau: float = 0.07) -> torch.Tensor:
    """ABLE's weighted contrastive loss over 2B projections ``z`` (rows L2-normed)."""
    sim = (z.float() @ z.float().T) / tau
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))                  # exclude c = a
    log_prob = F.log_softmax(sim, dim=1).masked_fill(eye, 0.0)
    return -(tau / base_tau) * (weights * log_prob).sum(1).mean()


def updated_confidence(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """s_i ← normalise(Y_i ⊙ p_i) (full replacement, no momentum)."""
    s = probs.float() * candidates.float()
    return s / s.sum(1, keepdim=True).clamp_min(1e-12)


def records_update(feat_mean: torch.Tensor, feats: torch.Tensor, m: float = 0.9
                   ) -> torch.Tensor:
    """RECORDS momentum mean of (detached) batch features."""
    return m * feat_mean + (1 - m) * feats.detach().float().mean(0)


def log_prior(classifier: torch.nn.Module, feat_mean: torch.Tensor) -> torch.Tensor:
    """log softmax(classifier(F)): the class log-prior RECORDS subtracts from logits."""
    with torch.no_grad():
        w = classifier.weight.float()
        b = classifier.bias.float() if classifier.bias is not None else 0.0
        return F.log_softmax(feat_mean.float() @ w.T + b, dim=0)


def able_losses(logits_w: torch.Tensor, z: torch.Tensor, candidates: torch.Tensor,
                conf_rows: torch.Tensor, contrast_conf: torch.Tensor,
                prior: torch.Tensor | None = None, tau: float = 0.1, base_tau: float = 0.07):
    """Both ABLE losses and the new confidences for one batch.

    ``conf_rows`` are the stored confidences of the batch images (classification target);
    ``contrast_conf`` the rows used in M (the same rows, or rows 0..B−1 of the confidence
    table under ``faithful_bug``). ``prior`` (log-prior, RECORDS) adjusts the probabilities
    used for pseudo-labels and the update. Returns (L_cls, L_cont, new confidences).
    """
    adjusted = logits_w.detach().float()
    if prior is not None:
        adjusted = adjusted - prior
    probs = F.softmax(adjusted, dim=1)
    l_cls = soft_cross_entropy(logits_w, conf_rows)
    l_cont = contrastive_loss(z, ambiguity_weights(candidates, contrast_conf, probs), tau, base_tau)
    return l_cls, l_cont, updated_confidence(probs, candidates)
