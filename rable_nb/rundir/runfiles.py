"""Torch-free readers and writers of a run directory's files: the dataset of notebook 01
(``dataset.npz``, ``dataset.json``, checked against the data a stage loaded), the synthetic
top-up of notebook 03 (``synthetic/manifest.jsonl``, ``synthetic/settings.json``, the
samples), the ``metrics-<method>.json`` files and logs of notebook 04 and which of them are
current. Stages, figures, the study and the results table read run files through this
module, so none of them needs the generator registry or torch to do so.

A run directory belongs to one data source: ``dataset.npz`` (and its readable copy
``dataset.json``) records the fingerprint of the decoded CIFAR-10 it indexes
(``data.Cifar.identity``); :func:`check_source` refuses any later stage that loaded other
data, and notebook 01 refuses to rewrite a run directory's dataset from other data.
"""
from __future__ import annotations

import json
import os
import shlex
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from . import artefacts, jsonl
from .. import config

SYNTH_DIR, MANIFEST, SETTINGS = "synthetic", "manifest.jsonl", "settings.json"
METRICS_FIELDS = ("method", "protocol", "params", "accuracy", "device", "wall_s",
                  "images_per_s", "commit")
ACCURACY_FIELDS = ("last", "best", "many", "medium", "few", "per_class")
FEATURE_SUFFIX = ".npy"  # synthetic feature vectors; images are PNGs


RUN_LOG = "run.json"
# run.json (written by runner): every notebook started, 'running' until it ends 'finished'
# (an entry without a status comes from before statuses were recorded: it was finished).
RUN_LOG_SCHEMA = {"profile": str, "notebooks": [{"notebook": str, "parameters": dict,
                                                 "status?": str, "seconds?": (int, float)}]}
RUNNING, FINISHED = "running", "finished"
# the small schemas of the run's JSON artefacts (artefacts.check_schema), one reader each
MANIFEST_ROW = {"file": str, "label": int}  # check_manifest checks the rest
SYNTH_SETTINGS_SCHEMA = {"generator": str, "cond_labels": str, "plan?": [int]}
METRICS_SCHEMA = {"method?": str, "params?": dict, "accuracy?": dict}  # typed where present
# dataset.json (notebook 01): its parameters and what it made
# (fields typed where present: hand-made records in tests and older runs hold fewer)
DATASET_SCHEMA = {"num_images?": int, "mean_candidates?": (int, float), "data_identity?": dict,
                  "IMBALANCE_FACTOR?": (int, float), "PARTIAL?": str, "SEED?": int}


def read_run_log(run_dir: str | os.PathLike, resumable: bool = False) -> dict:
    """``run.json`` of a run directory ({} when absent), checked against its schema; a
    damaged one is named, or moved aside when ``resumable`` (the runner: nothing is then
    skipped)."""
    return artefacts.read_json(
        artefacts.inside(run_dir, RUN_LOG, "run log"), what="run log", resumable=resumable,
        schema=RUN_LOG_SCHEMA,
        fix=f"Run the notebooks again into {run_dir} (the runner moves it aside).") or {}


def read_dataset_record(run_dir: str | os.PathLike, remake: bool = False) -> dict:
    """``dataset.json`` of a run directory ({} when absent), checked against its schema; a
    damaged one is named with the command that remakes it, or moved aside when ``remake``
    (notebook 01 is about to write it again)."""
    return artefacts.read_json(
        artefacts.inside(run_dir, "dataset.json", "dataset record"),
        what="the run's dataset record", resumable=remake, schema=DATASET_SCHEMA,
        fix=f"Run notebook 01 again into this run directory ({rerun_command(run_dir, '01')}): "
            "it writes a new dataset.") or {}


