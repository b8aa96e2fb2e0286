"""Profiles, parameter validation and project paths shared by every notebook.

A notebook's first cell holds literal parameters (``None`` = "use the profile's
default"); its second cell calls :func:`resolve`, which applies the profile, reads
``RABLE_PROFILE`` / ``NB_SMOKE`` / ``RABLE_RUN_DIR`` from the environment (nbval cannot
inject parameters) and validates everything once.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("smoke", "quick", "paper")
PARTIAL_KINDS = ("uniform", "instance")
DEVICES = ("auto", "cpu", "cuda")

# Profile defaults, applied to every parameter left at None.
PROFILE_DEFAULTS: dict[str, dict] = {
    # N_MAX: images of the most frequent class; CLEAN_*: the classifier behind `instance`
    # candidates (CLEAN_PER_CLASS 0 = the whole clean training set).
    "smoke": dict(N_MAX=300, N_TEST_PER_CLASS=20, CLEAN_ARCH="tiny_cnn", CLEAN_EPOCHS=2,
                  CLEAN_PER_CLASS=100),
    "quick": dict(N_MAX=5000, N_TEST_PER_CLASS=1000, CLEAN_ARCH="small_cnn", CLEAN_EPOCHS=3,
                  CLEAN_PER_CLASS=1000),
    "paper": dict(N_MAX=5000, N_TEST_PER_CLASS=1000, CLEAN_ARCH="resnet18", CLEAN_EPOCHS=40,
                  CLEAN_PER_CLASS=0),
}


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """Current commit of the project (``-dirty`` when tracked files changed), or 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see half a file.

    The temporary name holds the process id, so processes writing the same file at once
    (parallel sweep points filling one cache) never write into each other's temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keeps the suffix for savefig/savez
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return write_atomic(path, lambda t: t.write_text(json.dumps(obj, indent=1, default=str)))


def cache_dir() -> Path:
    """Folder for decoded data and cached classifiers (``RABLE_CACHE`` or ``.cache/``)."""
    path = Path(os.environ.get("RABLE_CACHE", PROJECT_ROOT / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def env_profile() -> str | None:
    """Profile requested through the environment (nbval runs cannot inject parameters)."""
    if os.environ.get("RABLE_PROFILE"):
        return os.environ["RABLE_PROFILE"]
    if os.environ.get("NB_SMOKE", "").strip() not in ("", "0", "false", "False"):
        return "smoke"
    return None


def validate(params: dict) -> None:
    """Raise ``ValueError`` with a clear message for any out-of-range parameter."""
    checks = {
        "PROFILE": (lambda v: v in PROFILES, f"must be one of {PROFILES}"),
        "IMBALANCE_FACTOR": (lambda v: isinstance(v, (int, float)) and 0 < v <= 1,
                             "must lie in (0, 1], e.g. 0.01 for rho = 100"),
        "Q": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "must lie in [0, 1)"),
        "RATE": (lambda v: isinstance(v, (int, float)) and 0 <= v <= 1, "must lie in [0, 1]"),
        "PARTIAL": (lambda v: v in PARTIAL_KINDS, f"must be one of {PARTIAL_KINDS}"),
        "SEED": (lambda v: isinstance(v, int) and v >= 0, "must be a non-negative integer"),
        "DEVICE": (lambda v: v in DEVICES, f"must be one of {DEVICES}"),
        "EPOCHS": (lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
        "BATCH_SIZE": (lambda v: isinstance(v, int) and v >= 1, "must be a positive integer"),
    }
    for name, (ok, rule) in checks.items():
        if params.get(name) is not None and not ok(params[name]):
            raise ValueError(f"{name}={params[name]!r} is invalid: {name} {rule}.")


def resolve(stage_defaults: dict[str, dict] | None = None, **params) -> dict:
    """Apply profile defaults and environment overrides, validate, create ``RUN_DIR``.

    ``stage_defaults`` maps profile → extra defaults of one pipeline stage (e.g.
    ``training.PROFILE_DEFAULTS``). Returns a plain dict of every parameter.
    """
    params = dict(params)
    params["PROFILE"] = params.get("PROFILE") or env_profile() or "smoke"
    validate({"PROFILE": params["PROFILE"]})
    defaults = {**PROFILE_DEFAULTS[params["PROFILE"]],
                **(stage_defaults or {}).get(params["PROFILE"], {})}
    for key, value in defaults.items():
        if params.get(key) is None:
            params[key] = value
    validate(params)
    run_dir = params.get("RUN_DIR") or os.environ.get("RABLE_RUN_DIR") or "runs/interactive"
    run_dir = Path(run_dir)
    if not run_dir.is_absolute():
        run_dir = PROJECT_ROOT / run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    params["RUN_DIR"] = str(run_dir)
    return params
