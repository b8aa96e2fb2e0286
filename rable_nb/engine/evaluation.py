"""Test-set metrics: overall, many / medium / few, per-class accuracy and the confusion
matrix of a network's predictions (the engine's evaluation after each epoch), and the
``accuracy`` block of a metrics file. Writing and reading the metrics files is
``runfiles``'; presenting the numbers is ``tables`` and ``viz``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.longtail import class_groups
from .networks import batched_logits


@torch.inference_mode()
def predict(net: torch.nn.Module, x_uint8: torch.Tensor, log_prior: torch.Tensor | None = None,
            batch: int | None = None, precision: str = "bf16") -> torch.Tensor:
    """Predicted classes of uint8 images (on the net's device); subtracts ``log_prior``
    from the logits when given (test-time adjustment). ``batch``, ``precision``: see
    :func:`networks.batched_logits`."""
    return batched_logits(net, x_uint8, log_prior, batch, precision).argmax(1)


def evaluate(net: torch.nn.Module, x_uint8, truth, class_counts,
             log_prior: torch.Tensor | None = None, precision: str = "bf16"
             ) -> tuple[dict, dict | None]:
    """:func:`summarize` of the raw predictions and, with ``log_prior``, of the test-time
    adjusted ones (logits − log-prior), from one pass over the images (at ``precision``:
    ``networks.PRECISIONS``) and one read of the predictions back to the host."""
    logits = batched_logits(net, x_uint8, precision=precision)
    pred = logits.argmax(1)
    if log_prior is not None:
        pred = torch.stack([pred, (logits - log_prior.to(logits.device)).argmax(1)])
    pred = pred.cpu().numpy()
    if log_prior is None:
        return summarize(pred, truth, class_counts), None
    return summarize(pred[0], truth, class_counts), summarize(pred[1], truth, class_counts)


def summarize(pred, truth, class_counts) -> dict:
    """Accuracy overall, per group and per class, plus the confusion matrix (rows = truth)."""
    pred, truth = np.asarray(torch.as_tensor(pred).cpu()), np.asarray(torch.as_tensor(truth).cpu())
    c = len(class_counts)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (truth, pred), 1)
    per_class = (np.diag(confusion) / np.maximum(confusion.sum(1), 1)).tolist()
    out = {"overall": float((pred == truth).mean()), "per_class": per_class,
           "confusion": confusion.tolist()}
    for name, members in class_groups(class_counts).items():
        mask = np.isin(truth, members)
        out[name] = float((pred[mask] == truth[mask]).mean()) if mask.any() else float("nan")
    return out


def accuracy_block(history: list[dict], final: dict, key: str = "test_acc") -> dict:
    """The ``accuracy`` object of a metrics file: last/best epoch plus the final groups."""
    accs = [h[key] for h in history if h.get(key) is not None]
    return {"last": final["overall"], "best": max(accs + [final["overall"]]),
            "many": final["many"], "medium": final["medium"], "few": final["few"],
            "per_class": final["per_class"]}
