"""Stage 05: the trained models of a run on one fixed set of test images (report Fig. 5.2).

Also the shared helpers of notebooks 05–07: which models a run has
(``checkpoints/<method>.safetensors`` of the methods whose results are current) and their
softmax outputs on uint8 images, with
the optional test-time logit adjustment (``logit_prior`` subtracted from the logits).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from . import config, dataset, evaluation
from .networks import batched_logits, load_model, pick_device

CAPTION_PX = 9  # space above each grid row for the predicted label, in image pixels


def validate(P: dict) -> None:
    """Check notebook 05's parameters, and the model choice notebooks 06-07 share."""
    from .training import validate as check_training
    check_training({"METHODS": P.get("METHODS")})  # the names notebook 04 trains
    config.check(P, {"GRID_PER_CLASS": config.integer(1), "CAPTIONS": config.BOOLEAN,
                     "ADJUST_LOGITS": config.BOOLEAN})


def find_models(run_dir, methods=None) -> dict[str, Path]:
    """``{method: checkpoint}`` of the models trained with the run's current parameters
    (``evaluation.current_metrics``; all, or ``methods``). Checkpoints of earlier settings
    and leftover temporary files are never returned.

    Raises ``FileNotFoundError`` naming notebook 04 when there is none (or one is missing).
    """
    folder = Path(run_dir) / "checkpoints"
    found = {m: folder / f"{m}.safetensors" for m in sorted(evaluation.current_metrics(run_dir))
             if (folder / f"{m}.safetensors").is_file()}
    if not found:
        raise FileNotFoundError(
            f"No model trained with this run's current parameters in {folder}: run notebook "
            f"04_training first (python -m rable_nb run --only 01,04 --out {run_dir}).")
    if methods:
        missing = [m for m in methods if m not in found]
        if missing:
            raise FileNotFoundError(f"No checkpoint for {missing} in {folder} made with the "
                                    f"current parameters (current: {sorted(found)}); train "
                                    "them with notebook 04_training.")
        found = {m: found[m] for m in methods}
    return found


def load_models(run_dir, methods=None, device: str = "auto") -> dict[str, dict]:
    """``{method: {"net", "meta", "prior"}}`` for :func:`find_models`'s checkpoints, in eval mode.

    ``prior`` is the checkpoint's ``logit_prior`` tensor (None when it has none).
    """
    dev = pick_device(device)
    models = {}
    for method, path in find_models(run_dir, methods).items():
        net, meta, extra = load_model(path, dev)
        models[method] = dict(net=net, meta=meta, prior=extra.get("logit_prior"))
    return models


def predict_proba(model: dict, x_uint8: np.ndarray, adjust: bool = False,
                  batch: int = 500) -> np.ndarray:
    """Softmax probabilities (N×C) of a loaded model on uint8 N×32×32×3 images.

    Preprocessing is the evaluation's: :func:`networks.normalize`, no augmentation. With
    ``adjust`` the model's ``logit_prior`` (if any) is subtracted from the logits first.
    """
    prior = model.get("prior") if adjust else None
    return torch.softmax(batched_logits(model["net"], x_uint8, prior, batch), 1).cpu().numpy()


def fixed_test_set(test_y: np.ndarray, per_class: int = 10, seed: int = 0) -> np.ndarray:
    """Indices of a seeded, class-ordered test subset with ``per_class`` images per class."""
    counts = np.bincount(test_y)
    if per_class < 1 or per_class > counts.min():
        raise ValueError(f"GRID_PER_CLASS={per_class} is invalid: it must lie in "
                         f"[1, {counts.min()}] (images per class in the test set).")
    return dataset.balanced_subset(test_y, per_class, seed)


