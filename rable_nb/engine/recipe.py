"""Short-budget training recipe pieces: learning-rate schedules, light views, label smoothing.

The published protocols (``paper`` profile; the TrainConfig defaults) train 500–800 epochs
with heavy views (RandomResizedCrop 0.2–1 + colour jitter; RandAugment + cutout) and a
per-epoch cosine schedule. At the ``quick`` profile's 25 epochs those views cost accuracy;
its recipe (docs/quick-profile.md, with the measurements) switches on, as TrainConfig
fields whose defaults keep today's numbers:

- ``augment='light'``: the weak view is a random flip + 4-pixel translation with
  reflected borders (one ``grid_sample`` per batch, on the device, drawn from the
  epoch's generator like every view); ``strong_augment`` chooses the strong view
  (ABLE's second view) the same way (``'protocol'`` = RandAugment + cutout);
- ``schedule='onecycle'``: per-step linear warm-up over the first ``warmup_frac`` of the
  steps to ``lr``, then linear decay to ``lr_min`` (on CUDA the trainer fills its device
  learning-rate tensor per step: no host read); ``'cosine'``: today's per-epoch cosine;
- ``nesterov``: Nesterov momentum; ``label_smoothing`` ε: the step's loss becomes
  (1−ε)·loss + ε·CE(uniform, logits of the base's first view) — label smoothing for a
  method whose loss is one cross-entropy, a uniform-target term for the others.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import augment

SCHEDULES = ("cosine", "onecycle")
AUGMENTS = ("protocol", "light")
LIGHT_SHIFT = 4  # pixels


def lr_at(cfg, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate of step ``step`` of epoch ``epoch`` (both 0-based, within a stage)."""
    if cfg.schedule == "cosine":   # per epoch (the published protocols)
        return cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * epoch / cfg.epochs)) / 2
    total = max(cfg.epochs * steps_per_epoch, 1)
    t = (epoch * steps_per_epoch + step) / total
    if t < cfg.warmup_frac:
        return cfg.lr * max(t / cfg.warmup_frac, 1e-3)
    return cfg.lr_min + (cfg.lr - cfg.lr_min) * (1 - t) / (1 - cfg.warmup_frac)


def per_step(cfg) -> bool:
    """Whether the schedule changes within an epoch."""
    return cfg.schedule != "cosine"


def light_view(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random horizontal flip + translation by up to ``LIGHT_SHIFT`` pixels in each
    direction (whole pixels, reflected borders): the short-budget CIFAR augmentation."""
    n, _, h, w = x.shape
    u = torch.rand(3, n, device=x.device, generator=generator)
    shift = (u[:2] * (2 * LIGHT_SHIFT + 1)).floor().clamp(max=2 * LIGHT_SHIFT) - LIGHT_SHIFT
    sign = torch.where(u[2] < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(sign)
    theta = torch.stack([sign, zero, 2 * shift[0] / w, zero, sign.abs(), 2 * shift[1] / h],
                        1).view(-1, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="reflection", align_corners=False)


def views(cfg) -> dict:
    """The views a method asks for by name, under the recipe's ``augment`` /
    ``strong_augment`` (``augment.VIEWS`` when both are ``'protocol'``)."""
    out = dict(augment.VIEWS)
    if cfg.augment == "light":
        out["weak"] = light_view
    if cfg.strong_augment == "light":
        out["strong"] = light_view
    return out


def check(cfg) -> None:
    """ValueError for a bad recipe setting of ``cfg``."""
    for name, choices in (("schedule", SCHEDULES), ("augment", AUGMENTS),
                          ("strong_augment", AUGMENTS)):
        if getattr(cfg, name) not in choices:
            raise ValueError(f"{name}={getattr(cfg, name)!r} is invalid: choose one of {choices}.")
    if not 0 <= cfg.label_smoothing < 1:
        raise ValueError(f"label_smoothing={cfg.label_smoothing!r} must be in [0, 1).")
    if not 0 < cfg.warmup_frac < 1:
        raise ValueError(f"warmup_frac={cfg.warmup_frac!r} must be in (0, 1).")


__all__ = ["AUGMENTS", "SCHEDULES", "check", "light_view", "lr_at", "per_step", "views"]
