"""How notebooks 04–07 present the numbers: chance level, the test-set size in use and a
Wilson 95 % interval beside every accuracy (:func:`reading_note`, :func:`with_interval`,
:func:`results_table`); "last" (after the final epoch) leads, "best" is always labelled as
the maximum over epochs *on the test set* (optimistic). docs/protocols.md explains the
evaluation protocols. Torch-free.
"""
from __future__ import annotations

import math

import numpy as np


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
