"""Torch-free readers of a run directory's files: the synthetic top-up of notebook 03
(``synthetic/manifest.jsonl``, ``synthetic/settings.json``, the samples) and the fields of
``metrics-<method>.json``. Stages, figures, the study and the results table read run files
through this module, so none of them needs the generator registry or torch to do so.
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
