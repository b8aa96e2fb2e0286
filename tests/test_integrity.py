"""Data integrity: one data source per run directory, one writer per directory,
only current results, every parameter validated before anything runs, and a kernel that
stops with the runner."""
import json
import os
import signal
import subprocess
import sys
import time

import nbformat
import numpy as np
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from rable_nb.commands import cli, figures
from rable_nb import config
from rable_nb.data import images as data
from rable_nb.stages import s05_predictions as predictions, s08_sweep as sweep, s04_training as training
from rable_nb.rundir import runfiles
from rable_nb.batch import runner


def _notebook(path, params_src, body_src):
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    nb.cells = [new_code_cell(params_src, metadata={"tags": ["parameters"]}),
                new_code_cell(body_src)]
    nbformat.write(nb, path)


# -- 1. one identity for a run's data ----------------------------------------------------------
@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """Another data source than the default one: 30 + 10 generated images per class."""
    return data.write_fake_cifar(tmp_path_factory.mktemp("small"), n_train=30, n_test=10, seed=1)


@pytest.mark.notebook
def test_a_later_stage_refuses_other_data_than_notebook_01_used(small_folder, cifar_dir,
                                                                 tmp_path):
    out = tmp_path / "R"  # the reproduction: 01 on a small folder, 04 on the default
    runner.run("smoke", "01", str(out), {"DATA_DIR": str(small_folder), "N_MAX": 30,
                                         "IMBALANCE_FACTOR": 0.1})
    with pytest.raises(runner.RunError, match="(?s)DataSourceError.*was made from other data"):
        runner.run("smoke", "04", str(out), {"DATA_DIR": str(cifar_dir),
                                             "METHODS": ["supervised"], "BATCH_SIZE": 16})
    assert not (out / "metrics-supervised.json").exists()
    log = json.loads((out / "run.json").read_text())
    assert list(runfiles.finished_notebooks(log)) == ["01_dataset_imbalance.ipynb"]  # 04 failed
    recorded = log["notebooks"][0]["parameters"]
    assert recorded["DATA_SOURCE"] == str(small_folder.resolve()) and "RABLE_DATA" in recorded
    meta = json.loads((out / "dataset.json").read_text())["data_identity"]
    assert meta["data_dir"] == str(small_folder.resolve()) and meta["train_images"] == 300
    with np.load(out / "dataset.npz") as z:  # the arrays carry the fingerprint too
        assert json.loads(str(z["meta"]))["data_identity"] == meta
    figure = (out / "fig-distribution.png").stat().st_mtime_ns
    with pytest.raises(runner.RunError, match="01_dataset_imbalance.*was made from other data"):
        runner.run("smoke", "01,04", str(out), {"DATA_DIR": str(cifar_dir)}, resume=True)
    assert (out / "fig-distribution.png").stat().st_mtime_ns == figure  # refused up front


def _identity(sha, n=10):
    return dict(data_dir="/d", layout="folders", train_images=n, test_images=n,
                classes=list(data.CLASSES), sha256=sha)


def _tiny_ds(sha):
    labels = np.arange(10)
    return dict(indices=labels, labels=labels, candidates=np.eye(10, dtype=bool),
                class_counts=np.ones(10, np.int64), data_identity=_identity(sha))


def test_notebook_01_refuses_to_rewrite_a_run_directory_from_other_data(tmp_path):
    runfiles.save_dataset(tmp_path, _tiny_ds("aaa"), {"SEED": 0})
    runfiles.save_dataset(tmp_path, _tiny_ds("aaa"), {"SEED": 1})  # same data, new parameters
    with pytest.raises(runfiles.DataSourceError, match="made from other data"):
        runfiles.save_dataset(tmp_path, _tiny_ds("bbb"), {"SEED": 0})
    assert runfiles.load_dataset(tmp_path)["params"]["SEED"] == 1  # untouched


def test_stages_compare_content_not_paths(tmp_path):
    runfiles.save_dataset(tmp_path, _tiny_ds("aaa"), {})
    moved = data.Cifar(*[np.zeros(1)] * 4, data.CLASSES, "elsewhere",
                       dict(_identity("aaa"), data_dir="/moved/copy"))
    runfiles.check_source(tmp_path, moved)  # a moved copy of the same data is accepted
    other = data.Cifar(*[np.zeros(1)] * 4, data.CLASSES, "x", _identity("bbb"))
    with pytest.raises(runfiles.DataSourceError, match="sha256 bbb"):
        runfiles.check_source(tmp_path, other)


