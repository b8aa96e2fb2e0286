"""Stage 01 (notebook 01): the long-tailed subset of CIFAR-10 and its partial (candidate)
labels, written to the run directory.

The long tail is ``longtail``'s, the candidate sets ``candidates``' (uniform, or
instance-dependent from a cached clean classifier), ``dataset.npz``/``dataset.json`` are
written and checked against the data by ``runfiles``. This module holds the stage's rules
(:func:`validate`), what defines a dataset (``DATASET_KEYS``) and :func:`run`.
"""
from __future__ import annotations

import textwrap

import numpy as np

from .. import config
from ..rundir import runfiles
from ..parts.candidates import clean_classifier, instance_candidates, predict_proba, uniform_candidates
from ..data.images import Cifar, folder_counts, resolve_data_dir
from ..data.longtail import LONG_TAIL_SEED, examples_per_class, long_tail_counts, long_tail_indices, num_images, take
from ..engine.networks import BACKBONES


def validate(P: dict) -> None:
    """Check notebook 01's own parameters (``ValueError`` with a clear message)."""
    config.check(P, {"N_MAX": config.integer(1), "CLEAN_ARCH": config.one_of(sorted(BACKBONES)),
                     "CLEAN_EPOCHS": config.integer(1), "CLEAN_PER_CLASS": config.integer(0)})
    num_images(P)  # an empty class is an error
    check_folder_size(P)


def check_folder_size(P: dict) -> None:
    """An ImageFolder ``DATA_DIR`` must hold the long tail's images of every class (counted
    without decoding, before notebook 01 starts); other layouts are checked as they load."""
    if not (config.is_int(P.get("N_MAX")) and config.is_number(P.get("IMBALANCE_FACTOR"))
            and "DATA_DIR" in P):
        return
    counts = folder_counts(P.get("DATA_DIR"))
    if not counts:
        return
    wanted = long_tail_counts(P["N_MAX"], len(counts), P["IMBALANCE_FACTOR"])
    short = [(name, have, need) for (name, have), need in zip(counts.items(), wanted)
             if have < need]
    if short:
        name, have, need = short[0]
        raise ValueError(
            f"N_MAX={P['N_MAX']} is invalid: the ImageFolder at DATA_DIR="
            f"{str(P.get('DATA_DIR') or resolve_data_dir())!r} has {have} training images of "
            f"class {name!r}, and the long tail (N_MAX={P['N_MAX']}, IMBALANCE_FACTOR="
            f"{P['IMBALANCE_FACTOR']}) needs {need}; lower N_MAX (its most frequent class "
            f"holds {list(counts.values())[0]}) or use a larger folder.")


def candidate_examples(ds: dict, images: np.ndarray, classes, per_class: int = 8,
                       seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Notebook 01's sample grid: per true class up to ``per_class`` seeded long-tailed
    images (``images`` aligned with ``ds``) and their candidate sets as titles: the true
    label in capitals, then the other candidates (abbreviated). One row per class."""
    slots = examples_per_class(ds["labels"], per_class, seed)
    titles = []
    for r in slots:
        if r < 0:
            titles.append("")
            continue
        true = int(ds["labels"][r])
        others = [classes[j][:4] for j in np.flatnonzero(ds["candidates"][r]) if j != true]
        titles.append(classes[true].upper() + "\n" + textwrap.fill(" ".join(others), 20))
    return take(images, slots), titles


def build_dataset(cifar: Cifar, imbalance_factor: float, partial: str, q: float, rate: float,
                  seed: int = 0, n_max: int = 5000, clean_arch: str = "resnet18",
                  clean_epochs: int = 60, clean_per_class: int | None = None,
                  device: str = "auto") -> dict:
    """Long-tailed subset plus candidate sets: the content of ``dataset.npz``."""
    config.validate({"PARTIAL": partial, "IMBALANCE_FACTOR": imbalance_factor, "Q": q,
                     "RATE": rate, "SEED": seed})
    counts = long_tail_counts(n_max, cifar.num_classes, imbalance_factor)
    indices = long_tail_indices(cifar.train_y, counts, LONG_TAIL_SEED)
    labels = cifar.train_y[indices]
    info: dict = {}
    if partial == "uniform":
        candidates = uniform_candidates(labels, cifar.num_classes, q, seed)
    else:
        net, info = clean_classifier(cifar, clean_arch, clean_epochs, seed, device, clean_per_class)
        probs = predict_proba(net, cifar.train_x[indices])
        candidates = instance_candidates(probs, labels, rate, seed)
    return dict(indices=indices, labels=labels, candidates=candidates,
                class_counts=np.asarray(counts, dtype=np.int64), clean_classifier=info,
                data_identity=cifar.identity)


# the parameters that define a dataset, recorded in dataset.json with the data's source
DATASET_KEYS = ("PROFILE", "DATA_DIR", "SEED", "IMBALANCE_FACTOR", "PARTIAL", "Q", "RATE",
                "N_MAX")


def run(P: dict, cifar: Cifar) -> dict:
    """The whole of stage 01 for resolved parameters ``P`` (notebook 01 and the campaign):
    the long tail and candidate sets of ``cifar``, written to ``RUN_DIR`` as
    ``dataset.npz`` and ``dataset.json`` (``DATASET_KEYS`` and the source). A run directory
    made from other data is refused before anything is built."""
    # keeps its data; remakes a damaged one
    runfiles.check_source(P["RUN_DIR"], cifar, remake=True)
    ds = build_dataset(cifar, P["IMBALANCE_FACTOR"], P["PARTIAL"], P["Q"], P["RATE"],
                       seed=P["SEED"], n_max=P["N_MAX"], clean_arch=P["CLEAN_ARCH"],
                       clean_epochs=P["CLEAN_EPOCHS"],
                       clean_per_class=P["CLEAN_PER_CLASS"] or None, device=P["DEVICE"])
    runfiles.save_dataset(P["RUN_DIR"], ds,
                          {k: P[k] for k in DATASET_KEYS} | {"source": cifar.source})
    return ds
