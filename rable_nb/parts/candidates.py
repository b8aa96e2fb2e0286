"""Partial (candidate) labels of the long-tailed subset.

- ``uniform`` candidates (PiCO/RECORDS): each wrong label enters with probability q.
- ``instance`` candidates (VALEN/ABLE): flip rates from a classifier trained on clean
  CIFAR-10 (:func:`clean_classifier`, trained once and cached),
  q_j = min(1, r · p̃_j / mean(p̃)).
The true label is always a candidate; all draws are seeded.

The clean classifier keeps its own short loop (:func:`_fit`) rather than
``engine.Trainer``: its weights decide the instance candidate sets of every committed
``instance`` run, and the engine's loop (another schedule, autocast, its own batch order)
would train other weights under the same cache key, so those runs would no longer
reproduce.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..rundir import artefacts
from .. import config
from ..engine.augment import random_crop_flip
from ..data.images import Cifar
from ..data.longtail import balanced_subset
from ..engine.networks import batched_logits, build_backbone, normalize, pick_device


def uniform_candidates(labels: np.ndarray, num_classes: int, q: float, seed: int = 0
                       ) -> np.ndarray:
    """N×C bool candidate sets: every wrong label enters independently with probability q."""
    config.validate({"Q": q})
    rng = np.random.default_rng(seed)
    cand = rng.random((len(labels), num_classes)) < q
    cand[np.arange(len(labels)), labels] = True
    return cand


def instance_flip_rates(probs: np.ndarray, labels: np.ndarray, rate: float) -> np.ndarray:
    """VALEN/ABLE rule: p[true]=0, p̃ = p / max p, q_j = min(1, r · p̃_j / mean_j p̃)."""
    config.validate({"RATE": rate})
    p = probs.astype(np.float64).copy()
    p[np.arange(len(labels)), labels] = 0.0
    p /= np.maximum(p.max(axis=1, keepdims=True), 1e-12)
    return np.minimum(1.0, rate * p / np.maximum(p.mean(axis=1, keepdims=True), 1e-12))


def instance_candidates(probs: np.ndarray, labels: np.ndarray, rate: float, seed: int = 0
                        ) -> np.ndarray:
    """N×C bool candidate sets: one Bernoulli per wrong label with instance flip rates."""
    flip = instance_flip_rates(probs, labels, rate)
    rng = np.random.default_rng(seed)
    cand = rng.random(flip.shape) < flip
    cand[np.arange(len(labels)), labels] = True
    return cand


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int,
         lr: float) -> None:
    """Plain supervised SGD with crop+flip augmentation and a one-cycle schedule (kept as
    it is: see the module's docstring)."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * max(1, len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    net.train()
    for _ in tqdm(range(epochs), desc="clean classifier", unit="epoch", leave=False):
        for idx in torch.randperm(len(x), device=x.device).split(batch):
            if len(idx) < batch:
                continue
            loss = F.cross_entropy(net(random_crop_flip(normalize(x[idx]))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def predict_proba(net: nn.Module, x_uint8: np.ndarray) -> np.ndarray:
    """Softmax probabilities of ``net`` on uint8 images (evaluation mode)."""
    return F.softmax(batched_logits(net, x_uint8), 1).cpu().numpy()


def clean_classifier(cifar: Cifar, arch: str, epochs: int, seed: int = 0, device: str = "auto",
                     per_class: int | None = None) -> tuple[nn.Module, dict]:
    """Train (or load from cache) a classifier on clean CIFAR-10; returns (net, info).

    ``info`` records architecture, epochs, training-set size and test accuracy.
    """
    dev = pick_device(device)
    source = (cifar.identity.get("sha256") or hashlib.sha1(cifar.source.encode()).hexdigest())[:10]
    key = f"clean-{arch}-e{epochs}-s{seed}-n{per_class or 'all'}-{source}"
    weights, meta = config.cache_dir() / f"{key}.safetensors", config.cache_dir() / f"{key}.json"
    torch.manual_seed(seed)
    backbone = build_backbone(arch)
    net = nn.Sequential(backbone, nn.Linear(backbone.feat_dim, cifar.num_classes)).to(dev)
    if weights.exists() and meta.exists():  # a damaged file: moved aside, trained again
        info = artefacts.read_json(meta, what="clean-classifier cache entry", resumable=True)
        state = info and artefacts.load(weights, lambda p: load_file(p, device=str(dev)),
                                        what="clean-classifier cache entry", resumable=True)
        if state is not None:
            net.load_state_dict(state)
            return net, info
    idx = np.arange(len(cifar.train_y))
    if per_class:
        idx = balanced_subset(cifar.train_y, per_class, seed)
    x = torch.as_tensor(cifar.train_x[idx], device=dev)
    y = torch.as_tensor(cifar.train_y[idx], device=dev)
    _fit(net, x, y, epochs, batch=min(128, len(idx)), lr=0.1)
    acc = float((predict_proba(net, cifar.test_x).argmax(1) == cifar.test_y).mean())
    info = dict(arch=arch, epochs=epochs, seed=seed, train_images=int(len(idx)),
                test_accuracy=acc, device=str(dev))
    config.write_atomic(weights, lambda t: save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, t))
    config.write_json(meta, info)  # written last: its presence marks a complete cache entry
    return net, info
