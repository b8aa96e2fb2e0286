"""Shared fixtures: a CIFAR-10 source (the shared copy, else a generated one) and
papermill execution of notebooks into temporary run directories.

``scripts/test.sh`` runs the suite in two pytest-xdist workers: the session fixtures that cost
a kernel or a decoding (notebook 01's run directory, the decoded CIFAR-10 cache entry) are
made once per test run, by the first worker that needs them, and read by the others."""
from __future__ import annotations

import fcntl
from pathlib import Path

import pytest

from rable_nb.data import images as data


def _made_once(request, name: str, make) -> Path:
    """A folder where ``make(folder)`` has run once for this test run: under pytest-xdist the
    first worker to get here makes it while the others wait on a lock, then all reuse it;
    without xdist, a fresh temporary folder as before. Tests read it or copy it."""
    factory = request.getfixturevalue("tmp_path_factory")
    if not hasattr(request.config, "workerinput"):  # not an xdist worker
        folder = factory.mktemp(name)
        make(folder)
        return folder
    shared = factory.getbasetemp().parent  # one per run, above the workers' own folders
    folder, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            folder.mkdir(exist_ok=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def made_once(request):
    """``made_once(name, make)``: the folder where ``make(folder)`` ran once for the test run
    (for all xdist workers), for a module's costly fixture that tests only read."""
    return lambda name, make: _made_once(request, name, make)


@pytest.fixture(scope="session")
def cifar_dir(request) -> Path:
    """The real CIFAR-10 copy in ../shared when present, else a small generated one."""
    if data.SHARED_COPY.is_dir():
        if hasattr(request.config, "workerinput"):  # decoded into the cache by one worker
            _made_once(request, "cifar-decoded", lambda _: data.load_cifar10(data.SHARED_COPY))
        return data.SHARED_COPY
    return _made_once(request, "fake-cifar",
                      lambda folder: data.write_fake_cifar(folder, n_train=300, n_test=20))


@pytest.fixture(scope="session")
def small_long_tail(cifar_dir):
    """(cifar, dataset dict, images): 131 training images in a 10-class long tail with
    uniform candidate sets (q = 0.3)."""
    import numpy as np

    from rable_nb.parts import candidates
    from rable_nb.data import longtail
    cifar = data.load_cifar10(cifar_dir)
    idx = longtail.long_tail_indices(cifar.train_y, [40, 30, 20, 15, 10, 8, 6, 5, 4, 3], 0)
    labels = cifar.train_y[idx]
    ds = dict(indices=idx, labels=labels,
              candidates=candidates.uniform_candidates(labels, 10, 0.3, 0),
              class_counts=np.bincount(labels, minlength=10))
    return cifar, ds, cifar.train_x[idx]


@pytest.fixture(scope="session")
def run_notebooks(cifar_dir):
    """Callable: execute notebooks (``only='01,04'``) in smoke into ``out``; returns the dir."""
    from rable_nb.batch import runner  # papermill & co: not on a bare torch image (campaign's tests)

    def _run(only: str, out: Path, **params) -> Path:
        params.setdefault("DATA_DIR", str(cifar_dir))
        selected = runner.select(only, runner.list_notebooks())
        known = set().union(*(runner.notebook_parameters(nb) for nb in selected))
        return runner.run("smoke", only, str(out), {k: v for k, v in params.items() if k in known})
    return _run


@pytest.fixture(scope="session")
def smoke_dataset_run(run_notebooks, request) -> Path:
    """A run directory where notebook 01 has written dataset.npz (smoke profile); tests read
    it or copy it (one for all xdist workers)."""
    return _made_once(request, "run-01", lambda folder: run_notebooks("01", folder))


@pytest.fixture(scope="session")
def trained_run(cifar_dir, tmp_path_factory) -> Path:
    """A run directory with two tiny checkpoints (as notebook 04 writes them), each trained
    for a few steps on 100 clean images per class so their predictions differ and vary."""
    import torch
    import torch.nn.functional as F

    from rable_nb import config
    from rable_nb.engine import evaluation, networks
    from rable_nb.data import longtail

    cifar = data.load_cifar10(cifar_dir)
    idx = longtail.long_tail_indices(cifar.train_y, [100] * 10, seed=0)
    x = networks.normalize(torch.as_tensor(cifar.train_x[idx]))
    y = torch.as_tensor(cifar.train_y[idx])
    run = tmp_path_factory.mktemp("trained-run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only add overhead on a busy CPU
    for seed, method in enumerate(("able", "able+records")):
        torch.manual_seed(seed)
        net = networks.PLLNet("tiny_cnn")
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for step in range(30 + 30 * seed):
            batch = torch.randint(len(x), (64,))
            loss = F.cross_entropy(net(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        extra = {"logit_prior": torch.log(torch.full((10,), 0.1))} if seed else None
        networks.save_model(net, run / "checkpoints" / f"{method}.safetensors",
                            meta={"method": method}, extra=extra)
        # what marks a model as the run's current result (runfiles.current_metrics)
        test = longtail.balanced_subset(cifar.test_y, 20)
        acc = float((evaluation.predict(net, cifar.test_x[test]).numpy() == cifar.test_y[test])
                    .mean())
        config.write_json(run / f"metrics-{method}.json", {
            "method": method, "params": {"METHODS": ["able", "able+records"]},
            "accuracy": {"last": acc, "best": acc}})
    torch.set_num_threads(threads)
    # the resumable training state notebook 04 keeps beside the model is not a model
    (run / "checkpoints" / "able-state.safetensors").write_bytes(b"not a model")
    return run


# Run first under xdist: the suite's one serial sweep (the other sweep tests, on either worker,
# then find it made: test_sweep_executors.serial_out) and the longest test.
LONGEST_FIRST = ("test_the_serial_sweep_records_every_point_and_goes_on_after_a_failure",
                 "test_08_09_run_their_smoke_sweeps_and_draw_their_figures")

# Fixtures that execute notebooks: a test using one starts kernels, so it is a `notebook`
# test (left out of `scripts/test.sh --fast`) whether or not it says so itself.
KERNEL_FIXTURES = {"run_notebooks", "smoke_dataset_run"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if KERNEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.notebook)
    if hasattr(config, "workerinput"):
        # xdist hands tests out one by one in this order (scripts/test.sh: --maxschedchunk 1):
        # the longest first, so that the short ones fill the gaps and no long test starts last,
        # alone on one worker (every worker sorts alike: the same collection for all)
        items.sort(key=lambda item: (
            LONGEST_FIRST.index(item.originalname) if item.originalname in LONGEST_FIRST
            else len(LONGEST_FIRST) + (item.get_closest_marker("notebook") is None)))
