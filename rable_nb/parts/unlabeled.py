"""The ``unlabeled`` data source: real CIFAR-10 images the long tail left out, pseudo-labelled
(Yang & Xu, NeurIPS 2020, "Rethinking the value of labels for improving class-imbalanced
learning", semi-supervised half; official code YyzHarry/imbalanced-semi-self).

Pool: every CIFAR-10 training image that is not in the run's long tail — at ρ = 100 with
n_max = 5000 exactly the 37,594 images the long tail dropped (with a smaller ``N_MAX``, as in
the smoke profile, the rest of the training set). Its labels are hidden: nothing below reads
them except :func:`report`.

Selection: a seeded random subset (seed = ``SEED``; no label is looked at) of
min(pool, ``UNLABELED`` (0 = all), ⌊``RATIO`` · long-tailed images⌋) images. The reference
adds 5 unlabeled images per labeled one (``dataset/imbalance_cifar.py`` line 81,
``unlabel_size_factor = 5``), hence ``RATIO`` = 5 by default; at ρ = 100 that admits the
whole pool.

Pseudo-labels: the intermediate model is ABLE trained on the long-tailed partial-label data
for ``WARMUP_EPOCHS`` (``warmup.warmup``: the same cached warm-up that conditions the
generators of notebook 03; it never receives the hidden labels). An unlabeled image starts
with every class as a candidate; the warm-up network's softmax p (evaluation mode, no
augmentation) gives ŷ = argmax_j p_j and its confidence max_j p_j. Rule: where the
confidence is at least ``UNLABELED_THRESHOLD`` the candidate set becomes {ŷ} (the image then
trains with ŷ as its label, ABLE's update keeping it there); below it the image keeps every
class as a candidate and the PLL method disambiguates it like any other. The reference uses
the intermediate classifier's argmax for every image (``gen_pseudolabels.py`` lines
108-119, no threshold) — ``UNLABELED_THRESHOLD`` = 0, the default.

The agreement of the pseudo-labels with the hidden truth is reported (:func:`report`, in the
metrics file's ``unlabeled`` block), never used.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import conditioning, warmup
from ..engine.networks import batched_logits


def pool(num_train: int, long_tail: np.ndarray) -> np.ndarray:
    """Sorted indices of the training images that are not in ``long_tail``."""
    return np.setdiff1d(np.arange(num_train), np.asarray(long_tail))


def select(pool_idx: np.ndarray, n_labeled: int, count: int = 0, ratio: float = 5.0,
           seed: int = 0) -> np.ndarray:
    """Seeded random subset of ``pool_idx`` (sorted) of min(pool, ``count`` (0 = all),
    ⌊``ratio`` · ``n_labeled``⌋) images; it depends on the pool's indices only."""
    n = min(len(pool_idx), count or len(pool_idx), int(ratio * n_labeled))
    rng = np.random.default_rng([seed, 20200])
    return np.sort(rng.permutation(pool_idx)[:n])


def pseudo_label(net: torch.nn.Module, images, num_classes: int, threshold: float = 0.0):
    """(pseudo-labels ŷ, confidences, candidate sets) of uint8 ``images`` under ``net``:
    candidates {ŷ} where the confidence reaches ``threshold``, else every class."""
    probs = F.softmax(batched_logits(net, images), 1)
    conf, labels = probs.max(1)
    labels, conf = labels.cpu().numpy(), conf.cpu().numpy()
    candidates = np.ones((len(labels), num_classes), dtype=bool)
    sure = conf >= threshold
    candidates[sure] = np.eye(num_classes, dtype=bool)[labels[sure]]
    return labels, conf, candidates


@dataclass(frozen=True)
class UnlabeledSettings:
    """What :func:`pseudo_labelled` reads, from notebook 04's parameters once
    (:meth:`from_params`)."""
    count: int          # UNLABELED (0: as many as RATIO allows)
    ratio: float        # RATIO
    threshold: float    # UNLABELED_THRESHOLD
    seed: int           # SEED
    warm: warmup.WarmupSettings   # the warm-up that pseudo-labels them

    @classmethod
    def from_params(cls, params: dict) -> UnlabeledSettings:
        return cls(int(params.get("UNLABELED") or 0), float(params.get("RATIO") or 5.0),
                   float(params.get("UNLABELED_THRESHOLD") or 0.0), int(params.get("SEED") or 0),
                   warmup.WarmupSettings.from_params(params))


def pseudo_labelled(ds: dict, cifar, settings: UnlabeledSettings, device: str = "auto") -> dict:
    """The unlabeled images of a run: ``x`` (uint8), ``candidates``, ``hidden`` (their true
    labels: for the trainer's logs and :func:`report` only) and ``info`` (how they were
    chosen and pseudo-labelled, with the pseudo-label accuracy).

    ``ds``: the run's dataset (``indices``, ``candidates``).
    """
    chosen = select(pool(len(cifar.train_y), ds["indices"]), len(ds["indices"]),
                    settings.count, settings.ratio, settings.seed)
    threshold = settings.threshold
    _, net, warm = warmup.warmup(cifar.train_x[ds["indices"]], ds["candidates"], cifar,
                                 settings.warm, device)
    x = cifar.train_x[chosen]
    labels, conf, candidates = pseudo_label(net, x, cifar.num_classes, threshold)
    hidden = cifar.train_y[chosen]
    info = dict(n=int(len(chosen)), pool=int(len(cifar.train_y) - len(ds["indices"])),
                threshold=threshold, confident=int((conf >= threshold).sum()),
                indices_sha1=hashlib.sha1(chosen.astype(np.int64).tobytes()).hexdigest(),
                warmup={k: v for k, v in warm.items() if k != "wall_s"},
                accuracy=report(labels, conf >= threshold, hidden, cifar.num_classes))
    return dict(x=x, candidates=candidates, hidden=hidden, info=info)


def report(pseudo, confident, hidden, num_classes: int) -> dict:
    """Agreement of the pseudo-labels with the hidden truth (reporting only): over every
    selected image (``conditioning.accuracy``: overall, per true class, counts) and over
    the confident ones that train with their pseudo-label."""
    pseudo, confident, hidden = map(np.asarray, (pseudo, confident, hidden))
    out = conditioning.accuracy(pseudo, hidden, num_classes) if len(hidden) else {}
    out["confident_overall"] = (float((pseudo[confident] == hidden[confident]).mean())
                                if confident.any() else None)
    return out
