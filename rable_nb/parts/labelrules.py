"""Assignment rules of the conditioning labels (``LABEL_RULE``): from the warm-up's outputs
and the candidate sets to one label per training image, without the hidden labels.

Inputs: the warm-up network's logits ``f(x)`` on the (unaugmented) training images, the
candidate masks ``Y`` and the warm-up's disambiguated confidences (their argmax within
``Y`` is the ``'confidence'`` rule, the only one before round 3). A logit-adjusted warm-up
(``proden+la``, the quick default) learns *balanced* logits: softmax(f(x)) estimates
p(y | x) under a uniform class prior, so the training prior must be put back to assign
labels — and it is unknown. It is estimated without labels by EM
(:func:`estimate_prior`): π ← mean_i normalise(π ⊙ softmax(f(x_i)) ⊙ Y_i), the maximum-
likelihood prior of a label-shift model whose labels are known to lie in the candidate sets
(Saerens et al., 2002, restricted to Y).

Rules (``LABEL_RULES``):

- ``'confidence'``: argmax of the warm-up's confidences within Y (precise, but the rare
  classes get few images: the confidences carry the head-biased prior of training);
- ``'adjusted'``: argmax over Y of log softmax(f(x)) + τ log π̂ (``LABEL_TAU``; τ = 0: the
  balanced network alone, which over-assigns the tail; τ = 1: the Bayes posterior under π̂);
- ``'sinkhorn'``: the count-constrained assignment (optimal transport, as SoLar does):
  Sinkhorn–Knopp scaling of Q = softmax(f(x)) ⊙ Y to rows summing to 1 and columns summing
  to N π̂, then the argmax of each row — every class gets about its estimated count.

``keep`` (``LABEL_KEEP`` < 1) keeps, per class, only that share of its assigned images —
the most confident under the rule's own score — in the conditioning set that the generator
is fitted on; the others get −1. The top-up plan still counts every assigned image (the
learner's belief of the class sizes), so precision rises without shrinking the plan.

:func:`purity` reports each rule against the hidden truth (reporting only).
"""
from __future__ import annotations

import numpy as np

LABEL_RULES = ("confidence", "adjusted", "sinkhorn")


