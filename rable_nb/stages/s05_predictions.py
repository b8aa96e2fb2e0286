"""Stage 05: the trained models of a run on one fixed set of test images (report Fig. 5.2):
one grid row per true class, ``GRID_PER_CLASS`` images each.

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

from ..rundir import artefacts, runfiles
from .. import config
from ..data import longtail
from ..parts import tables
from ..engine.networks import batched_logits, load_model, pick_device

CAPTION_PX = 9  # space above each grid row for the predicted label, in image pixels


def validate(P: dict) -> None:
    """Check notebook 05's parameters, and the model choice notebooks 06-07 share."""
    from .s04_training import validate as check_training
    check_training({"METHODS": P.get("METHODS")})  # the names notebook 04 trains
    config.check(P, {"GRID_PER_CLASS": config.integer(1), "CAPTIONS": config.BOOLEAN,
                     "ADJUST_LOGITS": config.BOOLEAN})


def find_models(run_dir, methods=None) -> dict[str, Path]:
    """``{method: checkpoint}`` of the models trained with the run's current parameters
    (``runfiles.current_metrics``; all, or ``methods``). Checkpoints of earlier settings
    and leftover temporary files are never returned.

    Raises ``FileNotFoundError`` naming notebook 04 when there is none (or one is missing).
    """
    folder = Path(run_dir) / "checkpoints"
    found = {m: folder / f"{m}.safetensors" for m in sorted(runfiles.current_metrics(run_dir))
             if (folder / f"{m}.safetensors").is_file()}
    if not found:
        raise FileNotFoundError(
            f"No model trained with this run's current parameters in {folder}: run notebook "
            f"04_training first ({runfiles.rerun_command(run_dir, '01,04')}).")
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
        net, meta, extra = artefacts.load(
            path, lambda p: load_model(p, dev), what=f"the final checkpoint of {method!r}",
            fix=f"Delete it and run notebook 04 again (`{runfiles.rerun_command(run_dir, '04')}"
                "`): training resumes from its saved state.")
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
    return longtail.balanced_subset(test_y, per_class, seed)


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


def rows_by_class(truth) -> tuple[np.ndarray, list[int], int]:
    """Grid layout with one row per true class: (order of the images, the class of each row,
    columns = the most images of one class). Correct for any ``GRID_PER_CLASS``."""
    truth = np.asarray(truth)
    row_classes = [int(c) for c in dict.fromkeys(truth.tolist())]  # first-seen order
    ncols = max(int((truth == c).sum()) for c in row_classes)
    order = np.full(len(row_classes) * ncols, -1)
    for r, c in enumerate(row_classes):
        members = np.flatnonzero(truth == c)
        order[r * ncols:r * ncols + len(members)] = members
    return order, row_classes, ncols


def draw_grid(ax, images, preds, truth, classes, title: str, captions: bool = True
              ) -> np.ndarray:
    """Draw one model's grid on ``ax``: one row per true class (its name at the left),
    colour = correct, greyscale = wrong.

    Captions give the full predicted class name (green when right, red when wrong). The
    title gives the number correct with its 95 % interval. Returns the top-left corners,
    in data coordinates, of the cells of ``images`` (in their given order).
    """
    images, preds, truth = np.asarray(images), np.asarray(preds), np.asarray(truth)
    correct = preds == truth
    order, row_classes, ncols = rows_by_class(truth)
    shown = greyscale_wrong(images, correct)
    blank = np.full_like(images[:1], 255)
    cells = np.concatenate([shown, blank])[order]  # -1: a blank cell in a short row
    h = images.shape[1]
    tiles, cell_origins = mosaic(cells, ncols, caption=CAPTION_PX if captions else 0)
    origins = np.zeros((len(images), 2), int)
    origins[order[order >= 0]] = cell_origins[order >= 0]
    ax.imshow(tiles, interpolation="nearest")
    if captions:
        for (x, y), p, ok in zip(origins, preds, correct):
            ax.text(x + h / 2, y - 1, classes[p], ha="center", va="bottom", fontsize=6,
                    color="tab:green" if ok else "tab:red")
    centres = [cell_origins[r * ncols][1] + h / 2 for r in range(len(row_classes))]
    ax.set_yticks(centres, [classes[c] for c in row_classes], fontsize=8)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_ylabel("true class")
    lo, hi = tables.wilson_interval(int(correct.sum()), len(correct))
    ax.set_title(f"{title}: {int(correct.sum())} correct of {len(correct)}\n"
                 f"(95 % CI {lo:.0%}–{hi:.0%}; chance {1 / len(classes):.0%})", fontsize=10)
    return origins


def _grid_size(truth) -> tuple[float, float]:
    """Figure inches of one grid panel: ~0.75 in per cell, so full class names fit."""
    _, row_classes, ncols = rows_by_class(truth)
    return ncols * 0.75 + 1.2, len(row_classes) * 0.95 + 0.9


def grid_figure(images, preds, truth, classes, title: str, captions: bool = True):
    """Figure with one model's prediction grid (see :func:`draw_grid`)."""
    fig, ax = plt.subplots(figsize=_grid_size(truth), layout="constrained")
    draw_grid(ax, images, preds, truth, classes, title, captions)
    return fig


def side_by_side(images, truth, preds_by_method: dict, classes, captions: bool = True):
    """The grids of several models next to each other, one panel per model."""
    n = len(preds_by_method)
    w, h = _grid_size(truth)
    fig, axes = plt.subplots(1, n, figsize=(n * w, h), squeeze=False, layout="constrained")
    for ax, (method, preds) in zip(axes[0], preds_by_method.items()):
        draw_grid(ax, images, preds, truth, classes, method, captions)
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