def check_inside(run_dir: str | os.PathLike) -> None:
    """Every entry of a run directory and of its folders (class folders, checkpoints, the
    generator's files, logs, feedback) must resolve inside it (``artefacts.inside``): a
    link out is refused (``OutsideError`` naming it) before any notebook reads or writes
    through it. Deeper paths are checked where they are read (manifest rows, feedback)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for entry in sorted(run_dir.iterdir()):
        what = f"{entry.name} of the run directory"
        artefacts.inside(run_dir, entry.name, what)
        if entry.is_dir():
            for sub in sorted(entry.iterdir()):
                artefacts.inside(run_dir, sub.relative_to(run_dir), f"{sub.name} in {what}")


def finished_notebooks(log: dict) -> dict[str, dict]:
    """{notebook: its run.json entry} of the notebooks the log records as finished; one
    started again and not ended (killed, failed, or running now) is not among them."""
    return {e["notebook"]: e for e in log.get("notebooks", [])
            if e.get("status", FINISHED) == FINISHED}


NOT_GIVEN = ("PROFILE", "RUN_DIR", "RABLE_DATA", "DATA_SOURCE")  # set by the runner itself


def _literal(value) -> str:
    """``value`` as the Python literal ``-p`` parses back (strings in double quotes, so the
    shell quoting stays readable)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_literal, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def rerun_command(run_dir: str | os.PathLike, only: str) -> str:
    """The command that runs notebooks ``only`` (e.g. '01' or '01,04') again into
    ``run_dir`` with the run's profile and the parameters ``run.json`` records for them:
    what a message prints as the fix, complete, so it works as pasted. The profile falls
    back to ``dataset.json``'s, then smoke, where no run log can be read."""
    try:
        log = read_run_log(run_dir)
    except artefacts.DamagedFileError:
        log = {}
    profile = log.get("profile")
    if not profile:
        try:
            profile = (artefacts.read_json(Path(run_dir) / "dataset.json") or {}).get("PROFILE")
        except artefacts.DamagedFileError:
            profile = None
    wanted = {f"{n.strip()}_" for n in only.split(",")}
    params = {}
    for entry in log.get("notebooks", []):
        if entry["notebook"][:3] in wanted:
            params.update({k: v for k, v in entry["parameters"].items() if k not in NOT_GIVEN})
    words = ["python", "-m", "rable_nb", "run", "--profile", str(profile or "smoke"),
             "--only", only, "--out", str(Path(run_dir))]
    for name, value in params.items():
        words += ["-p", name, _literal(value)]
    return shlex.join(words)


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
    return jsonl.read(artefacts.inside(run_dir, f"{SYNTH_DIR}/{MANIFEST}", "the manifest"),
                      repair=False)


def read_settings(run_dir: str | os.PathLike) -> dict:
    """``synthetic/settings.json`` of a run ({} when nothing was generated)."""
    return artefacts.read_json(Path(run_dir) / SYNTH_DIR / SETTINGS, what="top-up settings",
                               fix="Run notebook 03 again into this run directory.",
                               schema=SYNTH_SETTINGS_SCHEMA) or {}


class ManifestError(ValueError):
    """``synthetic/manifest.jsonl`` does not describe the top-up ``settings.json`` records."""


def check_manifest(run_dir: str | os.PathLike, rows: list[dict], settings: dict,
                   complete: bool = False, num_classes: int | None = None) -> None:
    """Refuse (``ManifestError`` naming the manifest and the first problem) rows that are not
    the top-up's: every row a mapping with a ``file`` (a relative path inside
    ``synthetic/``) and an integer ``label`` (below ``num_classes`` when given), each file
    once, the backend and conditioning labels of ``settings.json``, every file present; per
    class at most the planned samples (``settings['plan']``), and exactly them when
    ``complete``."""
    out = Path(run_dir) / SYNTH_DIR
    where = f"{out / MANIFEST}"
    fix = (f"The top-up is written by notebook 03 only: run it again "
           f"({rerun_command(run_dir, '03')}; it repairs the folder), or delete {out} and "
           "rerun it.")

    def refuse(problem: str):
        raise ManifestError(f"{where}: {problem}. {fix}")
    files, per_class = set(), Counter()
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            refuse(f"line {i} is {row!r}, not a mapping with 'file' and 'label'")
        file, label = row.get("file"), row.get("label")
        if not isinstance(file, str) or not file or not isinstance(label, int) \
                or isinstance(label, bool) or label < 0:
            refuse(f"line {i} ({row!r}) needs 'file' (a path inside {out}) and an integer "
                   "'label' >= 0")
        try:  # resolved, links included: a sample linked elsewhere is not the top-up's
            artefacts.inside(out, file)
        except artefacts.OutsideError as err:
            refuse(f"line {i} ({row!r}) needs 'file' (a path inside {out}): {err}")
        if num_classes is not None and label >= num_classes:
            refuse(f"line {i}: label {label} is not one of the data's {num_classes} classes")
        if file in files:
            refuse(f"line {i}: {file} appears twice (a duplicated row)")
        files.add(file)
        per_class[label] += 1
        for key in ("generator", "cond_labels"):
            if key in row and key in settings and row[key] != settings[key]:
                refuse(f"line {i}: {key}={row[key]!r}, but settings.json records "
                       f"{settings[key]!r}")
    plan = settings.get("plan")
    if isinstance(plan, list):
        for label in range(max(len(plan), max(per_class, default=-1) + 1)):
            n, want = per_class[label], plan[label] if label < len(plan) else 0
            if n > want or (complete and n != want):
                refuse(f"class {label} has {n} samples, the top-up plan {want}"
                       + ("" if n > want else " (an unfinished top-up)"))
    for i, row in enumerate(rows, 1):
        if not (out / row["file"]).is_file():
            refuse(f"line {i}: {out / row['file']} is missing")


