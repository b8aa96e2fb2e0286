"""Stage 01: long-tailed subset of CIFAR-10 and partial (candidate) labels.

- Long tail (exponential profile): n_c = int(n_max · IF^(c/(C−1))).
- ``uniform`` candidates (PiCO/RECORDS): each wrong label enters with probability q.
- ``instance`` candidates (VALEN/ABLE): flip rates from a classifier trained on clean
  CIFAR-10 (trained here and cached), q_j = min(1, r · p̃_j / mean(p̃)).
The true label is always a candidate; all draws are seeded.

A run directory belongs to one data source: ``dataset.npz`` (and its readable copy
``dataset.json``) records the fingerprint of the decoded CIFAR-10 it indexes
(``data.Cifar.identity``); :func:`check_source` refuses any later stage that loaded other
data, and notebook 01 refuses to rewrite a run directory's dataset from other data.
"""
from __future__ import annotations

import hashlib
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import artefacts, config, runfiles
from .augment import random_crop_flip
from .data import CLASSES, Cifar, folder_counts, resolve_data_dir
from .networks import BACKBONES, batched_logits, build_backbone, normalize, pick_device


LONG_TAIL_SEED = 0  # the long tail is fixed; SEED varies only the candidate sets
NUM_CLASSES = len(CLASSES)


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


def num_images(P: dict) -> int | None:
    """Training images of a dataset: recorded (``num_images`` of dataset.json) or planned
    from ``N_MAX`` and ``IMBALANCE_FACTOR`` (CIFAR-10's classes); None when unknown."""
    if P.get("num_images") is not None:
        return int(P["num_images"])
    if config.is_int(P.get("N_MAX")) and config.is_number(P.get("IMBALANCE_FACTOR")):
        return sum(long_tail_counts(P["N_MAX"], NUM_CLASSES, P["IMBALANCE_FACTOR"]))
    return None


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Per-class image counts of the exponential long-tail profile."""
    config.validate({"IMBALANCE_FACTOR": imbalance_factor})
    counts = [int(n_max * imbalance_factor ** (c / (num_classes - 1))) for c in range(num_classes)]
    if min(counts) < 1:
        raise ValueError(f"IMBALANCE_FACTOR={imbalance_factor} with n_max={n_max} leaves a class "
                         f"with no image ({counts}); raise n_max or the factor.")
    return counts


def long_tail_indices(labels: np.ndarray, counts: list[int], seed: int = 0) -> np.ndarray:
    """Indices of the first ``counts[c]`` images of each class after a seeded shuffle."""
    picked = []
    for c, n in enumerate(counts):
        members = np.flatnonzero(labels == c)
        if n > len(members):
            raise ValueError(f"class {c} has {len(members)} images, {n} requested")
        rng = np.random.default_rng([seed, c])
        picked.append(np.sort(rng.permutation(members)[:n]))
    return np.concatenate(picked)


def balanced_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Seeded indices of up to ``per_class`` images of every class, grouped by class."""
    counts = np.bincount(labels)
    return long_tail_indices(labels, np.minimum(counts, per_class).tolist(), seed)


def examples_per_class(labels, per_class: int, seed: int = 0) -> np.ndarray:
    """Seeded positions of up to ``per_class`` items of every class present, in rows of
    ``per_class`` (one row per class); -1 fills the row of a class with fewer items, so in a
    grid of ``per_class`` columns every class starts its own row (see :func:`take`)."""
    labels = np.asarray(labels)
    picks = balanced_subset(labels, per_class, seed) if len(labels) else np.zeros(0, int)
    rows = []
    for c in np.unique(labels[picks]):
        mine = picks[labels[picks] == c]
        rows.append(np.concatenate([mine, np.full(per_class - len(mine), -1)]))
    return np.concatenate(rows).astype(int) if rows else np.zeros(0, int)