def test_resume_reruns_a_notebook_when_the_data_source_changed(tmp_path, monkeypatch):
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "01_data.ipynb", "PROFILE = None\nRUN_DIR = None\nDATA_DIR = None",
              "import os, pathlib\n"
              "with open(pathlib.Path(RUN_DIR, 'runs.txt'), 'a') as f:\n"
              "    f.write(os.environ.get('RABLE_DATA', '') + '\\n')")
    monkeypatch.setenv("RABLE_DATA", str(tmp_path / "A"))
    runner.run("smoke", None, str(tmp_path / "r"), notebook_dir=nbs)
    runner.run("smoke", None, str(tmp_path / "r"), notebook_dir=nbs, resume=True)  # skipped
    monkeypatch.setenv("RABLE_DATA", str(tmp_path / "B"))
    runner.run("smoke", None, str(tmp_path / "r"), notebook_dir=nbs, resume=True)  # reruns
    runs = (tmp_path / "r" / "runs.txt").read_text().split()
    assert runs == [str(tmp_path / "A"), str(tmp_path / "B")]


# -- 4. one writer per directory ---------------------------------------------------------------
HOLD = ("import sys, time\nfrom rable_nb.rundir.locks import DirLock\n"
        "DirLock(sys.argv[1], 'run').acquire()\nprint('held', flush=True)\ntime.sleep(120)")


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    from rable_nb.rundir import locks
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runner.RunError, match=rf"in use by another run: pid {holder.pid} "):
            runner.run("smoke", "00", str(out))
        assert not (out / "run.json").exists() and not (out / "fig-cost.png").exists()
        grid = tmp_path / "grid.yaml"
        grid.write_text("notebooks: '01'\ngrid: {Q: [0.1]}\n")
        assert cli.main(["sweep", str(grid), "--out", str(out)]) == 1
        assert "in use by another run" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    lock_file = out / locks.LOCK_FILE
    assert json.loads(lock_file.read_text())["pid"] == holder.pid  # left behind by kill -9
    with locks.DirLock(out, "run"):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(locks.LockedError, match=f"pid {os.getpid()}"):
            locks.DirLock(out, "sweep").acquire()  # also within one process
    assert f"taking over the stale lock of {out} left by pid {holder.pid}" in \
        capsys.readouterr().err
    assert not lock_file.exists()  # released


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    from rable_nb.rundir import locks
    (tmp_path / locks.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(locks.LockedError, match="host elsewhere.*cannot be checked"):
        locks.DirLock(tmp_path).acquire()


# -- 5. no stale per-method results ------------------------------------------------------------
def _plant(run, method, methods, epochs=2, accuracy=0.5, dataset_params=None):
    """metrics + checkpoint of ``method`` as notebook 04 leaves them (newest last)."""
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints" / f"{method}.safetensors").write_bytes(b"model")
    params = {"METHODS": methods, "EPOCHS": epochs, "train": {"method": method},
              "dataset": dataset_params or {}}
    (run / f"metrics-{method}.json").write_text(json.dumps(
        {"method": method, "params": params, "accuracy": {"last": accuracy}}))
    time.sleep(0.01)  # distinct modification times


def test_only_results_of_the_current_parameters_are_used(tmp_path):
    run = tmp_path / "run"
    _plant(run, "supervised", ["able", "supervised"])
    _plant(run, "proden", ["proden"], epochs=5)
    _plant(run, "able", ["able", "rable"], accuracy=0.7)  # latest run: METHODS changed
    (run / "checkpoints" / ".able.tmp.safetensors").write_bytes(b"half")  # killed mid-save
    (run / "checkpoints" / "rable.safetensors").write_bytes(b"no metrics")  # killed before
    assert list(predictions.find_models(run)) == ["able"]
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for \['supervised'\]"):
        predictions.find_models(run, ["supervised"])
    assert sweep.read_metrics(run) == {"able/last": 0.7}  # no proden/last from a leftover
    assert list(runfiles.current_metrics(run)) == ["able"]
    for name in ("fig-grid-able.png", "fig-grid-supervised.png", "fig-curves.png"):
        (run / name).write_bytes(b"png")
    (run / "run.json").write_text(json.dumps({"profile": "smoke", "notebooks": []}))
    copied = figures.copy_figures(run, tmp_path / "figures", force=True)
    assert sorted(p.name for p in copied) == ["fig-curves.png", "fig-grid-able.png"]
    prov = json.loads((tmp_path / "figures" / "provenance.json").read_text())
    assert list(prov["fig-grid-able.png"]["parameters"]["training"]) == ["able"]


def test_a_model_trained_on_synthetic_images_does_not_hide_the_others(tmp_path):
    """rable's metrics record its top-up (GENERATOR, GEN_LABELS, synthetic): that must not
    make the run's other methods look stale, and a remade top-up makes rable stale."""
    settings = {"generator": "pixel", "cond_labels": "pseudo", "TARGET_PER_CLASS": 16}
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "settings.json").write_text(json.dumps(settings))
    _plant(tmp_path, "able", ["able", "rable"])
    _plant(tmp_path, "rable", ["able", "rable"])
    path = tmp_path / "metrics-rable.json"
    m = json.loads(path.read_text())
    m["params"].update(GENERATOR="pixel", GEN_LABELS="pseudo", synthetic=settings)
    path.write_text(json.dumps(m))
    assert sorted(runfiles.current_metrics(tmp_path)) == ["able", "rable"]
    assert sorted(predictions.find_models(tmp_path)) == ["able", "rable"]
    (tmp_path / "synthetic" / "settings.json").write_text(json.dumps(dict(settings, generator="copy")))
    assert sorted(runfiles.current_metrics(tmp_path)) == ["able"]  # notebook 03 remade it


