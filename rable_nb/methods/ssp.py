"""SSP: self-supervised rotation pre-training of the backbone, then ABLE from those weights
(Yang & Xu, NeurIPS 2020, "Rethinking the value of labels for improving class-imbalanced
learning"; official code YyzHarry/imbalanced-semi-self).

Pre-training (no labels, no candidate sets): every training image is rotated by
r·90°, r ∈ {0, 1, 2, 3}, and a linear head on the backbone's features learns to predict r
(cross-entropy over the 4 rotations). As in the reference (``pretrain_rot.py`` lines
80 and 223-236, ``utils.py`` ``rotation`` lines 12-21): one rotation per image, drawn so that
each of the four rotations takes a quarter of the batch (there: a permutation of
[0, 1, 2, 3]·⌈B/4⌉ cut to B; here: a random permutation of 0..B−1 modulo 4), after a random
crop (reflect-padded by 4) and flip (``pretrain_rot.py`` lines 107-112); SGD, momentum 0.9,
weight decay 2e-4, lr 0.1 (lines 38-43; the reference steps the rate down after 160 and
180 of 200 epochs, here it follows a cosine to ``lr_min``). The reference then trains the
classifier from the pre-trained weights with everything but the last linear layer loaded
(``train.py`` lines 180-205); here the backbone's weights (BatchNorm statistics included)
go into the ABLE network, whose classifier and projection head start fresh, and ABLE trains
as in ``able.py`` — the same step, views and losses, so ``ssp+records``, ``ssp+la``,
``ssp+mixup`` compose like ``able``'s.

The pre-training runs once per training set and settings, when the trainer is built
(:meth:`Ssp.prepare`), on every image the trainer holds (the long tail; with
``+unlabeled`` also the unlabeled images: the pretext task needs no labels). It is cached
in the cache folder under ``ssp-<key>`` (key: the images, the architecture and the
settings below), so ``ssp`` and ``ssp+records`` on one data set share one pre-training;
an interrupted pre-training resumes from its per-epoch state. Settings
(``METHOD_PARAMS = {"ssp": {...}}``; ``SSP_EPOCHS`` sets ``epochs``): ``epochs`` (default:
the training epochs — the reference pre-trains 200 and trains 200), ``lr`` 0.1,
``weight_decay`` 2e-4, ``batch_size`` (default: the training batch size).
"""
from __future__ import annotations

import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..rundir import artefacts
from .. import config
from ..engine.augment import random_crop_flip
from ..engine.networks import build_backbone, standardize, to_unit
from .able import Able

ROTATIONS = 4
VERSION = 1  # bump when the pre-training changes: cached backbones of other versions are not used


def rotation_labels(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """A rotation r ∈ {0, 1, 2, 3} per image, each taking ⌊n/4⌋ or ⌈n/4⌉ of the images in
    random order."""
    return torch.randperm(n, device=device, generator=generator) % ROTATIONS


def rotate(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Image i of ``x`` (N×C×H×W, square) turned by ``labels[i]`` quarter turns
    counter-clockwise (``torch.rot90`` over H, W)."""
    turns = torch.stack([torch.rot90(x, k, (2, 3)) for k in range(ROTATIONS)])
    return turns[labels, torch.arange(len(x), device=x.device)]


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the rotation head's N×4 ``logits`` against the rotations applied."""
    return F.cross_entropy(logits.float(), labels)


def _cache_key(images: np.ndarray, settings: dict) -> str:
    return artefacts.fingerprint(images, settings=settings)[:16]


class _RotationNet(torch.nn.Module):
    """Backbone + linear rotation head (the pre-training network)."""

    def __init__(self, arch: str):
        super().__init__()
        self.backbone = build_backbone(arch)
        self.head = torch.nn.Linear(self.backbone.feat_dim, ROTATIONS)

    def forward(self, x):
        return self.head(self.backbone(x))


def _save_state(path, net, opt, epoch: int, history: list[dict]) -> None:
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    for i, p in enumerate(net.parameters()):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"optim.{i}"] = buf
    meta = {"epoch": str(epoch), "history": json.dumps(history)}
    config.write_atomic(path, lambda t: save_file(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, t, meta))


def _load_state(path, net, opt) -> tuple[int, list[dict]]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path), device=str(next(net.parameters()).device))
    net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")})
    params = list(net.parameters())
    for k, v in t.items():
        if k.startswith("optim."):
            opt.state[params[int(k[6:])]]["momentum_buffer"] = v.clone()
    return int(meta["epoch"]), json.loads(meta["history"])


def _epoch(net, opt, images: torch.Tensor, batch_size: int, gen: torch.Generator) -> dict:
    """One pass of rotation prediction over ``images`` (uint8 N×3×H×W on the device) in
    random order (drop_last); returns the mean loss and rotation accuracy."""
    dev, cuda = images.device, images.device.type == "cuda"
    order = torch.randperm(len(images), device=dev, generator=gen)
    steps = len(images) // batch_size
    loss_sum = torch.zeros((), device=dev)
    correct = torch.zeros((), device=dev)
    net.train()
    for s in range(steps):
        idx = order[s * batch_size:(s + 1) * batch_size]
        x = random_crop_flip(to_unit(images[idx]), generator=gen)
        r = rotation_labels(len(idx), gen, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            logits = net(standardize(rotate(x, r))).float()
        loss = rotation_loss(logits, r)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(1) == r).float().mean()
    loss, acc = (torch.stack([loss_sum, correct]) / steps).tolist()  # one read per epoch
    return {"loss_rot": loss, "rotation_acc": acc}


