"""Figures shared by several notebooks (class distributions, image grids) and notebook
04's training figures — learning curves, per-class bars, confusion matrices
(:func:`training_figures`)."""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ..rundir import runfiles
from . import tables
from ..config import write_atomic
from ..data.longtail import class_groups


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


# -- notebook 04's training figures ----------------------------------------------------------
LINE_STYLES = ("-", (0, (6, 2)), (0, (1.5, 1.5)), (0, (6, 2, 1.5, 2)))  # solid, dash, dot, dash-dot


def smoothing_window(n_epochs: int) -> int:
    """Default moving-average window: none up to 60 epochs, then an odd ~1/40 of the run
    (800 epochs: 21)."""
    return 1 if n_epochs < 60 else (n_epochs // 40) | 1


def moving_average(values, window: int) -> np.ndarray:
    """Centred moving average over ``window`` (odd) points; missing values (None/NaN) are
    skipped and the ends average over the points that exist."""
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    if window <= 1:
        return v
    ok = ~np.isnan(v)
    kernel = np.ones(window | 1)
    total = np.convolve(np.where(ok, v, 0.0), kernel, "same")
    count = np.convolve(ok.astype(float), kernel, "same")
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _series(ax, epochs, values, colour, style, label, window: int) -> None:
    """One curve: raw (with markers when there are few epochs), or smoothed with the raw
    curve faint behind it."""
    y = moving_average(values, 1)
    if np.isnan(y).all():
        return
    if window > 1:
        ax.plot(epochs, y, color=colour, ls=style, lw=0.7, alpha=0.25)
        ax.plot(epochs, moving_average(y, window), color=colour, ls=style, lw=1.8, label=label)
    else:
        ax.plot(epochs, y, color=colour, ls=style, lw=1.8, label=label,
                marker="o" if len(epochs) <= 30 else None, ms=4)


def _loss_terms(history: list[dict]) -> list[str]:
    keys = {k for h in history for k in h if k.startswith("loss_") and h[k] is not None}
    return sorted(keys, key=lambda k: (k != "loss_cls", k))  # the classification loss first


def plot_curves(histories: dict[str, list[dict]], num_classes: int = 10,
                n_test: int | None = None, smooth: int | None = None, title: str | None = None):
    """Learning curves of every method in one figure: test accuracy (raw solid, test-time
    adjusted dashed, chance dotted), pseudo-label accuracy on the training set, and each
    loss term (one line style per term). One colour per method. ``smooth``: moving-average
    window in epochs (None: :func:`smoothing_window`; 1: raw), the raw curve faint behind."""
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), layout="constrained")
    colours = plt.get_cmap("tab10")
    longest = max((len(h) for h in histories.values()), default=0)
    window = smoothing_window(longest) if smooth is None else max(1, int(smooth))
    losses = []
    for i, (method, hist) in enumerate(histories.items()):
        colour, ep = colours(i % 10), [h["epoch"] for h in hist]
        _series(axes[0], ep, [h.get("test_acc") for h in hist], colour, LINE_STYLES[0],
                method, window)
        _series(axes[0], ep, [h.get("test_acc_adjusted") for h in hist], colour,
                LINE_STYLES[1], f"{method} (test-time adjusted)", window)
        _series(axes[1], ep, [h.get("pseudo_label_acc") for h in hist], colour, LINE_STYLES[0],
                method, window)
        for k, key in enumerate(_loss_terms(hist)):
            values = [h.get(key) for h in hist]
            losses += [v for v in values if v is not None]
            _series(axes[2], ep, values, colour, LINE_STYLES[k % len(LINE_STYLES)],
                    f"{method}: {key[5:]}", window)
        for a, b in zip(hist, hist[1:]):  # stage boundaries (e.g. SoLar's estimation stage)
            if a.get("stage") != b.get("stage"):
                for ax in axes:
                    ax.axvline(a["epoch"] + 0.5, color="0.5", lw=0.8)
                axes[1].text(a["epoch"] + 0.5, 0.02, f" {b['stage']} stage →", fontsize=7,
                             color="0.3")
    axes[0].axhline(1 / num_classes, color="0.3", ls=":", lw=1.2,
                    label=f"chance ({1 / num_classes:.0%})")
    size = f", {n_test} test images" if n_test else ""
    titles = (f"test accuracy{size}", "pseudo-label accuracy (training set)", "loss terms")
    for ax, name in zip(axes, titles):
        ax.set(title=name, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.set(ylim=(0, 1), ylabel="accuracy")
    if losses and min(losses) > 0:
        axes[2].set_yscale("log")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    note = f"; curves smoothed over {window} epochs, raw values faint" if window > 1 else ""
    fig.suptitle((title or "learning curves") + note)
    return fig


def plot_per_class(per_class: dict[str, list[float]], classes, class_counts,
                   n_per_class: int | None = None, title: str | None = None):
    """Per-class last-epoch accuracy of every method in one figure: bars with their values,
    classes ordered by training frequency (training images in brackets), many / medium /
    few shaded, chance dotted."""
    groups = class_groups(class_counts)
    order = groups["many"] + groups["medium"] + groups["few"]
    width = min(24, max(11, 0.6 * len(order) * max(2, len(per_class))))
    fig, ax = plt.subplots(figsize=(width, 4.4), layout="constrained")
    start = 0
    for name, shade in (("many", "#e8f0fb"), ("medium", "#f4f4f4"), ("few", "#fbe9e7")):
        k = len(groups[name])
        ax.axvspan(start - 0.5, start + k - 0.5, color=shade, zorder=0)
        ax.text(start + k / 2 - 0.5, 1.13, name, ha="center", va="center", fontsize=9)
        start += k
    width = 0.8 / max(len(per_class), 1)
    for i, (method, accs) in enumerate(per_class.items()):
        pos = np.arange(len(order)) + (i - (len(per_class) - 1) / 2) * width
        values = [accs[c] for c in order]
        bars = ax.bar(pos, values, width, label=method, zorder=2)
        ax.bar_label(bars, [f"{v:.2f}" for v in values], fontsize=6,
                     rotation=90 if len(per_class) > 2 else 0, padding=2)
    chance = 1 / len(classes)
    ax.axhline(chance, color="0.3", ls=":", lw=1.2, zorder=3, label=f"chance ({chance:.0%})")
    ax.set_xticks(range(len(order)),
                  [f"{classes[c]}\n({int(class_counts[c])})" for c in order], fontsize=8)
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set(ylim=(0, 1.2), yticks=np.linspace(0, 1, 6), ylabel="test accuracy (last epoch)",
           xlabel="class (training images)")
    size = f", {n_per_class} test images per class" if n_per_class else ""
    ax.set_title(title or f"per-class test accuracy after the last epoch{size}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def plot_confusion(confusions: dict[str, list], classes, title: str | None = None):
    """One confusion matrix per method, normalised per true class (each row sums to 1; the
    diagonal is the per-class accuracy), values in %, one shared colour bar."""
    n, c = len(confusions), len(classes)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 1.2, 4.8 * nrows),
                             squeeze=False, layout="constrained")
    fig.get_layout_engine().set(hspace=0.08)  # room between a row's labels and the next titles
    for ax in axes.flat[n:]:
        ax.axis("off")
    image = None
    for ax, (method, counts) in zip(axes.flat, confusions.items()):
        counts = np.asarray(counts, dtype=float)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        if c <= 12:
            for (i, j), v in np.ndenumerate(share):
                if v >= 0.005:
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if v > 0.5 else "black")
        ax.set_title(f"{method}\n{int(counts.sum())} test images", fontsize=9)
        ax.set_xticks(range(c), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(c), classes, fontsize=7)
        ax.set(xlabel="predicted class", ylabel="true class")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8,
                 label="share of the true class's test images")
    fig.suptitle(title or "confusion matrices after the last epoch (rows: true class, "
                          "normalised per row; numbers in %)")
    return fig


def training_figures(run_dir, metrics: dict[str, dict], classes, class_counts,
                     title: str | None = None) -> dict:
    """Draw notebook 04's figures for every current method and save them in ``run_dir``:
    ``fig-curves.png`` (from ``logs/``), ``fig-per-class.png``, ``fig-confusion.png``.
    Returns {file name: figure}."""
    run_dir = Path(run_dir)
    labels = {m: runfiles.method_label(m, v) for m, v in metrics.items()}
    n_test = next((tables.test_images(v) for v in metrics.values() if tables.test_images(v)), None)
    per_class = n_test // len(classes) if n_test else None
    histories = {labels[m]: runfiles.read_history(run_dir, m) for m in metrics}
    figs = {
        "fig-curves.png": plot_curves({k: h for k, h in histories.items() if h}, len(classes),
                                      n_test, title=title),
        "fig-per-class.png": plot_per_class(
            {labels[m]: v["accuracy"]["per_class"] for m, v in metrics.items()}, classes,
            class_counts, per_class),
        "fig-confusion.png": plot_confusion(
            {labels[m]: v["confusion"] for m, v in metrics.items() if "confusion" in v},
            classes),
    }
    for name, fig in figs.items():
        save(fig, run_dir / name)
    return figs