def test_a_new_dataset_makes_every_model_stale(tmp_path):
    _plant(tmp_path, "able", ["able"], dataset_params={"IMBALANCE_FACTOR": 0.1})
    (tmp_path / "dataset.json").write_text(json.dumps({"IMBALANCE_FACTOR": 0.1}))
    assert list(predictions.find_models(tmp_path)) == ["able"]
    (tmp_path / "dataset.json").write_text(json.dumps({"IMBALANCE_FACTOR": 0.01}))  # 01 reran
    with pytest.raises(FileNotFoundError, match="run notebook 04_training first"):
        predictions.find_models(tmp_path)
    assert runfiles.current_metrics(tmp_path) == {}


def test_a_grid_drawn_before_its_model_was_retrained_is_left_out(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"profile": "smoke", "notebooks": []}))
    (tmp_path / "fig-grid-able.png").write_bytes(b"png")
    time.sleep(0.01)
    _plant(tmp_path, "able", ["able"])
    with pytest.raises(figures.FigureError, match="no current"):
        figures.copy_figures(tmp_path, tmp_path / "figures", force=True)


# -- 6. everything validated before anything runs ---------------------------------------------
NOTEBOOKS = runner.list_notebooks()


def _resolved(nb, tmp_path, **override):
    stage = config.NOTEBOOK_STAGES[nb.name[:2]]
    params = {**runner.notebook_parameters(nb), "PROFILE": "smoke", "RUN_DIR": str(tmp_path),
              **override}
    return config.resolve(stage, create=False, **params)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_every_parameter_of_every_notebook_is_validated(nb, tmp_path):
    _resolved(nb, tmp_path)  # the notebook's own defaults pass
    for name in runner.notebook_parameters(nb):
        with pytest.raises(ValueError, match=f"{name}=.* is invalid"):
            _resolved(nb, tmp_path, **{name: {"not": "valid"}})


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_booleans_are_refused_where_numbers_are_expected(nb, tmp_path):
    resolved = _resolved(nb, tmp_path)
    numeric = [k for k in runner.notebook_parameters(nb) if config.is_number(resolved.get(k))]
    for name in numeric:
        with pytest.raises(ValueError, match=f"{name}=True is invalid"):
            _resolved(nb, tmp_path, **{name: True})