def pretrain(images: torch.Tensor, arch: str, epochs: int, batch_size: int, lr: float,
             weight_decay: float, lr_min: float = 0.0, seed: int = 0, progress: bool = True
             ) -> tuple[dict[str, torch.Tensor], dict]:
    """(backbone state dict, info) of rotation pre-training on ``images`` (uint8 N×3×H×W,
    on the device that trains), cached per images and settings; resumes an interrupted run.

    ``info``: the settings, the per-epoch loss and rotation accuracy (on the augmented
    training images), wall time of the pre-training and the cache entry's name.
    """
    settings = dict(arch=arch, epochs=epochs, batch_size=min(batch_size, len(images)), lr=lr,
                    weight_decay=weight_decay, lr_min=lr_min, seed=seed, rotations=ROTATIONS,
                    version=VERSION)
    folder = config.cache_dir() / f"ssp-{_cache_key(images.cpu().numpy(), settings)}"
    done, weights = folder / "ssp.json", folder / "backbone.safetensors"
    state = folder / "state.safetensors"    # per-epoch state of an unfinished pre-training
    dev = images.device
    if done.exists():  # a damaged file of the entry is moved aside and the entry made again
        info = artefacts.read_json(done, what="SSP cache entry", resumable=True)
        backbone = info and artefacts.load(weights, lambda p: load_file(str(p), device=str(dev)),
                                           what="SSP cache entry", resumable=True)
        if backbone is not None:
            return backbone, dict(info, cached=True)
        done.unlink(missing_ok=True)
    torch.manual_seed(seed)
    net = _RotationNet(arch).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    start, history = artefacts.load(state, lambda p: _load_state(p, net, opt),
                                    what="SSP pre-training state", resumable=True) or (0, [])
    gen = torch.Generator(device=dev)
    bar = tqdm(range(start, epochs), desc="ssp pre-training", unit="epoch", initial=start,
               total=epochs, disable=not progress, leave=False)
    for epoch in bar:
        t0 = time.time()
        rate = lr_min + (lr - lr_min) * (1 + math.cos(math.pi * epoch / epochs)) / 2
        for group in opt.param_groups:
            group["lr"] = rate
        row = _epoch(net, opt, images, settings["batch_size"],
                     gen.manual_seed(seed * 1_000_003 + epoch))
        history.append({"epoch": epoch + 1, "lr": rate, **row, "seconds": time.time() - t0})
        bar.set_postfix(rotation_acc=f"{row['rotation_acc']:.3f}")
        _save_state(state, net, opt, epoch + 1, history)
    backbone = {k: v.detach().clone() for k, v in net.backbone.state_dict().items()}
    config.write_atomic(weights, lambda t: save_file(
        {k: v.cpu().contiguous() for k, v in backbone.items()}, t))
    info = dict(settings, history=history, wall_s=sum(h["seconds"] for h in history),
                cache=folder.name)
    config.write_json(done, info)  # written last: marks a complete cache entry
    state.unlink(missing_ok=True)
    return backbone, dict(info, cached=False)


class Ssp(Able):
    name = "ssp"
    shortcuts = {**Able.shortcuts, "SSP_EPOCHS": "epochs"}
    approach = "self-supervision (SSP)"
    # ABLE's own, then the rotation pre-training's (epochs/batch size: those of the run)
    params = {**Able.params, "epochs": None, "lr": 0.1, "weight_decay": 2e-4,
              "batch_size": None}
    tiny = {"epochs": 1}
    rules = {**Able.rules, "epochs": config.integer(1), "lr": config.number(0),
             "weight_decay": config.number(0), "batch_size": config.integer(1)}

    @classmethod
    def default_params(cls, cfg):
        return dict(cls.params, epochs=cfg.epochs, batch_size=cfg.batch_size)

    def __init__(self, cfg, params):
        super().__init__(cfg, params)
        for key in ("epochs", "batch_size"):
            if not (config.is_int(params[key]) and params[key] >= 1):
                raise ValueError(f"method_params['ssp']['{key}']={params[key]!r} is invalid: "
                                 "a positive integer is needed.")
        for key in ("lr", "weight_decay"):
            if not (config.is_number(params[key]) and params[key] >= 0):
                raise ValueError(f"method_params['ssp']['{key}']={params[key]!r} is invalid: "
                                 "a number >= 0 is needed.")

    def prepare(self, trainer):
        """Pre-train (or load the cached pre-training) and put its backbone into the
        network; returns the pre-training's record for the metrics file."""
        p = self.p
        weights, info = pretrain(trainer.x, self.cfg.arch, p["epochs"], p["batch_size"],
                                 p["lr"], p["weight_decay"], self.cfg.lr_min, self.cfg.seed)
        trainer.net.backbone.load_state_dict(weights)
        return {k: v for k, v in info.items() if k != "history"} | {
            "rotation_acc_last": info["history"][-1]["rotation_acc"] if info["history"] else None}
