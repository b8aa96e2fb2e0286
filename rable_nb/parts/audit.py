"""Audit of synthetic images (every backend): label fidelity, mode collapse, realism,
diversity and memorisation, scored by a *judge* classifier.

Judge: the classifier trained on clean, balanced CIFAR-10 that the package already trains
and caches for instance-dependent candidate labels (``candidates.clean_classifier``, profile
settings ``CLEAN_*``); its features are its penultimate (backbone) outputs. Per class c
with synthetic images (at most ``per_class`` of them, a seeded subset):

- **judge accuracy**: share of synthetic images of c that the judge classifies as c, beside
  its accuracy on real test images of c; the **confusion matrix** (rows: intended class,
  columns: judge prediction; the SCDL-GAN study's mode-collapse check) shows a collapse onto few
  classes as a dominant column. ``confusion_real`` is the judge's own confusion matrix on
  the real test images (rows: true class), the reference that separates the judge's
  errors from the generator's (``fig-audit-confusion.png`` shows both, with counts).
- **FD-judge**: Fréchet distance ‖μ_s − μ_r‖² + tr(Σ_s + Σ_r − 2(Σ_sΣ_r)^½) between
  Gaussians fitted to the judge features of the synthetic images of c and of the real test
  images of c (Heusel et al., 2017, computed in the judge's feature space instead of
  Inception's: it is *not* FID and not comparable with published FIDs). Reference: the same
  distance for the real long-tailed training images of c. Few samples bias it upwards.
- **diversity**: mean pairwise Euclidean distance of the judge features of the synthetic
  images of c divided by the same for real test images of c (1 = as diverse as real data,
  0 = one image repeated).
- **memorisation**: d(x) = min over the long-tailed training images t and their mirror
  images of the RMS pixel difference ‖x − t‖₂/√(H·W·C) (pixels in [0, 1]). The threshold τ_c is
  the ``ALPHA`` = 5 % quantile of d over real *test* images of c, i.e. of how close real
  images that were never trained on come to the training images. Memorisation = share of
  synthetic images of c with d(x) < τ_c: about 0.05 for a generator that draws fresh
  images, 1 for exact copies (the ``copy`` backend).

Feature-space samples (the ``feature`` backend) have no pixels, so the judge cannot see
them. Their audit (:func:`feature_audit`) keeps the same fields, measured in the feature
space of the run's backbone (``generator/backbone.safetensors``): **judge accuracy** = the
frozen backbone classifier's accuracy on synthetic features of c (label fidelity; with
pseudo conditioning the labels came from the same network, so it measures how well the
generator reproduces what that network believes), beside its accuracy on real test
features; **FD** between the synthetic and the real test features of c (reference: real
training features); **diversity** relative to real test features; **memorisation** with
d(x) = RMS distance ‖x − t‖₂/√D to the nearest real training feature t and the same 5 %
rule. No figure of closest pairs exists for them (a feature vector is not an image).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import candidates
from ..data import longtail
from ..engine.networks import batched_features, pick_device

ALPHA = 0.05
DIVERSITY_MAX = 500  # images per class for the O(n²) pairwise distances


# what rows() reads of a compared run's synthetic/audit.json
AUDIT_SCHEMA = {"generator": str, "cond_labels": str, "judge": {"arch": str},
                "overall": {"n_audited": int}, "per_class": [dict]}

def judge_outputs(judge, x_uint8) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features float64 N×D, predicted classes) of the judge on uint8 images."""
    if not len(x_uint8):
        return np.zeros((0, 1)), np.zeros(0, np.int64)
    feats, logits = batched_features(judge[0], judge[1], np.asarray(x_uint8))
    return feats.double().cpu().numpy(), logits.argmax(1).cpu().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float | None:
    """Fréchet distance between Gaussians fitted to the rows of a and b (None if n < 2)."""
    from scipy import linalg
    if len(a) < 2 or len(b) < 2:
        return None
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # singular when n <= feature dim: the bias noted above
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(max(0.0, ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)))