def _restricted(logits: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """softmax(logits) restricted to the candidate sets (rows need not sum to 1)."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return p * (np.asarray(cand) > 0)


def estimate_prior(logits: np.ndarray, cand: np.ndarray, iters: int = 200,
                   tol: float = 1e-7) -> np.ndarray:
    """EM estimate of the training class prior from balanced logits and candidate sets."""
    q = _restricted(np.asarray(logits, np.float64), cand)
    k = q.shape[1]
    prior = np.full(k, 1.0 / k)
    for _ in range(iters):
        post = q * prior
        post /= np.maximum(post.sum(1, keepdims=True), 1e-300)
        new = post.mean(0)
        if np.abs(new - prior).max() < tol:
            prior = new
            break
        prior = new
    return prior


def sinkhorn(q: np.ndarray, col: np.ndarray, iters: int = 500, tol: float = 1e-6) -> np.ndarray:
    """Scale the non-negative N×C matrix ``q`` to row sums 1 and column sums ``col``."""
    q = np.asarray(q, np.float64) + 0.0
    q /= q.sum()
    r, c = np.full(len(q), 1.0 / len(q)), np.asarray(col, np.float64) / np.sum(col)
    u = np.ones(len(q))
    for _ in range(iters):
        v = c / np.maximum(q.T @ u, 1e-300)
        u_new = r / np.maximum(q @ v, 1e-300)
        if np.abs(u_new - u).max() < tol * np.abs(u).max():
            u = u_new
            break
        u = u_new
    return q * u[:, None] * v[None, :]


def _normalised(score: np.ndarray) -> np.ndarray:
    return score / np.maximum(score.sum(1, keepdims=True), 1e-300)


def scores(rule: str, logits: np.ndarray, cand: np.ndarray, tau: float = 1.0,
           prior: np.ndarray | None = None, eps: float = 0.1) -> np.ndarray:
    """N×C non-negative scores whose row argmax is ``rule``'s label (zero outside Y):
    the posterior under the EM prior (``'confidence'``'s ranking), the τ-adjusted posterior,
    or the normalised Sinkhorn plan."""
    logits = np.asarray(logits, np.float64)
    mask = np.asarray(cand) > 0
    prior = estimate_prior(logits, cand) if prior is None else np.asarray(prior, np.float64)
    q = _restricted(logits, cand)
    if rule in ("confidence", "adjusted"):
        power = 1.0 if rule == "confidence" else tau
        return _normalised(q * np.maximum(prior, 1e-12) ** power)
    logq = np.log(np.maximum(q, 1e-300))
    sharp = np.where(mask, np.exp((logq - logq.max(1, keepdims=True)) / eps), 0)
    return _normalised(sinkhorn(sharp, prior * len(logits)))


def labelled(rule: str, logits: np.ndarray, cand: np.ndarray, confidence_labels=None,
             tau: float = 1.0, prior: np.ndarray | None = None, eps: float = 0.1) -> tuple:
    """(one label per image under ``rule``, the rule's score of that label): the labels
    before ``keep`` thins them, and the ranking ``keep_confident`` thins them by."""
    if rule not in LABEL_RULES:
        raise ValueError(f"LABEL_RULE={rule!r} is invalid: expected one of {LABEL_RULES}.")
    if rule == "confidence" and confidence_labels is None:
        raise ValueError("the 'confidence' rule needs the warm-up's confidences")
    score = scores(rule, logits, cand, tau, prior, eps)
    labels = (np.asarray(confidence_labels, np.int64) if rule == "confidence"
              else np.where(np.asarray(cand) > 0, score, -1.0).argmax(1))
    return labels, score[np.arange(len(labels)), labels]


def assign(rule: str, logits: np.ndarray, cand: np.ndarray, confidence_labels=None,
           tau: float = 1.0, prior: np.ndarray | None = None, eps: float = 0.1,
           keep: float = 1.0) -> np.ndarray:
    """One conditioning label per image under ``rule`` (see the module docstring); −1 for
    the images that ``keep`` < 1 leaves out of the conditioning sets."""
    if rule == "confidence" and keep >= 1 and confidence_labels is not None:
        return np.asarray(confidence_labels, np.int64)
    return keep_confident(*labelled(rule, logits, cand, confidence_labels, tau, prior, eps),
                          keep)


def keep_confident(labels: np.ndarray, confidence: np.ndarray, keep: float) -> np.ndarray:
    """Per class, the ``keep`` share (at least one image) of its images with the highest
    ``confidence``; the others become −1."""
    labels = np.asarray(labels, np.int64)
    if keep >= 1:
        return labels
    out = np.full(len(labels), -1, np.int64)
    for c in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == c)
        best = rows[np.argsort(-confidence[rows], kind="stable")[:max(1, round(keep * len(rows)))]]
        out[best] = c
    return out


def purity(cond, truth, num_classes: int) -> dict:
    """Per class: precision and recall of the conditioning set against the hidden truth,
    and the conditioning and true counts (reporting only)."""
    cond, truth = np.asarray(cond), np.asarray(truth)
    prec, rec = [], []  # −1: in no conditioning set
    for c in range(num_classes):
        chosen, real = cond == c, truth == c
        prec.append(float((truth[chosen] == c).mean()) if chosen.any() else 0.0)
        rec.append(float((cond[real] == c).mean()) if real.any() else None)
    return dict(precision=prec, recall=rec,
                cond_counts=np.bincount(cond[cond >= 0], minlength=num_classes).tolist(),
                true_counts=np.bincount(truth, minlength=num_classes).tolist())
