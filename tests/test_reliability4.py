"""Reliability round 4 (issue #36): paths stay inside the run directory, records tell the
truth, contents are checked, the CLI prints one line instead of a traceback, fix commands
work as printed, and the smaller findings.

Each test builds its files by hand or with a few-step fit; kernels start only where a
notebook's own behaviour is the point (marked ``notebook``)."""
import errno
import json
import shlex
import shutil
import signal
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from PIL import Image

from rable_nb.rundir import artefacts, runfiles
from rable_nb.commands import cli, report
from rable_nb import config
from rable_nb.data import images as data
from rable_nb.stages import s07_demo as demo, s05_predictions as predictions, s03_rebalance as rebalance, s08_sweep as sweep, s04_training as training
from rable_nb.engine import engine, networks
from rable_nb.batch import runner
from rable_nb.generators import topup as topup_writer

from test_reliability import topup  # noqa: F401 - the fixture: a complete 2 + 1 top-up
from test_training import tiny_data


def _png(path: Path, value: int = 7, side: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(path)
    return path


# -- 1. one rule for paths: resolved, links included, inside the run directory -------------
def test_a_class_folder_linked_outside_is_refused_and_nothing_there_is_deleted(topup, tmp_path):
    photos = tmp_path / "photos"
    photo = _png(photos / "holiday.png")
    (topup / "synthetic" / "bird").symlink_to(photos, target_is_directory=True)
    settings = dict(generator="copy", cond_labels="pseudo", plan=[2, 1, 0])
    with pytest.raises(artefacts.OutsideError, match=r"synthetic class folder .*bird leads "
                                                     r"outside .*synthetic"):
        topup_writer.pending(topup, {0: 2, 1: 1, 2: 0}, data.CLASSES, settings)
    assert photo.exists()  # the user's photo is still there
    (topup / "synthetic" / "bird").unlink()
    assert topup_writer.pending(topup, {0: 2, 1: 1, 2: 0}, data.CLASSES, settings) == 0


def test_a_sample_linked_outside_is_not_trained_on(topup, tmp_path):
    sample = topup / "synthetic" / "airplane" / "airplane_00001.png"
    sample.unlink()
    sample.symlink_to(_png(tmp_path / "elsewhere.png"))
    with pytest.raises(runfiles.ManifestError, match=r"line 2 .*airplane_00001\.png leads "
                                                     r"outside"):
        runfiles.load_synthetic(topup, True, 3)


def test_a_compared_run_whose_synthetic_folder_is_a_link_is_refused(topup, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "synthetic").symlink_to(topup / "synthetic", target_is_directory=True)
    with pytest.raises(artefacts.OutsideError, match="the synthetic folder .* leads outside"):
        rebalance.other_samples([str(other)], (4, 4, 3))
    assert len(rebalance.other_samples([str(topup)], (4, 4, 3))["copy"][1]) == 3


def test_feedback_and_captions_are_read_and_written_only_inside_the_run(tmp_path):
    run = tmp_path / "run"
    outside = _png(tmp_path / "secret.png", side=32)
    entry = demo.append_feedback(run, np.zeros((32, 32, 3), np.uint8), "ab" * 32, [1],
                                 data.CLASSES)
    assert len(demo.load_feedback(run)["images"]) == 1
    lines = (run / demo.FEEDBACK_FILE).read_text()
    (run / demo.FEEDBACK_FILE).write_text(lines + json.dumps(
        dict(entry, sha256="cd" * 32, image=str(outside))) + "\n")
    fb = demo.load_feedback(run)   # the outside line is refused, named, and not loaded
    assert len(fb["images"]) == 1 and len(fb["refused"]) == 1
    assert "line 2: foreign" in fb["refused"][0]
    (run / "feedback" / f"{'cd' * 32}.png").symlink_to(outside)
    (run / demo.FEEDBACK_FILE).write_text(lines + json.dumps(
        dict(entry, sha256="cd" * 32, image=f"feedback/{'cd' * 32}.png")) + "\n")
    fb = demo.load_feedback(run)   # a link out of the run's feedback folder: refused too
    assert len(fb["images"]) == 1 and "leads outside" in fb["refused"][0]
    (run / "feedback").rename(run / "fb")
    (run / "feedback").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(artefacts.OutsideError, match="feedback image"):
        demo.append_feedback(run, np.ones((32, 32, 3), np.uint8), "ef" * 32, [1], data.CLASSES)
    assert not (tmp_path / ("ef" * 32 + ".png")).exists()
    (tmp_path / "captions.jsonl").write_text('{"index": 0, "label": 0, "caption": "x"}\n')
    (run / runfiles.CAPTIONS).symlink_to(tmp_path / "captions.jsonl")
    with pytest.raises(artefacts.OutsideError, match="captions file"):
        runfiles.load_captions(run)


def test_the_runner_refuses_a_run_directory_with_a_link_out_before_anything_runs(tmp_path,
                                                                                monkeypatch):
    from test_integrity import _notebook
    nbs, out, elsewhere = tmp_path / "nbs", tmp_path / "out", tmp_path / "elsewhere"
    nbs.mkdir()
    elsewhere.mkdir()
    _notebook(nbs / "00_a.ipynb", "PROFILE = None\nRUN_DIR = None", "print('x')")
    (out / "generator").mkdir(parents=True)
    (out / "generator" / "gan.safetensors").symlink_to(elsewhere / "weights.safetensors")
    ran = []
    monkeypatch.setattr(runner.pm, "execute_notebook", lambda nb, target, **kw: ran.append(nb))
    with pytest.raises(artefacts.OutsideError, match=r"gan.safetensors in generator of the run "
                                                     r"directory .* leads outside"):
        runner.run("smoke", None, str(out), notebook_dir=nbs)
    assert not ran and not (out / "run.json").exists()
    (out / "generator" / "gan.safetensors").unlink()
    (out / "linked-run").symlink_to(out, target_is_directory=True)  # inside: allowed
    runner.run("smoke", None, str(out), notebook_dir=nbs)
    assert len(ran) == 1


# -- 3. records that tell the truth: running before a notebook starts, finished after -----
def test_a_killed_rerun_is_never_taken_as_finished(tmp_path, monkeypatch, capsys):
    from test_integrity import _notebook
    nbs, out = tmp_path / "nbs", tmp_path / "out"
    nbs.mkdir()
    for name in ("00_a", "04_train"):
        _notebook(nbs / f"{name}.ipynb", "PROFILE = None\nRUN_DIR = None", "print('x')")
    killed = set()

    def execute(nb, target, **kw):  # a kernel-free stand-in for papermill
        if Path(nb).stem in killed:
            raise KeyboardInterrupt("stopped by SIGTERM")  # the rerun is killed mid-way
        Path(target).write_text(Path(nb).read_text())
    monkeypatch.setattr(runner.pm, "execute_notebook", execute)
    runner.run("smoke", None, str(out), notebook_dir=nbs)
    assert set(runfiles.finished_notebooks(runfiles.read_run_log(out))) == {
        "00_a.ipynb", "04_train.ipynb"}
    killed.add("04_train")
    with pytest.raises(KeyboardInterrupt):
        runner.run("smoke", "04", str(out), notebook_dir=nbs)
    log = runfiles.read_run_log(out)
    assert [e.get("status") for e in log["notebooks"]] == ["finished", "running"]
    assert set(runfiles.finished_notebooks(log)) == {"00_a.ipynb"}
    assert [p.name for p in report.executed_notebooks(out)] == ["00_a.ipynb"]
    assert "left out 04_train.ipynb" in capsys.readouterr().err
    (out / "checkpoints").mkdir()
    model = out / "checkpoints" / "able.safetensors"
    model.write_bytes(b"x")
    monkeypatch.setattr(demo.predictions, "find_models", lambda run_dir: {"able": model})
    assert demo._model_time(out) is None  # the demo does not serve the killed rerun's models
    killed.clear()
    runner.run("smoke", None, str(out), notebook_dir=nbs, resume=True)
    assert "skip 00_a.ipynb" in capsys.readouterr().out
    assert set(runfiles.finished_notebooks(runfiles.read_run_log(out))) == {
        "00_a.ipynb", "04_train.ipynb"}
    assert demo._model_time(out) is not None


# -- 2. contents checked: finite tensors, model ids, finite losses, JSON of its schema -----
def test_weights_of_nan_are_named_or_moved_aside(tmp_path, capsys):
    run = tmp_path / "run"
    net = networks.PLLNet("tiny_cnn")
    with torch.no_grad():
        next(net.parameters())[0] = float("nan")  # the header is intact, the data are not
    networks.save_model(net, run / "checkpoints" / "able.safetensors")
    config.write_json(run / "metrics-able.json", {"method": "able", "params": {}})
    with pytest.raises(artefacts.DamagedFileError, match=r"able\.safetensors is damaged .*"
                                                         r"holds NaN or inf"):
        predictions.load_models(run, ["able"], "cpu")
    state = tmp_path / "state.safetensors"
    shutil.copy(run / "checkpoints" / "able.safetensors", state)
    assert artefacts.load(state, lambda p: "read", resumable=True) is None  # made again
    assert "state.safetensors is damaged" in capsys.readouterr().err
    np.savez(tmp_path / "cache.npz", ok=np.arange(3), x=np.array([1.0, np.inf]))
    with pytest.raises(artefacts.DamagedFileError, match="'x' holds NaN or inf"):
        artefacts.load(tmp_path / "cache.npz", np.load)
    np.save(tmp_path / "feature.npy", np.array([0.5, np.nan], np.float32))  # a sample
    with pytest.raises(artefacts.DamagedFileError, match="'feature.npy' holds NaN or inf"):
        artefacts.load(tmp_path / "feature.npy", runfiles.load_sample)


def test_training_stops_on_a_non_finite_loss_naming_the_steps(tmp_path):
    data_ = tiny_data(64)
    cfg = engine.TrainConfig(epochs=2, batch_size=32, lr=1e12)  # diverges within 2 epochs
    with pytest.raises(engine.NonFiniteLoss, match=r"loss term\(s\) \['loss_cls'.* non-finite "
                                                   r"\(NaN/inf\) within steps \d+-\d+ \(epoch "
                                                   r"\d\)\. Likely cause"):
        engine.train(cfg, data_, tmp_path, "cpu", progress=False)


class _Generator:
    """A stand-in backend whose weights (``model_id``) can change between calls."""
    name, batch, suffix = "fake", 4, ".png"

    def __init__(self, weights: str):
        self.weights = weights

    def model_id(self) -> str:
        return f"generator/fake.safetensors@{self.weights}"

    def generate(self, label, seeds):
        return np.zeros((len(seeds), 4, 4, 3), np.uint8), [{} for _ in seeds]


def test_a_top_up_is_not_resumed_with_other_weights_than_drew_it(tmp_path):
    settings = dict(generator="fake", cond_labels="pseudo", plan=[3, 0])
    topup_writer.top_up(tmp_path, _Generator("aaa"), {0: 1, 1: 0}, data.CLASSES, settings)
    with pytest.raises(ValueError, match=r"drawn by generator/fake.safetensors@aaa, but the "
                                         r"generator's weights are now .*@bbb"):
        topup_writer.top_up(tmp_path, _Generator("bbb"), {0: 3, 1: 0}, data.CLASSES, settings)
    stats = topup_writer.top_up(tmp_path, _Generator("aaa"), {0: 3, 1: 0}, data.CLASSES,
                                settings)
    assert stats["generated"] == 2


def test_json_of_the_wrong_shape_names_the_file_and_the_field(tmp_path, capsys):
    run = tmp_path / "run"
    config.write_json(run / "run.json", {"profile": "smoke"})  # no 'notebooks'
    with pytest.raises(artefacts.DamagedFileError, match=r"run\.json is damaged .*field "
                                                         r"'notebooks' is missing"):
        report.executed_notebooks(run)
    assert runfiles.read_run_log(run, resumable=True) == {}  # the runner: moved aside
    assert "field 'notebooks' is missing" in capsys.readouterr().err
    (run / runfiles.CAPTIONS).write_text('{"index": 0, "label": 1, "caption": "a"}\n'
                                           '{"index": 1, "caption": "b"}\n')
    with pytest.raises(artefacts.DamagedFileError, match=r"captions\.jsonl row 2 .*field "
                                                         r"'label' is missing"):
        runfiles.load_captions(run)
    config.write_json(run / "dataset.json", {"num_images": "many", "mean_candidates": 1.5})
    with pytest.raises(artefacts.DamagedFileError, match=r"dataset\.json is damaged .*field "
                                                         r"'num_images' is str"):
        runner.check_parameters({}, runner.select("04", runner.list_notebooks()),
                                dict(PROFILE="smoke", RUN_DIR=str(run)))


# -- 5. no raw traceback from the CLI: one line naming the file and what to do --------------
def test_the_cli_ends_project_and_os_errors_in_one_line(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    config.write_json(run / "run.json", {"profile": "smoke", "notebooks": "all"})
    assert cli.main(["report", "--run", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: run log ")
    assert "field 'notebooks' is str 'all', not a list" in err and "Traceback" not in err
    config.write_json(run / "run.json", {"profile": "smoke", "notebooks": []})
    full = OSError(errno.ENOSPC, "No space left on device", str(run / "run.json"))
    monkeypatch.setattr(config, "write_atomic", lambda *a, **k: (_ for _ in ()).throw(full))
    assert cli.main(["run", "--profile", "smoke", "--only", "00", "--out", str(run)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # not the bar
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith(f"error: cannot use {run / 'run.json'}: No space left on "
                                "device; the disk is full: free space")


def test_a_notebook_that_cannot_be_saved_and_files_moved_aside_are_named(tmp_path, monkeypatch,
                                                                         capsys):
    from test_integrity import _notebook
    nbs, out = tmp_path / "nbs", tmp_path / "out"
    nbs.mkdir()
    _notebook(nbs / "04_train.ipynb", "PROFILE = None\nRUN_DIR = None", "print('x')")
    notice = ("warning: training state /r/able-state.safetensors is damaged (ValueError: x); "
              f"{artefacts.QUARANTINE_NOTICE} able-state.safetensors.damaged and made again.\n")

    def execute(nb, target, **kw):  # the kernel printed a notice, then the disk filled up
        book = nbformat.read(nb, as_version=4)
        book.cells[1].outputs = [nbformat.v4.new_output("stream", name="stderr", text=notice)]
        book.cells[1].metadata["papermill"] = {"start_time": "now"}
        nbformat.write(book, target)
        raise OSError(errno.ENOSPC, "No space left on device", str(target))
    monkeypatch.setattr(runner.pm, "execute_notebook", execute)
    with pytest.raises(runner.RunError, match=r"Notebook 04_train.ipynb \(cell index 1\): "
                                              r"cannot write .*04_train.ipynb: No space left"):
        runner.run("smoke", None, str(out), notebook_dir=nbs)
    assert f"04_train.ipynb: {notice.strip()}" in capsys.readouterr().err  # on the terminal


# -- 4. recovery reachable as printed: complete fix commands; notebook 01 remakes ----------
def _printed_command(message: str) -> list[str]:
    """The ``python -m rable_nb run ...`` command a message prints, as the shell splits it."""
    start = message.index("python -m rable_nb run")
    return shlex.split(message[start:message.index(")", message.index("--out", start))])


def _main_job_run(run: Path) -> None:
    """run.json of the main job (profile quick): notebook 01 and 04 with their parameters."""
    common = dict(PROFILE="quick", RUN_DIR=str(run))
    config.write_json(run / "run.json", dict(profile="quick", notebooks=[
        dict(notebook="01_dataset_imbalance.ipynb", status="finished",
             parameters=dict(common, PARTIAL="uniform", Q=0.3, RABLE_DATA=None,
                             DATA_SOURCE="/data")),
        dict(notebook="04_training.ipynb", status="finished",
             parameters=dict(common, METHODS=["able", "rable"], EPOCHS=10))]))


def test_a_printed_fix_command_is_complete_and_passes_the_runners_checks(tmp_path,
                                                                          monkeypatch):
    run = tmp_path / "my run"  # a space: the command is quoted for the shell
    _main_job_run(run)
    (run / "dataset.npz").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(artefacts.DamagedFileError) as err:
        runfiles.load_dataset(run)
    words = _printed_command(str(err.value))
    seen = []
    monkeypatch.setattr(runner, "run", lambda profile, only, out, params, *a, **k: seen.append(
        (profile, only, out, params, runner.check_parameters(
            params, runner.select(only, runner.list_notebooks()),
            dict(PROFILE=profile, RUN_DIR=out)))) or Path(out))
    assert cli.main(words[3:]) == 0  # as pasted: no "Unknown parameter(s) ['EPOCHS', ...]"
    assert seen[0][:4] == ("quick", "01", str(run), dict(PARTIAL="uniform", Q=0.3))
    with pytest.raises(FileNotFoundError) as err:
        predictions.find_models(run)
    words = _printed_command(str(err.value))
    assert cli.main(words[3:]) == 0
    assert seen[1][3] == dict(PARTIAL="uniform", Q=0.3, METHODS=["able", "rable"], EPOCHS=10)


@pytest.mark.notebook
def test_notebook_01_remakes_a_damaged_dataset_with_the_printed_command(run_notebooks,
                                                                        tmp_path, capsys):
    run = run_notebooks("01", tmp_path / "run")
    before = runfiles.load_dataset(run)
    (run / "dataset.npz").write_bytes((run / "dataset.npz").read_bytes()[:100])
    (run / "dataset.json").write_text('{"num_images": 3')
    with pytest.raises(artefacts.DamagedFileError) as err:
        runfiles.load_dataset(run)
    assert cli.main(_printed_command(str(err.value))[3:]) == 0
    after = runfiles.load_dataset(run)
    assert all(np.array_equal(before[k], after[k]) for k in ("indices", "candidates"))
    assert "dataset.npz.damaged" in capsys.readouterr().err  # the notice, on the terminal


# -- 6. smaller: signal messages and codes, an empty top-up plan, a repeated grid point ----
@pytest.mark.parametrize("stop, code, said", [
    (KeyboardInterrupt(), 130, "error: interrupted (Ctrl-C); the kernel was shut down"),
    (runner.Stopped("stopped by SIGTERM", signal.SIGTERM), 143, "error: stopped by SIGTERM;"),
    (runner.Stopped("stopped by SIGHUP", signal.SIGHUP), 129, "error: stopped by SIGHUP;")])
def test_a_stopped_run_says_why_and_exits_with_the_documented_code(stop, code, said,
                                                                  monkeypatch, capsys):
    monkeypatch.setattr(runner, "run", lambda *a, **k: (_ for _ in ()).throw(stop))
    assert cli.main(["run", "--profile", "smoke", "--only", "00"]) == code
    assert capsys.readouterr().err.startswith(said)
    usage = (config.PROJECT_ROOT / "docs" / "usage.md").read_text()
    name = {130: "Ctrl-C", 143: "SIGTERM", 129: "SIGHUP"}[code]
    assert f"{code} ({name})" in usage


def test_an_empty_top_up_plan_is_named_not_taken_for_a_missing_notebook_03(tmp_path):
    settings = dict(generator="fake", cond_labels="pseudo", plan=[0, 0])
    assert topup_writer.top_up(tmp_path, _Generator("aaa"), {0: 0, 1: 0}, data.CLASSES,
                               settings)["generated"] == 0
    assert training.synthetic_problem("rable", tmp_path).startswith(
        "notebook 03 planned no synthetic samples")


def test_a_grid_listing_the_same_point_twice_is_refused(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("notebooks: '01'\ngrid: {SEED: [0, 1]}\npoints: [{Q: 0.3}, {Q: 0.3}]\n")
    with pytest.raises(ValueError, match=r"points 0 and 1 are the same \({'SEED': 0, 'Q': 0.3}"
                                         r"\); each point runs once"):
        sweep.load_grid(grid)
    grid.write_text("notebooks: '01'\ngrid: {SEED: [0, 1], Q: [0.3]}\n")
    assert len(sweep.points(sweep.load_grid(grid))) == 2
