"""Parameterised batch runs: one papermill run of the selected notebooks per grid point.

A grid file (YAML, see ``examples/sweep-*.yaml``)::

    profile: smoke            # smoke | quick | paper
    notebooks: "01,04"        # which notebooks every point runs
    fixed: {METHODS: [able], EPOCHS: 2}        # the same for every point
    grid: {IMBALANCE_FACTOR: [0.1, 0.01], Q: [0.1, 0.3]}   # cartesian product

Instead of (or besides) ``grid``, ``points`` lists points one by one, for studies whose
points are not a product (``examples/sweep-study-quick.yaml``)::

    points:                   # each entry: one point (its values win over `fixed`)
      - {METHODS: [able, able+records]}
      - {METHODS: [rable], GENERATOR: pixel, TARGET_PER_CLASS: 1000}

With both, every grid combination runs with every listed point.

Each point runs in its own directory ``<out>/<NNN>_<name>/`` and leaves ``point.json``
(parameters, status, error). A failed point is recorded with its error and the sweep goes
on; ``results.csv`` (one row per point: parameters, status, error, ambiguity, and
``<method>/<metric>`` accuracies from ``metrics-<method>.json``, with ``<method>/n_test``,
``<method>/n_synthetic`` and ``<method>/n_unlabeled``: the test images and the images added to
the long tail; ``<method>/generator`` and ``<method>/gen_labels`` for methods trained on
synthetic images) is rewritten after every point. A rerun skips points already ``done``
with the same parameters and retries the others (notebooks that finished inside an
interrupted point are skipped too).

Executors (``rable_nb/batch/sweep_executors.py``): every point runs in its own process, locally
(``--parallel``) or as a Ray task. Only the sweep process writes ``results.csv``, in grid
order, as points finish.
"""
from __future__ import annotations

import itertools
import json
import re
import sys
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from .. import config
from ..rundir import runfiles
from ..batch import runner
from ..rundir.locks import DirLock, LockedError
from ..batch.sweep_executors import LOG_FILE, _local_events, _ray_events, _record, check_executor

GRID_KEYS = {"profile", "notebooks", "fixed", "grid", "points"}
METRICS = ("last", "best", "many", "medium", "few")
COUNTS = ("n_test", "n_synthetic", "n_unlabeled")  # images behind a method's accuracies
MARKS = ("generator", "gen_labels")  # how a method's synthetic images were made (rable)
SMOKE_GRID = "examples/sweep-smoke.yaml"
# Where notebook 08 looks when SWEEP_DIR is not given (docs/usage.md's sweeps write there)
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
    grid, listed = spec.get("grid"), spec.get("points")
    if (grid is not None or listed is None) and (not isinstance(grid, dict) or not grid or not all(
            isinstance(v, list) and v for v in grid.values())):
        raise ValueError(f"{path}: 'grid' must map parameter names to non-empty lists of values.")
    if listed is not None and (not isinstance(listed, list) or not listed or not all(
            isinstance(p, dict) and p for p in listed)):
        raise ValueError(f"{path}: 'points' must be a non-empty list of mappings from parameter "
                         "names to values.")
    if not isinstance(spec["fixed"], dict):
        raise ValueError(f"{path}: 'fixed' must map parameter names to values.")
    grid, listed = grid or {}, listed or []
    overlap = set(grid) & set(spec["fixed"])
    if overlap:
        raise ValueError(f"{path}: {sorted(overlap)} appear in both 'grid' and 'fixed'.")
    overlap = set(grid) & {k for p in listed for k in p}
    if overlap:
        raise ValueError(f"{path}: {sorted(overlap)} appear in both 'grid' and 'points'.")
    seen = {}
    for i, point in enumerate(points(spec)):  # a copy would run again and pass for a seed
        key = json.dumps(point, sort_keys=True, default=str)
        if key in seen:
            raise ValueError(f"{path}: points {seen[key]} and {i} are the same ({point}); each "
                             "point runs once: list it once (repeats of a setting are a grid "
                             "parameter, e.g. SEED: [0, 1, 2]).")
        seen[key] = i
    if spec.get("notebooks") is not None:  # "01,04", [1, 4] or 1 (YAML reads 01 as 1)
        nbs = spec["notebooks"]
        nbs = nbs if isinstance(nbs, list) else str(nbs).split(",")
        spec["notebooks"] = ",".join(f"{int(n):02d}" if str(n).strip().isdigit() else str(n)
                                     for n in nbs)
    notebooks = runner.select(spec.get("notebooks"), runner.list_notebooks(notebook_dir))
    known = set().union(*(runner.notebook_parameters(nb) for nb in notebooks))
    unknown = sorted((set(grid) | set(spec["fixed"]) | {k for p in listed for k in p}) - known)
    if unknown:
        raise ValueError(f"{path}: unknown parameter(s) {unknown}; notebooks "
                         f"{[nb.name for nb in notebooks]} take {sorted(known)}.")
    return spec


