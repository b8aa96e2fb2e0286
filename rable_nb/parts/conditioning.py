"""Conditioning labels of the generators: PLL-honest pseudo-labels, or the hidden truth.

In partial-label learning the true label of a training image is hidden; only its candidate
set is known. A generator conditioned on true classes would use information the learner
does not have. ``GEN_LABELS``:

- ``'pseudo'`` (default): train ``WARMUP_METHOD`` (ABLE; quick: ``proden+la``) for
  ``WARMUP_EPOCHS`` through the package's training engine (``rable_nb/parts/warmup.py``) and
  take, per image, the argmax of its disambiguated confidences restricted to its candidate set (``Trainer.conf`` ⊙ Y). The hidden labels are
  never given to the warm-up (it receives −1 in their place), so its output depends only on
  images, candidate sets and settings. The warm-up is cached per data set and settings.
  ``LABEL_RULE`` chooses how the warm-up's outputs become one label per image
  (``rable_nb/parts/labelrules.py``): ``'confidence'`` (the argmax above), ``'adjusted'``
  (balanced logits + ``LABEL_TAU`` · log of the EM-estimated prior, within Y) or
  ``'sinkhorn'`` (each class gets about its estimated count; sharpness ``LABEL_EPS``);
  ``LABEL_KEEP`` < 1 fits the generator on the most confident share of each class only
  (the others get −1; the plan counts them all).
- ``'oracle'``: the hidden true labels — an ablation; it is recorded as such in
  ``synthetic/settings.json``, every manifest row, the metrics of ``rable`` runs and the
  figure titles.

The top-up plan counts images per *conditioning* label: with pseudo-labels the true class
counts are unknown, so class c is topped up to the target from the number of images
pseudo-labelled c (documented choice: the learner rebalances what it believes the classes to
be). The warm-up model also serves ``SYNTH_FILTER`` (:func:`sample_filter`): ``'class'``
(or ``True``) keeps samples it assigns to the intended class; ``'centre'`` keeps samples
whose distance to the class centre in its feature space lies inside the band
(``SYNTH_FILTER_BAND``, default the 5–95 % quantiles) of the distances of the class's real
conditioning images — DiffuLT's and DBG's "approximately in-distribution" filter, with the
warm-up's pseudo-labels instead of true labels.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .. import config
from . import labelrules
from .labelrules import LABEL_RULES
from ..engine.networks import batched_logits
from .warmup import WARMUP_RULES, WarmupSettings, warmup

GEN_LABELS = ("pseudo", "oracle")
FILTERS = ("none", "class", "centre")  # SYNTH_FILTER; False / True: 'none' / 'class'


def filter_mode(value) -> str:
    """The ``SYNTH_FILTER`` mode of a notebook value (False/None: 'none', True: 'class')."""
    if value is None or isinstance(value, bool):
        return "class" if value else "none"
    return value


def recorded_filter(value):
    """How ``synthetic/settings.json`` records the filter (False / True as before round 3)."""
    return {"none": False, "class": True}.get(filter_mode(value), filter_mode(value))


def validate(params: dict) -> None:
    """Clear ``ValueError`` for bad conditioning parameters."""
    config.check(params, {"GEN_LABELS": config.one_of(GEN_LABELS), **WARMUP_RULES,
                          "LABEL_RULE": config.one_of(LABEL_RULES),
                          "LABEL_TAU": config.number(0),
                          "LABEL_EPS": config.number(0, low_open=True),
                          "LABEL_KEEP": config.number(0, 1, low_open=True)})


@dataclass(frozen=True)
class ConditioningSettings:
    """What the conditioning labels depend on, read once from notebook 03's parameters
    (:meth:`from_params`): the source (``GEN_LABELS``), the warm-up behind pseudo-labels,
    the assignment rule (``LABEL_RULE`` and the one setting it reads, ``LABEL_KEEP``) and
    whether a sample filter needs the warm-up's network (``SYNTH_FILTER``)."""
    kind: str
    warmup: WarmupSettings
    rule: str = "confidence"
    tau: float = 1.0           # LABEL_TAU ('adjusted')
    eps: float = 0.1           # LABEL_EPS ('sinkhorn')
    keep: float = 1.0          # LABEL_KEEP: the most confident share kept
    synth_filter: str = "none"

    @classmethod
    def from_params(cls, params: dict) -> ConditioningSettings:
        keep = params.get("LABEL_KEEP")
        return cls(kind=params["GEN_LABELS"], warmup=WarmupSettings.from_params(params),
                   rule=params.get("LABEL_RULE") or "confidence",
                   tau=1.0 if params.get("LABEL_TAU") is None else float(params["LABEL_TAU"]),
                   eps=float(params.get("LABEL_EPS") or 0.1),
                   keep=1.0 if keep is None else float(keep),
                   synth_filter=filter_mode(params.get("SYNTH_FILTER")))

    def rule_record(self) -> dict:
        """The assignment rule and the setting it reads (recorded in synthetic/settings.json)."""
        out = {"LABEL_RULE": self.rule}
        if self.rule == "adjusted":
            out["LABEL_TAU"] = self.tau
        elif self.rule == "sinkhorn":
            out["LABEL_EPS"] = self.eps
        if self.keep < 1:
            out["LABEL_KEEP"] = self.keep
        return out


