"""Test-set evaluation: overall, many/medium/few, per-class accuracy, confusion matrix,
the ``metrics-<method>.json`` file (fields: ``METRICS_FIELDS``, ``ACCURACY_FIELDS``), and
which of a run's results are current.

Also how notebooks 04–07 present the numbers: chance level, the test-set size in use and a
Wilson 95 % interval beside every accuracy (:func:`reading_note`, :func:`with_interval`,
:func:`results_table`); "last" (after the final epoch) leads, "best" is always labelled as
the maximum over epochs *on the test set* (optimistic). The figures of notebook 04 —
learning curves, per-class bars, confusion matrices — are drawn and saved here
(:func:`training_figures`). docs/protocols.md explains the evaluation protocols.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import artefacts, config, jsonl, runfiles
from .networks import batched_logits
from .runfiles import ACCURACY_FIELDS, METRICS_FIELDS, method_label



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


def _synthetic_is_current(metrics: dict, run_dir: Path) -> bool:
    """A model trained on synthetic images is stale once ``synthetic/`` holds another top-up
    than the one it used (notebook 03 remade it under other settings); a run directory
    without ``synthetic/settings.json`` (e.g. a copy of the results only) cannot tell."""
    used = (metrics.get("params") or {}).get("synthetic")
    now = runfiles.read_settings(run_dir)
    return not used or not now or used == now


def current_metrics(run_dir) -> dict[str, dict]:
    """``{method: metrics}`` of the results made with a run directory's current parameters.

    The current parameters are those of the latest training run (the newest
    ``metrics-*.json``): a method's results count only when they were made with the same
    shared parameters (everything but the method's own ``train`` block), the method is in
    that run's ``METHODS``, and they were trained on the run's current dataset (and, for
    methods trained on synthetic images, on the current ``synthetic/`` top-up). Results of
    earlier settings, of methods since dropped from ``METHODS`` or of other data are left
    out, so figures, grids and sweep tables never mix them in.
    """
    run_dir = Path(run_dir)
    paths = sorted(run_dir.glob("metrics-*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    found = {p.stem[len("metrics-"):]: artefacts.read_json(
        p, what="metrics file", schema=runfiles.METRICS_SCHEMA,
        fix="Delete it and run notebook 04 again (training resumes from its saved state).")
        for p in paths}
    if not found:
        return {}
    latest = _shared_params(list(found.values())[-1])
    methods = latest.get("METHODS")
    data_now = runfiles.read_dataset_record(run_dir)
    if data_now and latest.get("dataset", data_now) != data_now:
        return {}  # notebook 01 has made a new dataset since: every model is stale
    return {method: m for method, m in found.items()
            if _shared_params(m) == latest and (methods is None or method in methods)
            and _synthetic_is_current(m, run_dir)}


def read_history(run_dir, method: str) -> list[dict]:
    """The per-epoch rows of ``logs/<method>.jsonl`` (epoch, lr, loss terms, pseudo-label and
    test accuracy, seconds); [] when the method has no log."""
    return jsonl.read(Path(run_dir) / "logs" / f"{method}.jsonl", repair=False)


# -- reading the numbers --------------------------------------------------------------------
BEST_LABEL = "best (max over epochs, test set)"
PROFILE_MEANING = {
    "smoke": "smoke profile: a tiny network trained for a few epochs on a few hundred images. "
             "The numbers show that the code runs; they say nothing about which method is "
             "better",
    "quick": "quick profile: a small CNN on the full CIFAR-10-LT, 10–25 epochs. Methods "
             "can be compared with each other (within the intervals), not with published "
             "numbers",
    "paper": "paper profile: the report's / protocol settings (ResNet-18, full data). "
             "docs/protocols.md says which numbers compare with published ones",
}


def wilson_interval(correct: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (95 % by default) of the accuracy ``correct / n``
    (``scipy.stats.binomtest(...).proportion_ci(method="wilson")``).

    With p = correct/n and z the normal quantile (1.96): centre (p + z²/2n) / (1 + z²/n),
    half-width z·√(p(1 − p)/n + z²/4n²) / (1 + z²/n) (Wilson 1927). Unlike p ± z·√(p(1 − p)/n)
    it stays inside [0, 1] and keeps its coverage for small test sets and accuracies near 0
    or 1.
    """
    from scipy.stats import binomtest
    if n <= 0:
        return 0.0, 1.0
    ci = binomtest(int(round(correct)), int(n)).proportion_ci(level, method="wilson")
    return float(ci.low), float(ci.high)


def accuracy_interval(accuracy: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """:func:`wilson_interval` of an accuracy measured on ``n`` test images."""
    return wilson_interval(round(accuracy * n), n, level)


def with_interval(accuracy: float, n: int | None) -> str:
    """'0.105 (95 % CI 0.070–0.155, 200 test images)'; just the number when n is unknown."""
    if not n:
        return f"{accuracy:.3f}"
    lo, hi = accuracy_interval(accuracy, n)
    return f"{accuracy:.3f} (95 % CI {lo:.3f}–{hi:.3f}, {n} test images)"


def test_images(metrics: dict) -> int | None:
    """How many test images a metrics file was evaluated on (its confusion matrix total)."""
    confusion = metrics.get("confusion")
    return int(np.sum(confusion)) if confusion is not None else None


def reading_note(profile: str, n_test: int, num_classes: int) -> str:
    """What notebooks 04–07 print before their first number: chance level, the test-set
    size in use, the noise that size allows, and what the profile means for the numbers."""
    lo, hi = wilson_interval(n_test / 2, n_test)
    return (f"How to read the numbers: chance is 1/{num_classes} = {1 / num_classes:.0%}. The "
            f"test set in use has {n_test} images ({n_test // num_classes} per class); at that "
            f"size the 95 % interval of an accuracy near 50 % spans ±{50 * (hi - lo):.1f} "
            f"points, and smaller differences between methods are noise.\n"
            f"{PROFILE_MEANING.get(profile, profile)}.")


def difference_notes(metrics: dict[str, dict], labels: dict[str, str] | None = None
                     ) -> list[str]:
    """One line per method after the first: its last-epoch accuracy minus the first one's,
    and whether the two 95 % intervals overlap (then no difference is shown)."""
    items = [(m, v, test_images(v)) for m, v in metrics.items()]
    if len(items) < 2:
        return []
    labels = labels or {}
    base, ref, n0 = items[0]
    lo0, hi0 = accuracy_interval(ref["accuracy"]["last"], n0 or 1)
    lines = []
    for method, m, n in items[1:]:
        lo, hi = accuracy_interval(m["accuracy"]["last"], n or 1)
        diff = 100 * (m["accuracy"]["last"] - ref["accuracy"]["last"])
        verdict = ("the 95 % intervals overlap: no difference shown at this test size"
                   if lo <= hi0 and lo0 <= hi else "the 95 % intervals do not overlap")
        lines.append(f"{labels.get(method, method)} − {labels.get(base, base)}: {diff:+.1f} "
                     f"points (last epoch); {verdict}.")
    return lines


def preparation_s(metrics: dict) -> float | None:
    """Seconds the method's pieces spent before the first epoch (``preparation``: what each
    piece's ``prepare`` recorded, e.g. SSP's pre-training), None when none prepared."""
    times = [p.get("wall_s") for p in (metrics.get("preparation") or {}).values()]
    times = [t for t in times if t is not None]
    return sum(times) if times else None


def results_table(metrics: dict[str, dict], labels: dict[str, str] | None = None):
    """Notebook 04's table: per method (and, for RECORDS, its test-time-adjusted accuracy)
    last-epoch accuracy with its 95 % interval first, then many / medium / few, best (the
    maximum over epochs on the test set: optimistic), and the run's sizes and speed."""
    import pandas as pd
    labels = labels or {}
    rows = []
    for method, m in metrics.items():
        n = test_images(m)
        for kind, key in (("raw", "accuracy"), ("test-time adjusted", "accuracy_adjusted")):
            acc = m.get(key)
            if not acc:
                continue
            lo, hi = accuracy_interval(acc["last"], n) if n else (math.nan, math.nan)
            rows.append({"method": labels.get(method, method), "accuracy": kind,
                         "last": acc["last"], "last 95% CI": f"{lo:.3f}–{hi:.3f}",
                         "many": acc["many"], "medium": acc["medium"], "few": acc["few"],
                         BEST_LABEL: acc["best"],
                         "comparable to published":
                             "✓" if m.get("comparable_to_published") == key else "",
                         "epochs": "+".join(str(s["epochs"]) for s in m.get("stages", [])),
                         "train images": m.get("n_train"), "synthetic": m.get("n_synthetic"),
                         "unlabeled": m.get("n_unlabeled", 0), "test images": n,
                         "wall s": m.get("wall_s"),
                         "pre-training s": preparation_s(m),
                         "images/s": m.get("images_per_s")})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).set_index(["method", "accuracy"])


# -- figures --------------------------------------------------------------------------------
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
    import matplotlib.pyplot as plt
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
    import matplotlib.pyplot as plt
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
    import matplotlib.pyplot as plt
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
    from . import viz
    run_dir = Path(run_dir)
    labels = {m: method_label(m, v) for m, v in metrics.items()}
    n_test = next((test_images(v) for v in metrics.values() if test_images(v)), None)
    per_class = n_test // len(classes) if n_test else None
    histories = {labels[m]: read_history(run_dir, m) for m in metrics}
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
        viz.save(fig, run_dir / name)
    return figs