def points(spec: dict) -> list[dict]:
    """Parameter dicts of every grid point (grid values vary fastest in the last key), each
    combined with every entry of ``points`` when the grid file lists any."""
    grid = spec.get("grid") or {}
    names = list(grid)
    combos = [dict(zip(names, values)) for values in itertools.product(*grid.values())]
    return [{**c, **p} for c in combos for p in spec.get("points") or [{}]]


def point_columns(spec: dict, todo: list[dict]) -> list[dict]:
    """Each point as ``results.csv`` shows it: every parameter some point sets, with this
    point's value, else ``fixed``'s (``None``: the notebooks' default)."""
    keys = list(dict.fromkeys(k for p in todo for k in p))
    return [{k: p.get(k, spec["fixed"].get(k)) for k in keys} for p in todo]


def point_name(i: int, point: dict) -> str:
    """Directory name of a point: index plus a readable, filesystem-safe parameter string."""
    text = ",".join(f"{k}={v}" for k, v in point.items())
    return f"{i:03d}_" + re.sub(r"[^A-Za-z0-9_.,=+-]+", "", text)[:80]


def read_metrics(run_dir) -> dict:
    """``{"<method>/<metric>": value}`` of the run's current results
    (``runfiles.current_metrics``: leftovers of other parameters are not read): the
    accuracies ``METRICS`` and, where the metrics file has them, the ``COUNTS`` (test images:
    the confusion matrix's total; synthetic and unlabeled images added to the long tail) and
    the ``MARKS`` of synthetic images (their generator and conditioning labels)."""
    row = {}
    for method, m in runfiles.current_metrics(run_dir).items():
        params = m.get("params") or {}
        values = {**{k: m.get("accuracy", {}).get(k) for k in METRICS},
                  "n_test": int(np.sum(m["confusion"])) if "confusion" in m else None,
                  "n_synthetic": m.get("n_synthetic"), "n_unlabeled": m.get("n_unlabeled"),
                  "generator": params.get("GENERATOR"), "gen_labels": params.get("GEN_LABELS")}
        for key, value in values.items():
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                row[f"{method}/{key}"] = value
    return row


def ambiguity(run_dir) -> float | None:
    """Average ambiguity (wrong labels per candidate set) from a run's ``dataset.json``."""
    mean = runfiles.read_dataset_record(run_dir).get("mean_candidates")
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
              notebook_dir: Path = runner.NOTEBOOK_DIR, parallel: int = 1,
              executor: str = "local", cpus_per_point: float | None = None,
              gpus_per_point: float | None = None) -> pd.DataFrame:
    """Run every point of ``spec`` (see :func:`load_grid`) into ``out``; returns the results.

    ``extra``: defaults added to every point (e.g. ``DATA_DIR``) when its notebooks take
    them; the grid file's values win. ``out`` is locked for the duration (one writer);
    each point's run locks its own directory. ``executor`` 'local' runs ``parallel`` points at once,
    each in its own process (GPUs round-robin); 'ray' makes every point a Ray task needing
    ``cpus_per_point`` (default 1) and ``gpus_per_point`` (default 0; fractions share a GPU).
    Only this process writes ``results.csv``, rewritten (in grid order) as points finish.
    Ctrl-C stops the workers and raises ``KeyboardInterrupt``; finished points stay.
    """
    check_executor(executor, parallel, cpus_per_point, gpus_per_point)
    out = Path(out).resolve()
    check_points(spec, out, extra, notebook_dir)
    # SIGTERM/SIGHUP do what Ctrl-C does: stop the workers (and their kernels), keep what
    # finished, record, exit (main_sweep: 128 + the signal)
    with runner.stop_on_signals(), DirLock(out, "sweep"):
        return _run_points(spec, out, kernel, extra, notebook_dir, parallel, executor,
                           cpus_per_point, gpus_per_point)


def _extra_params(extra: dict | None, spec: dict, notebook_dir: Path) -> dict:
    """Of ``extra`` (defaults added to every point), what the grid's notebooks take."""
    if not extra:
        return {}
    selected = runner.select(spec.get("notebooks"), runner.list_notebooks(notebook_dir))
    known = set().union(*(runner.notebook_parameters(nb) for nb in selected))
    return {k: v for k, v in extra.items() if k in known}


