"""The backbone of a run's feature space: the warm-up network whose penultimate features a
feature-space backend (``space == 'feature'``: ``feature``, ``feature-copy``) generates, the
head fine-tuning of ``rable-feature`` trains on and the audit judges. Notebook 03 saves it
to ``generator/backbone.safetensors``; everything that reads features loads it from there.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..rundir import artefacts, runfiles
from .networks import batched_features, load_model, pick_device, save_model

BACKBONE = "backbone.safetensors"


def path(run_dir) -> Path:
    """Where the run's backbone lives: ``generator/backbone.safetensors``."""
    return Path(run_dir) / "generator" / BACKBONE


def save_backbone(net, run_dir, info: dict | None = None) -> Path:
    """Copy the backbone network (a ``PLLNet``) to ``generator/backbone.safetensors``."""
    out = path(run_dir)
    # no wall time: the same backbone gives the same file
    save_model(net, out, meta={"backbone": {k: v for k, v in (info or {}).items()
                                            if k != "wall_s"}})
    return out


def load_backbone(run_dir, device: str = "auto"):
    """(network, meta) of the run's backbone; ``FileNotFoundError`` naming the fix."""
    file = path(run_dir)
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing: the backbone of the feature space is "
                                "saved by notebook 03 with a feature-space GENERATOR "
                                "('feature', 'feature-copy').")
    net, meta, _ = artefacts.load(
        file, lambda p: load_model(p, pick_device(device)), what="the feature backbone",
        fix=f"Run notebook 03 again ({runfiles.rerun_command(run_dir, '03')}): it saves the "
            "backbone anew.")
    return net, meta


def encode(net, x_uint8) -> np.ndarray:
    """Backbone features (float32 N×D) of uint8 images, the network in evaluation mode."""
    feats, _ = batched_features(net.backbone, net.classifier, x_uint8)
    return feats.cpu().numpy().astype(np.float32)
