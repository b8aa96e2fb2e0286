"""Parameterised batch runs: one papermill run of the selected notebooks per grid point.

A grid file (YAML, see ``examples/sweep-*.yaml``)::

    profile: smoke            # smoke | quick | paper
    notebooks: "01,04"        # which notebooks every point runs
    fixed: {METHODS: [able], EPOCHS: 2}        # the same for every point
    grid: {IMBALANCE_FACTOR: [0.1, 0.01], Q: [0.1, 0.3]}   # cartesian product

Each point runs in its own directory ``<out>/<NNN>_<name>/`` and leaves ``point.json``
(parameters, status, error). A failed point is recorded with its error and the sweep goes
on; ``results.csv`` (one row per point: parameters, status, error, ambiguity, and
``<method>/<metric>`` accuracies from ``metrics-<method>.json``) is rewritten after every
point. A rerun skips points already ``done`` with the same parameters and retries the
others (notebooks that finished inside an interrupted point are skipped too).
"""
from __future__ import annotations

import itertools
import json
import re
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from . import config, evaluation, runner
from .locks import DirLock, LockedError

GRID_KEYS = {"profile", "notebooks", "fixed", "grid"}
METRICS = ("last", "best", "many", "medium", "few")
POINT_FILE = "point.json"
SMOKE_GRID = "examples/sweep-smoke.yaml"
# Where notebook 08 looks when SWEEP_DIR is not given (the README's sweep commands write there)
DEFAULT_SWEEP_DIRS = {"quick": "runs/sweep-quick", "paper": "runs/sweep-paper"}


def validate(P: dict) -> None:
    """Check notebook 08's parameters (``ValueError`` with a clear message)."""
    config.check(P, {"SWEEP_DIR": config.PATH, "SWEEP_GRID": config.PATH})


def load_grid(path, notebook_dir: Path = runner.NOTEBOOK_DIR) -> dict:
    """Read and check a grid file; raises ``ValueError`` with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Grid file {path} does not exist.")
    spec = yaml.safe_load(path.read_text()) or {}
    unexpected = sorted(set(spec) - GRID_KEYS) if isinstance(spec, dict) else spec
    if unexpected:
        raise ValueError(f"{path}: a grid file is a mapping with keys {sorted(GRID_KEYS)}; "
                         f"unexpected: {unexpected!r}.")
    spec.setdefault("profile", "smoke")
    spec.setdefault("fixed", {})
    if spec["profile"] not in config.PROFILES:
        raise ValueError(f"{path}: profile {spec['profile']!r} is not one of {config.PROFILES}.")
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid or not all(
            isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"{path}: 'grid' must map parameter names to non-empty lists of values.")
    if not isinstance(spec["fixed"], dict):
        raise ValueError(f"{path}: 'fixed' must map parameter names to values.")
    overlap = set(grid) & set(spec["fixed"])
    if overlap:
        raise ValueError(f"{path}: {sorted(overlap)} appear in both 'grid' and 'fixed'.")
    if spec.get("notebooks") is not None:  # "01,04", [1, 4] or 1 (YAML reads 01 as 1)
        nbs = spec["notebooks"]
        nbs = nbs if isinstance(nbs, list) else str(nbs).split(",")
        spec["notebooks"] = ",".join(f"{int(n):02d}" if str(n).strip().isdigit() else str(n)
                                     for n in nbs)
    notebooks = runner.select(spec.get("notebooks"), runner.list_notebooks(notebook_dir))
    known = set().union(*(runner.parameter_cell(nb) for nb in notebooks))
    unknown = sorted((set(grid) | set(spec["fixed"])) - known)
    if unknown:
        raise ValueError(f"{path}: unknown parameter(s) {unknown}; notebooks "
                         f"{[nb.name for nb in notebooks]} take {sorted(known)}.")
    return spec


def points(spec: dict) -> list[dict]:
    """Parameter dicts of every grid point (grid values vary fastest in the last key)."""
    names = list(spec["grid"])
    return [dict(zip(names, values)) for values in itertools.product(*spec["grid"].values())]


def point_name(i: int, point: dict) -> str:
    """Directory name of a point: index plus a readable, filesystem-safe parameter string."""
    text = ",".join(f"{k}={v}" for k, v in point.items())
    return f"{i:03d}_" + re.sub(r"[^A-Za-z0-9_.,=+-]+", "", text)[:80]


def read_metrics(run_dir) -> dict:
    """``{"<method>/<metric>": value}`` of the run's current results
    (``evaluation.current_metrics``: leftovers of other parameters are not read)."""
    row = {}
    for method, m in evaluation.current_metrics(run_dir).items():
        for key in METRICS:
            value = m.get("accuracy", {}).get(key)
            if isinstance(value, (int, float)):
                row[f"{method}/{key}"] = value
    return row


def ambiguity(run_dir) -> float | None:
    """Average ambiguity (wrong labels per candidate set) from a run's ``dataset.json``."""
    path = Path(run_dir) / "dataset.json"
    if not path.exists():
        return None
    mean = json.loads(path.read_text()).get("mean_candidates")
    return None if mean is None else mean - 1


