"""``python -m rable_nb figures --run runs/NAME``: copy a run's report figures into
``figures/`` with their provenance.

Only runs of the ``paper`` profile belong there; other profiles need ``--force`` (their
provenance then says so). ``figures/provenance.json`` maps each figure to the run it came
from: profile, parameters, device, commit, the figure's date and sha256. Only results of
the run's current parameters are used (``runfiles.current_metrics``): a per-method
figure (``fig-<kind>-<method>.png``) of a method whose results are not current, or drawn
before its model was last trained, is left out.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import sys
from pathlib import Path

from ..rundir import artefacts, runfiles
from .. import config

FIGURES_DIR = config.PROJECT_ROOT / "figures"
PROVENANCE = "provenance.json"


class FigureError(RuntimeError):
    """The run cannot be copied; the message says why and what to do."""


def stale_figures(run_dir: Path, current: dict) -> list[Path]:
    """Per-method figures of methods whose results are not current (or older than the
    method's checkpoint)."""
    ckpts = run_dir / "checkpoints"
    trained = ({p.stem[len("metrics-"):] for p in run_dir.glob("metrics-*.json")}
               | {p.stem for p in ckpts.glob("[!.]*.safetensors")})
    stale = []
    for fig in sorted(run_dir.glob("fig-*.png")):
        for method in trained:
            if fig.stem.endswith(f"-{method}"):
                ckpt = ckpts / f"{method}.safetensors"
                if method not in current or (
                        ckpt.exists() and fig.stat().st_mtime_ns < ckpt.stat().st_mtime_ns):
                    stale.append(fig)
    return stale


def run_provenance(run_dir: Path) -> dict:
    """Profile, parameters, devices and commits recorded by a run directory."""
    run_log = runfiles.read_run_log(run_dir)
    ds = runfiles.read_dataset_record(run_dir)
    profile = run_log.get("profile") or ds.get("PROFILE")
    if profile is None:
        raise FigureError(f"{run_dir} has neither run.json nor dataset.json: not a run "
                          "directory written by `python -m rable_nb run`.")
    metrics = runfiles.current_metrics(run_dir)
    run_params = {}
    for entry in runfiles.finished_notebooks(run_log).values():
        run_params.update(entry.get("parameters", {}))
    commits = sorted({m["commit"] for m in metrics.values()
                      if m.get("commit") not in (None, "", "unknown")})
    inside = run_dir.is_relative_to(config.PROJECT_ROOT)
    return dict(
        run=str(run_dir.relative_to(config.PROJECT_ROOT) if inside else run_dir),
        profile=profile,
        commit=commits[0] if len(commits) == 1 else (commits or config.git_commit()),
        parameters=dict(run=run_params, dataset=ds,
                        training={k: m.get("params") for k, m in metrics.items()}),
        device=sorted({m["device"] for m in metrics.values() if m.get("device")}) or None,
        notebooks=[e.get("notebook") for e in run_log.get("notebooks", [])])


def copy_figures(run_dir, dest=FIGURES_DIR, force: bool = False) -> list[Path]:
    """Copy ``run_dir/fig-*.png`` into ``dest`` and update ``dest/provenance.json``."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FigureError(f"Run directory {run_dir} does not exist.")
    info = run_provenance(run_dir)
    if info["profile"] != "paper" and not force:
        raise FigureError(
            f"{run_dir} is a {info['profile']!r} run; only 'paper' runs go into figures/ "
            "(the report's figures). Rerun with --force to copy it anyway; its provenance "
            "will record the profile.")
    stale = stale_figures(run_dir, runfiles.current_metrics(run_dir))
    figs = [f for f in sorted(run_dir.glob("fig-*.png")) if f not in stale]
    if stale:
        print(f"left out {len(stale)} figure(s) of results that are not current: "
              f"{', '.join(f.name for f in stale)}", file=sys.stderr)
    if not figs:
        raise FigureError(f"{run_dir} has no current fig-*.png figures to copy.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    provenance = artefacts.read_json(dest / PROVENANCE) or {}
    copied = []
    for fig in figs:
        config.write_atomic(dest / fig.name, lambda t, src=fig: shutil.copyfile(src, t))
        provenance[fig.name] = dict(
            info, sha256=hashlib.sha256(fig.read_bytes()).hexdigest(),
            date=dt.datetime.fromtimestamp(fig.stat().st_mtime, dt.timezone.utc).isoformat(
                timespec="seconds"),
            copied=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            forced=info["profile"] != "paper")
        copied.append(dest / fig.name)
    config.write_json(dest / PROVENANCE, provenance)
    return copied


def main_figures(args) -> int:
    """``python -m rable_nb figures --run runs/NAME [--force]``."""
    try:
        copied = copy_figures(args.run, force=args.force)
    except FigureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"done: copied {len(copied)} figure(s) into {FIGURES_DIR} "
          f"({', '.join(p.name for p in copied)}); provenance in {FIGURES_DIR / PROVENANCE}")
    return 0
