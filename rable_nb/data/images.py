"""CIFAR-10 (or any image data set) loading: ImageFolder directory, train/test tar.gz
archives, or torchvision's CIFAR-10.

Whatever the source, images are decoded once and cached as uint8 arrays N×H×W×C in the
cache folder. Size and channels come from the data: C = 1 when every training image file is
greyscale (e.g. Fashion-MNIST, 28×28), else 3 (greyscale files among colour ones become RGB);
H×W is the most common size of the training images, and images of another size are resized
to it (bicubic); the test split follows the training split. CIFAR-10 gives N×32×32×3. The
cache key covers the source's resolved path, layout and the name, size and modification
time of every source file, so adding, deleting or editing an image decodes again. The training set is stored class-sorted (stable), so dataset indices are
positions in that order. Every split must have the training split's classes, by name.
Corrupt image files are skipped, counted in one warning that names the first few; the
warning is stored with the cache and repeats on every load.

:attr:`Cifar.identity` fingerprints the decoded data (path, layout, image counts, classes,
a SHA-256 of the arrays); ``dataset.json`` records it so that no later stage of a run
reads other data than the run was made from.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..rundir import artefacts
from ..config import PROJECT_ROOT, cache_dir, write_atomic

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SHARED_COPY = PROJECT_ROOT.parent / "shared" / "data" / "cifar10"
DOWNLOAD_DIR = PROJECT_ROOT / "data"


@dataclass
class Cifar:
    """Decoded images: uint8 N×H×W×C (CIFAR-10: 32×32×3) and int64 labels; train is
    class-sorted."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    source: str
    identity: dict = field(default_factory=dict)  # see content_identity

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.train_x.shape[1:])


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


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N")


def _decode(blob: bytes) -> np.ndarray:
    """One image file as uint8 at its own size: H×W for greyscale files (16-bit grey scaled,
    not clipped), else H×W×3 (RGB)."""
    with Image.open(io.BytesIO(blob)) as img:
        if img.mode not in GREY_MODES:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
        if img.mode.startswith("I"):
            grey = np.asarray(img, dtype=np.float64)
            if img.mode != "I" or grey.max() > 255:  # mode I holds 8-bit values in some files
                grey = grey / 257.0
            return np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.asarray(img.convert("L"), dtype=np.uint8)


