"""The CUDA-graph training step against the eager one (needs a CUDA GPU; skipped without).

Both paths draw the same random numbers (the graphs replay the trainer's registered
generator) and run the same kernels, so their losses agree to bf16 rounding; every method
family runs, covering CORR's and SoLar's second step variant (captured in epoch 2), a SoLar
queue that fills up mid-epoch and +la's per-epoch shift.
"""
import numpy as np
import pytest
import torch

from rable_nb.parts import candidates
from rable_nb.engine import cuda_graph, engine

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PARAMS = {"solar": {"queue_batches": 4, "est_epochs": 1}}


def data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return x, candidates.uniform_candidates(y, 10, 0.3, seed), y


def run(method, graph, epochs=3):
    x, cand, y = data()
    cfg = engine.TrainConfig(method=method, epochs=epochs, batch_size=32, method_params=PARAMS)
    tr = engine.Trainer(cfg, x, cand, y, "cuda", graph=graph)
    return tr, [tr.train_epoch(progress=False) for _ in range(tr.total_epochs)]


@pytest.mark.parametrize("method", ["able", "able+records", "proden+la", "supervised+mixup",
                                    "corr+records+mixup", "solar+mixup"])
def test_graph_steps_match_eager_within_bf16_tolerance(method):
    eager, eager_rows = run(method, graph=False)
    graphed, graph_rows = run(method, graph=True)
    assert graphed.graph and graphed._captured.captures >= 1
    variants = {key for key in graphed._captured.graphs}
    assert len(variants) <= 3                          # one graph per variant, not per step
    for a, b in zip(eager_rows, graph_rows):
        for key, value in a.items():
            if key.startswith("loss") or key == "pseudo_label_acc":
                assert b[key] == pytest.approx(value, rel=2e-2, abs=2e-3), (a["epoch"], key)
    torch.testing.assert_close(graphed.conf, eager.conf, rtol=0.05, atol=0.02)


def test_replays_draw_fresh_random_numbers_each_step():
    tr, _ = run("able", graph=True, epochs=1)
    gen = tr.epoch_generator(5)
    idx = torch.arange(32, device="cuda")
    before = {k: v.clone() for k, v in tr.net.state_dict().items()}
    first = {k: v.clone() for k, v in tr.run_step(idx, gen, 1).items()}
    second = tr.run_step(idx, gen, 2)
    assert tr._captured.graphs                         # these were replays
    assert first["loss_cont"] != second["loss_cont"]   # same images, new augmentations
    assert any(not torch.equal(before[k], v) for k, v in tr.net.state_dict().items())


def test_a_step_that_rebinds_state_is_refused(monkeypatch):
    from rable_nb.methods import records

    def rebinding_observe(self, method, batch, out):
        feats = out.feats["weak"].detach().float().mean(0)
        self.feat_mean = 0.9 * self.feat_mean + 0.1 * feats        # rebinds: not in place
        self._prior = torch.log_softmax(batch.net.classifier(self.feat_mean), 0)
    monkeypatch.setattr(records.Records, "observe", rebinding_observe)
    with pytest.raises(RuntimeError, match="rebinds or creates .*method.records.feat_mean"):
        run("able+records", graph=True, epochs=1)


def test_a_fresh_network_is_captured_again():
    tr, rows = run("solar", graph=True, epochs=2)       # estimate stage, then a fresh network
    assert [r["stage"] for r in rows] == ["estimate", "train", "train"]
    assert tr._captured.valid()
    assert tr._captured.captures > len(tr._captured.graphs)   # the estimate stage's were dropped
    assert cuda_graph.WARMUP >= 1
