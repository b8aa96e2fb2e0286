"""Stage 09: what rebalances a long-tailed partial-label learner best — a sweep's results
grouped by approach.

Approaches, read from a method's name (``rable_nb/methods``) and, for generated images,
from the generator its metrics record:

- **none** — ABLE on the long tail (``able``): the baseline;
- **re-weighting** — RECORDS' rebalancing of the disambiguation (``+records``);
- **generated images** — ABLE on the long tail plus a generator's top-up (``rable``), one
  approach per generator backend (``copy`` is the control: the real images again);
- **self-supervision** — rotation pre-training, then ABLE (``ssp``);
- **real unlabeled images** — the images the long tail left out, pseudo-labelled
  (``+unlabeled``).

Combinations (``ssp+records``) name every part. Accuracies are those of the balanced test
set at the last epoch, overall and on the few classes (the 3 rarest training classes of
CIFAR-10), each with chance level (1/C on a balanced test set) and a 95 % binomial
confidence interval for the number of test images behind it (Wilson score interval,
``scipy.stats.binomtest``): two approaches whose intervals overlap widely are not told apart
by this test set.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..data import longtail
from .. import methods
from ..rundir import runfiles
from . import s08_sweep as sweep
from ..parts import tables
from ..data.images import CLASSES

SMOKE_GRID = "examples/sweep-study-smoke.yaml"
# Where notebook 09 looks when SWEEP_DIR is not given (the commands of docs/usage.md write there)
DEFAULT_SWEEP_DIRS = {"quick": "runs/sweep-study-quick", "paper": "runs/sweep-study-paper"}
NUM_CLASSES = len(CLASSES)


def validate(P: dict) -> None:
    """Check notebook 09's parameters (the sweep's, as notebook 08's)."""
    sweep.validate(P)


def notebook_results(P: dict, kernel: str = "python3"):
    """(results, sweep directory) of notebook 09: ``sweep.notebook_results`` with the study's
    smoke grid and default directories."""
    return sweep.notebook_results(P, kernel, SMOKE_GRID, DEFAULT_SWEEP_DIRS)


def approach(method: str, generator=None, gen_labels=None) -> str:
    """The rebalancing approach of ``method`` (see the module docstring), e.g.
    ``'self-supervision (SSP) + re-weighting (RECORDS)'``; ``generator``/``gen_labels``
    describe a ``rable`` top-up (an oracle-conditioned one is marked as the ablation)."""
    base, mods = methods.parse(method)
    said = methods.BASES[base].approach    # each piece names its part (methods/base.py)
    parts = []
    if said == "generated":
        made = (runfiles.describe({"generator": generator, "cond_labels": gen_labels})
                if isinstance(generator, str) else "unknown generator")
        parts.append(f"generated ({made})")
    elif said is None:
        parts.append(f"{base} (another learner)")
    elif said:
        parts.append(said)
    parts += [methods.MODIFIERS[m].approach or m for m in mods]
    return " + ".join(parts) or "none (ABLE)"


