"""Test-set evaluation: overall, many/medium/few, per-class accuracy, confusion matrix,
the ``metrics-<method>.json`` file (fields: ``METRICS_FIELDS``, ``ACCURACY_FIELDS``), and
which of a run's results are current."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import config
from .networks import batched_logits

METRICS_FIELDS = ("method", "protocol", "params", "accuracy", "device", "wall_s",
                  "images_per_s", "commit")
ACCURACY_FIELDS = ("last", "best", "many", "medium", "few", "per_class")


def class_groups(class_counts) -> dict[str, list[int]]:
    """many / medium / few classes by training-set frequency (LT-PLL convention).

    CIFAR-10: the 3 most frequent, the middle 4, the 3 rarest; CIFAR-100: 33/34/33;
    otherwise thirds (the middle group takes the remainder).
    """
    counts = np.asarray(class_counts)
    order = [int(c) for c in np.argsort(-counts, kind="stable")]
    k = len(order) // 3
    return {"many": order[:k], "medium": order[k:len(order) - k], "few": order[len(order) - k:]}


@torch.inference_mode()
def predict(net: torch.nn.Module, x_uint8: torch.Tensor, log_prior: torch.Tensor | None = None,
            batch: int | None = None) -> torch.Tensor:
    """Predicted classes of uint8 images (on the net's device); subtracts ``log_prior``
    from the logits when given (test-time adjustment). ``batch``: see
    :func:`networks.batched_logits`."""
    return batched_logits(net, x_uint8, log_prior, batch).argmax(1)


def evaluate(net: torch.nn.Module, x_uint8, truth, class_counts,
             log_prior: torch.Tensor | None = None) -> tuple[dict, dict | None]:
    """:func:`summarize` of the raw predictions and, with ``log_prior``, of the test-time
    adjusted ones (logits − log-prior), from one pass over the images and one read of the
    predictions back to the host."""
    logits = batched_logits(net, x_uint8)
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


def write_metrics(run_dir, metrics: dict) -> Path:
    """Write ``metrics-<method>.json`` atomically after checking every required field."""
    missing = [k for k in METRICS_FIELDS if k not in metrics]
    missing += [f"accuracy.{k}" for k in ACCURACY_FIELDS if k not in metrics.get("accuracy", {})]
    if missing:
        raise ValueError(f"metrics for {metrics.get('method')!r} lack {missing}")
    path = config.write_json(Path(run_dir) / f"metrics-{metrics['method']}.json", metrics)
    return path


# What a method's metrics add about its own training: its config, and for methods trained on
# synthetic images (``rable``) the generator, its conditioning labels and the top-up settings.
PER_METHOD_PARAMS = ("train", "synthetic", "GENERATOR", "GEN_LABELS")


def _shared_params(metrics: dict) -> dict:
    """The parameters every method of one training run shares (all but ``PER_METHOD_PARAMS``)."""
    return {k: v for k, v in (metrics.get("params") or {}).items() if k not in PER_METHOD_PARAMS}


def current_metrics(run_dir) -> dict[str, dict]:
    """``{method: metrics}`` of the results made with a run directory's current parameters.

    The current parameters are those of the latest training run (the newest
    ``metrics-*.json``): a method's results count only when they were made with the same
    shared parameters (everything but the method's own ``train`` block), the method is in
    that run's ``METHODS``, and they were trained on the run's current dataset. Results of
    earlier settings, of methods since dropped from ``METHODS`` or of another dataset are
    left out, so figures, grids and sweep tables never mix them in.
    """
    run_dir = Path(run_dir)
    paths = sorted(run_dir.glob("metrics-*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    found = {p.stem[len("metrics-"):]: json.loads(p.read_text()) for p in paths}
    if not found:
        return {}
    latest = _shared_params(list(found.values())[-1])
    methods = latest.get("METHODS")
    data_now = config.read_json(run_dir / "dataset.json")
    if data_now and latest.get("dataset", data_now) != data_now:
        return {}  # notebook 01 has made a new dataset since: every model is stale
    return {method: m for method, m in found.items()
            if _shared_params(m) == latest and (methods is None or method in methods)}


# -- figures --------------------------------------------------------------------------------
def plot_curves(histories: dict[str, list[dict]]):
    """Learning curves: test accuracy, pseudo-label accuracy and losses per epoch."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for method, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        line, = axes[0].plot(ep, [h["test_acc"] for h in hist], ".-", label=method)
        if any("test_acc_adjusted" in h for h in hist):
            axes[0].plot(ep, [h.get("test_acc_adjusted") for h in hist], ".--",
                         color=line.get_color(), label=f"{method} (adjusted)")
        if hist and hist[0].get("pseudo_label_acc") is not None:
            axes[1].plot(ep, [h["pseudo_label_acc"] for h in hist], ".-",
                         color=line.get_color(), label=method)
        for key, style in (("loss_cls", ".-"), ("loss_cont", ".:")):
            if hist and key in hist[0]:
                axes[2].plot(ep, [h[key] for h in hist], style, color=line.get_color(),
                             label=f"{method} {key[5:]}")
    axes[2].set_yscale("log")
    for ax, title in zip(axes, ("test accuracy", "pseudo-label accuracy (train)", "losses")):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_per_class(per_class: dict[str, list[float]], classes, class_counts):
    """Per-class accuracy bars (classes ordered by training frequency), groups shaded."""
    import matplotlib.pyplot as plt
    groups = class_groups(class_counts)
    order = groups["many"] + groups["medium"] + groups["few"]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    start = 0
    for name, shade in (("many", "#e8f0fb"), ("medium", "#f4f4f4"), ("few", "#fbe9e7")):
        k = len(groups[name])
        ax.axvspan(start - 0.5, start + k - 0.5, color=shade, zorder=0)
        ax.text(start + k / 2 - 0.5, 1.02, name, ha="center", va="bottom")
        start += k
    width = 0.8 / max(len(per_class), 1)
    for i, (method, accs) in enumerate(per_class.items()):
        pos = np.arange(len(order)) + (i - (len(per_class) - 1) / 2) * width
        ax.bar(pos, [accs[c] for c in order], width, label=method, zorder=2)
    ax.set_xticks(range(len(order)),
                  [f"{classes[c]}\n({int(class_counts[c])})" for c in order], fontsize=8)
    ax.set(ylim=(0, 1.1), ylabel="test accuracy")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig
