"""Profiles, parameter validation and project paths shared by every notebook.

A notebook's first cell holds literal parameters (``None`` = "use the profile's
default"); its second cell calls :func:`resolve` with the name of its *stage* (the
package module that owns its parameters, see ``NOTEBOOK_STAGES``), which applies the
profile and the stage's defaults, reads ``RABLE_PROFILE`` / ``NB_SMOKE`` /
``RABLE_RUN_DIR`` from the environment (a notebook opened by hand gets no parameters) and
validates everything once. The runner calls the same :func:`resolve` for every selected notebook
before the first one starts, so a bad value stops a run before anything is written.

A stage module provides ``validate(P)`` (one rule per parameter, see :func:`check`) and,
optionally, ``PROFILE_DEFAULTS`` ({profile: {NAME: value}}) or ``profile_defaults(P)``.
Checking a new parameter is one line in its stage's rules.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("smoke", "quick", "paper")
PARTIAL_KINDS = ("uniform", "instance")
DEVICES = ("auto", "cpu", "cuda")
# Training recipes (``RECIPE``): the TrainConfig settings each one switches on
# (rable_nb/engine/recipe.py; the choices and their measurements: docs/quick-profile.md).
# 'protocol': the published protocols' settings (the TrainConfig defaults); 'short': the
# short-budget recipe of the quick profile.
RECIPES: dict[str, dict] = {
    "protocol": {},
    "short": dict(schedule="onecycle", nesterov=True, label_smoothing=0.1, augment="light",
                  strong_augment="light", channels_last=True),
}

# Profile defaults, applied to every parameter left at None.
PROFILE_DEFAULTS: dict[str, dict] = {
    # N_MAX: images of the most frequent class; CLEAN_*: the classifier behind `instance`
    # candidates (CLEAN_PER_CLASS 0 = the whole clean training set); WARMUP_*: the
    # intermediate ABLE model behind pseudo-labels (generator conditioning in notebook 03,
    # `+unlabeled` images in notebook 04; rable_nb/parts/conditioning.py), trained with WARMUP_METHOD;
    # RECIPE: the training recipe of notebook 04 and the warm-up (RECIPES).
    "smoke": dict(N_MAX=300, N_TEST_PER_CLASS=20, CLEAN_ARCH="tiny_cnn", CLEAN_EPOCHS=2,
                  CLEAN_PER_CLASS=100, WARMUP_ARCH="tiny_cnn", WARMUP_EPOCHS=2,
                  WARMUP_BATCH=64, WARMUP_LR=0.01, WARMUP_METHOD="able", RECIPE="protocol"),
    "quick": dict(N_MAX=5000, N_TEST_PER_CLASS=1000, CLEAN_ARCH="small_cnn", CLEAN_EPOCHS=3,
                  CLEAN_PER_CLASS=1000, WARMUP_ARCH="mini_cnn", WARMUP_EPOCHS=10,
                  WARMUP_BATCH=128, WARMUP_LR=0.05, WARMUP_METHOD="proden+la",
                  RECIPE="short"),
    "paper": dict(N_MAX=5000, N_TEST_PER_CLASS=1000, CLEAN_ARCH="resnet18", CLEAN_EPOCHS=40,
                  CLEAN_PER_CLASS=0, WARMUP_ARCH="resnet18", WARMUP_EPOCHS=100,
                  WARMUP_BATCH=256, WARMUP_LR=0.01, WARMUP_METHOD="able",
                  RECIPE="protocol"),
}


# Notebook 04's stage defaults per profile (training.PROFILE_DEFAULTS;
# config.resolve(stage_defaults=...)); protocol L changes the
# paper profile's epochs and batch size (see stage_defaults).
# UNLABELED / RATIO / UNLABELED_THRESHOLD: the ``+unlabeled`` images (rable_nb/parts/unlabeled.py):
# how many (0 = all), at most RATIO per long-tailed image (the reference's 5; smoke: 1, to
# stay small), confidence needed to train with the pseudo-label (0: always, as the reference).
_UNLABELED = dict(UNLABELED=0, RATIO=5, UNLABELED_THRESHOLD=0.0)
TRAINING_DEFAULTS: dict[str, dict] = {
    "smoke": dict(_UNLABELED, ARCH="tiny_cnn", EPOCHS=2, BATCH_SIZE=64, LR=0.01,
                  CHECKPOINT_EVERY=1, RATIO=1),
    # quick: a CPU comparison at 25 epochs with the short-budget recipe (config.RECIPES
    # 'short', the profile's RECIPE; measurements in docs/quick-profile.md).
    "quick": dict(_UNLABELED, ARCH="mini_cnn", EPOCHS=25, BATCH_SIZE=128, LR=0.05,
                  CHECKPOINT_EVERY=1),
    "paper": dict(_UNLABELED, ARCH="resnet18", EPOCHS=500, BATCH_SIZE=64, LR=0.01,
                  CHECKPOINT_EVERY=10, PROTOCOL="R"),
}
L_EPOCHS = 800   # protocol L: the published CIFAR-10-LT schedule (docs/protocols.md)
PROTOCOL_SETTINGS = {"R": dict(EPOCHS=500, BATCH_SIZE=64),
                     "L": dict(EPOCHS=L_EPOCHS, BATCH_SIZE=256)}


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """Current commit of the project (``-dirty`` when tracked files changed); where git
    cannot tell (a copy of the tree without ``.git``, e.g. on a GPU lease) ``RABLE_COMMIT``,
    else 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("RABLE_COMMIT") or "unknown"


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


