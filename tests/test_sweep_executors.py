"""Sweep executors: ``--parallel K`` (spawned workers, GPUs round-robin) and ``--executor ray``
give the serial sweep's results.csv rows; Ctrl-C stops the workers and their kernels, and a
rerun finishes the grid without redoing finished points.

The grid: 3 smoke points of notebook 01; the middle point's DATA_DIR holds archives that are
not gzip files, so its notebook fails (values that break a rule are refused before the sweep
starts: tests/test_sweep.py), and the others go on. SIGTERM and SIGHUP stop a sweep as
Ctrl-C does. The serial sweep of this grid is the suite's only one (``serial_out``)."""
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import psutil
import pytest
import yaml

from rable_nb.commands import cli
from rable_nb import config
from rable_nb.stages import s08_sweep as sweep
from rable_nb.batch import sweep_executors

N_MAX = [150, 200, 250]


@pytest.fixture(scope="module")
def grid(cifar_dir, made_once) -> Path:
    """The grid file (one for all xdist workers: the rows they compare name its folders)."""
    def write(folder):
        broken = folder / "broken"  # archives that are not gzip files: notebook 01 fails
        broken.mkdir()
        for name in ("train.tar.gz", "test.tar.gz"):
            (broken / name).write_bytes(b"not a gzip file")
        points = [{"N_MAX": n} for n in N_MAX]
        points[1]["DATA_DIR"] = str(broken)
        (folder / "grid.yaml").write_text(yaml.safe_dump(dict(
            profile="smoke", notebooks="01", points=points,
            fixed={"DATA_DIR": str(cifar_dir), "PARTIAL": "uniform", "Q": 0.3})))
    return made_once("grid", write) / "grid.yaml"


def _rows(out: Path) -> pd.DataFrame:
    """results.csv without timings, run directories by name, errors without the sweep path."""
    res = pd.read_csv(out / "results.csv").drop(columns=["seconds"])
    res["run_dir"] = res["run_dir"].map(lambda p: Path(p).name)
    res["error"] = res["error"].fillna("").str.replace(str(out.resolve()), "<out>")
    return res


@pytest.fixture(scope="module")
def serial_out(grid, made_once) -> Path:
    """The suite's one serial sweep (a run directory per point): the reference every executor
    must reproduce (made once for all xdist workers)."""
    def sweep_into(out):
        assert cli.main(["sweep", str(grid), "--out", str(out)]) == 1  # one point failed
    return made_once("serial", sweep_into)


@pytest.fixture(scope="module")
def serial(serial_out) -> pd.DataFrame:
    res = _rows(serial_out)
    assert res["status"].tolist() == ["done", "failed", "done"]
    assert "not a gzip file" in res.loc[1, "error"]
    assert "01_dataset_imbalance" in res.loc[1, "error"]
    assert res["ambiguity"].iloc[[0, 2]].between(2.0, 3.4).all()  # about 9q = 2.7
    return res


def _points(out: Path) -> list[dict]:
    names = pd.read_csv(out / "results.csv")["run_dir"].map(lambda p: Path(p).name)
    return [json.loads((out / name / sweep_executors.POINT_FILE).read_text()) for name in names]


def _done(run_dir: Path) -> bool:
    return sweep._record(run_dir).get("status") == "done"


def _point_of(kernel: psutil.Process) -> Path | None:
    """The point a kernel runs: its worker writes the point's log."""
    try:
        logs = [f.path for f in kernel.parent().open_files() if f.path.endswith(sweep_executors.LOG_FILE)]
    except (psutil.Error, AttributeError):  # exited meanwhile
        return None
    return Path(logs[0]).parent if logs else None


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:  # exited meanwhile (or a zombie)
        return ""


@pytest.mark.notebook
def test_the_serial_sweep_records_every_point_and_goes_on_after_a_failure(serial_out, serial):
    """What tests/test_sweep.py's two-point sweep (a second serial sweep) checked, on this
    module's one: the failure is recorded and the next point runs (the ``serial`` fixture's
    rows: status, error, measured ambiguity); a rerun skipping finished points is
    test_interrupted_parallel_sweep_stops_its_kernels_and_resumes's rerun."""
    records = _points(serial_out)
    assert [r["status"] for r in records] == ["done", "failed", "done"]
    assert [r["params"]["N_MAX"] for r in records] == N_MAX
    assert all(r["params"]["Q"] == 0.3 for r in records)             # fixed values too
    assert [(serial_out / name / "dataset.npz").exists() for name in serial["run_dir"]] == [
        True, False, True]


