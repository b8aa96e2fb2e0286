"""Nothing is read back to the host inside an epoch, for every method name.

Each method trains four short epochs (both step variants of CORR, SoLar and +mixup, a SoLar
queue that fills up, SoLar's stage change) under a guard that records every read of tensor
data by the host: a dispatch mode sees ``.item()``, ``float``/``bool``/``int`` of a tensor,
``nonzero``, boolean indexing and copies to the CPU (also those made inside ATen, such as
``F.one_hot``'s range check on CPU), and ``Tensor.item/tolist/cpu/numpy/__bool__/__float__/
__int__/__index__`` are patched to record too. Only the epoch's read-out
(``Trainer._read_epoch``, once per epoch) runs outside the guard. On CUDA each such read
would stall the GPU, and inside a CUDA-graph capture it is an error.

The same runs check that the tensors a captured step records stay where they are from one
epoch to the next (``cuda_graph.bindings``): state is updated in place. A CPU simulation of
replays checks the pieces' ``variant`` and ``schedule`` declarations.
"""
import contextlib

import numpy as np
import pytest
import torch

from rable_nb.parts import candidates
from rable_nb import config, methods
from rable_nb.engine import cuda_graph, engine, evaluation, networks, profiling
from rable_nb.stages import s04_training as training

PATCHED = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def host_read_guard(monkeypatch):
    """An active ``profiling.OpCounter`` whose ``host_reads`` also lists the Python-level
    reads of ``PATCHED``."""
    counter = profiling.OpCounter()

    def recording(name):
        original = getattr(torch.Tensor, name)

        def patched(self, *args, **kwargs):
            if counter.counting:
                counter.host_reads.append(f"Tensor.{name} @ {profiling.where_in_package()}")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, patched)
    for name in PATCHED:
        recording(name)
    with counter:
        yield counter


@contextlib.contextmanager
def epoch_guard(monkeypatch):
    """:func:`host_read_guard` around training epochs, except the epoch's one read-out
    (``Trainer._read_epoch``)."""
    read_epoch = engine.Trainer._read_epoch
    with host_read_guard(monkeypatch) as guard:
        def unguarded_read(self, *args):
            guard.counting = False
            try:
                return read_epoch(self, *args)
            finally:
                guard.counting = True
        monkeypatch.setattr(engine.Trainer, "_read_epoch", unguarded_read)
        yield guard
    monkeypatch.setattr(engine.Trainer, "_read_epoch", read_epoch)


def small_data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return x, candidates.uniform_candidates(y, 10, 0.3, seed), y


# +drs changes only the epoch's sample order, drawn before the steps: its draw (with the
# dynamic top-up's sources) runs under this guard in tests/test_drs.py, so its names are left
# out here rather than doubling this test's time
NAMES = [n for n in methods.names() if "drs" not in n]


@pytest.mark.parametrize("name", NAMES)
def test_an_epoch_reads_nothing_back_and_keeps_its_tensors_in_place(monkeypatch, name,
                                                                     recipe="protocol"):
    x, cand, y = small_data()
    cfg = engine.TrainConfig(method=name, epochs=3, batch_size=16,   # 3 steps per epoch
                               method_params={"solar": {"queue_batches": 2, "est_epochs": 1}},
                               **config.RECIPES[recipe])
    tr = engine.Trainer(cfg, x, cand, y, "cpu", sample_weight=np.linspace(0.5, 1, len(y)))
    bound, stage = {}, None
    with epoch_guard(monkeypatch) as guard:
        rows = []
        for _ in range(tr.total_epochs):
            rows.append(tr.train_epoch(progress=False))
            guard.counting = False
            now = cuda_graph.bindings(tr)
            if rows[-1].get("stage") == stage:          # (a new stage brings a new network)
                moved = sorted(k for k, v in bound.items() if now.get(k) != v)
                assert not moved, f"{name}: moved between epochs: {moved}"
            bound, stage = now, rows[-1].get("stage")
            guard.counting = True
    assert guard.host_reads == [], f"{name} read back to the host: {guard.host_reads}"
    assert guard.ops > 0 and all(np.isfinite(r["loss_cls"]) for r in rows)
    if name.startswith(("corr", "solar")) and name.endswith("mixup"):
        assert "loss_mix" in rows[-1]                 # the second variant ran under the guard


@pytest.mark.parametrize("name", ["able", "proden+la", "supervised+la", "corr+records+mixup",
                                  "solar+la", "rable"])
def test_the_short_recipe_reads_nothing_back(monkeypatch, name):
    """The quick profile's recipe (per-step learning rate, light views, label smoothing,
    Nesterov, channels_last) keeps the step free of host reads."""
    test_an_epoch_reads_nothing_back_and_keeps_its_tensors_in_place(monkeypatch, name, "short")


@pytest.mark.parametrize("name", ["corr+records+mixup", "solar+la+mixup", "able+records",
                                  "supervised+la+mixup"])