def project_path(path: str | os.PathLike) -> Path:
    """``path`` itself when absolute, else relative to the project root (where notebooks
    run interactively, a relative ``RUN_DIR`` or ``COMPARE_RUNS`` entry means this)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def plural(n: int, word: str) -> str:
    """'1 image', '2 images'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def short_path(path) -> str:
    """``path`` relative to the project when it lies inside it (for messages), else as given."""
    path = Path(path)
    return str(path.relative_to(PROJECT_ROOT) if path.is_relative_to(PROJECT_ROOT)
               else path)


def cache_dir() -> Path:
    """Folder for decoded data and cached classifiers (``RABLE_CACHE`` or ``.cache/``)."""
    path = Path(os.environ.get("RABLE_CACHE", PROJECT_ROOT / ".cache"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def env_profile() -> str | None:
    """Profile requested through the environment (a notebook opened by hand gets none)."""
    if os.environ.get("RABLE_PROFILE"):
        return os.environ["RABLE_PROFILE"]
    if os.environ.get("NB_SMOKE", "").strip() not in ("", "0", "false", "False"):
        return "smoke"
    return None


# -- parameter rules: NAME -> (predicate, what is allowed) ---------------------------------
def is_int(v) -> bool:
    """An integer, not a bool (``True`` is an int in Python)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float, not a bool."""
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(low: int = 0) -> tuple:
    return (lambda v: is_int(v) and v >= low,
            "a positive integer" if low == 1 else f"an integer >= {low}")


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> tuple:
    def ok(v):
        return (is_number(v) and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))
    if high is None:
        return ok, f"a number {'>' if low_open else '>='} {low}"
    return ok, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def one_of(choices) -> tuple:
    choices = tuple(choices)
    return (lambda v: isinstance(v, str) and v in choices), f"one of {choices}"


def list_of(choices) -> tuple:
    choices = tuple(choices)
    return (lambda v: isinstance(v, list) and bool(v) and all(
        isinstance(x, str) and x in choices for x in v)), f"a non-empty list drawn from {choices}"


BOOLEAN = (lambda v: isinstance(v, bool), "True or False")
TEXT = (lambda v: isinstance(v, str), "a string")
PATH = (lambda v: isinstance(v, str) and bool(v), "a path (a non-empty string)")


def check(params: dict, rules: dict[str, tuple]) -> None:
    """``ValueError`` naming the first parameter that breaks its rule; ``None`` (= the
    profile's default) always passes."""
    for name, (ok, allowed) in rules.items():
        value = params.get(name)
        if value is not None and not ok(value):
            raise ValueError(f"{name}={value!r} is invalid: {name} must be {allowed}.")


# Parameters shared by several notebooks (same name, same meaning everywhere).
RULES = {
    "PROFILE": one_of(PROFILES),
    "RUN_DIR": PATH,
    "DATA_DIR": PATH,
    "IMBALANCE_FACTOR": (number(0, 1, low_open=True)[0],
                         "a number in (0, 1], e.g. 0.01 for rho = 100"),
    "Q": number(0, 1, high_open=True),
    "RATE": number(0, 1),
    "PARTIAL": one_of(PARTIAL_KINDS),
    "SEED": integer(0),
    "DEVICE": one_of(DEVICES),
    "EPOCHS": integer(1),
    "BATCH_SIZE": integer(1),
    "RECIPE": one_of(RECIPES),
}


def validate(params: dict) -> None:
    """Raise ``ValueError`` with a clear message for any bad shared parameter."""
    check(params, RULES)


# -- stages ---------------------------------------------------------------------------------
# Notebook (two-digit prefix) -> the rable_nb module that owns its parameters.
NOTEBOOK_STAGES = {"00": "cost", "01": "dataset", "02": "captioning", "03": "rebalance",
                   "04": "training", "05": "predictions", "06": "embedding", "07": "demo",
                   "08": "sweep", "09": "study"}


def stage_module(stage: str):
    """The stage module ``rable_nb.stages.s<NN>_<stage>`` of notebook NN."""
    number = {name: n for n, name in NOTEBOOK_STAGES.items()}[stage]
    return importlib.import_module(f"{__package__}.stages.s{number}_{stage}")


def resolve(stage: str | None = None, *, stage_defaults: dict[str, dict] | None = None,
            create: bool = True, **params) -> dict:
    """Apply profile + stage defaults and environment overrides, validate, create ``RUN_DIR``.

    ``stage`` names the module owning the notebook's parameters (``'training'``): its
    defaults apply and its ``validate`` runs. ``stage_defaults`` (profile → defaults) may
    be given instead. ``create=False`` checks only (nothing is written). Returns a plain
    dict of every parameter.
    """
    params = dict(params)
    params["PROFILE"] = params.get("PROFILE") or env_profile() or "smoke"
    validate({"PROFILE": params["PROFILE"]})
    module = stage_module(stage) if stage else None
    if module is not None and stage_defaults is None:
        stage_defaults = (module.profile_defaults(params) if hasattr(module, "profile_defaults")
                          else getattr(module, "PROFILE_DEFAULTS", {}))
    defaults = {**PROFILE_DEFAULTS[params["PROFILE"]],
                **(stage_defaults or {}).get(params["PROFILE"], {})}
    for key, value in defaults.items():
        if params.get(key) is None:
            params[key] = value
    validate(params)
    if module is not None:
        module.validate(params)
    run_dir = project_path(params.get("RUN_DIR") or os.environ.get("RABLE_RUN_DIR")
                           or "runs/interactive")
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    params["RUN_DIR"] = str(run_dir)
    return params