@pytest.mark.parametrize("sig, code", [(signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_closed_terminal_or_ctrl_c_stops_a_sweep_as_sigterm_does(tmp_path, monkeypatch, sig,
                                                                   code):
    """SIGHUP takes SIGTERM's handler (exit 128 + 1), and Ctrl-C's KeyboardInterrupt takes the
    same way out of the sweep (runner.Stopped is a KeyboardInterrupt; exit 130): checked on the
    handler here, end to end for SIGTERM in
    test_interrupted_parallel_sweep_stops_its_kernels_and_resumes (an interrupted sweep for
    SIGHUP, then one for SIGINT, each took 50-130 s: the real SIGINT sweep is covered by the
    SIGTERM one, whose workers and kernels are stopped on the same KeyboardInterrupt path)."""
    from rable_nb.batch import runner

    def interrupted(*_, **__):
        with runner.stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.getsignal(signal.SIGTERM)
            os.kill(os.getpid(), sig)
            time.sleep(5)                     # the handler raises at the next bytecode
        raise AssertionError(f"{sig.name} did not stop the sweep")
    monkeypatch.setattr(sweep, "run_sweep", interrupted)
    grid = tmp_path / "grid.yaml"
    grid.write_text("notebooks: '01'\ngrid: {Q: [0.1]}\n")
    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM)}
    # Python's Ctrl-C handler, as in a terminal (a background job, or a test worker process,
    # may have inherited SIGINT ignored)
    ctrl_c = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli.main(["sweep", str(grid), "--out", str(tmp_path / "o")]) == code
    finally:
        signal.signal(signal.SIGINT, ctrl_c)
    assert {s: signal.getsignal(s) for s in before} == before          # restored on the way out


def test_workers_get_the_visible_gpus_round_robin(monkeypatch):
    assert sweep_executors.worker_gpus(4, ["0", "1"]) == ["0", "1", "0", "1"]
    assert sweep_executors.worker_gpus(3, ["GPU-5a1f"]) == ["GPU-5a1f"] * 3
    assert sweep_executors.worker_gpus(2, []) == [None, None]
    for env, gpus in [("3,5", ["3", "5"]), ("2,-1,4", ["2"]), ("", [])]:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env)
        assert sweep_executors.visible_gpus() == gpus
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert sweep_executors.visible_gpus() == ["0", "1", "2"]