def mean_pairwise(features: np.ndarray, seed: int = 0) -> float | None:
    """Mean Euclidean distance over distinct pairs (a seeded subset of DIVERSITY_MAX rows)."""
    if len(features) < 2:
        return None
    if len(features) > DIVERSITY_MAX:
        features = features[np.random.default_rng(seed).choice(len(features), DIVERSITY_MAX,
                                                                replace=False)]
    d = torch.cdist(torch.as_tensor(features), torch.as_tensor(features))
    n = len(features)
    return float(d.sum() / (n * (n - 1)))


@torch.no_grad()
def nearest_rows(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 1024):
    """(RMS distance ‖q − b‖₂/√D, index) of the nearest row b of ``bank`` to each query."""
    dists, idx = [], []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i:i + chunk], bank).min(1)
        dists.append(d.values.cpu())
        idx.append(d.indices.cpu())
    if not dists:
        return np.zeros(0), np.zeros(0, np.int64)
    return (torch.cat(dists) / float(np.sqrt(bank.shape[1]))).numpy(), torch.cat(idx).numpy()


@torch.no_grad()
def nearest_train(x_uint8, train_uint8, device: str = "auto", chunk: int = 1024):
    """(RMS pixel distance, index) of each image's nearest training image or its mirror."""
    dev = pick_device(device)
    flat = lambda a: torch.as_tensor(np.asarray(a), device=dev).float().div(255).flatten(1)  # noqa: E731
    train = torch.as_tensor(np.asarray(train_uint8), device=dev)
    bank = torch.cat([flat(train), flat(train.flip(2))])  # N×H×W×3: flip(2) mirrors width
    dist, idx = nearest_rows(flat(x_uint8), bank, chunk)
    return dist, idx % len(train)


def _subset(labels: np.ndarray, per_class: int | None, seed: int) -> np.ndarray:
    if per_class is None:
        return np.arange(len(labels))
    return longtail.balanced_subset(labels, per_class, seed)


def audit(syn_x, syn_y, train_x, train_y, test_x, test_y, judge, classes,
          per_class: int | None = None, seed: int = 0, device: str = "auto") -> dict:
    """Per-class audit of synthetic images (see the module docstring) as a JSON-able dict.

    ``train_y`` (the hidden truth) is used only to pick each class's real training images for
    the FD-judge reference: the audit is an evaluation, not part of learning.
    """
    keep = _subset(syn_y, per_class, seed)
    sx = np.asarray(syn_x)[keep]
    ref = _subset(test_y, per_class, seed)
    s_feat, s_pred = judge_outputs(judge, sx)
    t_feat, t_pred = judge_outputs(judge, test_x)
    r_feat, _ = judge_outputs(judge, train_x)
    s_dist, s_near = nearest_train(sx, train_x, device)
    t_dist, _ = nearest_train(test_x[ref], train_x, device)
    return _summary(syn_y, keep, s_feat, s_pred, s_dist, s_near, test_y, t_feat, t_pred,
                    ref, t_dist, train_y, r_feat, classes, seed)


@torch.no_grad()
def feature_audit(syn_f, syn_y, train_f, train_y, test_f, test_y, classifier, classes,
                  per_class: int | None = None, seed: int = 0, device: str = "auto") -> dict:
    """The audit of synthetic *features* (see the module docstring): the same fields as
    :func:`audit`, in the backbone's feature space, judged by its ``classifier``."""
    dev = pick_device(device)
    as_tensor = lambda a: torch.as_tensor(np.asarray(a), device=dev).float()  # noqa: E731
    keep = _subset(syn_y, per_class, seed)
    ref = _subset(test_y, per_class, seed)
    sf, tf, rf = as_tensor(syn_f)[keep], as_tensor(test_f), as_tensor(train_f)
    classifier = classifier.to(dev).eval()
    preds = lambda f: classifier(f).argmax(1).cpu().numpy()  # noqa: E731
    s_dist, s_near = nearest_rows(sf, rf)
    t_dist, _ = nearest_rows(tf[ref], rf)
    numpy = lambda t: t.double().cpu().numpy()  # noqa: E731
    return _summary(syn_y, keep, numpy(sf), preds(sf), s_dist, s_near, test_y, numpy(tf),
                    preds(tf), ref, t_dist, train_y, numpy(rf), classes, seed)