def check_points(spec: dict, out, extra: dict | None = None,
                 notebook_dir: Path = runner.NOTEBOOK_DIR) -> None:
    """Every point's values checked by its notebooks' rules, as ``run`` checks them, before
    any point runs (``ValueError`` naming the point): a typo in one grid value stops the
    sweep at once, as an unknown parameter name does."""
    notebooks = runner.select(spec.get("notebooks"), runner.list_notebooks(notebook_dir))
    extra = _extra_params(extra, spec, notebook_dir)
    for i, point in enumerate(points(spec)):
        run_dir = Path(out).resolve() / point_name(i, point)
        params = runner.absolute_paths({**extra, **spec["fixed"], **point})
        try:
            runner.check_parameters(params, notebooks,
                                    dict(PROFILE=spec["profile"], RUN_DIR=str(run_dir)))
        except runner.RunError as err:
            raise ValueError(f"grid point {run_dir.name} ({point}): {err} Nothing has run; "
                             "fix the grid file.") from None


def _run_points(spec: dict, out: Path, kernel: str, extra: dict | None, notebook_dir: Path,
                parallel: int, executor: str, cpus_per_point: float | None,
                gpus_per_point: float | None) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    config.write_json(out / "grid.json", spec)
    todo = points(spec)
    shown = point_columns(spec, todo)
    records = [_record(out / point_name(i, point)) for i, point in enumerate(todo)]
    rows = [_row(shown[i], r, out / point_name(i, p))
            for i, (p, r) in enumerate(zip(todo, records))]
    write_results(out, rows)
    extra = _extra_params(extra, spec, notebook_dir)  # only what its notebooks take
    jobs = []
    for i, point in enumerate(todo):
        params = {**(extra or {}), **spec["fixed"], **point}
        run_dir = out / point_name(i, point)
        if records[i].get("status") == "done" and records[i].get("params") == params:
            tqdm.write(f"skip {run_dir.name}: finished")
            continue
        jobs.append(dict(index=i, run_dir=str(run_dir), params=params, profile=spec["profile"],
                         notebooks=spec.get("notebooks"), kernel=kernel,
                         notebook_dir=str(notebook_dir)))
    done, failed, running = len(todo) - len(jobs), 0, set()
    bar = tqdm(total=len(todo), initial=done, desc=f"sweep [{spec['profile']}]", unit="point")
    bar.set_postfix(done=done, failed=failed, running=0)
    events = (_local_events(jobs, parallel) if executor == "local" else
              _ray_events(jobs, cpus_per_point or 1, gpus_per_point or 0))
    try:
        with closing(events):
            for kind, job, record in events if jobs else ():
                name = Path(job["run_dir"]).name
                if kind == "start":
                    running.add(name)
                    tqdm.write(f"start {name}: log {Path(job['run_dir']) / LOG_FILE}")
                else:
                    running.discard(name)
                    done, failed = done + (record["status"] == "done"), failed + (
                        record["status"] != "done")
                    if record["status"] != "done":
                        tqdm.write(f"point {name} failed: {record['error'].splitlines()[0]}")
                    rows[job["index"]] = _row(shown[job["index"]], record, Path(job["run_dir"]))
                    write_results(out, rows)
                    bar.update(1)
                bar.set_postfix(done=done, failed=failed, running=len(running))
    except KeyboardInterrupt:  # points that finished while the workers were being stopped
        for job in jobs:
            rows[job["index"]] = _row(shown[job["index"]], _record(Path(job["run_dir"])),
                                      Path(job["run_dir"]))
        write_results(out, rows)
        tqdm.write(f"interrupted: workers stopped; the {done} finished point(s) are kept in "
                   f"{out}; rerun the same command to continue.")
        raise
    finally:
        bar.close()
    return pd.DataFrame(rows)


def long_format(results: pd.DataFrame) -> pd.DataFrame:
    """Finished points, one row per (point, method): parameters, ambiguity and accuracies."""
    done = results[results["status"] == "done"]
    metric_cols = [c for c in done.columns if "/" in c]
    params = [c for c in done.columns if c not in metric_cols]
    methods = sorted({c.split("/")[0] for c in metric_cols})
    frames = []
    for method in methods:
        cols = {f"{method}/{m}": m for m in METRICS + COUNTS + MARKS
                if f"{method}/{m}" in done.columns}
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


