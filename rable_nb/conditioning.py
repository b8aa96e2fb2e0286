"""Conditioning labels of the generators: PLL-honest pseudo-labels, or the hidden truth.

In partial-label learning the true label of a training image is hidden; only its candidate
set is known. A generator conditioned on true classes would use information the learner
does not have. ``GEN_LABELS``:

- ``'pseudo'`` (default): train ABLE for ``WARMUP_EPOCHS`` through the package's training
  engine (``training.train``) and take, per image, the argmax of its disambiguated
  confidences restricted to its candidate set (``Trainer.conf`` ⊙ Y). The hidden labels are
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
import json

import numpy as np
import torch

from . import config, dataset, training
from .networks import BACKBONES, batched_logits, load_model, pick_device, save_model

GEN_LABELS = ("pseudo", "oracle")
WARMUP_TEST_PER_CLASS = 100  # the warm-up logs its test accuracy on this many per class
# The warm-up's settings (profile defaults in config.PROFILE_DEFAULTS): shared by notebook 03
# (generator conditioning) and notebook 04 (pseudo-labels of ``+unlabeled`` images).
WARMUP_RULES = {"WARMUP_ARCH": config.one_of(sorted(BACKBONES)),
                "WARMUP_EPOCHS": config.integer(1), "WARMUP_BATCH": config.integer(1),
                "WARMUP_LR": config.number(0, low_open=True)}


def validate(params: dict) -> None:
    """Clear ``ValueError`` for bad conditioning parameters."""
    config.check(params, {"GEN_LABELS": config.one_of(GEN_LABELS), **WARMUP_RULES})


def _key(train_x: np.ndarray, candidates: np.ndarray, settings: dict) -> str:
    """Cache key of a warm-up: its images, candidate sets and settings (never the labels)."""
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for arr in (train_x, candidates):
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def warmup(train_x, candidates, cifar, arch: str, epochs: int, batch_size: int, lr: float,
           seed: int = 0, device: str = "auto"):
    """(pseudo-labels, warm-up network, info) of ABLE trained for ``epochs`` (cached).

    The training run resumes from its own checkpoint in the cache folder when interrupted.
    """
    settings = dict(method="able", arch=arch, epochs=epochs, batch_size=batch_size, lr=lr,
                    seed=seed)
    folder = config.cache_dir() / f"warmup-{_key(train_x, candidates, settings)}"
    done = folder / "warmup.json"
    if done.exists():
        with np.load(folder / "pseudo.npz") as z:
            pseudo = z["labels"]
        net, _, _ = load_model(folder / "warmup.safetensors", pick_device(device))
        return pseudo, net, json.loads(done.read_text())
    test = dataset.balanced_subset(cifar.test_y, WARMUP_TEST_PER_CLASS, seed)
    data = dict(train_x=train_x, candidates=candidates,
                labels=np.full(len(candidates), -1),  # hidden: never given to the warm-up
                test_x=cifar.test_x[test], test_y=cifar.test_y[test],
                class_counts=np.ones(cifar.num_classes, np.int64))
    cfg = training.TrainConfig(method="able", arch=arch, epochs=epochs, batch_size=batch_size,
                               lr=lr, seed=seed, num_classes=cifar.num_classes)
    result = training.train(cfg, data, folder, device, checkpoint_every=1)
    trainer = result["trainer"]
    cand = torch.as_tensor(np.asarray(candidates), device=trainer.conf.device)
    pseudo = (trainer.conf * cand).argmax(1).cpu().numpy()
    info = dict(settings, test_accuracy=result["final"]["overall"], wall_s=result["wall_s"],
                cache=folder.name)
    config.write_atomic(folder / "pseudo.npz", lambda t: np.savez(t, labels=pseudo))
    save_model(trainer.net, folder / "warmup.safetensors", meta={"warmup": settings})
    config.write_json(done, info)  # written last: marks a complete cache entry
    return pseudo, trainer.net.eval(), info


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
        pseudo, net, wi = warmup(train_x, ds["candidates"], cifar, params["WARMUP_ARCH"],
                                 params["WARMUP_EPOCHS"], params["WARMUP_BATCH"],
                                 params["WARMUP_LR"], params.get("SEED") or 0, device)
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