def greyscale_wrong(images: np.ndarray, correct: np.ndarray) -> np.ndarray:
    """Copy of uint8 N×H×W×3 images where wrongly predicted ones become grey (R = G = B).

    Grey uses the ITU-R 601 luma, 0.299 R + 0.587 G + 0.114 B; correct ones keep colour.
    """
    out = np.array(images, dtype=np.uint8, copy=True)
    luma = np.rint(out[~correct].astype(np.float32) @ np.float32([0.299, 0.587, 0.114]))
    out[~correct] = np.repeat(luma.astype(np.uint8)[..., None], 3, axis=-1)
    return out


def mosaic(images: np.ndarray, ncols: int = 10, pad: int = 2, caption: int = 0):
    """Tile uint8 N×H×W×3 images into one white-padded image; ``caption`` pixels of space
    above each row. Returns (mosaic, N×2 top-left (x, y) of each cell)."""
    n, h, w = images.shape[:3]
    nrows = int(np.ceil(n / ncols))
    sx, sy = w + pad, h + pad + caption
    out = np.full((nrows * sy + pad, ncols * sx + pad, 3), 255, np.uint8)
    origins = np.array([(pad + (i % ncols) * sx, pad + caption + (i // ncols) * sy)
                        for i in range(n)])
    for img, (x, y) in zip(images, origins):
        out[y:y + h, x:x + w] = img
    return out, origins


def draw_grid(ax, images, preds, truth, classes, title: str, ncols: int = 10,
              captions: bool = True) -> np.ndarray:
    """Draw one model's grid on ``ax``: colour = correct, greyscale = wrong.

    Captions give the predicted label (green when right, red when wrong). The title says
    how many are correct. Returns the cells' top-left corners in data coordinates.
    """
    preds, truth = np.asarray(preds), np.asarray(truth)
    correct = preds == truth
    h = images.shape[1]
    tiles, origins = mosaic(greyscale_wrong(images, correct), ncols,
                            caption=CAPTION_PX if captions else 0)
    ax.imshow(tiles, interpolation="nearest")
    ax.axis("off")
    if captions:
        for (x, y), p, ok in zip(origins, preds, correct):
            ax.text(x + h / 2, y - 1, classes[p][:8], ha="center", va="bottom", fontsize=5,
                    color="tab:green" if ok else "tab:red")
    ax.set_title(f"{title}: {int(correct.sum())} correct of {len(correct)}")
    return origins


def grid_figure(images, preds, truth, classes, title: str, captions: bool = True,
                ncols: int = 10):
    """Figure with one model's prediction grid (see :func:`draw_grid`)."""
    nrows = int(np.ceil(len(images) / ncols))
    fig, ax = plt.subplots(figsize=(ncols * 0.7, nrows * 0.8 + 0.3), layout="constrained")
    draw_grid(ax, images, preds, truth, classes, title, ncols, captions)
    return fig


def side_by_side(images, truth, preds_by_method: dict, classes, captions: bool = True,
                 ncols: int = 10):
    """The grids of several models next to each other, one panel per model."""
    n = len(preds_by_method)
    nrows = int(np.ceil(len(images) / ncols))
    fig, axes = plt.subplots(1, n, figsize=(n * ncols * 0.7, nrows * 0.8 + 0.3), squeeze=False,
                             layout="constrained")
    for ax, (method, preds) in zip(axes[0], preds_by_method.items()):
        draw_grid(ax, images, preds, truth, classes, method, ncols, captions)
    return fig


def error_table(truth, preds_by_method: dict, classes) -> pd.DataFrame:
    """Per true class and model: how many of its images are wrong and what they became."""
    truth = np.asarray(truth)
    rows = []
    for c, name in enumerate(classes):
        mask = truth == c
        row = {"class": name, "images": int(mask.sum())}
        for method, preds in preds_by_method.items():
            wrong = np.asarray(preds)[mask & (np.asarray(preds) != truth)]
            became = Counter(classes[p] for p in wrong).most_common()
            row[f"{method} wrong"] = int(len(wrong))
            row[f"{method} mistaken for"] = ", ".join(f"{k} ×{v}" for k, v in became)
        rows.append(row)
    return pd.DataFrame(rows).set_index("class")