def _row(point: dict, record: dict, run_dir: Path) -> dict:
    row = {**{k: repr(v) if isinstance(v, (list, dict)) else v for k, v in point.items()},
           "status": record.get("status", "pending"), "error": record.get("error", ""),
           "seconds": record.get("seconds"), "run_dir": str(run_dir)}
    if row["status"] == "done":
        row["ambiguity"] = ambiguity(run_dir)
        row.update(read_metrics(run_dir))
    return row


def write_results(out: Path, rows: list[dict]) -> Path:
    """Write ``results.csv`` atomically."""
    path = config.write_atomic(out / "results.csv",
                               lambda t: pd.DataFrame(rows).to_csv(t, index=False))
    return path


def run_sweep(spec: dict, out, kernel: str = "python3", extra: dict | None = None,
              notebook_dir: Path = runner.NOTEBOOK_DIR) -> pd.DataFrame:
    """Run every point of ``spec`` (see :func:`load_grid`) into ``out``; returns the results.

    ``extra``: defaults added to every point (e.g. ``DATA_DIR``) when its notebooks take
    them; the grid file's values win. ``out`` is locked for the duration (one writer);
    each point's run locks its own directory.
    """
    out = Path(out).resolve()
    with DirLock(out, "sweep"):
        return _run_points(spec, out, kernel, extra, notebook_dir)


def _run_points(spec: dict, out: Path, kernel: str, extra: dict | None,
                notebook_dir: Path) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    config.write_json(out / "grid.json", spec)
    todo = points(spec)
    records = []
    for i, point in enumerate(todo):
        run_dir = out / point_name(i, point)
        prev = run_dir / POINT_FILE
        records.append(json.loads(prev.read_text()) if prev.exists() else {})
    rows = [_row(p, r, out / point_name(i, p)) for i, (p, r) in enumerate(zip(todo, records))]
    write_results(out, rows)
    if extra:  # only what the grid's notebooks take (e.g. DATA_DIR)
        selected = runner.select(spec.get("notebooks"), runner.list_notebooks(notebook_dir))
        known = set().union(*(runner.parameter_cell(nb) for nb in selected))
        extra = {k: v for k, v in extra.items() if k in known}
    params_of = [{**(extra or {}), **spec["fixed"], **p} for p in todo]
    bar = tqdm(list(enumerate(todo)), desc=f"sweep [{spec['profile']}]", unit="point")
    for i, point in bar:
        run_dir = out / point_name(i, point)
        if records[i].get("status") == "done" and records[i].get("params") == params_of[i]:
            tqdm.write(f"skip {run_dir.name}: finished")
            continue
        start = time.time()
        record = dict(params=params_of[i], notebooks=spec.get("notebooks"),
                      profile=spec["profile"])
        try:
            runner.run(spec["profile"], spec.get("notebooks"), str(run_dir), params_of[i],
                       kernel=kernel, notebook_dir=notebook_dir, resume=True)
            record["status"] = "done"
        except Exception as err:  # noqa: BLE001 - record it, go on with the next point
            record.update(status="failed", error=f"{type(err).__name__}: {err}"[:4000])
            tqdm.write(f"point {run_dir.name} failed: {str(err).splitlines()[0]}")
        record["seconds"] = round(time.time() - start, 1)
        run_dir.mkdir(parents=True, exist_ok=True)
        config.write_json(run_dir / POINT_FILE, record)
        rows[i] = _row(point, record, run_dir)
        write_results(out, rows)
    return pd.DataFrame(rows)


def long_format(results: pd.DataFrame) -> pd.DataFrame:
    """Finished points, one row per (point, method): parameters, ambiguity and accuracies."""
    done = results[results["status"] == "done"]
    metric_cols = [c for c in done.columns if "/" in c]
    params = [c for c in done.columns if c not in metric_cols]
    methods = sorted({c.split("/")[0] for c in metric_cols})
    frames = []
    for method in methods:
        cols = {f"{method}/{m}": m for m in METRICS if f"{method}/{m}" in done.columns}
        part = done[params + list(cols)].rename(columns=cols).assign(method=method)
        frames.append(part.dropna(subset=["last"]) if "last" in part else part.iloc[:0])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_results(sweep_dir) -> pd.DataFrame:
    """A sweep's ``results.csv``, or ``FileNotFoundError`` saying how to make one."""
    path = Path(sweep_dir) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run a sweep first, e.g. `python -m rable_nb sweep "
            f"examples/sweep-smoke.yaml --out {sweep_dir}` (or set SWEEP_GRID).")
    return pd.read_csv(path)


