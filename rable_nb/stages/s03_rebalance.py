"""Stage 03 (notebook 03_generative_rebalancing): top the rare classes up with synthetic
samples — conditioning labels → plan → fit → top-up → audit — callable without a kernel.

``run(P, cifar, ds)`` does the whole stage and returns what the notebook shows. The
conditioning labels are PLL-honest pseudo-labels of the warm-up (``GEN_LABELS='pseudo'``) or
the hidden truth (``'oracle'``, an ablation; ``rable_nb/parts/conditioning.py``); class c is topped
up to ``TARGET_PER_CLASS`` from the number of images labelled c; the backend
(``GENERATOR``, ``rable_nb/generators/``) is fitted on the long tail with those labels and
draws the samples into ``synthetic/`` (resumable, ``synthetic/settings.json`` names what
made them); a finished top-up is audited (``rable_nb/parts/audit.py``). The stage's own
parameters and figures live here; each backend's parameters live in its file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..parts import audit, conditioning, viz
from . import s02_captioning as captioning
from .. import config, generators
from ..data import longtail
from ..engine import networks
from ..rundir import runfiles
from ..config import project_path
from ..rundir.runfiles import load_synthetic, read_settings

# AUDIT_PER_CLASS: synthetic (and reference test) images audited per class, 0 = all;
# AUDIT_JUDGE_ARCH / AUDIT_JUDGE_EPOCHS: the clean classifier that judges images (None: the
# profile's CLEAN_ARCH / CLEAN_EPOCHS, the classifier behind `instance` candidates).
# COMPARE_RUNS: other run directories whose synthetic samples notebook 03 shows beside these.
# The warm-up behind GEN_LABELS='pseudo' (WARMUP_*) is shared with notebook 04: its defaults
# are in config.PROFILE_DEFAULTS, its rules in warmup.WARMUP_RULES.
_COMMON = dict(GEN_LABELS="pseudo", LABEL_RULE="confidence", LABEL_TAU=1.0, LABEL_EPS=0.1,
               LABEL_KEEP=1.0,
               SYNTH_FILTER=False, SYNTH_FILTER_BAND=[0.05, 0.95], SYNTH_FILTER_ATTEMPTS=10,
               AUDIT_JUDGE_ARCH=None, AUDIT_JUDGE_EPOCHS=None, COMPARE_RUNS=[])
STAGE_DEFAULTS: dict[str, dict] = {
    "smoke": dict(_COMMON, GENERATOR="pixel", AUDIT_PER_CLASS=0,
                  TARGET_PER_CLASS=captioning.PROFILE_DEFAULTS["smoke"]["TARGET_PER_CLASS"]),
    # quick: sinkhorn labels kept at half (measured, docs/labels-and-controls.md: precision
    # 0.76 / worst 0.48 vs 0.83 / 0.70 but recall of the rarest 0.22 vs 0.08; copy top-up
    # +1.75 overall, +12.4 few over the confidence labels, 3 seeds); audit 200 per class
    "quick": dict(_COMMON, GENERATOR="copy", AUDIT_PER_CLASS=200, LABEL_RULE="sinkhorn",
                  LABEL_EPS=0.2, LABEL_KEEP=0.5),
    "paper": dict(_COMMON, GENERATOR="sd", AUDIT_PER_CLASS=0),
}


def profile_defaults(P: dict | None = None) -> dict[str, dict]:
    """Notebook 03's defaults per profile: the stage's own and every registered backend's
    (read from the registry when asked, so a backend added at run time has its defaults)."""
    return {name: {**own, **generators.profile_defaults(name)}
            for name, own in STAGE_DEFAULTS.items()}


PROFILE_DEFAULTS = profile_defaults()


def plugin_parameters() -> list[str]:
    """What notebook 03 takes beyond its parameters cell: every registered backend's
    parameters (``generators.knobs``; listed in docs/generator-parameters.md)."""
    return list(generators.knobs())


def validate(params: dict) -> None:
    """Clear ``ValueError`` for every parameter of the generation stage."""
    captioning.validate({"TARGET_PER_CLASS": params.get("TARGET_PER_CLASS")})
    conditioning.validate(params)
    config.check(params, {
        "GENERATOR": config.one_of(sorted(generators.GENERATORS)),
        "SYNTH_FILTER": (lambda v: conditioning.filter_mode(v) in conditioning.FILTERS,
                         f"one of {conditioning.FILTERS} (or False / True: 'none' / 'class')"),
        "SYNTH_FILTER_BAND": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                              and all(isinstance(q, (int, float)) for q in v)
                              and 0 <= v[0] < v[1] <= 1,
                              "two quantiles [low, high] with 0 <= low < high <= 1, e.g. "
                              "[0.05, 0.95]"),
        "SYNTH_FILTER_ATTEMPTS": config.integer(1),
        "GEN_STOP_AFTER": config.integer(1), "AUDIT_PER_CLASS": config.integer(0),
        "AUDIT_JUDGE_ARCH": config.one_of(sorted(networks.BACKBONES)),
        "AUDIT_JUDGE_EPOCHS": config.integer(1),
        "COMPARE_RUNS": (lambda v: isinstance(v, list) and all(config.PATH[0](x) for x in v),
                         "a list of run directories (paths), e.g. ['runs/smoke-copy']"),
    })
    for run in params.get("COMPARE_RUNS") or []:  # before anything runs, not in a note at the end
        manifest = project_path(run) / runfiles.SYNTH_DIR / runfiles.MANIFEST
        if not manifest.is_file():
            raise ValueError(
                f"COMPARE_RUNS={params['COMPARE_RUNS']!r} is invalid: {project_path(run)} "
                + ("has no synthetic samples (no synthetic/manifest.jsonl): run notebook 03 "
                   "there first" if project_path(run).is_dir() else "does not exist")
                + "; relative paths are from the directory `run` is called in.")
    generators.validate(params)


def topup_settings(generator, params: dict, cond_info: dict) -> dict:
    """What defines a top-up folder (``synthetic/settings.json``): the backend's parameters,
    seed, target, filter and the conditioning labels (kind, fingerprint, warm-up)."""
    out = dict(generator.settings(params), SEED=params.get("SEED") or 0,
               TARGET_PER_CLASS=params.get("TARGET_PER_CLASS"),
               SYNTH_FILTER=conditioning.recorded_filter(params.get("SYNTH_FILTER")),
               cond_labels=cond_info["gen_labels"], cond_sha1=cond_info["sha1"])
    mode = conditioning.filter_mode(params.get("SYNTH_FILTER"))
    if mode != "none":
        out["SYNTH_FILTER_ATTEMPTS"] = params["SYNTH_FILTER_ATTEMPTS"]
    if mode == "centre":
        out["SYNTH_FILTER_BAND"] = list(params.get("SYNTH_FILTER_BAND") or (0.05, 0.95))
    if "warmup" in cond_info:  # its settings and result, not its (varying) wall time
        out["warmup"] = {k: v for k, v in cond_info["warmup"].items() if k != "wall_s"}
    for key in ("rule", "estimated_counts", "assigned_counts", "accuracy",
                "accuracy_confidence"):
        if key in cond_info:
            out[key] = cond_info[key]
    return out


def run(P: dict, cifar, ds: dict) -> dict:
    """The whole stage for the resolved notebook parameters ``P`` on the run's dataset ``ds``.

    Returns ``generator`` (the fitted backend), ``cond`` (the conditioning labels),
    ``cond_info`` (kind, fingerprint, warm-up, agreement with the hidden truth — reported
    only), ``counts`` (images per conditioning label), ``plan`` ({class: samples to add}),
    ``target``, ``settings``, ``todo`` (samples still to draw before the fit), ``fit_x``
    (what the backend was fitted on: images or features), ``fit`` (its outcome; ``done``
    False when ``GEN_STOP_AFTER`` stopped it: rerun to resume), ``stats`` (the top-up's),
    ``complete`` (every planned sample exists), ``synth_counts`` (samples per class on disk) and ``audit`` (None until complete). A
    complete top-up is checked: every class below the target reaches it exactly.
    """
    run_dir = Path(P["RUN_DIR"])
    real_x = cifar.train_x[ds["indices"]]
    gen = generators.get(P["GENERATOR"])
    cond, warm_net, cond_info = conditioning.cond_labels(
        ds, real_x, cifar, conditioning.ConditioningSettings.from_params(P), P["DEVICE"],
        need_net=gen.space == "feature")
    cond_info["accuracy"] = conditioning.accuracy(cond, ds["labels"], cifar.num_classes)
    if "confidence_labels" in cond_info:  # today's rule beside the chosen one (report only)
        cond_info["accuracy_confidence"] = conditioning.accuracy(
            cond_info.pop("confidence_labels"), ds["labels"], cifar.num_classes)
    counts = np.asarray(cond_info.get("assigned_counts")  # LABEL_KEEP < 1: cond has −1s
                        or np.bincount(cond[cond >= 0], minlength=cifar.num_classes))
    plan = generators.topup_plan(counts, P["TARGET_PER_CLASS"])
    settings = dict(topup_settings(gen, P, cond_info),  # the plan: checked by notebook 04
                    plan=[int(plan[c]) for c in range(cifar.num_classes)])
    todo = generators.pending(run_dir, plan, cifar.classes, settings, gen.suffix)  # or refuses
    fit_x = gen.fit_inputs(real_x, warm_net, run_dir, cond_info.get("warmup"))
    fit = gen.fit(fit_x, cond, counts, P, run_dir)
    stats = {}
    if fit["done"]:
        accept = conditioning.sample_filter(P["SYNTH_FILTER"], warm_net, fit_x, cond,
                                            P.get("SYNTH_FILTER_BAND") or (0.05, 0.95))
        stats = generators.top_up(run_dir, gen, plan, cifar.classes, settings, seed=P["SEED"],
                                  accept=accept, max_attempts=P["SYNTH_FILTER_ATTEMPTS"])
    complete = fit["done"] and generators.pending(run_dir, plan, cifar.classes, settings,
                                                  gen.suffix) == 0
    target = longtail.target_count(counts, P["TARGET_PER_CLASS"])
    result = dict(generator=gen, cond=cond, cond_info=cond_info, counts=counts, plan=plan,
                  target=target, settings=settings, todo=todo, fit_x=fit_x, fit=fit, stats=stats,
                  complete=complete, audit=None,
                  synth_counts=runfiles.synthetic_counts(run_dir, cifar.num_classes))
    if complete:
        synth = result["synth_counts"]
        short = counts < target
        if not (counts[short] + synth[short] == target).all():
            raise RuntimeError(f"{run_dir / 'synthetic'}: the top-up is incomplete "
                               f"({(counts + synth).tolist()} per class for target {target}).")
        if synth.sum():
            result["audit"] = audit.run(run_dir, cifar, ds, audit.AuditSettings.from_params(P),
                                        P["DEVICE"])
    return result


# -- what notebook 03 shows ----------------------------------------------------------------
def conditioning_table(result: dict, ds: dict, classes):
    """Per class: the hidden true count (reported only), the count the warm-up's prior
    estimates (rules other than 'confidence'), the conditioning count, the precision and
    recall of the conditioning set against the truth — for the chosen ``LABEL_RULE`` and,
    beside it, for the 'confidence' rule — and the samples to generate."""
    import pandas as pd

    info = result["cond_info"]
    cols = {"class": classes, "true count (hidden)": ds["class_counts"]}
    if "estimated_counts" in info:
        cols["estimated count (EM prior)"] = info["estimated_counts"]
    cols["conditioning count"] = result["counts"]
    if info["accuracy"]["cond_counts"] != list(result["counts"]):
        cols["fit set (LABEL_KEEP)"] = info["accuracy"]["cond_counts"]
    rule = info.get("rule", {}).get("LABEL_RULE", info["gen_labels"])
    for name, acc in ((rule, info["accuracy"]), ("confidence", info.get("accuracy_confidence"))):
        if acc:
            if name != rule:
                cols["count (confidence)"] = acc["cond_counts"]
            cols[f"precision ({name})"] = acc["precision"]
            cols[f"recall ({name})"] = acc["per_class"]
    cols["to generate"] = list(result["plan"].values())
    return pd.DataFrame(cols).set_index("class").round(3)


def purity_summary(acc: dict, counts=None) -> str:
    """One line: mean and worst per-class precision and recall, and the range of the
    counts the plan uses (default: the conditioning sets') over the true counts."""
    prec, rec = np.array(acc["precision"]), np.array([r or 0 for r in acc["per_class"]])
    counts = acc["cond_counts"] if counts is None else counts
    ratio = np.asarray(counts) / np.maximum(acc["true_counts"], 1)
    return (f"precision mean {prec.mean():.2f} (worst {prec.min():.2f}), recall mean "
            f"{rec.mean():.2f} (worst {rec.min():.2f}), planned / true count "
            f"{ratio.min():.2f}–{ratio.max():.2f}")


def samples_figure(result: dict, P: dict, cifar, ds: dict):
    """Synthetic samples beside real ones of the same class (and beside ``COMPARE_RUNS``'
    samples, whose generators it names); for feature vectors, both in the first two
    principal components. Saved as ``fig-samples.png`` for images. None when there are no
    samples."""
    run_dir = Path(P["RUN_DIR"])
    syn_x, syn_y, _ = load_synthetic(run_dir)
    if not len(syn_y):
        return None
    title = runfiles.describe(read_settings(run_dir) or result["settings"])
    if result["generator"].space == "feature":
        return pca_figure(result["fit_x"], result["cond"], syn_x, syn_y, cifar.classes,
                          title=title)
    real_x = cifar.train_x[ds["indices"]]
    others = other_samples(P["COMPARE_RUNS"], real_x.shape[1:])
    if others:
        print(f"samples beside those of: {', '.join(others)} (COMPARE_RUNS)")
    n = 3 if others else 4
    grid, titles = side_by_side(real_x, result["cond"], syn_x, syn_y, cifar.classes, n=n,
                                seed=P["SEED"], others=others)
    fig = viz.image_grid(grid, titles, ncols=n * (2 + len(others)), scale=1.4,
                         title=title + (f"; beside: {', '.join(others)}" if others else ""))
    viz.save(fig, run_dir / "fig-samples.png")
    return fig


def rebalanced(result: dict, P: dict, classes):
    """The report's Figure 5.1 for a complete top-up, saved as ``fig-rebalanced.png``."""
    run_dir = Path(P["RUN_DIR"])
    made = read_settings(run_dir) or result["settings"]
    fig = rebalanced_figure(result["counts"], result["synth_counts"], classes,
                            title=f"{runfiles.describe(made)}; {P['PROFILE']} profile",
                            target=result["target"], cond_labels=made["cond_labels"])
    viz.save(fig, run_dir / "fig-rebalanced.png")
    return fig


def rebalanced_figure(real_counts, synth_counts, classes, title: str = "",
                      target: int | None = None, cond_labels: str = "pseudo"):
    """The report's Figure 5.1: images per class before and after the top-up.

    Before: real images per conditioning label (``cond_labels``: pseudo-labels, or the
    hidden truth for 'oracle'). After: real (blue) + synthetic (orange) images per class,
    each bar labelled with its total and, in orange, the synthetic count. ``target``
    (default n_max) is drawn as a dashed line and named in the panel title: classes below it
    reach it exactly, classes above it keep all their real images, so the "after" panel is
    flat only up to the target. A log axis is used when the largest class exceeds 5× the
    target (small classes stay visible). ``title``: the run's top-up (generator, labels).
    """
    import matplotlib.pyplot as plt

    real, synth = np.asarray(real_counts), np.asarray(synth_counts)
    target = longtail.target_count(real, target)
    total = real + synth
    x = np.arange(len(classes))
    log = total.max() > 5 * target
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True, layout="constrained")
    which = "true class (ORACLE)" if cond_labels == "oracle" else f"{cond_labels} label"
    panels = ((f"before: real images per {which}", np.zeros_like(synth)),
              (f"after: every class below {target} topped up to {target}", synth))
    for ax, (name, add) in zip(axes, panels):
        ax.bar(x, real, color="tab:blue", label=f"real ({int(real.sum()):,})")
        if add.any():
            ax.bar(x, add, bottom=real, color="tab:orange",
                   label=f"synthetic ({int(add.sum()):,})")
        for i in x:
            n = real[i] + add[i]
            ax.annotate(f"{int(n)}", (i, max(n, 0.8)), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
            if add[i]:
                ax.annotate(f"+{int(add[i])}", (i, n), xytext=(0, 11), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7, color="#b35900")
        ax.axhline(target, color="0.25", ls="--", lw=1, label=f"target {target} per class")
        ax.set_xticks(x, classes, rotation=45, ha="right")
        ax.set_title(name, fontsize=10)
    if log:
        axes[0].set_yscale("log")
        axes[0].set_ylim(0.7, total.max() * 6)  # headroom for the two labels above a bar
    else:
        axes[0].set_ylim(0, total.max() * 1.25)
    axes[0].set_ylabel("training images" + (" (log scale)" if log else ""))
    fig.legend(*axes[1].get_legend_handles_labels(), loc="outside lower center", ncol=3,
               fontsize=8, frameon=False)
    fig.suptitle("Rebalanced training set" + (f" — {title}" if title else ""))
    return fig


def side_by_side(real_x, real_y, syn_x, syn_y, classes, n: int = 4, seed: int = 0,
                 others: dict | None = None):
    """Images and titles: per class with synthetic images, n real, n synthetic, then n of
    each entry of ``others`` ({name: (samples, labels)}, e.g. other backends' top-ups)."""
    rng = np.random.default_rng(seed)
    sources = [("real", real_x, real_y), ("synth", syn_x, syn_y),
               *((name, x, y) for name, (x, y) in (others or {}).items())]
    images, titles = [], []
    for c in np.unique(syn_y):
        for kind, x, y in sources:
            pick = np.flatnonzero(y == c)
            pick = rng.choice(pick, size=min(n, len(pick)), replace=False)
            images += [x[i] for i in pick] + [np.full_like(real_x[0], 255)] * (n - len(pick))
            titles += [f"{classes[c][:5]} {kind}"] * len(pick) + [""] * (n - len(pick))
    return np.stack(images), titles


def other_samples(run_dirs, image_shape) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{generator name: (samples, labels)} of other runs' top-ups (the run directory's name
    added where a generator repeats), to show
    beside this one (``COMPARE_RUNS``; relative paths from the project root). A run without
    samples, or with samples of another shape, is left out with a note."""
    out = {}
    for run in map(project_path, run_dirs or []):
        x, y, _ = load_synthetic(run)
        if not len(y) or x.shape[1:] != tuple(image_shape):
            why = f"samples of shape {x.shape[1:]}" if len(y) else "no synthetic samples"
            print(f"COMPARE_RUNS: {run} left out ({why}).")
            continue
        name = read_settings(run).get("generator")
        out[name if name not in out else f"{name} ({run.name})"] = (x, y)
    return out


def loss_figure(log: list[dict], title: str = ""):
    """Every logged loss against the training step (log scale where all are positive)."""
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(k for r in log for k in r if k not in ("step", "images_per_s")))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k in keys:  # a fit in phases logs other losses in each phase
        rows = [r for r in log if k in r]
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], ".-", label=k)
    if all(r[k] > 0 for r in log for k in keys if k in r):
        ax.set_yscale("log")
    ax.set(xlabel="training step", ylabel="loss", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def pca_figure(real, real_y, syn, syn_y, classes, title: str = "", per_class: int = 200,
               seed: int = 0):
    """Real and synthetic features of the topped-up classes in the first two principal
    components of the real features (``per_class`` points of each, seeded)."""
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    pca = PCA(2, random_state=seed).fit(real)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for i, c in enumerate(np.unique(syn_y)):
        colour = plt.cm.tab10(i % 10)
        for points, labels, marker, alpha in ((real, real_y, "o", 0.35), (syn, syn_y, "x", 0.8)):
            rows = np.flatnonzero(labels == c)
            if not len(rows):  # a class no real image is labelled with (yet topped up)
                continue
            rows = rng.choice(rows, min(per_class, len(rows)), replace=False)
            xy = pca.transform(points[rows])
            ax.scatter(xy[:, 0], xy[:, 1], s=10, marker=marker, color=colour, alpha=alpha,
                       label=f"{classes[c]} {'real' if marker == 'o' else 'synthetic'}")
    ax.set(xlabel="PC 1", ylabel="PC 2",
           title=title or "backbone features: real (o) and synthetic (x)")
    ax.legend(fontsize=6, ncol=2, markerscale=1.5)
    fig.tight_layout()
    return fig
