"""``python -m rable_nb campaign``: the tiny rehearsal end to end (as a GPU lease would run
it, on a CPU), the stage runner's records (errors, skips, each stage written as it ends),
the epoch rule of protocol L, bad input, the bundle's limits and how results.py shows
campaign runs."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from rable_nb.commands import campaign, campaign_protocol, campaign_stages, cli
from rable_nb import config, generators
from rable_nb.batch import results


def test_bad_input_is_one_clear_line_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "bundle"
    cases = [(["--minutes", "0"], "--minutes 0 is invalid"),
             (["--minutes", "-3", "--tiny"], "--minutes -3 is invalid"),
             (["--tiny", "--methods", "able,rable"], "needs a generator's top-up"),
             (["--tiny", "--methods", "able,nope"], "'nope'"),
             (["--tiny", "--device", "tpu"], "--device 'tpu' is invalid")]
    if not __import__("torch").cuda.is_available():
        cases.append(([], "--device cuda: no CUDA device is visible here"))
    for args, message in cases:
        assert cli.main(["campaign", "--out", str(out), *args]) == 1, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
        assert not out.exists()
    (out / "old").mkdir(parents=True)
    assert cli.main(["campaign", "--tiny", "--out", str(out)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err


def test_a_default_bundle_name_never_collides_with_an_earlier_one(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "PROJECT_ROOT", tmp_path)
    first = campaign.default_out("cpu", tiny=False)
    assert first.parent == tmp_path / "results" and first.name.startswith("gpu-")
    first.mkdir(parents=True)
    assert campaign.default_out("cpu", tiny=False) == first.with_name(first.name + "-2")


def _camp(tmp_path, minutes=2.0, tiny=False):
    return campaign_stages.Campaign(out=tmp_path / "b", work=tmp_path / "w", device="cpu",
                                    tiny=tiny, minutes=minutes, methods=["able"])


def test_each_stage_is_recorded_as_it_ends_errors_and_skips_included(tmp_path, capsys):
    camp = _camp(tmp_path)
    seen = []

    def env(c, deadline):
        return {"headline": "fine"}

    def broken(c, deadline):
        seen.append(json.loads((c.out / campaign.SUMMARY).read_text())["stages"])
        raise RuntimeError("CUDA error: an illegal memory access")

    def slow(c, deadline):
        assert deadline <= c.start + 0.13 * c.total_s + 1       # its own share, no more
        seen.append(json.loads((c.out / campaign.SUMMARY).read_text())["stages"])
        c.start -= 100                                           # as if it took 100 s
        return {"status": "partial"}

    summary = campaign.run_stages(camp, [("environment", env), ("cuda_tests", broken),
                                         ("speed", slow), ("protocol_l", env)])
    assert list(seen[0]) == ["environment", "cuda_tests"]       # the running stage too
    assert seen[0]["cuda_tests"]["status"] == "running"
    assert seen[0]["environment"]["status"] == "ok"
    assert seen[1]["cuda_tests"]["status"] == "error" and seen[1]["speed"]["status"] == "running"
    stages = summary["stages"]
    assert stages["environment"]["status"] == "ok"
    err = stages["cuda_tests"]["error"]
    assert stages["cuda_tests"]["status"] == "error" and err["type"] == "RuntimeError"
    assert "illegal memory access" in err["message"] and "in broken" in err["traceback"]
    assert stages["speed"]["status"] == "partial"
    assert stages["protocol_l"]["status"] == "skipped"
    assert "it needs at least 45 s" in stages["protocol_l"]["reason"]
    assert summary["status"] == "error"
    assert json.loads((camp.out / campaign.SUMMARY).read_text()) == summary
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and "cuda_tests" in lines[1] and "RuntimeError" in lines[1]


def test_items_skip_missing_packages_and_spent_budgets_and_record_crashes():
    def crash():
        raise ValueError("bf16 not supported")
    records, status = campaign_stages.items(time.time() + 60, [
        ("a", ("no_such_module_rable",), lambda: {}), ("b", (), crash),
        ("c", (), lambda: {"x": 1})])
    assert records["a"]["status"] == "skipped" and "no_such_module_rable" in records["a"]["reason"]
    assert records["b"]["status"] == "failed" and records["b"]["error"]["type"] == "ValueError"
    assert records["c"]["status"] == "ok" and records["c"]["x"] == 1 and status == "failed"
    records, status = campaign_stages.items(time.time() - 1, [("d", (), lambda: {})])
    assert records["d"]["status"] == "skipped" and "budget" in records["d"]["reason"]
    assert status == "partial"


def test_the_epoch_count_fits_the_whole_schedule_into_the_time_left():
    # floor((0.88 × 300 − 8) / 2) = 128 epochs of 2 s; SoLar's 100-epoch estimate first
    assert campaign_protocol.choose_epochs(2.0, 300) == 128
    assert campaign_protocol.choose_epochs(2.0, 300, extra_epochs=100) == 28
    assert campaign_protocol.choose_epochs(0.1, 3000) == 800               # the protocol's cap
    assert campaign_protocol.choose_epochs(2.0, 300, cap=40) == 40
    assert campaign_protocol.choose_epochs(30.0, 40) == 0                  # not one fits
    for e in (1.7, 2.3):
        n = campaign_protocol.choose_epochs(e, 500)
        assert n * e <= campaign_protocol.MARGIN * 500 < (n + 1) * e + campaign_protocol.END_S + e
    with pytest.raises(ValueError, match="positive"):
        campaign_protocol.choose_epochs(0, 300)


def test_every_cuda_only_test_is_marked_and_collected(tmp_path):
    files = campaign_stages.cuda_test_files()
    assert {f.name for f in files} >= {"test_cuda_graph.py", "test_augment.py"}
    for path in sorted((config.PROJECT_ROOT / "tests").glob("test_*.py")):
        if re.search(r"skipif\(\s*not torch\.cuda\.is_available\(\)", path.read_text()):
            assert path in files, f"{path.name} skips without CUDA but has no cuda marker"
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="t" name="ok"/>'
                   '<testcase classname="t" name="bad"><failure message="assert 1 == 2">'
                   'trace</failure></testcase><testcase classname="t" name="s">'
                   '<skipped message="needs a CUDA GPU"/></testcase></testsuite></testsuites>')
    lines = ("tests/test_a.py::test_x[able] PASSED   [ 50%]\n"
             "tests/test_a.py::test_y FAILED   [100%]\nnoise PASSED\n")
    assert campaign_stages.verbose_outcomes(lines) == {
        "tests/test_a.py::test_x[able]": {"outcome": "passed"},
        "tests/test_a.py::test_y": {"outcome": "failed"}}
    got = campaign_stages.junit_outcomes(xml)
    assert got["t::ok"] == {"outcome": "passed"}
    assert got["t::bad"]["outcome"] == "failed" and "assert 1 == 2" in got["t::bad"]["message"]
    assert got["t::s"] == {"outcome": "skipped", "message": "needs a CUDA GPU"}


def test_the_bundle_refuses_checkpoints_and_size(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    assert campaign.check_bundle(tmp_path) == {"files": 1, "bytes": 2}
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "big.jsonl").write_bytes(b"x" * campaign.BUNDLE_LIMIT)
    with pytest.raises(ValueError, match="over its"):
        campaign.check_bundle(tmp_path)
    (tmp_path / "logs" / "big.jsonl").unlink()
    (tmp_path / "able.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match="checkpoints"):
        campaign.check_bundle(tmp_path)


def _campaign_metrics(root, method, epochs, last):
    m = dict(method=method, protocol="L-short", device="cuda: NVIDIA H200", wall_s=300.0,
             images_per_s=20000.0, commit="0123456789abcdef", epochs_done=epochs,
             accuracy=dict(last=last, best=last, many=0.9, medium=last, few=0.1,
                           per_class=[last] * 10),
             campaign=dict(protocol="L", epochs=epochs, protocol_epochs=800),
             params=dict(PROFILE="paper", train=dict(epochs=epochs, arch="resnet18"),
                         dataset=dict(IMBALANCE_FACTOR=0.01, PARTIAL="uniform", Q=0.3)))
    path = root / "gpu-2026-12-02-h200" / "L-rho100-q0.3" / f"metrics-{method}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m))


def test_results_state_a_campaign_runs_epoch_gap_beside_the_published_numbers(tmp_path):
    _campaign_metrics(tmp_path, "corr+records+mixup", 40, 0.61)
    _campaign_metrics(tmp_path, "able+la", 40, 0.55)
    text = results.render(results.load(tmp_path))
    assert "**Shortened protocol L: 40 of 800 epochs**" in text
    assert "| method | ρ=100, q=0.3 | published, 800 epochs (ρ=100, q=0.3) |" in text
    assert "metrics-corr%2Brecords%2Bmixup.json) | 79.79 (adjusted) |" in text
    assert "metrics-able%2Bla.json) | – |" in text
    assert "| 40 of 800 | cuda: NVIDIA H200 |" in text and "| L-short |" in text


@pytest.mark.notebook
def test_tiny_campaign_runs_every_stage_on_a_cpu(tmp_path):
    """The rehearsal of a GPU lease: the real command, in its own process."""
    out = tmp_path / "gpu-bundle"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(config.PROJECT_ROOT)}
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "rable_nb", "campaign", "--tiny",
                           "--out", str(out)], cwd=config.PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    seconds = time.time() - t0
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = json.loads((out / campaign.SUMMARY).read_text())
    stages = summary["stages"]
    assert list(stages) == list(campaign.BUDGETS)
    assert {k: v["status"] for k, v in stages.items()} == dict.fromkeys(stages, "ok")
    stage_lines = re.findall(r"^\[ *\d+ s\] (\w+) ", done.stdout, re.M)
    assert stage_lines == list(stages)                                # one line per stage
    assert stages["environment"]["packages"]["torch"]
    tests = stages["cuda_tests"]
    assert tests["skipped"] >= 7 and tests["failed"] == 0             # no CUDA here
    speed = stages["speed"]["items"]
    assert speed["train"]["results"][0]["able_images_per_s"] > 0
    assert "CUDA graphs need a CUDA device" in speed["train"]["results"][1]["skipped"]
    checks = stages["device_checks"]["items"]
    assert {f"generator:{g}" for g in generators.GENERATORS} <= set(checks)  # feature-copy too
    assert {"method:solar", "method:ssp", "method:able+mixup", "paper_pass"} <= set(checks)
    L = stages["protocol_l"]
    assert 1 <= L["epochs"] <= campaign_protocol.MAX_EPOCHS[True] and L["side_by_side"] == 3
    files = campaign.bundle_files(out)
    assert sum(files.values()) <= campaign.BUNDLE_LIMIT == 1_000_000
    assert not [f for f in files if f.endswith((".safetensors", ".npz"))]
    for method in campaign.DEFAULT_METHODS:
        m = json.loads((out / "L-rho10-q0.3" / f"metrics-{method}.json").read_text())
        assert m["epochs_done"] == L["epochs"] and m["campaign"]["protocol_epochs"] == 800
        log = (out / "L-rho10-q0.3" / "logs" / f"{method}.jsonl").read_text().splitlines()
        assert len(log) == L["epochs"]
    assert results.write_readme(tmp_path)[1] == 3                       # renders with the gap
    assert f"{L['epochs']} of 800 epochs" in (tmp_path / "README.md").read_text()
    print(f"tiny campaign: {seconds:.0f} s wall, {summary['seconds']:.0f} s inside")


def test_graph_and_eager_are_compared_within_bf16_tolerance_and_graphs_need_proof(tmp_path):
    eager = {"losses": {"loss_cls": [2.30, 1.90], "loss_mix": [0.0, 0.0004]}}
    near = {"losses": {"loss_cls": [2.31, 1.89], "loss_mix": [0.0, 0.0011]}}
    assert campaign_stages.compare_paths(eager, near)["max_abs_gap"] == pytest.approx(0.01)
    with pytest.raises(AssertionError, match="loss_cls"):
        campaign_stages.compare_paths(eager, {"losses": {"loss_cls": [2.30, 2.10]}})
    camp = _camp(tmp_path)
    camp.methods = ["able", "corr"]
    assert campaign_protocol.use_graph(camp) == (False, "eager: no CUDA device")
    camp.device = "cuda"
    ok = {"status": "ok"}
    camp.summary = {"stages": {"device_checks": {"items": {"method:able": ok}},
                               "speed": {"items": {"train": {"graph_over_eager": 1.4}}}}}
    graph, why = campaign_protocol.use_graph(camp)
    assert not graph and "['corr']" in why                     # corr's graph path unchecked
    camp.summary["stages"]["device_checks"]["items"]["method:corr"] = ok
    assert campaign_protocol.use_graph(camp)[0]
    camp.summary["stages"]["speed"]["items"]["train"]["graph_over_eager"] = 1.01
    assert campaign_protocol.use_graph(camp) == (False, "eager: graph_over_eager = 1.01")


def test_a_gpu_campaigns_protocol_l_settings_are_protocol_ls_but_for_the_epochs(tmp_path):
    from rable_nb.stages import s04_training as training
    camp = _camp(tmp_path)
    camp.device, camp.data_dir, camp.methods = "cuda", tmp_path, list(campaign.DEFAULT_METHODS)
    P = campaign_protocol.settings(camp, tmp_path / "run")
    assert (P["ARCH"], P["BATCH_SIZE"], P["EPOCHS"], P["LR"]) == ("resnet18", 256, 800, 0.01)
    ds_params = {k: P[k] for k in ("SEED", "IMBALANCE_FACTOR", "PARTIAL", "Q", "RATE", "N_MAX")}
    assert training.protocol_name(P, ds_params) == "L"
    assert training.protocol_name({**P, "EPOCHS": 40}, ds_params) == "custom"  # hence L-short
    assert P["N_TEST_PER_CLASS"] == 1000 and P["CHECKPOINT_EVERY"] > 800
    assert campaign_protocol.extra_epochs("corr+records+mixup", P, 40) == 0
    assert campaign_protocol.extra_epochs("solar", P, 40) > 0          # its estimation stage
