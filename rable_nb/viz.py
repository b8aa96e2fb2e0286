"""Figures shared by several notebooks (class distributions, image grids)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .config import write_atomic


def save(fig, path: str | os.PathLike) -> Path:
    """Save a figure atomically (temp file + rename) at 150 dpi."""
    return write_atomic(path, lambda t: fig.savefig(t, dpi=150, bbox_inches="tight"))


def class_distribution(counts, classes, title: str = "training images per class"):
    """Bar chart of per-class counts on a linear and a log axis."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, scale in zip(axes, ("linear", "log")):
        ax.bar(range(len(counts)), counts, color="tab:blue")
        ax.set_yscale(scale)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set(ylabel="images", title=f"{title} ({scale})")
        for i, n in enumerate(counts):
            ax.text(i, n, str(int(n)), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    return fig


def candidate_sizes(candidates: np.ndarray, labels: np.ndarray, classes):
    """Mean candidate-set size per true class, and the histogram of set sizes."""
    sizes = candidates.sum(1)
    per_class = [sizes[labels == c].mean() if (labels == c).any() else 0
                 for c in range(len(classes))]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    a.bar(range(len(classes)), per_class, color="tab:orange")
    a.axhline(sizes.mean(), color="k", ls="--", lw=1, label=f"mean {sizes.mean():.2f}")
    a.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    a.set(ylabel="candidates per image", title="candidate-set size by true class")
    a.legend()
    b.hist(sizes, bins=np.arange(0.5, len(classes) + 1.5), color="tab:orange", rwidth=0.85)
    b.set(xlabel="candidate-set size", ylabel="images", title="distribution of set sizes")
    fig.tight_layout()
    return fig


def show_image(ax, img: np.ndarray) -> None:
    """Draw a uint8 H×W×3, H×W×1 or H×W image (greyscale in grey, full 0–255 range)."""
    img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)


def image_grid(images: np.ndarray, titles=None, ncols: int = 10, scale: float = 1.2,
               title: str | None = None):
    """Grid of uint8 H×W×3 (or greyscale) images with optional per-image titles."""
    nrows = int(np.ceil(len(images) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * scale, nrows * scale * 1.15),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.flat[i]
        show_image(ax, img)
        if titles is not None:
            ax.set_title(titles[i], fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