def notebook_results(P: dict, kernel: str = "python3", smoke_grid: str = SMOKE_GRID,
                     default_dirs: dict[str, str] | None = None
                     ) -> tuple[pd.DataFrame | None, Path]:
    """A notebook's sweep (08; 09 with its own ``smoke_grid`` and ``default_dirs``):
    (results, sweep directory).

    With ``SWEEP_GRID`` the grid is run (finished points are skipped) into ``SWEEP_DIR`` or
    ``RUN_DIR/sweep-<grid name>``; without, ``SWEEP_DIR``'s results are read. With neither:
    the smoke profile runs the tiny ``smoke_grid`` (``examples/sweep-smoke.yaml``); quick and
    paper read ``default_dirs[profile]`` (``DEFAULT_SWEEP_DIRS``) and return ``(None, dir)``
    when it holds no results yet (a full pipeline run must not fail on the optional sweep).
    """
    default_dirs = default_dirs or DEFAULT_SWEEP_DIRS
    grid = P.get("SWEEP_GRID")
    if grid is None and P.get("SWEEP_DIR") is None and P["PROFILE"] == "smoke":
        grid = smoke_grid
    if grid:
        grid = config.project_path(grid)
        out = config.project_path(P.get("SWEEP_DIR") or Path(P["RUN_DIR"]) / f"sweep-{grid.stem}")
        run_sweep(load_grid(grid), out, kernel, extra={"DATA_DIR": P.get("DATA_DIR")}
                  if P.get("DATA_DIR") else None)
        return read_results(out), out
    if P.get("SWEEP_DIR") is None:
        out = config.project_path(default_dirs[P["PROFILE"]])
        return (read_results(out) if (out / "results.csv").exists() else None), out
    out = config.project_path(P["SWEEP_DIR"])
    return read_results(out), out


def varying(results: pd.DataFrame) -> list[str]:
    """Grid parameters that take more than one value among the points."""
    end = list(results.columns).index("status")
    return [c for c in results.columns[:end] if results[c].nunique(dropna=False) > 1]


SEED_KEYS = ("SEED",)  # grid parameters whose points are repeats of one setting
AMBIGUITY_KEYS = ("Q", "RATE", "PARTIAL")  # what sets the ambiguity of a point


def settings(long: pd.DataFrame, vary: list[str]) -> pd.DataFrame:
    """One row per method and grid setting: points that differ only by ``SEED`` are
    averaged — ``last`` and the group accuracies (mean), ``spread`` (standard deviation of
    ``last``; NaN for one seed), ``seeds`` (how many), and the mean measured ambiguity."""
    keys = ["method"] + [v for v in vary if v not in SEED_KEYS and v in long]
    if "IMBALANCE_FACTOR" in long and "IMBALANCE_FACTOR" not in keys:
        keys.append("IMBALANCE_FACTOR")  # the same for every point: kept for the titles
    metrics = [m for m in ("last", "many", "medium", "few", "ambiguity") if m in long]
    grouped = long.groupby(keys, dropna=False, sort=True)
    out = grouped[metrics].mean()
    out["spread"] = grouped["last"].std()
    out["seeds"] = grouped["last"].size()
    return out.reset_index()