def test_steps_depend_on_epoch_and_step_only_as_declared(name):
    """What a replay does, simulated on CPU: a captured graph reruns the code path of the
    step it recorded — the first of its variant — with the schedule's numbers as 0-dim
    tensors refilled per step. Training so must equal eager training bit for bit: every
    host branch is declared in ``variant`` and every changing number comes from
    ``schedule`` (reading ``batch.epoch`` or ``batch.step`` for a number, or leaving a
    branch undeclared, makes it differ)."""
    x, cand, y = small_data(64)
    cfg = engine.TrainConfig(method=name, epochs=3, batch_size=16,
                               method_params={"solar": {"queue_batches": 3, "est_epochs": 2,
                                                        "warmup_epochs": 2}})
    eager = engine.Trainer(cfg, x, cand, y, "cpu")
    replayed = engine.Trainer(cfg, x, cand, y, "cpu")
    recorded = {}
    compute_step = replayed.compute_step

    def as_replayed(idx, gen, epoch, step, schedule):
        key = (replayed.stage.name, replayed.method.variant(epoch, step))
        epoch, step = recorded.setdefault(key, (epoch, step))
        values = {k: cuda_graph.scalar_tensor(v, "cpu") for k, v in schedule.items()}
        return compute_step(idx, gen, epoch, step, values)
    replayed.compute_step = as_replayed
    rows = [[t.train_epoch(progress=False) for _ in range(t.total_epochs)]
            for t in (eager, replayed)]
    assert len(recorded) >= {"corr": 2, "solar": 6}.get(name.split("+")[0], 1)
    for a, b in zip(*rows):
        for key in a:
            if key.startswith("loss") or key == "pseudo_label_acc" and a[key] is not None:
                assert b[key] == a[key], (a["epoch"], key)
    assert torch.equal(replayed.conf, eager.conf)


def test_the_guard_sees_reads_made_inside_aten(monkeypatch):
    """The guard is not blind: reads that the package no longer makes are caught."""
    labels = torch.tensor([1, 0, 2])
    with host_read_guard(monkeypatch) as guard:
        torch.nn.functional.one_hot(labels, 3)       # checks the range on the host (CPU)
        torch.bincount(labels)
        labels[labels > 0]
        labels.tolist()
    kinds = [r.split(" @ ")[0] for r in guard.host_reads]
    assert "_local_scalar_dense" in kinds and "Tensor.tolist" in kinds
    assert "index" in kinds or "nonzero" in kinds


def test_sync_free_helpers_equal_torch(monkeypatch):
    from rable_nb.methods._losses import class_counts, one_hot
    labels = torch.tensor([3, 0, 3, 9, 1])
    with host_read_guard(monkeypatch) as guard:
        got_hot, got_counts = one_hot(labels, 10), class_counts(labels, 10)
    assert guard.host_reads == []
    assert torch.equal(got_hot, torch.nn.functional.one_hot(labels, 10).float())
    assert torch.equal(got_counts, torch.bincount(labels, minlength=10).float())


def test_evaluation_makes_one_pass_for_raw_and_adjusted_accuracy(monkeypatch):
    torch.manual_seed(0)
    net = networks.PLLNet("tiny_cnn", 10)
    x = torch.randint(0, 256, (50, 32, 32, 3), dtype=torch.uint8)
    truth = np.arange(50) % 10
    counts = np.arange(10, 0, -1) * 5
    prior = torch.log_softmax(torch.randn(10), 0)
    expected = [evaluation.summarize(evaluation.predict(net, x, p), truth, counts)
                for p in (None, prior)]
    passes = []
    original = evaluation.batched_logits
    monkeypatch.setattr(evaluation, "batched_logits",
                        lambda *a, **k: passes.append(1) or original(*a, **k))
    raw, adjusted = evaluation.evaluate(net, x, truth, counts, prior)
    assert len(passes) == 1 and [raw, adjusted] == expected
    assert evaluation.evaluate(net, x, truth, counts) == (expected[0], None)


def test_graph_on_cpu_falls_back_to_the_eager_step(capsys):
    x, cand, y = small_data(32)
    cfg = engine.TrainConfig(method="able+records", epochs=1, batch_size=16)
    eager = engine.Trainer(cfg, x, cand, y, "cpu")
    graphed = engine.Trainer(cfg, x, cand, y, "cpu", graph=True)
    assert "GRAPH=True: CUDA graphs need a CUDA device" in capsys.readouterr().out
    assert not graphed.graph
    assert eager.train_epoch(progress=False)["loss_cont"] == \
        graphed.train_epoch(progress=False)["loss_cont"]
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        cuda_graph.CapturedSteps(eager)
    with pytest.raises(ValueError, match="GRAPH=True and COMPILE=True"):
        engine.Trainer(cfg, x, cand, y, "cpu", compile=True, graph=True)
    with pytest.raises(ValueError, match="GRAPH=True and COMPILE=True"):
        training.validate({"GRAPH": True, "COMPILE": True})
    with pytest.raises(ValueError, match="GRAPH='yes' is invalid"):
        training.validate({"GRAPH": "yes"})