def _project_path(path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else config.PROJECT_ROOT / path


def notebook_results(P: dict, kernel: str = "python3") -> tuple[pd.DataFrame | None, Path]:
    """Notebook 08's sweep: (results, sweep directory).

    With ``SWEEP_GRID`` the grid is run (finished points are skipped) into ``SWEEP_DIR`` or
    ``RUN_DIR/sweep-<grid name>``; without, ``SWEEP_DIR``'s results are read. With neither:
    the smoke profile runs the tiny ``examples/sweep-smoke.yaml``; quick and paper read
    ``DEFAULT_SWEEP_DIRS[profile]`` and return ``(None, dir)`` when it holds no results yet
    (a full pipeline run must not fail on the optional sweep).
    """
    grid = P.get("SWEEP_GRID")
    if grid is None and P.get("SWEEP_DIR") is None and P["PROFILE"] == "smoke":
        grid = SMOKE_GRID
    if grid:
        grid = _project_path(grid)
        out = _project_path(P.get("SWEEP_DIR") or Path(P["RUN_DIR"]) / f"sweep-{grid.stem}")
        run_sweep(load_grid(grid), out, kernel, extra={"DATA_DIR": P.get("DATA_DIR")}
                  if P.get("DATA_DIR") else None)
        return read_results(out), out
    if P.get("SWEEP_DIR") is None:
        out = _project_path(DEFAULT_SWEEP_DIRS[P["PROFILE"]])
        return (read_results(out) if (out / "results.csv").exists() else None), out
    out = _project_path(P["SWEEP_DIR"])
    return read_results(out), out


def varying(results: pd.DataFrame) -> list[str]:
    """Grid parameters that take more than one value among the points."""
    end = list(results.columns).index("status")
    return [c for c in results.columns[:end] if results[c].nunique(dropna=False) > 1]


def _curves(ax, long: pd.DataFrame, x: str, groups: list[str], xlabel: str) -> None:
    """Last-epoch accuracy against ``x``, one line per method and value of ``groups``."""
    for key, part in long.groupby(["method"] + groups, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        label = key[0] + "".join(f", {g}={v}" for g, v in zip(groups, key[1:]))
        part = part.sort_values(x)
        ax.plot(part[x], part["last"], marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel="test accuracy (last epoch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def sweep_figure(results: pd.DataFrame):
    """Accuracy vs imbalance ratio, vs measured ambiguity, and many/medium/few bars at the
    hardest point (smallest imbalance factor, then largest ambiguity)."""
    long = long_format(results)
    if long.empty:
        raise ValueError("No finished point with accuracies in this sweep (see its "
                         "status/error columns); the grid must include notebook 04.")
    vary = varying(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), layout="constrained")
    if "IMBALANCE_FACTOR" in long:
        long = long.assign(rho=1 / long["IMBALANCE_FACTOR"])
        others = [v for v in vary if v != "IMBALANCE_FACTOR" and v in long]
        _curves(axes[0], long, "rho", others, "imbalance ratio ρ = 1 / IMBALANCE_FACTOR")
        axes[0].set_xscale("log")
    axes[0].set_title("accuracy vs imbalance")
    if long["ambiguity"].notna().any():
        others = [v for v in vary if v not in ("Q", "RATE", "PARTIAL") and v in long]
        _curves(axes[1], long, "ambiguity", others,
                "average ambiguity (wrong labels per candidate set)")
    axes[1].set_title("accuracy vs ambiguity")
    order = [c for c in ("IMBALANCE_FACTOR", "ambiguity") if c in long]
    hardest = long.sort_values(order, ascending=[True, False][:len(order)]).iloc[0]
    at = long[(long[order] == hardest[order]).all(axis=1)] if order else long
    groups = [g for g in ("many", "medium", "few") if g in at]
    width = 0.8 / max(1, len(groups))
    for k, g in enumerate(groups):
        axes[2].bar(np.arange(len(at)) + (k - (len(groups) - 1) / 2) * width, at[g], width,
                    label=g)
    axes[2].set_xticks(np.arange(len(at)), at["method"], rotation=20)
    where = ", ".join(f"{c}={hardest[c]:.3g}" for c in order)
    axes[2].set(ylabel="test accuracy", ylim=(0, 1), title=f"many / medium / few at {where}")
    axes[2].legend(fontsize=8)
    return fig


def main_sweep(args) -> int:
    """``python -m rable_nb sweep GRID.yaml [--out DIR] [--kernel NAME]``."""
    try:
        spec = load_grid(args.grid)
    except (ValueError, runner.RunError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out or config.PROJECT_ROOT / "runs" / f"sweep-{Path(args.grid).stem}")
    try:
        results = run_sweep(spec, out, kernel=args.kernel)
    except LockedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    failed = int((results["status"] != "done").sum())
    print(f"done: {len(results) - failed} of {len(results)} points finished; "
          f"results in {out / 'results.csv'}")
    return 1 if failed else 0