@pytest.mark.parametrize("only, params, pattern", [
    ("01", {"IMBALANCE_FACTOR": True}, "IMBALANCE_FACTOR=True is invalid"),
    ("01,04", {"METHODS": ["able", "pico"]}, r"METHODS=\['able', 'pico'\] is invalid"),
    ("04", {"ARCH": "vgg"}, "ARCH='vgg' is invalid"),
    ("02,03", {"TARGET_PER_CLASS": 0}, "TARGET_PER_CLASS=0 is invalid"),
    ("03", {"SD_SCHEDULER": "fast"}, "SD_SCHEDULER='fast' is invalid"),
    ("05", {"METHODS": "able"}, "METHODS='able' is invalid"),
    ("01,04", {"N_MAX": 30, "IMBALANCE_FACTOR": 0.1, "BATCH_SIZE": 200},
     "04_training.ipynb: BATCH_SIZE=200 is invalid: .*at most the 118 training images"),
    ("01", {"N_MAX": 30, "IMBALANCE_FACTOR": 0.01}, "leaves a class with no image"),
    ("07", {"MAX_UPLOAD_MB": 1000}, "MAX_UPLOAD_MB=1000 is invalid"),
])
def test_the_runner_refuses_bad_values_before_anything_runs(tmp_path, only, params, pattern):
    with pytest.raises(runner.RunError, match=pattern):
        runner.run("smoke", only, str(tmp_path / "r"), params)
    assert not (tmp_path / "r").exists()


def test_batch_size_is_checked_against_the_recorded_dataset(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"num_images": 40}))
    with pytest.raises(runner.RunError, match="BATCH_SIZE=64 is invalid.*40 training images"):
        runner.run("smoke", "04", str(tmp_path), {"BATCH_SIZE": 64})


def test_a_method_that_cannot_run_fails_the_notebook_unless_skipping_is_allowed(
        smoke_dataset_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(smoke_dataset_run, run)
    with pytest.raises(runner.RunError, match="METHODS has 'rable', which cannot run"):
        runner.run("smoke", "04", str(run), {"METHODS": ["able", "rable"]})
    log = json.loads((run / "run.json").read_text())
    assert "04_training.ipynb" not in runfiles.finished_notebooks(log)
    assert not (run / "metrics-able.json").exists()  # refused before any training
    assert training.runnable_methods(["able", "rable"], run, allow_skip=True)[0] == ["able"]


# -- 7. the kernel stops with the runner -------------------------------------------------------
DRIVE = ("import signal, sys\nfrom pathlib import Path\nfrom rable_nb.batch import runner\n"
         "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # even if inherited ignored
         "runner.run('smoke', None, sys.argv[1], notebook_dir=Path(sys.argv[2]), "
         "kernel='wrapped')")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.mark.notebook  # starts the runner and its kernel in a process
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killing_the_runner_stops_its_kernel_and_releases_the_lock(tmp_path, sig):
    # A kernel behind a wrapper process (as conda-run or module-loading kernels are) cannot
    # notice that the runner died; only the runner's own shutdown stops it.
    spec = tmp_path / "jupyter" / "kernels" / "wrapped"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": ["/bin/sh", "-c", f"{sys.executable} -m ipykernel_launcher -f {{connection_file}}"
                 "; true"], "display_name": "wrapped", "language": "python"}))
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "00_sleep.ipynb", "PROFILE = None\nRUN_DIR = None",
              "import os, pathlib, time\n"
              "pathlib.Path(RUN_DIR, 'kernel.pid').write_text(str(os.getpid()))\ntime.sleep(120)")
    out = tmp_path / "out"
    env = dict(os.environ, JUPYTER_PATH=str(tmp_path / "jupyter"))
    proc = subprocess.Popen([sys.executable, "-c", DRIVE, str(out), str(nbs)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kernel = None
    try:
        for _ in range(600):
            if (out / "kernel.pid").exists() and (out / "kernel.pid").read_text():
                kernel = int((out / "kernel.pid").read_text())
                break
            time.sleep(0.1)
        assert kernel and _alive(kernel), proc.stderr.read() if proc.poll() is not None else ""
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert not _alive(kernel), "the kernel outlived the runner"
        assert not (out / ".rable_nb.lock").exists()
        assert proc.returncode != 0
    finally:
        proc.kill()
        if kernel and _alive(kernel):
            os.kill(kernel, signal.SIGKILL)