def _curves(ax, pts: pd.DataFrame, x: str, lines: list[str], xlabel: str) -> None:
    """Last-epoch accuracy against ``x``, one line per method and value of ``lines``;
    error bars: ± one standard deviation over seeds where a setting has several."""
    import matplotlib.pyplot as plt
    methods = sorted(pts["method"].unique())
    variants = sorted({tuple(r) for r in pts[lines].itertuples(index=False)}, key=str)
    for key, part in pts.groupby(["method"] + lines, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        label = key[0] + "".join(f", {g}={v}" for g, v in zip(lines, key[1:]))
        k = variants.index(tuple(key[1:]))  # colour = method, line style + marker = variant
        part = part.sort_values(x)
        spread = part["spread"] if (part["seeds"] > 1).any() else None
        ax.errorbar(part[x], part["last"], yerr=spread, capsize=3, label=label,
                    color=plt.get_cmap("tab10")(methods.index(key[0]) % 10),
                    ls=("-", "--", ":", "-.")[k % 4], marker="os^Dv"[k % 5])
    ax.set(xlabel=xlabel)


def _accuracy_axis(ax, chance: float) -> None:
    """Accuracy on a fixed 0–1 axis with chance marked: no zoom that turns noise into a cliff."""
    ax.axhline(chance, color="0.3", ls=":", lw=1.2, label=f"chance ({chance:.0%})")
    ax.set(ylim=(0, 1), ylabel="test accuracy (last epoch)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def sweep_figure(results: pd.DataFrame, num_classes: int = 10):
    """Accuracy vs imbalance ratio, vs measured ambiguity, and many/medium/few bars at the
    hardest setting (smallest imbalance factor, then largest ambiguity).

    Accuracy axes are fixed to [0, 1] with chance marked. Points that differ only by
    ``SEED`` are averaged (error bars: ± one standard deviation). A panel whose x-axis the
    grid does not vary (one ``IMBALANCE_FACTOR``; one ``Q``/``RATE``/``PARTIAL``) is left
    out, and a note under the figure says so.
    """
    import matplotlib.pyplot as plt  # here: sweep workers import this module and never plot
    long = long_format(results)
    if long.empty:
        raise ValueError("No finished point with accuracies in this sweep (see its "
                         "status/error columns); the grid must include notebook 04.")
    vary = varying(results)
    pts = settings(long, vary)
    chance = 1 / num_classes
    panels, notes = [], []
    if "IMBALANCE_FACTOR" in vary:
        panels.append("imbalance")
    else:
        notes.append("accuracy vs imbalance left out: the grid has one IMBALANCE_FACTOR")
    if any(k in vary for k in AMBIGUITY_KEYS) and pts["ambiguity"].notna().any():
        panels.append("ambiguity")
    else:
        notes.append("accuracy vs ambiguity left out: the grid has one ambiguity level "
                     "(one Q / RATE / PARTIAL)")
    panels.append("groups")
    seeds = int(pts["seeds"].max())
    notes.append(f"mean ± s.d. over {seeds} seeds per setting" if seeds > 1 else
                 "one run per setting: no spread over seeds is shown (add SEED to the grid)")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.6), squeeze=False,
                             layout="constrained")
    axes = dict(zip(panels, axes[0]))
    others = [v for v in vary if v not in SEED_KEYS and v in pts]
    if "imbalance" in axes:
        ax = axes["imbalance"]
        _curves(ax, pts.assign(rho=1 / pts["IMBALANCE_FACTOR"]), "rho",
                [v for v in others if v != "IMBALANCE_FACTOR"],
                "imbalance ratio ρ = 1 / IMBALANCE_FACTOR")
        ax.set_xscale("log")
        ax.set_title("accuracy vs imbalance")
        _accuracy_axis(ax, chance)
    if "ambiguity" in axes:
        ax = axes["ambiguity"]
        _curves(ax, pts, "ambiguity", [v for v in others if v not in AMBIGUITY_KEYS],
                "average ambiguity (wrong labels per candidate set)")
        ax.set_title("accuracy vs ambiguity")
        _accuracy_axis(ax, chance)
    order = [c for c in ("IMBALANCE_FACTOR", "ambiguity") if c in pts]
    hardest = pts.sort_values(order, ascending=[True, False][:len(order)]).iloc[0]
    at = pts[(pts[others] == hardest[others]).all(axis=1)] if others else pts
    ax = axes["groups"]
    groups = [g for g in ("many", "medium", "few") if g in at]
    width = 0.8 / max(1, len(groups))
    for k, g in enumerate(groups):
        bars = ax.bar(np.arange(len(at)) + (k - (len(groups) - 1) / 2) * width, at[g], width,
                      label=g)
        ax.bar_label(bars, [f"{v:.2f}" for v in at[g]], fontsize=7, padding=2)
    ax.set_xticks(np.arange(len(at)), at["method"], rotation=20)
    where = ", ".join(f"{c}={hardest[c]:.3g}" for c in order)
    ax.set_title(f"many / medium / few at {where}")
    _accuracy_axis(ax, chance)
    fig.text(0.01, -0.02, "; ".join(notes) + ".", fontsize=8, color="0.3", ha="left", va="top")
    return fig


def main_sweep(args) -> int:
    """``python -m rable_nb sweep GRID.yaml [--out DIR] [--kernel NAME] [--parallel K]
    [--executor local|ray] [--cpus-per-point C] [--gpus-per-point G]``."""
    executor = dict(parallel=args.parallel, executor=args.executor,
                    cpus_per_point=args.cpus_per_point, gpus_per_point=args.gpus_per_point)
    try:
        spec = load_grid(args.grid)
        check_executor(**executor)
    except (ValueError, runner.RunError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out or config.PROJECT_ROOT / "runs" / f"sweep-{Path(args.grid).stem}")
    try:
        results = run_sweep(spec, out, kernel=args.kernel, **executor)
    except (LockedError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM/SIGHUP (runner.Stopped)
        return 128 + err.signum if isinstance(err, runner.Stopped) else 130
    failed = int((results["status"] != "done").sum())
    print(f"done: {len(results) - failed} of {len(results)} points finished; "
          f"results in {out / 'results.csv'}")
    return 1 if failed else 0
