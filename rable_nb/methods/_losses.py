"""Loss math shared by several methods (pure tensor functions).

Notation: a batch of B images with candidate masks Y (B×C bool), stored confidences S
(B×C, rows sum to 1) and logits f (B×C). ``weight`` (B, optional) are per-image loss
weights (e.g. a lower weight for synthetic images); ``None`` means a plain mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean(values) without weights, else Σ w·v / Σ w (no host synchronisation)."""
    if weight is None:
        return values.mean()
    return (weight * values).sum() / weight.sum().clamp_min(1e-12)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot rows of integer ``labels``. Unlike ``F.one_hot`` on CPU, it never reads
    the labels back to check their range, so a step using it stays free of host reads on
    every device."""
    return (labels[..., None] == torch.arange(num_classes, device=labels.device)).float()


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float count of each class among ``labels`` (a ``bincount`` that needs no read-back
    of the largest label on CUDA)."""
    return one_hot(labels, num_classes).sum(0)


def uniform_confidence(candidates: torch.Tensor) -> torch.Tensor:
    """Initial confidences: uniform over each candidate set (rows sum to 1)."""
    y = candidates.float()
    return y / y.sum(1, keepdim=True).clamp_min(1)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """−mean_i Σ_j targets_ij log softmax(logits_i)_j (weighted mean with ``weight``)."""
    per_image = -(targets * F.log_softmax(logits.float(), dim=1)).sum(1)
    return weighted_mean(per_image, weight)


def updated_confidence(probs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """s_i ← normalise(Y_i ⊙ p_i) (PRODEN/ABLE: full replacement, no momentum)."""
    s = probs.float() * candidates.float()
    return s / s.sum(1, keepdim=True).clamp_min(1e-12)


def classifier_log_prior(classifier: torch.nn.Module, feat_mean: torch.Tensor) -> torch.Tensor:
    """log softmax(classifier(F)): the class log-prior a classifier assigns to the feature
    vector F (no gradient)."""
    with torch.no_grad():
        w = classifier.weight.float()
        b = classifier.bias.float() if classifier.bias is not None else 0.0
        return F.log_softmax(feat_mean.float() @ w.T + b, dim=0)


def smoothed(loss: torch.Tensor, logits: torch.Tensor, eps: float,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """(1−ε)·loss + ε·(−mean_j log softmax(logits)_j), weighted per image like the loss."""
    uniform = -F.log_softmax(logits.float(), dim=1).mean(1)
    return (1 - eps) * loss + eps * weighted_mean(uniform, weight)
