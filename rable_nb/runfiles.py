"""Torch-free readers of a run directory's files: the synthetic top-up of notebook 03
(``synthetic/manifest.jsonl``, ``synthetic/settings.json``, the samples) and the fields of
``metrics-<method>.json``. Stages, figures, the study and the results table read run files
through this module, so none of them needs the generator registry or torch to do so.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from . import jsonl

SYNTH_DIR, MANIFEST, SETTINGS = "synthetic", "manifest.jsonl", "settings.json"
METRICS_FIELDS = ("method", "protocol", "params", "accuracy", "device", "wall_s",
                  "images_per_s", "commit")
ACCURACY_FIELDS = ("last", "best", "many", "medium", "few", "per_class")
FEATURE_SUFFIX = ".npy"  # synthetic feature vectors; images are PNGs


def load_sample(path: Path) -> np.ndarray:
    """A synthetic sample: a feature vector (.npy) or an image (greyscale PNGs come back
    as H×W×1)."""
    if path.suffix == FEATURE_SUFFIX:
        return np.load(path)
    with Image.open(path) as img:
        if img.mode == "L":
            return np.asarray(img)[..., None]
        return np.asarray(img.convert("RGB"))


def manifest_rows(run_dir: str | os.PathLike) -> list[dict]:
    """The lines of a run's ``synthetic/manifest.jsonl`` (empty when there is none)."""
    return jsonl.read(Path(run_dir) / SYNTH_DIR / MANIFEST, repair=False)


def read_settings(run_dir: str | os.PathLike) -> dict:
    """``synthetic/settings.json`` of a run ({} when nothing was generated)."""
    path = Path(run_dir) / SYNTH_DIR / SETTINGS
    return json.loads(path.read_text()) if path.exists() else {}


def load_synthetic(run_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(samples — uint8 images N×H×W×C or features N×D —, labels, manifest rows)."""
    out = Path(run_dir) / SYNTH_DIR
    rows = manifest_rows(run_dir)
    if not rows:
        return np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64), []
    samples = np.stack([load_sample(out / r["file"]) for r in rows])
    return samples, np.array([r["label"] for r in rows], dtype=np.int64), rows


def synthetic_counts(run_dir: str | os.PathLike, num_classes: int) -> np.ndarray:
    """Synthetic samples per class according to the manifest."""
    counts = Counter(r["label"] for r in manifest_rows(run_dir))
    return np.array([counts.get(c, 0) for c in range(num_classes)], dtype=np.int64)


def synthetic_space(run_dir) -> str | None:
    """What the run's synthetic samples are ('image' or 'feature', read from the files the
    manifest names), None when there are none."""
    rows = manifest_rows(run_dir)
    if not rows:
        return None
    return "feature" if Path(rows[0]["file"]).suffix == FEATURE_SUFFIX else "image"


def describe(settings: dict) -> str:
    """Short label of a top-up for titles, e.g. 'pixel, pseudo labels' or
    'copy, ORACLE labels (ablation)'."""
    if not settings:
        return "no synthetic data"
    cond = settings.get("cond_labels")
    tag = "ORACLE labels (ablation)" if cond == "oracle" else f"{cond} labels"
    return f"{settings.get('generator')}, {tag}"


def method_label(method: str, metrics: dict) -> str:
    """Display name of a trained method: models trained on synthetic images carry their
    top-up, e.g. 'rable [pixel, pseudo labels]' or 'rable [copy, ORACLE labels (ablation)]'."""
    synthetic = (metrics.get("params") or {}).get("synthetic")
    if not synthetic:
        return method
    return f"{method} [{describe(synthetic)}]"