def load_synthetic(run_dir: str | os.PathLike, complete: bool = False,
                   num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(samples — uint8 images N×H×W×C or features N×D —, labels, manifest rows), the
    manifest first checked against ``settings.json`` (:func:`check_manifest`; ``complete``:
    every planned sample must exist, as training requires). A sample file that cannot be
    decoded is an ``artefacts.DamagedFileError`` naming it and the fix."""
    out = artefacts.inside(run_dir, SYNTH_DIR, "the synthetic folder")
    rows = manifest_rows(run_dir)
    if not rows:
        return np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64), []
    check_manifest(run_dir, rows, read_settings(run_dir), complete, num_classes)
    fix = (f"Delete it and run notebook 03 again ({rerun_command(run_dir, '03')}): the top-up "
           "redraws the missing sample.")
    samples = np.stack([artefacts.load(out / r["file"], load_sample, what="synthetic sample",
                                       fix=fix) for r in rows])
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
    rule = (settings.get("rule") or {}).get("LABEL_RULE", "confidence")
    if cond != "oracle" and rule != "confidence":
        tag += f" ({rule})"
    if settings.get("SYNTH_FILTER"):
        tag += f", {filter_name(settings)} filter"
    return f"{settings.get('generator')}, {tag}"


def filter_name(settings: dict) -> str:
    """The recorded ``SYNTH_FILTER`` of a top-up by name ('class' for the old True)."""
    return "class" if settings["SYNTH_FILTER"] is True else str(settings["SYNTH_FILTER"])


def method_label(method: str, metrics: dict) -> str:
    """Display name of a trained method: models trained on synthetic images carry their
    top-up, e.g. 'rable [pixel, pseudo labels]' or 'rable [copy, ORACLE labels (ablation)]'."""
    synthetic = (metrics.get("params") or {}).get("synthetic")
    if not synthetic:
        return method
    return f"{method} [{describe(synthetic)}]"


def setting(m: dict) -> str:
    """Column label of a run's data: 'ρ=100, q=0.3' (uniform) or 'ρ=100, r=0.4' (instance)."""
    ds = m["params"].get("dataset") or m["params"]
    factor = ds.get("IMBALANCE_FACTOR")
    rho = f"ρ={1 / factor:.3g}" if factor else "ρ=?"
    if ds.get("PARTIAL") == "instance":
        return f"{rho}, r={ds.get('RATE')}"
    return f"{rho}, q={ds.get('Q')}"


# -- the dataset (notebook 01) ---------------------------------------------------------------
class DataSourceError(ValueError):
    """A stage loaded other data than the run directory's dataset was made from."""


IDENTITY_KEYS = ("sha256", "train_images", "test_images", "classes")


def _describe_source(identity: dict) -> str:
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
            f"{run_dir} was made from other data: its dataset indexes "
            f"{_describe_source(recorded)}, but this stage loaded {_describe_source(current)}. "
            "Use the DATA_DIR (or RABLE_DATA) the run was made with, or a new run directory "
            "(--out) for the other data.")


