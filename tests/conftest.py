"""Shared fixtures: a CIFAR-10 source (the shared copy, else a generated one) and
papermill execution of notebooks into temporary run directories."""
from __future__ import annotations

from pathlib import Path

import pytest

from rable_nb import data, runner


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    """The real CIFAR-10 copy in ../shared when present, else a small generated one."""
    if data.SHARED_COPY.is_dir():
        return data.SHARED_COPY
    return data.write_fake_cifar(tmp_path_factory.mktemp("fake-cifar"), n_train=300, n_test=20)


@pytest.fixture(scope="session")
def run_notebooks(cifar_dir):
    """Callable: execute notebooks (``only='01,04'``) in smoke into ``out``; returns the dir."""
    def _run(only: str, out: Path, **params) -> Path:
        params.setdefault("DATA_DIR", str(cifar_dir))
        selected = runner.select(only, runner.list_notebooks())
        known = set().union(*(runner.parameter_cell(nb) for nb in selected))
        return runner.run("smoke", only, str(out), {k: v for k, v in params.items() if k in known})
    return _run


@pytest.fixture(scope="session")
def smoke_dataset_run(run_notebooks, tmp_path_factory) -> Path:
    """A run directory where notebook 01 has written dataset.npz (smoke profile)."""
    return run_notebooks("01", tmp_path_factory.mktemp("run-01"))