def cond_labels(ds: dict, train_x, cifar, settings: ConditioningSettings, device: str = "auto",
                need_net: bool = False):
    """(conditioning labels, warm-up network or None, info) for ``settings.kind``.

    ``'pseudo'`` reads only images and candidate sets; ``'oracle'`` returns ``ds['labels']``.
    The warm-up also runs for ``'oracle'`` when ``SYNTH_FILTER`` or ``need_net`` (the
    ``feature`` backend's backbone) needs its network.
    """
    kind = settings.kind
    validate({"GEN_LABELS": kind})
    net, info = None, {"gen_labels": kind}
    if kind == "pseudo" or settings.synth_filter != "none" or need_net:
        pseudo, net, wi = warmup(train_x, ds["candidates"], cifar, settings.warmup, device)
        info["warmup"] = wi
    if kind == "pseudo":
        info["rule"] = rule = settings.rule_record()
        if rule != {"LABEL_RULE": "confidence"}:
            logits = batched_logits(net, train_x).float().cpu().numpy()
            prior = labelrules.estimate_prior(logits, ds["candidates"])
            info["estimated_counts"] = np.round(prior * len(train_x)).astype(int).tolist()
            info["confidence_labels"] = pseudo  # today's rule, shown beside the chosen one
            how = dict(tau=settings.tau, prior=prior, eps=settings.eps)
            every, score = labelrules.labelled(rule["LABEL_RULE"], logits, ds["candidates"],
                                               pseudo, **how)
            info["assigned_counts"] = np.bincount(every, minlength=ds["candidates"].shape[1]
                                                  ).tolist()  # the plan counts them all
            pseudo = labelrules.keep_confident(every, score, settings.keep)
    labels = pseudo if kind == "pseudo" else np.asarray(ds["labels"])
    info["sha1"] = hashlib.sha1(np.ascontiguousarray(labels, np.int64).tobytes()).hexdigest()
    return labels, net, info


def accuracy(cond, truth, num_classes: int) -> dict:
    """Purity of the conditioning labels against the hidden truth (reporting only): overall
    agreement; per true class the recall (``per_class``); per conditioning class the
    precision; the conditioning-label counts next to the true counts."""
    cond, truth = np.asarray(cond), np.asarray(truth)
    pur = labelrules.purity(cond, truth, num_classes)
    return dict(overall=float((cond == truth).mean()), per_class=pur["recall"],
                precision=pur["precision"], cond_counts=pur["cond_counts"],
                true_counts=pur["true_counts"])


def sample_filter(mode, net, real, cond, band=(0.05, 0.95)):
    """``accept(samples, label)`` for ``SYNTH_FILTER=mode`` (None for 'none'). ``real``: the
    real training images, or their features when the samples are features; ``cond``: their
    conditioning labels (the centres and bands of :func:`centre_filter`)."""
    mode = filter_mode(mode)
    if mode == "none":
        return None
    return class_filter(net) if mode == "class" else centre_filter(net, real, cond, band)


def _features(net, x) -> np.ndarray:
    from ..engine.backbone import encode
    return np.asarray(x, np.float32) if np.ndim(x) == 2 else encode(net, x)


def centre_filter(net, real, cond, band=(0.05, 0.95)):
    """``accept(samples, label)``: a sample of class c is kept when its distance to the mean
    feature of c's real conditioning images lies in the ``band`` quantiles of those
    images' own distances (features of the warm-up network; vectors are taken as they are)."""
    feats, cond = _features(net, real), np.asarray(cond)
    centres, bounds = {}, {}
    for c in np.unique(cond):
        f = feats[cond == c]
        centres[int(c)] = f.mean(0)
        d = np.linalg.norm(f - centres[int(c)], axis=1)
        bounds[int(c)] = np.quantile(d, band) if len(d) > 1 else (0.0, np.inf)

    def accept(samples, label):
        c = int(label)
        if c not in centres:
            return np.ones(len(samples), bool)
        d = np.linalg.norm(_features(net, samples) - centres[c], axis=1)
        lo, hi = bounds[c]
        return (d >= lo) & (d <= hi)
    return accept


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