def _rerun_01(run_dir) -> str:
    return (f"Run notebook 01 again into this run directory "
            f"({rerun_command(run_dir, '01')}): it moves the damaged file aside and "
            "writes a new dataset.")


def _dataset_meta(run_dir: Path, resumable: bool = False) -> dict | None:
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
    meta = _dataset_meta(run_dir, resumable=remake)
    if meta is None:
        meta = read_dataset_record(run_dir, remake) or None
    return meta


def check_source(run_dir: str | os.PathLike, cifar, remake: bool = False) -> None:
    """Refuse ``cifar`` (a ``data.Cifar``) when the run directory's dataset was made from
    other data (a run directory without a dataset passes). ``remake`` (notebook 01, about
    to write a new dataset): a damaged ``dataset.npz``/``dataset.json`` is moved aside with
    a notice; the data is then checked against what is still readable, and a dataset of
    which nothing is readable is made anew."""
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


def load_dataset(run_dir: str | os.PathLike, cifar=None) -> dict:
    """Read ``dataset.npz`` and its parameters from a run directory, with a clear error;
    with ``cifar`` (a ``data.Cifar``), first check that it is the data the dataset was made
    from."""
    path = Path(run_dir) / "dataset.npz"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run notebook 01_dataset_imbalance first "
                                f"({rerun_command(run_dir, '01')}).")
    if cifar is not None:
        check_source(run_dir, cifar)
    def arrays(p):
        with np.load(p) as z:
            return {k: z[k] for k in z.files if k != "meta"}
    ds = artefacts.load(path, arrays, what="the run's dataset", fix=_rerun_01(run_dir))
    ds["params"] = _recorded(Path(run_dir))
    return ds


# -- the metrics files and logs (notebook 04) ------------------------------------------------
def write_metrics(run_dir, metrics: dict) -> Path:
    """Write ``metrics-<method>.json`` atomically after checking every required field."""
    missing = [k for k in METRICS_FIELDS if k not in metrics]
    missing += [f"accuracy.{k}" for k in ACCURACY_FIELDS if k not in metrics.get("accuracy", {})]
    if missing:
        raise ValueError(f"metrics for {metrics.get('method')!r} lack {missing}")
    return config.write_json(Path(run_dir) / f"metrics-{metrics['method']}.json", metrics)


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
    now = read_settings(run_dir)
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
        p, what="metrics file", schema=METRICS_SCHEMA,
        fix="Delete it and run notebook 04 again (training resumes from its saved state).")
        for p in paths}
    if not found:
        return {}
    latest = _shared_params(list(found.values())[-1])
    methods = latest.get("METHODS")
    data_now = read_dataset_record(run_dir)
    if data_now and latest.get("dataset", data_now) != data_now:
        return {}  # notebook 01 has made a new dataset since: every model is stale
    return {method: m for method, m in found.items()
            if _shared_params(m) == latest and (methods is None or method in methods)
            and _synthetic_is_current(m, run_dir)}


def read_history(run_dir, method: str) -> list[dict]:
    """The per-epoch rows of ``logs/<method>.jsonl`` (epoch, lr, loss terms, pseudo-label and
    test accuracy, seconds); [] when the method has no log."""
    return jsonl.read(Path(run_dir) / "logs" / f"{method}.jsonl", repair=False)


# -- captions.jsonl (notebook 02) ------------------------------------------------------------
CAPTIONS = "captions.jsonl"
CAPTION_ROW = {"index": int, "label": int, "caption": str}  # one line of captions.jsonl

def load_captions(run_dir: str | os.PathLike) -> list[dict]:
    """Rows of ``captions.jsonl`` with a clear error when notebook 02 has not run."""
    path = artefacts.inside(run_dir, CAPTIONS, "captions file")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run notebook 02_captioning first "
                                f"({runfiles.rerun_command(run_dir, '02')}).")
    return jsonl.read(path, schema=CAPTION_ROW)
