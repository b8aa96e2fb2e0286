"""CIFAR-10 loading: ImageFolder directory, train/test tar.gz archives, or torchvision.

Whatever the source, images are decoded once and cached as uint8 arrays (N×32×32×3) in
the cache folder. The training set is stored class-sorted (stable), so dataset indices
are positions in that order. Corrupt image files are skipped, counted in one warning
that names the first few.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .config import PROJECT_ROOT, cache_dir, write_atomic

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SHARED_COPY = PROJECT_ROOT.parent / "shared" / "data" / "cifar10"
DOWNLOAD_DIR = PROJECT_ROOT / "data"


@dataclass
class Cifar:
    """Decoded CIFAR-10: uint8 images (N×32×32×3) and int64 labels; train is class-sorted."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """``DATA_DIR`` if given, else ``RABLE_DATA``, else ../shared/data/cifar10, else ./data."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get("RABLE_DATA"):
        return Path(os.environ["RABLE_DATA"]).expanduser()
    if SHARED_COPY.is_dir():
        return SHARED_COPY
    return DOWNLOAD_DIR


def detect_layout(root: Path) -> str:
    """Return 'archives', 'folders' or 'torchvision' for a data directory."""
    if (root / "train.tar.gz").is_file() and (root / "test.tar.gz").is_file():
        return "archives"
    for base in (root, root / "cifar10"):
        if (base / "train").is_dir() and (base / "test").is_dir():
            return "folders"
    return "torchvision"


def _decode(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as img:
        img = img.convert("RGB")
        if img.size != (32, 32):
            img = img.resize((32, 32), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)


def _collect(items, total: int, desc: str, classes: list[str]):
    """Decode (class_name, name, bytes-callable) items; skip and count corrupt files."""
    images, labels, bad = [], [], []
    for cls, name, read in tqdm(sorted(items, key=lambda t: (t[0], t[1])), total=total,
                                desc=desc, unit="img", leave=False):
        try:
            images.append(_decode(read()))
            labels.append(classes.index(cls))
        except Exception:  # PIL raises several types for broken files
            bad.append(name)
    if bad:
        warnings.warn(f"{desc}: skipped {len(bad)} corrupt image file(s), e.g. {bad[:3]}",
                      stacklevel=3)
    if not images:
        raise FileNotFoundError(f"{desc}: no readable images found.")
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def _read_folder(split_dir: Path):
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    items = [(c, str(f), f.read_bytes) for c in classes for f in (split_dir / c).iterdir()
             if f.suffix.lower() in IMAGE_SUFFIXES]
    return _collect(items, len(items), f"decode {split_dir}", classes), classes


def _read_archive(path: Path):
    with tarfile.open(path, "r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
        blobs = {m.name: tar.extractfile(m).read() for m in members}
    classes = sorted({Path(n).parent.name for n in blobs})
    items = [(Path(n).parent.name, n, (lambda b=b: b)) for n, b in blobs.items()]
    return _collect(items, len(items), f"decode {path.name}", classes), classes


def _read_torchvision(root: Path):
    from torchvision.datasets import CIFAR10
    try:
        splits = [CIFAR10(str(root), train=t, download=True) for t in (True, False)]
    except Exception as err:  # no network, bad mirror, ...
        raise FileNotFoundError(
            f"No CIFAR-10 found at {root} and the torchvision download failed ({err}).\n"
            "Fix: set DATA_DIR (or the RABLE_DATA environment variable) to a directory "
            "holding train.tar.gz/test.tar.gz or train/<class>/, test/<class>/ folders; "
            f"looked at DATA_DIR, $RABLE_DATA, {SHARED_COPY}, {DOWNLOAD_DIR}.") from err
    out = [(np.asarray(s.data, dtype=np.uint8), np.asarray(s.targets, dtype=np.int64))
           for s in splits]
    return out, list(splits[0].classes)


def _source_key(root: Path, layout: str) -> str:
    """Cache key from the source's path, layout and file sizes/mtimes."""
    parts = [str(root.resolve()), layout]
    if layout == "archives":
        parts += [f"{(root / f).stat().st_size}:{(root / f).stat().st_mtime_ns}"
                  for f in ("train.tar.gz", "test.tar.gz")]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _decode_source(root: Path, layout: str):
    if layout == "archives":
        (train, classes), (test, _) = (_read_archive(root / f"{s}.tar.gz")
                                       for s in ("train", "test"))
    elif layout == "folders":
        base = root if (root / "train").is_dir() else root / "cifar10"
        (train, classes), (test, _) = (_read_folder(base / s) for s in ("train", "test"))
    else:
        (train, test), classes = _read_torchvision(root)
    return train, test, classes


def load_cifar10(data_dir: str | os.PathLike | None = None) -> Cifar:
    """Load CIFAR-10 (see :func:`resolve_data_dir`), decoding once into the cache."""
    root = resolve_data_dir(data_dir)
    if data_dir and not root.exists():
        raise FileNotFoundError(
            f"DATA_DIR={str(data_dir)!r} does not exist. Point it at a directory with "
            "train.tar.gz/test.tar.gz or train/<class>/ and test/<class>/ image folders.")
    layout = detect_layout(root)
    cache = cache_dir() / f"cifar10-{_source_key(root, layout)}.npz"
    if not cache.exists():
        (trx, try_), (tex, tey), classes = _decode_source(root, layout)
        order = np.argsort(try_, kind="stable")
        write_atomic(cache, lambda t: np.savez(t, train_x=trx[order], train_y=try_[order],
                                               test_x=tex, test_y=tey, classes=np.array(classes)))
    with np.load(cache) as z:
        return Cifar(z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                     tuple(str(c) for c in z["classes"]), f"{root} ({layout})")


def write_fake_cifar(root: str | os.PathLike, n_train: int = 60, n_test: int = 20,
                     seed: int = 0, fmt: str = "png") -> Path:
    """Write a small class-dependent ImageFolder (train/, test/) for tests without data.

    Each class gets its own mean colour plus noise, so a classifier can learn it.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(c * 25) % 256, (c * 70) % 256, (255 - c * 25) % 256])
            for i in range(n):
                img = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.{fmt}")
    return root
