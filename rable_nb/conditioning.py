"""Conditioning labels of the generators: PLL-honest pseudo-labels, or the hidden truth.

In partial-label learning the true label of a training image is hidden; only its candidate
set is known. A generator conditioned on true classes would use information the learner
does not have. ``GEN_LABELS``:

- ``'pseudo'`` (default): train ``WARMUP_METHOD`` (ABLE; quick: ``proden+la``) for
  ``WARMUP_EPOCHS`` through the package's training engine (``rable_nb/warmup.py``) and
  take, per image, the argmax of its disambiguated confidences restricted to its candidate set (``Trainer.conf`` ⊙ Y). The hidden labels are
  never given to the warm-up (it receives −1 in their place), so its output depends only on
  images, candidate sets and settings. The warm-up is cached per data set and settings.
- ``'oracle'``: the hidden true labels — an ablation; it is recorded as such in
  ``synthetic/settings.json``, every manifest row, the metrics of ``rable`` runs and the
  figure titles.

The top-up plan counts images per *conditioning* label: with pseudo-labels the true class
counts are unknown, so class c is topped up to the target from the number of images
pseudo-labelled c (documented choice: the learner rebalances what it believes the classes to
be). The warm-up model also serves ``SYNTH_FILTER`` (keep samples it assigns to the
intended class).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from . import config
from .networks import batched_logits
from .warmup import WARMUP_RULES, from_params

GEN_LABELS = ("pseudo", "oracle")


def validate(params: dict) -> None:
    """Clear ``ValueError`` for bad conditioning parameters."""
    config.check(params, {"GEN_LABELS": config.one_of(GEN_LABELS), **WARMUP_RULES})


def cond_labels(kind: str, ds: dict, train_x, cifar, params: dict, device: str = "auto",
                need_net: bool = False):
    """(conditioning labels, warm-up network or None, info) for ``GEN_LABELS=kind``.

    ``'pseudo'`` reads only images and candidate sets; ``'oracle'`` returns ``ds['labels']``.
    The warm-up also runs for ``'oracle'`` when ``SYNTH_FILTER`` or ``need_net`` (the
    ``feature`` backend's backbone) needs its network.
    """
    validate({"GEN_LABELS": kind})
    net, info = None, {"gen_labels": kind}
    if kind == "pseudo" or params.get("SYNTH_FILTER") or need_net:
        pseudo, net, wi = from_params(train_x, ds["candidates"], cifar, params, device)
        info["warmup"] = wi
    labels = pseudo if kind == "pseudo" else np.asarray(ds["labels"])
    info["sha1"] = hashlib.sha1(np.ascontiguousarray(labels, np.int64).tobytes()).hexdigest()
    return labels, net, info


def accuracy(cond, truth, num_classes: int) -> dict:
    """Agreement of conditioning labels with the hidden truth (reporting only): overall and
    per true class, and the conditioning-label counts next to the true counts."""
    cond, truth = np.asarray(cond), np.asarray(truth)
    per_class = [float((cond[truth == c] == c).mean()) if (truth == c).any() else None
                 for c in range(num_classes)]
    return dict(overall=float((cond == truth).mean()), per_class=per_class,
                cond_counts=np.bincount(cond, minlength=num_classes).tolist(),
                true_counts=np.bincount(truth, minlength=num_classes).tolist())


def class_filter(net):
    """``accept(samples, label)`` for ``SYNTH_FILTER``: the network predicts ``label`` (for
    feature vectors: the network's classifier head)."""
    @torch.inference_mode()
    def accept(samples, label):
        if np.ndim(samples) == 2:
            dev = next(net.parameters()).device
            logits = net.classifier(torch.as_tensor(samples, device=dev).float())
        else:
            logits = batched_logits(net, samples)
        return (logits.argmax(1) == int(label)).cpu().numpy()
    return accept