def binomial_interval(accuracy: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of an accuracy measured on ``n`` test images
    (``tables.accuracy_interval``); NaN where the accuracy or ``n`` is unknown."""
    if not n or pd.isna(accuracy) or pd.isna(n):
        return float("nan"), float("nan")
    return tables.accuracy_interval(accuracy, int(n), level)


def few_share(num_classes: int = NUM_CLASSES) -> float:
    """Share of a balanced test set that belongs to the few classes."""
    return len(longtail.class_groups(np.arange(num_classes))["few"]) / num_classes


# Parameters that must be equal across the compared points: the data set and the training
SAME_FOR_ALL = ("IMBALANCE_FACTOR", "PARTIAL", "Q", "RATE", "SEED", "N_MAX", "N_TEST_PER_CLASS",
                "DATA_DIR", "ARCH", "EPOCHS", "BATCH_SIZE", "LR", "PROTOCOL")


def table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per finished (point, method): approach, images added to the long tail, the
    last-epoch accuracy overall and on the few classes with their 95 % intervals, chance
    level, test images; sorted by approach, then added images.

    The points must share their data set and training settings (``SAME_FOR_ALL``);
    ``ValueError`` names the parameter that varies."""
    differ = [p for p in sweep.varying(results) if p in SAME_FOR_ALL]
    if differ:
        raise ValueError(f"The study compares approaches on one data set and one training "
                         f"setting, but {differ} vary among the sweep's points; give them one "
                         "value (fixed) or select the points of one setting.")
    long = sweep.long_format(results)
    if long.empty:
        raise ValueError("No finished point with accuracies in this sweep (see its "
                         "status/error columns); the grid must include notebook 04.")
    for col in sweep.COUNTS + sweep.MARKS:
        if col not in long:
            long[col] = np.nan
    long["approach"] = [approach(m, g if isinstance(g, str) else None,
                                 lab if isinstance(lab, str) else None)
                        for m, g, lab in zip(long["method"], long["generator"], long["gen_labels"])]
    long["added"] = long["n_synthetic"].fillna(0) + long["n_unlabeled"].fillna(0)
    long["chance"] = 1 / NUM_CLASSES
    n_few = long["n_test"] * few_share()
    for col, n in (("last", long["n_test"]), ("few", n_few)):
        bounds = [binomial_interval(a, k) for a, k in zip(long[col], n)]
        long[f"{col}_low"], long[f"{col}_high"] = zip(*bounds) if bounds else ((), ())
    cols = ["approach", "method", "added", "last", "last_low", "last_high", "few", "few_low",
            "few_high", "chance", "n_test", "n_synthetic", "n_unlabeled", "run_dir"]
    long["order"] = [approach_order(a) for a in long["approach"]]
    long = long.sort_values(["order", "approach", "added"], kind="stable")
    return long[cols].reset_index(drop=True)


ORDER = ("none", "re-weighting", "generated", "self-supervision", "real unlabeled")


def approach_order(name: str) -> int:
    """Sort key of an approach: the baseline first, then the approaches in the order of
    ``ORDER`` (by their first part), single approaches before combinations."""
    first = next((i for i, o in enumerate(ORDER) if name.startswith(o)), len(ORDER))
    return 100 * first + name.count(" + ")


def study_figure(tab: pd.DataFrame, title: str = ""):
    """(a) last-epoch accuracy overall and on the few classes per approach (95 % intervals,
    chance dashed); (b, c) overall and few-class accuracy against the number of images added
    to the long tail, one line per approach that adds images, the baseline at 0."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), layout="constrained",
                             gridspec_kw={"width_ratios": [1.4, 1, 1]})
    labels = [f"{a}" + (f"\n[{int(n):,} added]" if n else "") for a, n in
              zip(tab["approach"], tab["added"])]
    y = np.arange(len(tab))
    for k, (col, color) in enumerate((("last", "tab:blue"), ("few", "tab:red"))):
        err = [tab[col] - tab[f"{col}_low"], tab[f"{col}_high"] - tab[col]]
        axes[0].barh(y + (k - 0.5) * 0.4, tab[col], 0.4, xerr=err, color=color, capsize=2,
                     label={"last": "overall", "few": "few classes"}[col])
    axes[0].axvline(1 / NUM_CLASSES, color="k", ls="--", lw=1, label="chance")
    axes[0].set_yticks(y, labels, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set(xlabel="test accuracy, last epoch (95 % interval)", xlim=(0, 1),
                title="by approach")
    axes[0].legend(fontsize=8, loc="lower right")
    baseline = tab[tab["approach"] == approach("able")]
    adders = tab[tab["added"] > 0]
    for ax, col, name in ((axes[1], "last", "overall"), (axes[2], "few", "few classes")):
        for key, part in adders.groupby("approach", sort=True):
            part = pd.concat([baseline, part]).sort_values("added")
            ax.errorbar(part["added"], part[col],
                        yerr=[part[col] - part[f"{col}_low"], part[f"{col}_high"] - part[col]],
                        marker="o", capsize=3, label=key)
        ax.axhline(1 / NUM_CLASSES, color="k", ls="--", lw=1, label="chance")
        ax.set(xlabel="images added to the long tail", ylabel=f"test accuracy ({name})",
               title=f"{name} vs added images" + ("" if len(baseline) else " (no baseline run)"),
               ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, color="tab:red")
    return fig


def details(tab: pd.DataFrame) -> pd.DataFrame:
    """What each row of :func:`table` cost and how its extra images were labelled, from the
    point's metrics file: training wall time; SSP's pre-training (epochs, seconds — of the
    run that filled the cache —, final rotation accuracy on the augmented training images);
    the unlabeled images' pseudo-label accuracy against their hidden labels (all of them, and
    those confident enough to train with their pseudo-label)."""
    rows, found = [], {}
    for r in tab.itertuples():
        if r.run_dir not in found:
            found[r.run_dir] = runfiles.current_metrics(r.run_dir)
        m = found[r.run_dir].get(r.method, {})
        ssp = m.get("preparation", {}).get("ssp", {})
        unl = m.get("unlabeled", {})
        rows.append({"approach": r.approach, "method": r.method, "added": r.added,
                     "wall s": m.get("wall_s"), "ssp epochs": ssp.get("epochs"),
                     "pre-training s": tables.preparation_s(m), "rotation acc": ssp.get("rotation_acc_last"),
                     "pseudo-label acc": unl.get("accuracy", {}).get("overall"),
                     "pseudo-label acc (confident)": unl.get("accuracy", {}).get(
                         "confident_overall"),
                     "confident": unl.get("confident")})
    return pd.DataFrame(rows)


def committed_tables(group: str = "quick-cpu", root=None) -> str:
    """Markdown of the committed results of ``group`` (``results/<group>``): the mean ± s.d.
    over seeds and the paired comparisons against matching controls — read live from the
    metrics files, so notebook 09 never shows numbers copied by hand."""
    from ..batch import comparison, results
    entries = [m for m in results.load(root or results.RESULTS_DIR) if m["group"] == group]
    if not entries:
        return f"No committed results in results/{group} yet."
    return (results.seed_table(entries) or "\n(no method has several seeds yet)\n") + (
        comparison.table(entries) or "\n(no top-up has its matching control yet)\n")