def _summary(syn_y, keep, s_feat, s_pred, s_dist, s_near, test_y, t_feat, t_pred, ref, t_dist,
             train_y, r_feat, classes, seed) -> dict:
    """The per-class audit from the judge's view of the synthetic samples (``s_*``: rows
    ``keep`` of ``syn_y``), the real test samples (``t_*``; ``t_dist``: the distances of
    rows ``ref`` to the training set) and the real training samples (``r_feat``)."""
    c_num = len(classes)
    sy = np.asarray(syn_y)[keep]
    confusion, confusion_real = np.zeros((2, c_num, c_num), np.int64)
    np.add.at(confusion, (sy, s_pred), 1)
    np.add.at(confusion_real, (np.asarray(test_y), t_pred), 1)
    rows = []
    for c in np.unique(syn_y):
        s, t, r = sy == c, test_y == c, train_y == c
        tau = float(np.quantile(t_dist[test_y[ref] == c], ALPHA)) if (test_y[ref] == c).any() else None
        real_div = mean_pairwise(t_feat[t], seed)
        syn_div = mean_pairwise(s_feat[s], seed)
        rows.append(dict(
            label=int(c), name=classes[c], n_synthetic=int((np.asarray(syn_y) == c).sum()),
            n_audited=int(s.sum()),
            judge_accuracy=float((s_pred[s] == c).mean()) if s.any() else None,
            judge_accuracy_real=float((t_pred[t] == c).mean()) if t.any() else None,
            fd_judge=frechet_distance(s_feat[s], t_feat[t]),
            fd_judge_real_train=frechet_distance(r_feat[r], t_feat[t]),
            diversity=(syn_div / real_div) if syn_div is not None and real_div else None,
            memorisation=float((s_dist[s] < tau).mean()) if tau is not None and s.any() else None,
            tau=tau, median_nn_distance=float(np.median(s_dist[s])) if s.any() else None))
    n = len(sy)
    overall = dict(n_audited=n, judge_accuracy=float((s_pred == sy).mean()) if n else None,
                   memorisation=float(np.mean([(s_dist[sy == r["label"]] < r["tau"]).mean()
                                               for r in rows if r["tau"] is not None]))
                   if rows else None)
    closest = np.argsort(s_dist)[:16]
    return dict(alpha=ALPHA, per_class=rows, overall=overall, confusion=confusion.tolist(),
                confusion_real=confusion_real.tolist(),
                closest=[dict(synthetic=int(keep[i]), train_row=int(s_near[i]),
                              distance=float(s_dist[i]), label=int(sy[i])) for i in closest])


@dataclass(frozen=True)
class AuditSettings:
    """The audit's settings, read once from notebook 03's parameters (:meth:`from_params`):
    the seed of its picks, the test images per class, the samples audited per class (None:
    all) and the image judge (``AUDIT_JUDGE_*``, else the clean classifier's ``CLEAN_*``)."""
    seed: int
    test_per_class: int
    judge_arch: str
    judge_epochs: int
    per_class: int | None = None
    clean_per_class: int | None = None

    @classmethod
    def from_params(cls, params: dict) -> AuditSettings:
        return cls(seed=int(params.get("SEED") or 0),
                   test_per_class=params["N_TEST_PER_CLASS"],
                   judge_arch=params.get("AUDIT_JUDGE_ARCH") or params["CLEAN_ARCH"],
                   judge_epochs=params.get("AUDIT_JUDGE_EPOCHS") or params["CLEAN_EPOCHS"],
                   per_class=params.get("AUDIT_PER_CLASS") or None,
                   clean_per_class=params.get("CLEAN_PER_CLASS") or None)


