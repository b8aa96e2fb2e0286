"""Execute the notebooks in pipeline order with papermill into a run directory.

Before the first notebook starts, every parameter of every selected notebook is resolved
and validated by the notebook's stage (``config.resolve``), and the run directory is
locked (``locks.DirLock``): a second run or sweep into it is refused.

Kernels are started by :class:`RunKernelManager`: with encrypted transport where the kernel
supports it, and with the kernel process's own log lines (not the cells' outputs, which go
into the executed notebook) in ``<run dir>/kernel.log`` instead of the terminal.
"""
from __future__ import annotations

import ast
import contextlib
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import nbformat
import papermill as pm
import zmq
from nbclient.exceptions import DeadKernelError
from jupyter_client.manager import AsyncKernelManager
from tqdm.auto import tqdm
from traitlets import Unicode, default
from traitlets.config import Config

from ..rundir import artefacts, runfiles
from .. import config
from ..data import images as data
from ..rundir.locks import DirLock, LockedError

NOTEBOOK_DIR = config.PROJECT_ROOT / "notebooks"
# The main job (``python -m rable_nb run`` without --profile, what scripts/run.sh runs): the
# quick profile's short-budget recipe on the real long tail (CIFAR-10-LT, rho = 100, uniform
# q = 0.3): ABLE, ABLE rebalanced with a static copy top-up to 1,000 images per class, and
# the best dynamic arm (PRODEN + mixup, each epoch's batches drawn class-balanced by its
# current labels: 51.90 % against 48.28 for +drs on ABLE at 10 epochs, seed 0,
# results/quick-cpu/d4-main-arms), then the prediction grids, t-SNE and the demo. Cut to
# fit 20 minutes on a 2-core CPU: 10 epochs and a mini_cnn audit judge (idle, at 25 epochs
# ABLE alone took 10.1 min and the small_cnn judge 6 min; docs/quick-profile.md#the-main-job).
# Any --only / -p given replaces or joins these; --profile smoke|quick|paper runs that
# profile's every notebook, as before.
MAIN_JOB = dict(profile="quick", only="00,01,03,04,05,06,07", out="runs/main",
                params=dict(PARTIAL="uniform", Q=0.3, GENERATOR="copy", TARGET_PER_CLASS=1000,
                            METHODS=["able", "rable", "proden+mixup+drs"], EPOCHS=10,
                            AUDIT_JUDGE_ARCH="mini_cnn"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
KERNEL_LOG = "kernel.log"


class RunKernelManager(AsyncKernelManager):
    """The kernel manager of ``run``: CurveZMQ transport encryption where the kernelspec
    declares support (ipykernel's does), so ipykernel has no "running over TCP without
    encryption" warning to print, and the kernel process's stdout/stderr — ipykernel's own
    log lines such as "KeyboardInterrupt caught in kernel" when jupyter_client interrupts it
    before a shutdown — appended to ``kernel_log`` rather than the terminal."""

    kernel_log = Unicode("", config=True, help="file for the kernel process's own output")

    @default("transport_encryption")
    def _encryption_where_possible(self) -> str:
        return "auto" if zmq.has("curve") else "disabled"

    async def _async_launch_kernel(self, kernel_cmd, **kw) -> None:
        if not self.kernel_log:
            return await super()._async_launch_kernel(kernel_cmd, **kw)
        with open(self.kernel_log, "ab") as log:  # the kernel keeps its own copy of the fd
            kw.update(stdout=log, stderr=log)
            return await super()._async_launch_kernel(kernel_cmd, **kw)


def kernel_options(run_dir: Path) -> dict:
    """papermill keyword arguments that start kernels with :class:`RunKernelManager`."""
    return dict(kernel_manager_class=RunKernelManager,
                config=Config({"RunKernelManager": {"kernel_log": str(run_dir / KERNEL_LOG)}}))


class RunError(RuntimeError):
    """A notebook failed; the message names the notebook and the cell."""


class Stopped(KeyboardInterrupt):
    """The runner received SIGTERM or SIGHUP (SIGINT raises KeyboardInterrupt itself);
    ``signum`` is the signal (the exit code is 128 + signum)."""

    def __init__(self, message: str = "", signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = int(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGTERM and SIGHUP into an exception while running, so that papermill shuts the
    kernel down and the run directory's lock is released on the way out (the default
    action would end the process at once and leave the kernel running)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        for s in previous:  # once: a second signal must not break the shutdown under way
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(f"stopped by {signal.Signals(signum).name}", signum)
    previous: dict = {}
    previous.update({s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)})
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def list_notebooks(notebook_dir: Path = NOTEBOOK_DIR) -> list[Path]:
    """Notebooks ``NN_name.ipynb`` in pipeline order."""
    return sorted(p for p in notebook_dir.glob("[0-9][0-9]_*.ipynb"))


def parameter_cell(path: Path) -> dict:
    """Names and literal values of the cell tagged ``parameters``."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse(cell.source)
            return {t.id: ast.literal_eval(node.value) for node in tree.body
                    if isinstance(node, ast.Assign) for t in node.targets}
    raise RunError(f"{path.name} has no cell tagged 'parameters'.")


def notebook_parameters(path: Path) -> dict:
    """Every parameter a notebook takes, with its literal (None: the profile's default): its
    cell tagged ``parameters`` and what its stage module's plug-ins declare
    (``plugin_parameters()``: notebook 03 takes every generator backend's parameters)."""
    stage = config.NOTEBOOK_STAGES.get(path.name[:2])
    extra = getattr(config.stage_module(stage), "plugin_parameters", None) if stage else None
    return {**dict.fromkeys(extra() if extra else ()), **parameter_cell(path)}


def select(only: str | None, notebooks: list[Path]) -> list[Path]:
    """Notebooks whose two-digit prefix is in ``only`` ('00,01'); all when None."""
    if not only:
        return notebooks
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    by_prefix = {p.name[:2]: p for p in notebooks}
    unknown = [w for w in wanted if w not in by_prefix]
    if unknown:
        raise RunError(f"Unknown notebook(s) {unknown}; available: {sorted(by_prefix)}.")
    return [by_prefix[w] for w in sorted(set(wanted))]


def parse_value(text: str):
    """Command-line value → Python literal when it parses as one, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def check_parameters(params: dict, notebooks: list[Path], base: dict | None = None
                     ) -> dict[Path, dict]:
    """Every name must be declared by some selected notebook, and every notebook's resolved
    parameters must pass its stage's checks; returns each notebook's injected parameters.

    ``base`` (PROFILE, RUN_DIR) goes to every notebook. Stages after notebook 01 see the
    dataset parameters (``P['dataset']``) that notebook 01 is about to use, or else those
    recorded in the run directory, so that e.g. BATCH_SIZE is checked against its size.
    """
    base = base or {}
    declared = {nb: notebook_parameters(nb) for nb in notebooks}
    known = set().union(*declared.values())
    unknown = sorted(set(params) - known)
    if unknown:
        raise RunError(f"Unknown parameter(s) {unknown}; the selected notebooks take: "
                       f"{sorted(known)}.")
    run_dir = Path(base.get("RUN_DIR", "."))
    # a damaged record is named with its fix, or moved aside when notebook 01 remakes it
    upstream = runfiles.read_dataset_record(run_dir, remake=any(
        nb.name[:2] == "01" for nb in notebooks))
    injected = {}
    for nb in notebooks:
        injected[nb] = {k: v for k, v in {**base, **params}.items() if k in declared[nb]}
        stage = config.NOTEBOOK_STAGES.get(nb.name[:2])
        try:
            P = config.resolve(stage, create=False, dataset=upstream,
                               **{**declared[nb], **injected[nb]})
        except ValueError as err:
            raise RunError(f"{nb.name}: {err}") from None
        if stage == "dataset":
            upstream = P
    return injected


def absolute_paths(params: dict) -> dict:
    """``DATA_DIR`` and the run directories of ``COMPARE_RUNS`` relative to the caller's
    directory (notebooks run in notebooks/)."""
    def absolute(value):
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            return str((Path.cwd() / value).resolve())
        return value
    params = dict(params)
    if "DATA_DIR" in params:
        params["DATA_DIR"] = absolute(params["DATA_DIR"])
    if isinstance(params.get("COMPARE_RUNS"), list):
        params["COMPARE_RUNS"] = [absolute(v) for v in params["COMPARE_RUNS"]]
    return params


def recorded_parameters(nb: Path, injected: dict) -> dict:
    """What a finished notebook is recorded with: its parameters, plus, where it reads
    data, the ``RABLE_DATA`` variable and the data directory that resolves to."""
    if "DATA_DIR" not in parameter_cell(nb):
        return injected
    source = data.resolve_data_dir(injected.get("DATA_DIR")).resolve()
    return dict(injected, RABLE_DATA=os.environ.get("RABLE_DATA"), DATA_SOURCE=str(source))


def _failure_message(nb: Path, out: Path, err: pm.PapermillExecutionError) -> str:
    cells = nbformat.read(out, as_version=4).cells if out.exists() else []
    logged = ""
    if err.cell_index < len(cells):
        logged = "".join(o.get("text", "") for o in cells[err.cell_index].get("outputs", [])
                         if o.get("output_type") == "stream")[-3000:]
    trace = ANSI.sub("", "\n".join(err.traceback))[-3000:]
    return (f"Notebook {nb.name} failed in cell {err.exec_count} (index {err.cell_index}): "
            f"{err.ename}: {err.evalue}\n"
            f"--- cell source ---\n{err.source}\n--- cell output ---\n{logged}\n"
            f"--- error ---\n{trace}\n{err.ename}: {err.evalue}\n"
            f"Executed notebook kept at {out}")


def _running_cell(out: Path) -> tuple[int | None, str]:
    """(index, source) of the cell the kernel was running in the executed notebook ``out``:
    the last code cell papermill started (it marks the cells after it ``pending``, and
    the dead one ``completed`` all the same); (None, '') when it cannot tell."""
    try:
        cells = nbformat.read(out, as_version=4).cells
    except (OSError, ValueError):
        return None, ""
    started = [i for i, c in enumerate(cells) if c.cell_type == "code"
               and c.get("metadata", {}).get("papermill", {}).get("start_time")]
    return (started[-1], cells[started[-1]].source) if started else (None, "")


def _dead_kernel_message(nb: Path, out: Path, err: Exception) -> str:
    index, source = _running_cell(out)
    where = (f"in cell index {index} of the executed notebook {out}" if index is not None
             else "before its first cell ran")
    return (f"Notebook {nb.name}: the kernel died {where} (killed — most often out of "
            f"memory; see dmesg or the kernel log {out.parent / KERNEL_LOG}).\n"
            + (f"--- cell source ---\n{source}\n" if source else "")
            + f"({type(err).__name__}: {str(err)[:300]})\nThe notebooks finished before it "
            "are kept: run again with --resume to continue from this notebook.")


def _show_notices(out: Path, log_file=None) -> None:
    """Repeat on the terminal the notices of files moved aside (``artefacts.quarantine``)
    that the kernel printed into the executed notebook ``out``."""
    try:
        cells = nbformat.read(out, as_version=4).cells
    except (OSError, ValueError):
        return
    streams = [o.get("text", "") for cell in cells for o in cell.get("outputs", [])
               if o.get("output_type") == "stream"]
    for line in "".join(streams).splitlines():
        if artefacts.QUARANTINE_NOTICE in line:
            tqdm.write(f"{out.name}: {line}", file=log_file or sys.stderr)


def _previous_log(run_dir: Path, profile: str) -> dict:
    """``run.json`` of earlier runs of this profile in ``run_dir`` (else an empty log)."""
    log = runfiles.read_run_log(run_dir, resumable=True)
    if log.get("profile") != profile:
        log = {"profile": profile, "notebooks": []}
    return dict(log, commit=config.git_commit())


def _record(run_dir: Path, log: dict, name: str, params: dict, **entry) -> None:
    """Replace ``name``'s entry in ``run.json``: ``status`` 'running' before the notebook
    starts, 'finished' only once it ended, so a killed rerun is never taken as done."""
    log["notebooks"] = [e for e in log["notebooks"] if e["notebook"] != name]
    log["notebooks"].append(dict(notebook=name, parameters=params, **entry))
    config.write_json(run_dir / runfiles.RUN_LOG, log)


def run(profile: str = "smoke", only: str | None = None, out: str | None = None,
        params: dict | None = None, kernel: str = "python3",
        notebook_dir: Path = NOTEBOOK_DIR, resume: bool = False, log_file=None) -> Path:
    """Run the selected notebooks in order; return the run directory.

    Everything is checked before the first notebook starts, and the run directory is
    locked for the duration; a failing notebook raises :class:`RunError` naming the
    notebook and cell. ``run.json`` records each notebook as running before it starts and as
    finished once it ended; with ``resume`` the
    leading notebooks already finished with the same parameters (and data source) are
    skipped. ``log_file`` (an open text file, e.g. a sweep point's ``point.log``) receives
    what the notebooks print and one line per notebook, instead of progress bars.
    """
    params = absolute_paths(dict(params or {}))
    if profile not in config.PROFILES:
        raise RunError(f"Unknown profile {profile!r}; choose one of {config.PROFILES}.")
    notebooks = select(only, list_notebooks(notebook_dir))
    if not notebooks:
        raise RunError(f"No notebooks found in {notebook_dir}.")
    run_dir = Path(out) if out else config.PROJECT_ROOT / "runs" / profile
    run_dir = (run_dir if run_dir.is_absolute() else Path.cwd() / run_dir).resolve()
    base = dict(PROFILE=profile, RUN_DIR=str(run_dir))
    injected = check_parameters(params, notebooks, base)
    try:
        with stop_on_signals(), DirLock(run_dir, "run"):
            runfiles.check_inside(run_dir)  # no link out of the run, before anything runs
            _execute(notebooks, injected, run_dir, profile, kernel, resume, log_file)
    except LockedError as err:
        raise RunError(str(err)) from None
    return run_dir


def _execute(notebooks: list[Path], injected: dict, run_dir: Path, profile: str, kernel: str,
             resume: bool, log_file=None) -> None:
    log = _previous_log(run_dir, profile)
    done = {n: e["parameters"] for n, e in runfiles.finished_notebooks(log).items()}
    skipping = resume  # once a notebook reruns, every later one reruns too (new inputs)
    for nb in tqdm(notebooks, desc=f"run [{profile}]", unit="notebook",
                   disable=log_file is not None):
        recorded = recorded_parameters(nb, injected[nb])
        target = run_dir / nb.name
        skipping = skipping and done.get(nb.name) == recorded and target.exists()
        if skipping:
            tqdm.write(f"skip {nb.name}: already finished with the same parameters", file=log_file)
            continue
        start = time.time()
        _record(run_dir, log, nb.name, recorded, status=runfiles.RUNNING,
                started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if log_file is not None:
            print(f"== {nb.name} -> {target}", file=log_file, flush=True)
        try:
            pm.execute_notebook(str(nb), str(target), parameters=injected[nb],
                                kernel_name=kernel, cwd=str(nb.parent), stdout_file=log_file,
                                stderr_file=log_file,
                                progress_bar=log_file is None and dict(desc=nb.stem, leave=False),
                                **kernel_options(run_dir))
        except pm.PapermillExecutionError as err:
            raise RunError(_failure_message(nb, target, err)) from None
        except DeadKernelError as err:
            raise RunError(_dead_kernel_message(nb, target, err)) from None
        except OSError as err:  # papermill saving the executed notebook: disk full, ...
            index, _ = _running_cell(target)
            raise RunError(f"Notebook {nb.name}"
                           + (f" (cell index {index})" if index is not None else "")
                           + f": {artefacts.os_error_line(err, 'cannot write')}") from None
        finally:
            _show_notices(target, log_file)
        _record(run_dir, log, nb.name, recorded, status=runfiles.FINISHED,
                seconds=round(time.time() - start, 1))


def main_run(args) -> int:
    """``python -m rable_nb run`` entry point."""
    params = {name: parse_value(value) for name, value in (args.p or [])}
    profile, only, out = args.profile, args.only, args.out
    if profile is None:  # the main job
        profile, only = MAIN_JOB["profile"], only or MAIN_JOB["only"]
        out = out or str(config.PROJECT_ROOT / MAIN_JOB["out"])
        params = {**MAIN_JOB["params"], **params}
    try:
        run_dir = run(profile, only, out, params, args.kernel, resume=args.resume)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"error: {str(err) or 'interrupted (Ctrl-C)'}; the kernel was shut down. Rerun "
              "with --resume to continue after the last finished notebook.", file=sys.stderr)
        return 128 + err.signum if isinstance(err, Stopped) else 130
    print(f"done: executed notebooks and artefacts in {run_dir}")
    return 0