@pytest.mark.notebook
def test_parallel_sweep_gives_the_serial_rows_and_spreads_points_over_gpus(
        grid, serial, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # two faked GPUs (notebook 01 uses none)
    out = tmp_path / "parallel"
    assert cli.main(["sweep", str(grid), "--out", str(out), "--parallel", "2"]) == 1
    pd.testing.assert_frame_equal(_rows(out), serial)
    printed, bars = capfd.readouterr()  # fd level: the workers' output too
    assert "sweep [smoke]" in bars and "failed=1, running=0" in bars  # the one bar
    for nested in ("run [smoke]", "01_dataset_imbalance:", "IPKernelApp"):  # in point.log
        assert nested not in bars + printed
    records = _points(out)
    assert {r["gpus"] for r in records} == {"0", "1"}  # both worker slots, one GPU each
    for i, name in enumerate(serial["run_dir"]):
        log = out.resolve() / name / sweep_executors.LOG_FILE
        assert f"start {name}: log {log}" in printed
        assert ("not a gzip file" if i == 1 else "average ambiguity") in log.read_text()
    assert "2 of 3 points finished" in printed


@pytest.mark.notebook
def test_ray_sweep_gives_the_serial_rows(grid, serial, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20)
    try:
        out = tmp_path / "ray"
        assert cli.main(["sweep", str(grid), "--out", str(out), "--executor", "ray"]) == 1
        assert ray.is_initialized()  # the sweep leaves a Ray it did not start running
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(_rows(out), serial)
    assert (out / _rows(out).loc[0, "run_dir"] / sweep_executors.LOG_FILE).exists()


# What a scheduler or `kill` sends (it, and Ctrl-C, used to leave the workers and their kernels
# running, so that a rerun collided with them): the one real interrupted sweep. Ctrl-C (SIGINT,
# a KeyboardInterrupt as SIGTERM's runner.Stopped is) and a closed terminal (SIGHUP, SIGTERM's
# handler) are checked on the handler, in
# test_a_closed_terminal_or_ctrl_c_stops_a_sweep_as_sigterm_does (its SIGINT case replaces
# this test's former SIGINT parameter, a second real sweep).
@pytest.mark.notebook
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143)])
def test_interrupted_parallel_sweep_stops_its_kernels_and_resumes(grid, serial, tmp_path,
                                                                  capsys, sig, code):
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "rable_nb", "sweep", str(grid), "--out", str(out),
           "--parallel", "2"]
    # SIG_DFL: Python then installs its Ctrl-C handler; a shell's background job (as CI may
    # run the suite) inherits SIGINT ignored, and the sweep then never saw the signal
    proc = subprocess.Popen(cmd, cwd=config.PROJECT_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    finished, running, deadline = [], {}, time.time() + 120
    while not (finished and running) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # wait for a finished point while another point's kernel runs
        finished = [p for p in out.glob("*/") if _done(p)]
        workers = psutil.Process(proc.pid).children(recursive=True)  # workers and kernels
        running = {k: _point_of(k) for k in workers if "ipykernel" in _cmdline(k)}
        running = {k: run for k, run in running.items() if run and not _done(run)}
    assert finished and running, "no point finished while another one ran"
    # Freeze the running kernels, so that their points cannot finish before Ctrl-C lands: the
    # sweep is surely mid-point when it is interrupted, however slow or fast the machine.
    for kernel in running:
        with suppress(psutil.NoSuchProcess):
            kernel.suspend()
    try:
        assert not any(_done(run) for run in running.values())
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
    finally:  # thawed, a kernel sees its worker gone and exits (ipykernel's parent poller)
        for kernel in running:
            with suppress(psutil.NoSuchProcess):
                kernel.resume()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"left running: {[_cmdline(p) for p in alive]}"
    res = pd.read_csv(out / "results.csv")
    names = [Path(d).name for d in res["run_dir"]]
    for run in finished:
        assert res["status"][names.index(run.name)] == "done"
    stamps = {run: (run / "dataset.npz").stat().st_mtime_ns for run in finished}

    assert cli.main(cmd[3:]) == 1  # the rerun: the same command, in this process
    printed = capsys.readouterr().out
    for run, stamp in stamps.items():
        assert f"skip {run.name}: finished" in printed
        assert (run / "dataset.npz").stat().st_mtime_ns == stamp  # not run again
    pd.testing.assert_frame_equal(_rows(out), serial)


def test_stopping_a_worker_that_exited_meanwhile_is_quiet():
    """Ctrl-C races the workers: one may exit between the liveness check and the signal (the
    sweep used to die of ProcessLookupError then, with exit code 1 instead of 130)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # exited and reaped: its pid names no process now
    joined = []
    worker = SimpleNamespace(pid=gone.pid, is_alive=lambda: True, join=joined.append)
    sweep_executors._stop([worker])  # SIGTERM, then SIGKILL: both find no process
    assert len(joined) == 2


@pytest.mark.parametrize("args, pattern", [
    (["--parallel", "0"], "--parallel 0 is invalid"),
    (["--executor", "slurm"], "--executor 'slurm' is not one of"),
    (["--gpus-per-point", "0.5"], "are for --executor ray"),
    (["--executor", "ray", "--parallel", "2"], "--parallel is for the local executor"),
    (["--executor", "ray", "--gpus-per-point", "-1"], "--gpus-per-point -1.0 is invalid"),
])
def test_bad_executor_options_fail_before_anything_runs(grid, tmp_path, args, pattern, capsys):
    assert cli.main(["sweep", str(grid), "--out", str(tmp_path / "o"), *args]) == 1
    assert pattern in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
