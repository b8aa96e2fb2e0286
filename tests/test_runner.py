"""The papermill runner: upfront validation, failure reporting, parameter injection."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from rable_nb.commands import cli
from rable_nb.rundir import runfiles
from rable_nb.batch import runner


def _notebook(path, params_src, body_src):
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    params = new_code_cell(params_src, metadata={"tags": ["parameters"]})
    nb.cells = [params, new_code_cell(body_src)]
    nbformat.write(nb, path)


@pytest.fixture
def nb_dir(tmp_path):
    d = tmp_path / "notebooks"
    d.mkdir()
    _notebook(d / "00_ok.ipynb", "PROFILE = None\nRUN_DIR = None\nQ = 0.3\nNAME = 'x'",
              "import json, pathlib\n"
              "pathlib.Path(RUN_DIR, 'seen.json').write_text(json.dumps([PROFILE, Q, NAME]))")
    _notebook(d / "01_fails.ipynb", "PROFILE = None\nRUN_DIR = None",
              "print('about to fail')\nraise ValueError('boom in the second cell')")
    return d


def test_parameters_are_injected_and_run_is_logged(nb_dir, tmp_path):
    out = runner.run("quick", "00", str(tmp_path / "r"), {"Q": 0.5, "NAME": "007"},
                     notebook_dir=nb_dir)
    assert json.loads((out / "seen.json").read_text()) == ["quick", 0.5, "007"]
    assert (out / "00_ok.ipynb").exists()
    log = json.loads((out / "run.json").read_text())
    assert log["profile"] == "quick" and log["notebooks"][0]["notebook"] == "00_ok.ipynb"


def test_failure_names_notebook_and_cell_and_shows_output(nb_dir, tmp_path):
    with pytest.raises(runner.RunError) as err:
        runner.run("smoke", None, str(tmp_path / "r"), notebook_dir=nb_dir)
    msg = str(err.value)
    assert "01_fails.ipynb failed in cell" in msg
    assert "about to fail" in msg and "boom in the second cell" in msg
    assert (tmp_path / "r" / "seen.json").exists()  # notebooks before it ran


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(profile="huge"), "Unknown profile 'huge'"),
    (dict(only="00,42"), r"Unknown notebook\(s\) \['42'\]"),
    (dict(params={"NOPE": 1}), r"Unknown parameter\(s\) \['NOPE'\]"),
    (dict(params={"Q": 1.5}), "Q=1.5 is invalid"),
])
def test_bad_requests_fail_before_anything_runs(nb_dir, tmp_path, kwargs, pattern):
    kwargs = {"profile": "smoke", **kwargs}
    with pytest.raises(runner.RunError, match=pattern):
        runner.run(out=str(tmp_path / "r"), notebook_dir=nb_dir, **kwargs)
    assert not (tmp_path / "r").exists()


def test_parse_value():
    assert runner.parse_value("0.3") == 0.3
    assert runner.parse_value("uniform") == "uniform"
    assert runner.parse_value("['able', 'rable']") == ["able", "rable"]
    assert runner.parse_value("None") is None


@pytest.mark.notebook  # starts the CLI in a process
def test_cli_exits_non_zero_with_one_clear_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rable_nb", "run", "--only", "99",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: Unknown notebook(s) ['99']")


@pytest.mark.notebook  # starts kernels
def test_resume_skips_finished_notebooks_only(nb_dir, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(runner.RunError):
        runner.run("smoke", None, str(out), notebook_dir=nb_dir)
    stamp = (out / "seen.json").stat().st_mtime_ns
    with pytest.raises(runner.RunError, match="01_fails"):
        runner.run("smoke", None, str(out), notebook_dir=nb_dir, resume=True)
    assert (out / "seen.json").stat().st_mtime_ns == stamp  # 00 was not executed again
    log = json.loads((out / "run.json").read_text())
    assert list(runfiles.finished_notebooks(log)) == ["00_ok.ipynb"]  # kept from run 1
    assert [e.get("status") for e in log["notebooks"]] == ["finished", "running"]  # 01 failed
    runner.run("smoke", "00", str(out), {"Q": 0.6}, notebook_dir=nb_dir, resume=True)
    assert json.loads((out / "seen.json").read_text())[1] == 0.6  # new parameters: rerun
    assert list(runfiles.finished_notebooks(runfiles.read_run_log(out))) == ["00_ok.ipynb"]


def test_run_without_a_profile_is_the_main_job_and_smoke_is_one_flag_away(monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run", lambda profile, only, out, params, *a, **k:
                        calls.append((profile, only, out, params)) or Path(out or "runs"))
    parser = cli.build_parser()
    assert runner.main_run(parser.parse_args(["run"])) == 0
    assert runner.main_run(parser.parse_args(["run", "-p", "METHODS", "['able']"])) == 0
    assert runner.main_run(parser.parse_args(["run", "--profile", "smoke"])) == 0
    (p0, only0, out0, params0), (_, _, _, params1), smoke = calls
    assert (p0, only0) == ("quick", runner.MAIN_JOB["only"]) and out0.endswith("runs/main")
    assert params0 == runner.MAIN_JOB["params"] and params1["METHODS"] == ["able"]
    assert smoke == ("smoke", None, None, {})