def take(images: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """``images[slots]`` with a white image where a slot is -1."""
    return np.concatenate([images, np.full_like(images[:1], 255)])[slots]


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


def uniform_candidates(labels: np.ndarray, num_classes: int, q: float, seed: int = 0
                       ) -> np.ndarray:
    """N×C bool candidate sets: every wrong label enters independently with probability q."""
    config.validate({"Q": q})
    rng = np.random.default_rng(seed)
    cand = rng.random((len(labels), num_classes)) < q
    cand[np.arange(len(labels)), labels] = True
    return cand


def instance_flip_rates(probs: np.ndarray, labels: np.ndarray, rate: float) -> np.ndarray:
    """VALEN/ABLE rule: p[true]=0, p̃ = p / max p, q_j = min(1, r · p̃_j / mean_j p̃)."""
    config.validate({"RATE": rate})
    p = probs.astype(np.float64).copy()
    p[np.arange(len(labels)), labels] = 0.0
    p /= np.maximum(p.max(axis=1, keepdims=True), 1e-12)
    return np.minimum(1.0, rate * p / np.maximum(p.mean(axis=1, keepdims=True), 1e-12))


def instance_candidates(probs: np.ndarray, labels: np.ndarray, rate: float, seed: int = 0
                        ) -> np.ndarray:
    """N×C bool candidate sets: one Bernoulli per wrong label with instance flip rates."""
    flip = instance_flip_rates(probs, labels, rate)
    rng = np.random.default_rng(seed)
    cand = rng.random(flip.shape) < flip
    cand[np.arange(len(labels)), labels] = True
    return cand


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int,
         lr: float) -> None:
    """Plain supervised SGD with crop+flip augmentation and a cosine schedule."""
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * max(1, len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    net.train()
    for _ in tqdm(range(epochs), desc="clean classifier", unit="epoch", leave=False):
        for idx in torch.randperm(len(x), device=x.device).split(batch):
            if len(idx) < batch:
                continue
            loss = F.cross_entropy(net(random_crop_flip(normalize(x[idx]))), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def predict_proba(net: nn.Module, x_uint8: np.ndarray) -> np.ndarray:
    """Softmax probabilities of ``net`` on uint8 images (evaluation mode)."""
    return F.softmax(batched_logits(net, x_uint8), 1).cpu().numpy()


def clean_classifier(cifar: Cifar, arch: str, epochs: int, seed: int = 0, device: str = "auto",
                     per_class: int | None = None) -> tuple[nn.Module, dict]:
    """Train (or load from cache) a classifier on clean CIFAR-10; returns (net, info).

    ``info`` records architecture, epochs, training-set size and test accuracy.
    """
    dev = pick_device(device)
    source = (cifar.identity.get("sha256") or hashlib.sha1(cifar.source.encode()).hexdigest())[:10]
    key = f"clean-{arch}-e{epochs}-s{seed}-n{per_class or 'all'}-{source}"
    weights, meta = config.cache_dir() / f"{key}.safetensors", config.cache_dir() / f"{key}.json"
    torch.manual_seed(seed)
    backbone = build_backbone(arch)
    net = nn.Sequential(backbone, nn.Linear(backbone.feat_dim, cifar.num_classes)).to(dev)
    if weights.exists() and meta.exists():  # a damaged file: moved aside, trained again
        info = artefacts.read_json(meta, what="clean-classifier cache entry", resumable=True)
        state = info and artefacts.load(weights, lambda p: load_file(p, device=str(dev)),
                                        what="clean-classifier cache entry", resumable=True)
        if state is not None:
            net.load_state_dict(state)
            return net, info
    idx = np.arange(len(cifar.train_y))
    if per_class:
        idx = balanced_subset(cifar.train_y, per_class, seed)
    x = torch.as_tensor(cifar.train_x[idx], device=dev)
    y = torch.as_tensor(cifar.train_y[idx], device=dev)
    _fit(net, x, y, epochs, batch=min(128, len(idx)), lr=0.1)
    acc = float((predict_proba(net, cifar.test_x).argmax(1) == cifar.test_y).mean())
    info = dict(arch=arch, epochs=epochs, seed=seed, train_images=int(len(idx)),
                test_accuracy=acc, device=str(dev))
    config.write_atomic(weights, lambda t: save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, t))
    config.write_json(meta, info)  # written last: its presence marks a complete cache entry
    return net, info


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


class DataSourceError(ValueError):
    """A stage loaded other data than the run directory's dataset was made from."""


IDENTITY_KEYS = ("sha256", "train_images", "test_images", "classes")


def _describe(identity: dict) -> str:
    return (f"{identity.get('data_dir')} ({identity.get('layout')}, "
            f"{identity.get('train_images')} training + {identity.get('test_images')} test "
            f"images, sha256 {str(identity.get('sha256'))[:12]})")


def compare_sources(recorded: dict | None, current: dict, run_dir) -> None:
    """:class:`DataSourceError` unless ``current`` is the data ``recorded`` for ``run_dir``.

    The content decides (hash, image counts, class names); a moved copy of the same data
    is the same source.
    """
    if not recorded:
        raise DataSourceError(
            f"{run_dir}/dataset.npz records no data fingerprint (it predates them), so the "
            "data it indexes cannot be checked: rerun notebook 01 into a new run directory.")
    if any(recorded.get(k) != current.get(k) for k in IDENTITY_KEYS):
        raise DataSourceError(
            f"{run_dir} was made from other data: its dataset indexes {_describe(recorded)}, "
            f"but this stage loaded {_describe(current)}. Use the DATA_DIR (or RABLE_DATA) "
            "the run was made with, or a new run directory (--out) for the other data.")


def _rerun_01(run_dir) -> str:
    return (f"Run notebook 01 again into this run directory "
            f"({runfiles.rerun_command(run_dir, '01')}): it moves the damaged file aside and "
            "writes a new dataset.")


def _meta(run_dir: Path, resumable: bool = False) -> dict | None:
    """The parameters stored inside ``dataset.npz`` (None when it predates them). A damaged
    file is a ``DamagedFileError`` naming the fix, or moved aside (``None``) when
    ``resumable`` (notebook 01 about to write a new one)."""
    def reader(path):
        with np.load(path) as z:
            return json.loads(str(z["meta"])) if "meta" in z.files else None
    return artefacts.load(run_dir / "dataset.npz", reader, what="the run's dataset",
                          fix=_rerun_01(run_dir), resumable=resumable)


def _recorded(run_dir: Path, remake: bool = False) -> dict | None:
    """The parameters a run's dataset records: inside ``dataset.npz``, else (one that
    predates them, or, with ``remake``, a damaged one moved aside) in ``dataset.json``;
    ``{}`` when the run has no dataset, ``None`` when nothing readable is left."""
    if not (run_dir / "dataset.npz").exists():
        return {}
    meta = _meta(run_dir, resumable=remake)
    if meta is None:
        meta = runfiles.read_dataset_record(run_dir, remake) or None
    return meta


def check_source(run_dir: str | os.PathLike, cifar: Cifar, remake: bool = False) -> None:
    """Refuse ``cifar`` when the run directory's dataset was made from other data (a run
    directory without a dataset passes). ``remake`` (notebook 01, about to write a new
    dataset): a damaged ``dataset.npz``/``dataset.json`` is moved aside with a notice; the
    data is then checked against what is still readable, and a dataset of which nothing is
    readable is made anew."""
    run_dir = Path(run_dir)
    if not (run_dir / "dataset.npz").exists():
        return
    meta = _recorded(run_dir, remake)
    if meta is None and not (run_dir / "dataset.npz").exists():
        return  # damaged, moved aside, no readable record left: notebook 01 makes it anew
    compare_sources((meta or {}).get("data_identity"), cifar.identity, run_dir)


def save_dataset(run_dir: str | os.PathLike, ds: dict, params: dict) -> None:
    """Write ``dataset.npz`` (arrays + parameters + data fingerprint) and its readable copy
    ``dataset.json`` atomically; refuses to replace a dataset made from other data."""
    run_dir = Path(run_dir)
    identity = ds.get("data_identity") or {}
    old = _recorded(run_dir, remake=True) or {}
    if old.get("data_identity"):  # a run directory keeps the data it was made from
        compare_sources(old["data_identity"], identity, run_dir)
    arrays = {k: ds[k] for k in ("indices", "labels", "candidates", "class_counts")}
    meta = dict(params, clean_classifier=ds.get("clean_classifier", {}),
                num_images=int(len(ds["labels"])),
                mean_candidates=float(ds["candidates"].sum(1).mean()), data_identity=identity)
    config.write_json(run_dir / "dataset.json", meta)
    config.write_atomic(run_dir / "dataset.npz", lambda t: np.savez_compressed(
        t, **arrays, meta=np.array(json.dumps(meta, default=str))))


# the parameters that define a dataset, recorded in dataset.json with the data's source
DATASET_KEYS = ("PROFILE", "DATA_DIR", "SEED", "IMBALANCE_FACTOR", "PARTIAL", "Q", "RATE",
                "N_MAX")


def run(P: dict, cifar: Cifar) -> dict:
    """The whole of stage 01 for resolved parameters ``P`` (notebook 01 and the campaign):
    the long tail and candidate sets of ``cifar``, written to ``RUN_DIR`` as
    ``dataset.npz`` and ``dataset.json`` (``DATASET_KEYS`` and the source). A run directory
    made from other data is refused before anything is built."""
    check_source(P["RUN_DIR"], cifar, remake=True)  # keeps its data; remakes a damaged one
    ds = build_dataset(cifar, P["IMBALANCE_FACTOR"], P["PARTIAL"], P["Q"], P["RATE"],
                       seed=P["SEED"], n_max=P["N_MAX"], clean_arch=P["CLEAN_ARCH"],
                       clean_epochs=P["CLEAN_EPOCHS"],
                       clean_per_class=P["CLEAN_PER_CLASS"] or None, device=P["DEVICE"])
    save_dataset(P["RUN_DIR"], ds, {k: P[k] for k in DATASET_KEYS} | {"source": cifar.source})
    return ds


def load_dataset(run_dir: str | os.PathLike, cifar: Cifar | None = None) -> dict:
    """Read ``dataset.npz`` and its parameters from a run directory, with a clear error;
    with ``cifar``, first check that it is the data the dataset was made from."""
    path = Path(run_dir) / "dataset.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run notebook 01_dataset_imbalance first "
                                f"({runfiles.rerun_command(run_dir, '01')}).")
    if cifar is not None:
        check_source(run_dir, cifar)
    def arrays(p):
        with np.load(p) as z:
            return {k: z[k] for k in z.files if k != "meta"}
    ds = artefacts.load(path, arrays, what="the run's dataset", fix=_rerun_01(run_dir))
    ds["params"] = _recorded(Path(run_dir))
    return ds