def _to_array(arr: np.ndarray, size: tuple[int, int], grey: bool) -> np.ndarray:
    """A decoded image as uint8 H×W×C (C = 1 if ``grey`` else 3) of ``size`` (H, W)."""
    if (arr.ndim == 2) != grey or arr.shape[:2] != size:
        img = Image.fromarray(arr).convert("L" if grey else "RGB")
        if img.size != size[::-1]:
            img = img.resize(size[::-1], Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[..., None] if grey else arr


def image_format(images: list[np.ndarray]) -> tuple[tuple[int, int], bool]:
    """(the most common size (H, W), whether every image is greyscale) of decoded images."""
    sizes = Counter(a.shape[:2] for a in images)
    return sizes.most_common(1)[0][0], all(a.ndim == 2 for a in images)


def _collect(items, total: int, desc: str, classes: list[str], fmt=None):
    """Decode (class_name, name, bytes-callable) items; returns (images, labels, skipped
    names of corrupt files, format). ``fmt`` = (size, grey) of the training split, which
    the test split follows; by default it comes from these images (:func:`image_format`)."""
    images, labels, bad = [], [], []
    for cls, name, read in tqdm(sorted(items, key=lambda t: (t[0], t[1])), total=total,
                                desc=desc, unit="img", leave=False):
        try:
            images.append(_decode(read()))
            labels.append(classes.index(cls))
        except Exception:  # PIL raises several types for broken files
            bad.append(name)
    if not images:
        raise FileNotFoundError(f"{desc}: no readable images found.")
    fmt = fmt or image_format(images)
    return (np.stack([_to_array(img, *fmt) for img in images]),
            np.asarray(labels, dtype=np.int64), bad, fmt)


def check_classes(found, expected, where) -> None:
    """Refuse a split whose class names differ from the training split's (by name)."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where}: the classes differ from the training split's "
            f"(missing: {missing or 'none'}; extra: {extra or 'none'}). Every split needs one "
            "folder per class, named as in the training split; labels are assigned by name.")


def _read_folder(split_dir: Path, classes: list[str] | None = None, fmt=None):
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if classes is not None:
        check_classes(found, classes, split_dir)
    classes = classes or found
    items = [(c, str(f), f.read_bytes) for c in classes for f in (split_dir / c).iterdir()
             if f.suffix.lower() in IMAGE_SUFFIXES]
    return _collect(items, len(items), f"decode {split_dir}", classes, fmt), classes


def _read_archive(path: Path, classes: list[str] | None = None, fmt=None):
    with tarfile.open(path, "r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
        blobs = {m.name: tar.extractfile(m).read() for m in members}
    found = sorted({Path(n).parent.name for n in blobs})
    if classes is not None:
        check_classes(found, classes, path)
    classes = classes or found
    items = [(Path(n).parent.name, n, (lambda b=b: b)) for n, b in blobs.items()]
    return _collect(items, len(items), f"decode {path.name}", classes, fmt), classes


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
    out = [(np.asarray(s.data, dtype=np.uint8), np.asarray(s.targets, dtype=np.int64), [], None)
           for s in splits]
    return out, list(splits[0].classes)


def folder_counts(data_dir: str | os.PathLike | None = None) -> dict[str, int] | None:
    """{class: image files} of an ImageFolder's training split (``train/<class>/``), in the
    order labels are assigned (by name), counted without decoding; ``None`` for other
    layouts or a data directory that does not exist (checked where it is loaded)."""
    root = resolve_data_dir(data_dir)
    if not root.is_dir() or detect_layout(root) != "folders":
        return None
    split = _folder_base(root) / "train"
    return {d.name: sum(1 for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            for d in sorted(split.iterdir()) if d.is_dir()}


def _folder_base(root: Path) -> Path:
    return root if (root / "train").is_dir() else root / "cifar10"


def _source_files(root: Path, layout: str) -> list[Path]:
    """Every file (and class folder) the decoded arrays depend on."""
    if layout == "archives":
        return [root / "train.tar.gz", root / "test.tar.gz"]
    if layout == "folders":
        base = _folder_base(root)
        return [p for split in ("train", "test") for d in sorted((base / split).iterdir())
                if d.is_dir() for p in [d, *sorted(d.iterdir())]]
    batches = root / "cifar-10-batches-py"
    return sorted(batches.iterdir()) if batches.is_dir() else []


def _source_key(root: Path, layout: str) -> str:
    """Cache key: resolved path, layout, and name, size and mtime of every source file."""
    h = hashlib.sha1(f"v3|{root.resolve()}|{layout}".encode())  # v3: native size, channels
    for path in _source_files(root, layout):
        st = path.stat()
        h.update(f"|{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _cache_path(root: Path, layout: str) -> Path:
    return cache_dir() / f"cifar10-{_source_key(root, layout)}.npz"


def _decode_source(root: Path, layout: str):
    """((train_x, train_y, skipped, format), (test_x, test_y, skipped, format), classes);
    the test split takes the training split's size and channels."""
    if layout == "archives":
        train, classes = _read_archive(root / "train.tar.gz")
        test, _ = _read_archive(root / "test.tar.gz", classes, train[3])
    elif layout == "folders":
        train, classes = _read_folder(_folder_base(root) / "train")
        test, _ = _read_folder(_folder_base(root) / "test", classes, train[3])
    else:
        (train, test), classes = _read_torchvision(root)
    return train, test, classes


def content_identity(root: Path, layout: str, arrays: dict, classes) -> dict:
    """Fingerprint of decoded data: where it came from, its size and a SHA-256 of its arrays."""
    h = hashlib.sha256("|".join(classes).encode())
    for key in ("train_x", "train_y", "test_x", "test_y"):
        h.update(f"{key}{arrays[key].shape}{arrays[key].dtype}".encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return dict(data_dir=str(root.resolve()), layout=layout,
                train_images=int(len(arrays["train_y"])), test_images=int(len(arrays["test_y"])),
                classes=list(classes), sha256=h.hexdigest())


def _write_cache(cache: Path, root: Path, layout: str) -> None:
    (trx, try_, bad_train, _), (tex, tey, bad_test, _), classes = _decode_source(root, layout)
    order = np.argsort(try_, kind="stable")
    arrays = dict(train_x=trx[order], train_y=try_[order], test_x=tex, test_y=tey)
    identity = content_identity(root, layout, arrays, classes)
    write_atomic(cache, lambda t: np.savez(t, **arrays, classes=np.array(classes),
                                           skipped=np.array(bad_train + bad_test, dtype=str),
                                           identity=np.array(json.dumps(identity))))


def _read_cache(cache: Path, root: Path, layout: str) -> tuple[Cifar, list[str]] | None:
    """(data, skipped files) of a decoded-data cache entry; ``None`` when absent or damaged
    (a damaged entry is moved aside with a notice: ``artefacts.load``)."""
    def reader(path):
        with np.load(path) as z:
            return (Cifar(z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                          tuple(str(c) for c in z["classes"]), f"{root} ({layout})",
                          json.loads(str(z["identity"]))),
                    [str(s) for s in z["skipped"]])
    return artefacts.load(cache, reader, what="decoded-data cache entry", resumable=True)


def load_cifar10(data_dir: str | os.PathLike | None = None) -> Cifar:
    """Load CIFAR-10 (see :func:`resolve_data_dir`), decoding once into the cache."""
    root = resolve_data_dir(data_dir)
    if data_dir and not root.exists():
        raise FileNotFoundError(
            f"DATA_DIR={str(data_dir)!r} does not exist. Point it at a directory with "
            "train.tar.gz/test.tar.gz or train/<class>/ and test/<class>/ image folders.")
    layout = detect_layout(root)
    cache = _cache_path(root, layout)
    loaded = _read_cache(cache, root, layout)
    if loaded is None:  # absent, or damaged (then moved aside): decode again
        _write_cache(cache, root, layout)
        if layout == "torchvision":  # the download created the files the key covers
            os.replace(cache, fresh := _cache_path(root, layout))
            cache = fresh
        loaded = _read_cache(cache, root, layout)
    cifar, skipped = loaded
    if skipped:
        warnings.warn(f"{root}: skipped {len(skipped)} corrupt image file(s), e.g. "
                      f"{skipped[:3]}", stacklevel=2)
    return cifar


def write_fake_cifar(root: str | os.PathLike, n_train: int = 60, n_test: int = 20,
                     seed: int = 0, fmt: str = "png", size: int = 32, channels: int = 3,
                     classes=CLASSES) -> Path:
    """Write a small class-dependent ImageFolder (train/, test/) for tests without data:
    ``size``×``size`` images, RGB (``channels=3``) or greyscale (``channels=1``, e.g. a
    Fashion-MNIST-like 28×28 folder).

    Each class gets its own mean colour (or grey level) plus noise, so a classifier can
    learn it.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(c * 25) % 256, (c * 70) % 256, (255 - c * 25) % 256])[:channels]
            for i in range(n):
                img = np.clip(base + rng.normal(0, 30, (size, size, channels)), 0, 255)
                Image.fromarray(img.astype(np.uint8).squeeze(-1) if channels == 1
                                else img.astype(np.uint8)).save(folder / f"{i:04d}.{fmt}")
    return root