def run(run_dir, cifar, ds, settings: AuditSettings, device: str = "auto") -> dict:
    """Audit ``run_dir/synthetic``: images with the profile's judge, features (the
    ``feature`` backend) in the run's backbone feature space. Writes
    ``synthetic/audit.json`` (``space``: 'image' or 'feature'), ``fig-audit.png``,
    ``fig-audit-confusion.png`` and, for images, ``fig-audit-closest.png``; returns the
    audit."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from ..engine import backbone
    from .. import config
    from . import viz
    from ..rundir.runfiles import describe, load_synthetic, read_settings, synthetic_space

    run_dir = Path(run_dir)
    seed, per_class = settings.seed, settings.per_class
    syn_x, syn_y, _ = load_synthetic(run_dir)
    test = longtail.balanced_subset(cifar.test_y, settings.test_per_class, seed)
    train_x, test_x, test_y = cifar.train_x[ds["indices"]], cifar.test_x[test], cifar.test_y[test]
    recorded = read_settings(run_dir)
    space = synthetic_space(run_dir)
    figures = {}
    if space == "feature":
        net, meta = backbone.load_backbone(run_dir, device)
        judge_info = dict(meta.get("backbone") or {}, judge="the backbone's own classifier",
                          arch=meta["arch"], file=f"generator/{backbone.BACKBONE}")
        result = feature_audit(syn_x, syn_y, backbone.encode(net, train_x), ds["labels"],
                               backbone.encode(net, test_x), test_y, net.classifier,
                               cifar.classes, per_class, seed, device)
    else:
        judge, judge_info = candidates.clean_classifier(
            cifar, settings.judge_arch, settings.judge_epochs, seed, device,
            settings.clean_per_class)
        result = audit(syn_x, syn_y, train_x, ds["labels"], test_x, test_y, judge,
                       cifar.classes, per_class, seed, device)
    result = dict(generator=recorded.get("generator"), cond_labels=recorded.get("cond_labels"),
                  space=space, judge=judge_info, **result)
    config.write_json(run_dir / "synthetic" / "audit.json", result)
    title = f"synthetic-data audit: {describe(recorded)}"
    figures["fig-audit.png"] = audit_figure(result, cifar.classes, title)
    figures["fig-audit-confusion.png"] = confusion_figure(result, cifar.classes, title)
    if space != "feature":
        figures["fig-audit-closest.png"] = closest_figure(result, syn_x, train_x, cifar.classes,
                                                          title)
    for name, fig in figures.items():
        viz.save(fig, run_dir / name)
        plt.close(fig)
    return result


def table(result: dict):
    """The per-class audit as a pandas DataFrame."""
    import pandas as pd
    cols = ["name", "n_synthetic", "judge_accuracy", "judge_accuracy_real", "fd_judge",
            "fd_judge_real_train", "diversity", "memorisation"]
    return pd.DataFrame([{k: r[k] for k in cols} for r in result["per_class"]]).set_index("name")


def compare(run_dirs):
    """A pandas DataFrame with one row per run directory (relative paths: from the project
    root) with an audit (``synthetic/audit.json``): its generator, conditioning labels,
    space (image or feature: the metrics of the two are measured by different judges and
    are not comparable), judge, samples audited and the per-class metrics averaged over the
    audited classes — the audit table of several backends on the same data."""
    import pandas as pd

    from ..rundir import artefacts
    from ..config import project_path
    rows = []
    for run in map(project_path, run_dirs):
        path = run / "synthetic" / "audit.json"
        if not path.exists():
            continue
        result = artefacts.read_json(path, what="audit of a compared run",
                                     fix=f"Run notebook 03 again into {run}.",
                                     schema=AUDIT_SCHEMA)
        mean = lambda key: np.nanmean([np.nan if r[key] is None else r[key]  # noqa: E731
                                       for r in result["per_class"]])
        rows.append(dict(run=run.name, generator=result["generator"],
                         cond_labels=result["cond_labels"], space=result.get("space", "image"),
                         judge=result["judge"]["arch"],
                         n_audited=result["overall"]["n_audited"],
                         judge_accuracy=result["overall"]["judge_accuracy"],
                         **{k: mean(k) for k in ("judge_accuracy_real", "fd_judge",
                                                 "fd_judge_real_train", "diversity")},
                         memorisation=result["overall"]["memorisation"]))
    return pd.DataFrame(rows).set_index("run") if rows else pd.DataFrame()


def judge_names(result: dict) -> tuple[str, str]:
    """(who judged, what the Fréchet distance is called) for an audit of images or features."""
    if result.get("space") == "feature":
        return "backbone classifier", "FD (backbone features)"
    return "judge", "FD-judge"


def audit_figure(result: dict, classes, title: str = ""):
    """Confusion matrix + per-class judge accuracy, FD-judge, diversity and memorisation."""
    import matplotlib.pyplot as plt

    rows = result["per_class"]
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    val = lambda key: [np.nan if r[key] is None else r[key] for r in rows]  # noqa: E731
    judge, fd = judge_names(result)
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    confusion_panel(ax[0], result["confusion"], [r["label"] for r in rows], classes,
                    f"{judge} prediction (row-normalised)", "intended class", judge)
    for a, (key_s, key_r, label_s, label_r, name) in zip(ax[1:3], (
            ("judge_accuracy", "judge_accuracy_real", "synthetic", "real test",
             f"{judge} accuracy"),
            ("fd_judge", "fd_judge_real_train", "synthetic", "real train", f"{fd} to real test"))):
        a.bar(x - 0.2, val(key_s), 0.4, label=label_s, color="tab:orange")
        a.bar(x + 0.2, val(key_r), 0.4, label=label_r, color="tab:blue")
        a.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
        a.set(title=name)
        a.legend(fontsize=7)
    ax[3].bar(x - 0.2, val("diversity"), 0.4, label="diversity (real = 1)", color="tab:green")
    ax[3].bar(x + 0.2, val("memorisation"), 0.4, label="memorisation share", color="tab:red")
    ax[3].axhline(result["alpha"], color="tab:red", ls=":", lw=1,
                  label=f"memorisation of fresh real images ({result['alpha']})")
    ax[3].set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax[3].set(title="diversity and memorisation", ylim=(0, 1.25))
    ax[3].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_panel(ax, confusion, rows, classes, title: str, ylabel: str, judge: str = "judge",
                    counts: bool = False) -> None:
    """Rows ``rows`` of a confusion matrix (columns: ``judge``'s class), coloured by row
    share; ``counts`` writes each non-zero count into its cell."""
    shown = np.asarray(confusion, float)[rows]
    share = shown / np.maximum(shown.sum(1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set(title=title, yticks=range(len(rows)), xticks=range(len(classes)),
           xlabel=f"{judge}'s class", ylabel=ylabel)
    ax.set_yticklabels([classes[r] for r in rows], fontsize=7)
    ax.set_xticklabels(classes, rotation=90, fontsize=7)
    if counts:
        for (i, j), n in np.ndenumerate(shown):
            if n:
                ax.text(j, i, str(int(n)), ha="center", va="center", fontsize=6,
                        color="white" if share[i, j] > 0.5 else "black")


def confusion_figure(result: dict, classes, title: str = ""):
    """The SCDL-GAN study's check: the judge's predictions for the synthetic samples of each
    intended class (counts; a collapsed generator fills one column), beside the judge's confusion
    on real test samples (its own errors). For features the judge is the backbone's
    classifier."""
    import matplotlib.pyplot as plt

    judge, _ = judge_names(result)
    kind = "features" if result.get("space") == "feature" else "images"
    rows = [r["label"] for r in result["per_class"]]
    fig, ax = plt.subplots(1, 2, figsize=(13, 0.45 * len(classes) + 2.2))
    confusion_panel(ax[0], result["confusion"], rows, classes,
                    f"synthetic {kind}: {judge} prediction per intended class", "intended class",
                    judge, counts=True)
    confusion_panel(ax[1], result["confusion_real"], list(range(len(classes))), classes,
                    f"real test {kind}: {judge} prediction per true class", "true class", judge,
                    counts=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def closest_figure(result: dict, syn_x, train_x, classes, title: str = "", n: int = 8):
    """The n synthetic images closest to a training image, each above its nearest neighbour."""
    import matplotlib.pyplot as plt

    from . import viz

    pairs = result["closest"][:n]
    fig, axes = plt.subplots(2, max(len(pairs), 1), figsize=(1.6 * max(len(pairs), 1), 3.8),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, p in enumerate(pairs):
        viz.show_image(axes[0, i], syn_x[p["synthetic"]])
        axes[0, i].set_title(f"{classes[p['label']][:6]}\nd={p['distance']:.3f}", fontsize=7)
        viz.show_image(axes[1, i], train_x[p["train_row"]])
    axes[0, 0].text(-4, 16, "synthetic", rotation=90, va="center", ha="right", fontsize=8)
    axes[1, 0].text(-4, 16, "nearest\ntraining", rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle(title + " — closest pairs (RMS pixel distance, mirrors included)", fontsize=9)
    fig.tight_layout()
    return fig
