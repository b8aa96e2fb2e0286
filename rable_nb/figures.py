"""``python -m rable_nb figures --run runs/NAME``: copy a run's report figures into
``figures/`` with their provenance.

Only runs of the ``paper`` profile belong there; other profiles need ``--force`` (their
provenance then says so). ``figures/provenance.json`` maps each figure to the run it came
from: profile, parameters, device, commit, the figure's date and sha256.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import sys
from pathlib import Path

from . import config

FIGURES_DIR = config.PROJECT_ROOT / "figures"
PROVENANCE = "provenance.json"


class FigureError(RuntimeError):
    """The run cannot be copied; the message says why and what to do."""


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def run_provenance(run_dir: Path) -> dict:
    """Profile, parameters, devices and commits recorded by a run directory."""
    run_log, ds = _json(run_dir / "run.json"), _json(run_dir / "dataset.json")
    profile = run_log.get("profile") or ds.get("PROFILE")
    if profile is None:
        raise FigureError(f"{run_dir} has neither run.json nor dataset.json: not a run "
                          "directory written by `python -m rable_nb run`.")
    metrics = {p.stem[8:]: _json(p) for p in sorted(run_dir.glob("metrics-*.json"))}
    run_params = {}
    for entry in run_log.get("notebooks", []):
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
    figs = sorted(run_dir.glob("fig-*.png"))
    if not figs:
        raise FigureError(f"{run_dir} has no fig-*.png figures to copy.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    provenance = _json(dest / PROVENANCE)
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
