"""Trainer: exact resume, metrics file, checkpoints, notebook 04 in smoke, bench."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from rable_nb.commands import bench, cli
from rable_nb.parts import candidates
from rable_nb.stages import s01_dataset as dataset, s04_training as training
from rable_nb.engine import engine, evaluation, networks
from rable_nb.data import longtail
from rable_nb.rundir import runfiles


def tiny_data(n=256, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(10), n // 10 + 1)[:n]
    base = np.stack([np.full((32, 32, 3), (c * 25, 255 - c * 20, (c * 70) % 256)) for c in y])
    x = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    cand = candidates.uniform_candidates(y, 10, 0.3, seed)
    return dict(train_x=x, candidates=cand, labels=y, test_x=x[:100], test_y=y[:100],
                class_counts=np.bincount(y, minlength=10))


def weights(tr):
    return {k: v.clone() for k, v in tr.net.state_dict().items()}


# stateful pieces: RECORDS' feature mean, mixup, SoLar's stages (the split falls on the
# stage boundary), queue and prior, +la's prior
# (--fast keeps proden+mixup, the quickest; the other three are `slow`: 25-35 s each under load)
@pytest.mark.parametrize("method", [
    pytest.param("able+records", marks=pytest.mark.slow), "proden+mixup",
    pytest.param("corr+records+mixup", marks=pytest.mark.slow),
    pytest.param("solar+la+mixup", marks=pytest.mark.slow)])
def test_split_run_equals_uninterrupted_run(tmp_path, method):
    data = tiny_data()
    cfg = engine.TrainConfig(method=method, epochs=3, batch_size=32)
    whole = engine.train(cfg, data, tmp_path / "a", "cpu", progress=False)
    first = engine.train(cfg, data, tmp_path / "b", "cpu", stop_after=1, progress=False)
    assert not first["done"] and first["trainer"].epoch == 1
    rest = engine.train(cfg, data, tmp_path / "b", "cpu", progress=False)
    assert rest["resumed"] and rest["done"]
    a, b = weights(whole["trainer"]), weights(rest["trainer"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(whole["trainer"].conf, rest["trainer"].conf)
    keys = ("test_acc", "pseudo_label_acc", "loss_cls", "lr")
    assert ([[h[k] for k in keys] for h in whole["history"]]
            == [[h[k] for k in keys] for h in rest["history"]])
    log = (tmp_path / "b" / "logs" / f"{method}.jsonl").read_text().splitlines()
    epochs = list(range(1, whole["trainer"].total_epochs + 1))        # solar: + 1 estimate
    assert [json.loads(line)["epoch"] for line in log] == epochs       # no duplicated rows


def test_changed_settings_start_from_scratch(tmp_path, capsys):
    data = tiny_data(128)
    engine.train(engine.TrainConfig(epochs=1, batch_size=32), data, tmp_path, "cpu",
                   progress=False)
    again = engine.train(engine.TrainConfig(epochs=2, batch_size=32), data, tmp_path, "cpu",
                           progress=False)
    assert not again["resumed"] and "starting from scratch" in capsys.readouterr().out


def test_changed_data_start_from_scratch_and_drop_stale_results(tmp_path, capsys):
    data = tiny_data(128)
    cfg = engine.TrainConfig(epochs=1, batch_size=32)
    training.finish(training.train(cfg, data, tmp_path, "cpu", progress=False), tmp_path,
                    {"PROFILE": "smoke"}, "custom")
    assert (tmp_path / "metrics-able.json").exists()
    other = dict(data, candidates=~data["candidates"] | np.eye(10, dtype=bool)[data["labels"]])
    again = training.train(cfg, other, tmp_path, "cpu", progress=False)
    assert not again["resumed"] and "other training or test data" in capsys.readouterr().out
    assert not (tmp_path / "metrics-able.json").exists()  # stale results of the old data
    assert not (tmp_path / "checkpoints" / "able.safetensors").exists()
    assert again["done"] and len(again["history"]) == 1


def test_finish_writes_metrics_and_loadable_checkpoint(tmp_path):
    data = tiny_data(128)
    cfg = engine.TrainConfig(method="able+records", epochs=1, batch_size=32)
    result = engine.train(cfg, data, tmp_path, "cpu", progress=False)
    metrics = training.finish(result, tmp_path, {"PROFILE": "smoke", "EPOCHS": 1}, "custom")
    saved = json.loads((tmp_path / "metrics-able+records.json").read_text())
    assert cfg.precision == "bf16" and saved["precision"] == "fp32"   # what ran: CPU = fp32
    assert set(runfiles.METRICS_FIELDS) <= set(saved) and saved == json.loads(json.dumps(metrics))
    assert set(runfiles.ACCURACY_FIELDS) <= set(saved["accuracy"])
    assert set(runfiles.ACCURACY_FIELDS) <= set(saved["accuracy_adjusted"])
    assert saved["accuracy"]["best"] >= saved["accuracy"]["last"]
    net, meta, extra = networks.load_model(tmp_path / "checkpoints" / "able+records.safetensors")
    assert meta["method"] == "able+records" and extra["logit_prior"].shape == (10,)
    x = torch.as_tensor(data["test_x"])
    assert torch.equal(evaluation.predict(net, x), evaluation.predict(result["trainer"].net, x))


def test_precision_setting_builds_the_autocast_of_every_forward_pass():
    """PRECISION: bf16 autocast on CUDA (default) or fp32 (the official code's arithmetic);
    CPU passes are fp32 whatever the setting."""
    assert networks.autocast_dtype("cuda", "bf16") is torch.bfloat16
    assert networks.autocast_dtype("cuda", "fp32") is None
    assert networks.autocast_dtype("cpu", "bf16") is None
    assert [networks.used_precision(d, p) for d, p in
            (("cuda", "bf16"), ("cuda", "fp32"), ("cpu", "bf16"))] == ["bf16", "fp32", "fp32"]
    with pytest.raises(ValueError, match="PRECISION='fp16' is invalid"):
        engine.TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="PRECISION='fp16' is invalid"):
        training.validate({"PRECISION": "fp16"})
    training.validate({"PRECISION": "fp32"})
    P = {"ARCH": "tiny_cnn", "EPOCHS": 1, "BATCH_SIZE": 8, "SEED": 0}
    assert training.config_from_params("able", P).precision == "bf16"
    assert training.config_from_params("able", {**P, "PRECISION": "fp32"}).precision == "fp32"


def test_the_precision_reaches_training_and_evaluation_passes(monkeypatch):
    """The same code path as on CUDA, run on CPU by letting 'bf16' autocast there: the
    training forward and the evaluation passes follow cfg.precision."""
    monkeypatch.setattr(networks, "autocast_dtype",
                        lambda device_type, precision="bf16":
                        torch.bfloat16 if precision == "bf16" else None)
    data = tiny_data(32)
    x = torch.as_tensor(data["test_x"][:8])
    outs = {}
    for precision in ("bf16", "fp32"):
        cfg = engine.TrainConfig(batch_size=8, epochs=1, precision=precision)
        tr = engine.Trainer(cfg, data["train_x"], data["candidates"], data["labels"], "cpu")
        assert tr.precision == precision
        images = tr.batch_inputs(torch.arange(8))
        tr.net.eval()
        outs[precision] = (tr.forward({"weak": images}).logits["weak"],
                           networks.batched_logits(tr.net, x, precision=precision),
                           tr.net(networks.standardize(images)), tr.net)
    bf16, fp32 = outs["bf16"], outs["fp32"]
    assert torch.equal(fp32[0], fp32[2]) and bf16[0].dtype == torch.float32
    assert not torch.allclose(bf16[0], fp32[0], atol=1e-4)            # bf16 arithmetic
    assert torch.equal(networks.batched_logits(fp32[3], x, precision="fp32"), fp32[1])
    assert not torch.allclose(networks.batched_logits(fp32[3], x, precision="bf16"), fp32[1],
                              atol=1e-4)


@pytest.mark.slow  # ~50 s under load
def test_bench_train_rows_per_precision():
    out = bench.train(device="cpu", batch_sizes=[16], precisions=("fp32", "bf16"))
    fp32, bf16 = out["results"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert fp32["able_images_per_s"] > 0 and "CUDA only" in bf16["skipped"]
    assert "fp32_over_bf16" not in out                     # measured on a GPU only
    assert bench.train(device="cpu", batch_sizes=[16])["precisions"] == ["fp32"]
    with pytest.raises(ValueError, match="precisions="):
        bench.train(device="cpu", precisions=("fp16",))


def test_summary_groups_and_confusion():
    counts = [500, 300, 200, 100, 90, 80, 70, 20, 10, 5]
    groups = longtail.class_groups(counts)
    assert groups == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}
    truth = np.arange(10).repeat(2)
    pred = truth.copy()
    pred[truth >= 7] = 0                       # all few-shot classes wrong
    s = evaluation.summarize(pred, truth, counts)
    assert s["many"] == 1.0 and s["medium"] == 1.0 and s["few"] == 0.0
    assert s["overall"] == pytest.approx(0.7) and np.asarray(s["confusion"]).sum() == 20


def test_bad_parameters_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="method"):
        engine.TrainConfig(method="pico")
    with pytest.raises(ValueError, match="METHODS"):
        training.validate({"METHODS": ["able", "pico"]})
    with pytest.raises(ValueError, match="BATCH_SIZE"):
        engine.Trainer(engine.TrainConfig(batch_size=64), *list(tiny_data(32).values())[:3],
                         device="cpu")
    with pytest.raises(ValueError, match="'rable', which cannot run: no synthetic images"):
        training.runnable_methods(["able", "rable"], tmp_path)
    runnable, skipped = training.runnable_methods(["able", "rable"], tmp_path, allow_skip=True)
    assert runnable == ["able"] and "synthetic" in skipped["rable"]


def write_synthetic(run_dir, per_class=4):
    folder = run_dir / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for c in range(10):
        for i in range(per_class):
            name = f"{c}/{i:03d}.png"
            (folder / str(c)).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
            rows.append(dict(file=name, label=c, prompt="a photo", seed=i, model_id="fake"))
    (folder / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


# one papermill run covers every base and every modifier (2 smoke epochs: CORR's update
# and mixup start at epoch 1; SoLar adds its estimation epoch)
SMOKE_METHODS = ["able", "rable+records", "corr", "corr+records+mixup", "solar+la+mixup",
                 "proden+la", "supervised+mixup"]


def test_notebook_04_smoke_writes_metrics_and_checkpoints(run_notebooks, smoke_dataset_run,
                                                          tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_dataset_run, run)
    write_synthetic(run)
    run_notebooks("04", run, METHODS=SMOKE_METHODS, SYNTHETIC_LABELS="partial")
    for method in SMOKE_METHODS:
        m = json.loads((run / f"metrics-{method}.json").read_text())
        assert set(runfiles.METRICS_FIELDS) <= set(m)
        assert set(runfiles.ACCURACY_FIELDS) <= set(m["accuracy"])
        assert len(m["accuracy"]["per_class"]) == 10 and m["wall_s"] > 0
        assert (run / "checkpoints" / f"{method}.safetensors").exists()
        records = "records" in method
        assert ("accuracy_adjusted" in m) == records == m["test_time_adjustment"]
        assert m["comparable_to_published"] == ("accuracy_adjusted" if records else "accuracy")
        assert m["epochs_done"] == sum(s["epochs"] for s in m["stages"])
        log = (run / "logs" / f"{method}.jsonl").read_text().splitlines()
        assert len(log) == m["epochs_done"]
    for fig in ("fig-curves.png", "fig-per-class.png"):
        assert (run / fig).stat().st_size > 10_000
    solar = json.loads((run / "metrics-solar+la+mixup.json").read_text())
    assert [s["name"] for s in solar["stages"]] == ["estimate", "train"]
    corr = [json.loads(line) for line in (run / "logs" / "corr+records+mixup.jsonl").read_text()
            .splitlines()]
    assert "loss_mix" not in corr[0] and corr[1]["loss_mix"] > 0   # mixup from epoch 1
    rable = json.loads((run / "metrics-rable+records.json").read_text())
    assert rable["n_synthetic"] == 40
    assert rable["n_train"] == json.loads((run / "metrics-able.json").read_text())["n_train"] + 40


@pytest.mark.slow  # ~12 s under load
def test_bench_train_cli_prints_json(capsys):
    assert cli.main(["bench", "train", "--device", "cpu", "--batch-size", "16", "--both"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    eager, graph = result["results"]
    assert (eager["path"], graph["path"]) == ("eager", "cuda_graph") and result["path"] == "eager"
    assert "CUDA graphs need a CUDA device" in graph["skipped"]
    assert result["able_images_per_s"] > 0 and result["bare_over_able"] > 0
    assert result["host_syncs_per_step"] == 0 and result["ops_per_step"] > 100
    assert 0 < result["busy_share"] and "CPU proxy" in result["busy_measure"]
    assert result["kernels_per_step"] is None                          # CUDA only
    epoch = training.LT_RHO100_IMAGES // 16 * result["step_ms"] / 1e3   # drop_last
    assert result["able_epoch_s_cifar10_lt_rho100"] == pytest.approx(epoch)
    assert result["epoch_s_with_eval"] == pytest.approx(epoch + result["eval_s"])
    assert result["run_800_epochs_min"] == pytest.approx(800 * result["epoch_s_with_eval"] / 60)
    assert cli.main(["bench", "augment", "--graph"]) == 1
    assert "apply to 'bench train' only" in capsys.readouterr().err
    assert cli.main(["bench", "augment", "--precision", "fp32"]) == 1
    with pytest.raises(ValueError, match="paths=.*choose from"):
        bench.train(device="cpu", paths=("graph",))


@pytest.mark.parametrize("partial", ["uniform", "instance"])
def test_synthetic_partial_labels_use_the_real_data_generator(cifar_dir, partial):
    from rable_nb.data import images as data
    cifar = data.load_cifar10(cifar_dir)
    ds = dataset.build_dataset(cifar, 0.1, partial, 0.3, 0.4, seed=0, n_max=20,
                               clean_arch="tiny_cnn", clean_epochs=1, clean_per_class=10,
                               device="cpu")
    params = dict(SEED=0, PARTIAL=partial, Q=0.3, RATE=0.4, clean_classifier=ds["clean_classifier"])
    labels = np.arange(10).repeat(20)
    x = cifar.test_x[:200]
    exact = training.synthetic_candidates(labels, params, "exact", cifar, x, "cpu")
    assert (exact.sum(1) == 1).all() and exact[np.arange(200), labels].all()
    cand = training.synthetic_candidates(labels, params, "partial", cifar, x, "cpu")
    assert cand.shape == (200, 10) and cand[np.arange(200), labels].all()
    assert cand.sum() > 200                                 # some wrong labels entered
    with pytest.raises(ValueError, match="SYNTHETIC_LABELS"):
        training.synthetic_candidates(labels, params, "noisy", cifar, x, "cpu")
