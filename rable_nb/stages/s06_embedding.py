"""Stage 06: t-SNE of the test-set representations each trained model learned.

Features are the backbone's penultimate activations (what the linear classifier sees)
or the L2-normalised projection-head embeddings (what the contrastive loss shapes).
t-SNE uses scikit-learn with PCA initialisation and a fixed seed, so a figure is
reproducible; the silhouette score (computed in the original feature space, cosine
distance) summarises how well the classes separate.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .. import config
from . import s05_predictions as predictions
from ..engine.networks import normalize

SPACES = ("penultimate", "projection")
PROFILE_DEFAULTS = {"smoke": {"N_TSNE": 200}, "quick": {"N_TSNE": 1000},
                    "paper": {"N_TSNE": 2000}}


def validate(P: dict) -> None:
    """Validate notebook 06's parameters (``ValueError`` with a clear message)."""
    predictions.validate(P)
    config.check(P, {
        "EMBEDDINGS": config.list_of(SPACES),
        "N_TSNE": (lambda v: config.is_int(v) and 10 <= v <= 10_000, "an integer in [10, 10000]"),
        "PERPLEXITY": config.number(0, low_open=True),
    })


@torch.no_grad()
def features(model: dict, x_uint8: np.ndarray, space: str = "penultimate",
             batch: int = 500) -> np.ndarray:
    """N×D features of a loaded model (see ``predictions.load_models``) in ``space``."""
    if space not in SPACES:
        raise ValueError(f"Unknown feature space {space!r}; choose one of {SPACES}.")
    net = model["net"]
    dev = next(net.parameters()).device
    out = []
    for i in range(0, len(x_uint8), batch):
        feats, _, proj = net.embed(normalize(torch.as_tensor(x_uint8[i:i + batch], device=dev)))
        out.append(feats if space == "penultimate" else proj)
    return torch.cat(out).float().cpu().numpy()


def tsne(feats: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE (PCA init, fixed seed); perplexity is capped below N/3 for small N.

    Below 1000 points it runs single-threaded: OpenMP threads cost more than they save
    there, and ~10× more on a busy CPU.
    """
    perplexity = min(perplexity, (len(feats) - 1) / 3)
    with threadpool_limits(1 if len(feats) < 1000 else None):
        return TSNE(2, perplexity=perplexity, init="pca", random_state=seed,
                    learning_rate="auto").fit_transform(feats.astype(np.float32))


def separation(feats: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette score of the true classes in feature space (cosine distance), in [−1, 1]."""
    return float(silhouette_score(feats, labels, metric="cosine"))


def embed_all(models: dict, x_uint8: np.ndarray, labels: np.ndarray, spaces=("penultimate",),
              seed: int = 0, perplexity: float = 30.0) -> tuple[dict, pd.DataFrame]:
    """t-SNE coordinates ``{(method, space): N×2}`` and a table of silhouette scores."""
    coords, scores = {}, []
    for method, space in tqdm([(m, s) for m in models for s in spaces], desc="t-SNE",
                              unit="embedding"):
        feats = features(models[method], x_uint8, space)
        coords[method, space] = tsne(feats, seed, perplexity)
        scores.append(dict(model=method, space=space, dim=feats.shape[1],
                           silhouette=separation(feats, labels)))
    return coords, pd.DataFrame(scores).set_index(["model", "space"])


def scatter(ax, coords: np.ndarray, labels: np.ndarray, classes, title: str) -> None:
    """One t-SNE panel, points coloured by true class."""
    cmap, size = plt.get_cmap("tab10"), 12 if len(coords) < 500 else 5
    for c, name in enumerate(classes):
        pts = coords[labels == c]
        ax.scatter(pts[:, 0], pts[:, 1], s=size, color=cmap(c % 10), label=name, alpha=0.8,
                   linewidths=0)
    ax.set(title=title, xticks=[], yticks=[])


def panels(coords_by_title: dict, labels: np.ndarray, classes, suptitle: str | None = None):
    """One t-SNE panel per entry of ``coords_by_title`` with a shared class legend."""
    n = len(coords_by_title)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 1.4, 4.6), squeeze=False,
                             layout="constrained")
    for ax, (title, coords) in zip(axes[0], coords_by_title.items()):
        scatter(ax, coords, labels, classes, title)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right center", markerscale=2.5, frameon=False)
    if suptitle:
        fig.suptitle(suptitle)
    return fig
