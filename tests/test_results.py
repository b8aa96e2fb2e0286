"""``python -m rable_nb results``: the results README from planted metrics files."""
import json

import pytest

from rable_nb.commands import cli
from rable_nb.batch import results
from rable_nb.rundir import runfiles


def _plant(root, path, method, last, *, factor=0.01, partial="uniform", q=0.3, rate=0.4,
           adjusted=None, epochs=800, done=800, seed=None, wall=1234.0):
    acc = dict(last=last, best=last + 0.02, many=0.9, medium=last, few=max(0.0, last - 0.3),
               per_class=[last] * 10)
    m = dict(method=method, protocol="L", accuracy=acc, device="cuda: NVIDIA H100",
             wall_s=wall, images_per_s=9000.0, commit="0123456789abcdef", epochs_done=done,
             params=dict(PROFILE="paper", train=dict(epochs=epochs, arch="resnet18"), dataset=dict(
                 IMBALANCE_FACTOR=factor, PARTIAL=partial, Q=q, RATE=rate)))
    if seed is not None:
        m["params"]["SEED"] = seed
    if adjusted is not None:
        m["accuracy_adjusted"] = dict(acc, last=adjusted)
    target = root / path / f"metrics-{method}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(m))


def test_tables_per_protocol_with_linked_cells_and_a_detail_table(tmp_path, capsys):
    _plant(tmp_path, "L/rho100-q03", "able", 0.5416)
    _plant(tmp_path, "L/rho100-q03", "able+records", 0.6012, adjusted=0.6658)
    _plant(tmp_path, "L/rho100-q05", "able", 0.4321, q=0.5, done=200)
    _plant(tmp_path, "L/rho50-q03", "able", 0.6000, factor=0.02)
    _plant(tmp_path, "R/report", "rable", 0.6658, partial="instance")
    assert cli.main(["results", "--root", str(tmp_path)]) == 0
    assert "from 5 metrics file(s)" in capsys.readouterr().out
    text = (tmp_path / "README.md").read_text()
    l_part, r_part = text.split("## Protocol L")[1].split("## Protocol R")
    # columns sorted by rho then q; a missing combination shows a dash
    assert "| method | ρ=50, q=0.3 | ρ=100, q=0.3 | ρ=100, q=0.5 |" in l_part
    assert ("| able | [60.00](L/rho50-q03/metrics-able.json) | "
            "[54.16](L/rho100-q03/metrics-able.json) | "
            "[43.21](L/rho100-q05/metrics-able.json) |") in l_part
    assert ("| able+records | – | [60.12](L/rho100-q03/metrics-able%2Brecords.json) | – |"
            in l_part)
    # detail: last, best, many/medium/few, adjusted, epochs, device, wall time, commit
    assert ("| ρ=100, q=0.3 | able+records | 60.12 | 62.12 | 90.00 | 60.12 | 30.12 | 66.58 "
            "| paper | resnet18 | 800 | cuda: NVIDIA H100 | 20.6 min | `0123456789` | L |"
            ) in l_part
    assert "| 200 of 800 |" in l_part  # a run stopped early says so
    assert "| ρ=100, r=0.4 |" in r_part and "[66.58](R/report/metrics-rable.json)" in r_part
    assert "maximum over epochs of the test accuracy" in text


def test_no_results_yet_is_said_plainly(tmp_path):
    assert cli.main(["results", "--root", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "No results of a real protocol run are committed yet" in text
    assert "|" not in text


def test_a_foreign_file_stops_with_its_name_and_leaves_the_readme(tmp_path, capsys):
    _plant(tmp_path, "L/a", "able", 0.5)
    (tmp_path / "README.md").write_text("old")
    bad = tmp_path / "L" / "b" / "metrics-x.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"method": "x"}))
    assert cli.main(["results", "--root", str(tmp_path)]) == 1
    assert f"{bad} is not a metrics file of notebook 04" in capsys.readouterr().err
    assert (tmp_path / "README.md").read_text() == "old"
    assert cli.main(["results", "--root", str(tmp_path / "nope")]) == 1


def test_the_committed_results_readme_is_up_to_date():
    assert (results.RESULTS_DIR / results.README).read_text() == results.render(
        results.load(results.RESULTS_DIR), results.load_audits(results.RESULTS_DIR))


@pytest.mark.parametrize("ds, label", [
    (dict(IMBALANCE_FACTOR=0.01, PARTIAL="uniform", Q=0.7), "ρ=100, q=0.7"),
    (dict(IMBALANCE_FACTOR=0.02, PARTIAL="instance", RATE=0.4), "ρ=50, r=0.4"),
])
def test_setting_labels(ds, label):
    assert runfiles.setting({"params": {"dataset": ds}}) == label


def test_cpu_runs_get_their_own_section_and_top_ups_their_generator(tmp_path):
    _plant(tmp_path, "quick-cpu/methods", "able", 0.27)
    _plant(tmp_path, "quick-cpu/copy-1000", "rable", 0.31)
    m = json.loads((tmp_path / "quick-cpu/copy-1000/metrics-rable.json").read_text())
    m["n_synthetic"] = 4464
    m["params"].update(synthetic={"generator": "copy", "cond_labels": "pseudo"})
    (tmp_path / "quick-cpu/copy-1000/metrics-rable.json").write_text(json.dumps(m))
    text = results.render(results.load(tmp_path))
    assert "## quick-cpu" in text and "## Protocol" not in text
    cell = "[31.00](quick-cpu/copy-1000/metrics-rable.json)"
    assert f"| rable [copy, pseudo labels] + 4464 | {cell} |" in text
    m["params"]["SYNTH_WEIGHT"] = 0
    assert results.row_label(m) == "rable [copy, pseudo labels] + 4464 at weight 0 (control)"


def test_methods_run_with_several_seeds_get_mean_and_sd(tmp_path):
    for seed, last in enumerate((0.50, 0.54, 0.58)):
        _plant(tmp_path, f"quick-cpu/s{seed}", "able", last, seed=seed, wall=60.0 * (seed + 1))
    _plant(tmp_path, "quick-cpu/s0", "proden", 0.40, seed=0)      # one seed: no row
    assert cli.main(["results", "--root", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "| ρ=100, q=0.3 | able | 0, 1, 2 | 54.00 ± 4.00 | 24.00 ± 4.00 | 2.00 ± 1.00 |" in text
    assert "| proden | 0, 1, 2" not in text and "| proden |" in text


def test_top_ups_are_paired_with_their_matching_controls_by_seed(tmp_path):
    from rable_nb.batch import comparison

    def plant(path, method, last, seed, generator, weight=None, rule=None, filt=None,
              sets=None, **gen_settings):
        _plant(tmp_path, f"quick-cpu/{path}-s{seed}", method, last, seed=seed)
        f = tmp_path / f"quick-cpu/{path}-s{seed}/metrics-{method}.json"
        m = json.loads(f.read_text())
        syn = {"generator": generator, "cond_labels": "pseudo", "SYNTH_FILTER": False,
               **gen_settings}
        if rule:
            syn["rule"] = rule
        if filt:
            syn.update(SYNTH_FILTER=filt, SYNTH_FILTER_BAND=[0.05, 0.95])
        m["params"]["synthetic"], m["n_synthetic"] = syn, 100
        if weight is not None:
            m["params"]["SYNTH_WEIGHT"] = weight
        if sets:
            m["params"]["SYNTHETIC_LABELS"] = sets
        f.write_text(json.dumps(m))
    for seed, (gen, ctrl, zero) in enumerate([(0.50, 0.48, 0.40), (0.52, 0.49, 0.41),
                                              (0.51, 0.50, 0.42)]):
        plant("fe", "rable-feature", gen, seed, "feature")
        plant("fc", "rable-feature", ctrl, seed, "feature-copy")
        plant("fz", "rable-feature", zero, seed, "feature", weight=0)
        plant("ff", "rable-feature", gen + 0.01, seed, "feature", filt="centre")
        plant("fp", "rable-feature", gen - 0.03, seed, "feature", sets="plausible")
    plant("px", "rable", 0.45, 0, "pixel", rule={"LABEL_RULE": "sinkhorn"})  # no control
    plant("fo", "rable-feature", 0.30, 0, "feature")  # another warm-up: its own arm
    other = tmp_path / "quick-cpu/fo-s0/metrics-rable-feature.json"
    m = json.loads(other.read_text())
    m["params"]["synthetic"]["warmup"] = {"cache": "warmup-x", "pseudo_sha1": "ab"}
    other.write_text(json.dumps(m))
    rows = comparison.paired_rows(results.load(tmp_path))
    by = {(r["arm"][2][0], r["change"]): r for r in rows}
    fe = by[("feature, pseudo labels", "feature → feature-copy")]
    assert fe["seeds"] == [0, 1, 2]
    mean, half = fe["last"]["diff"]
    assert mean == pytest.approx(0.02) and half == pytest.approx(4.30265 * 0.01 / 3 ** 0.5, rel=1e-5)
    assert by[("feature, pseudo labels", "weight → 0")]["last"]["diff"][0] == \
        pytest.approx(0.10)
    assert by[("feature, pseudo labels, centre filter", "centre filter → none")]["last"][
        "diff"][0] == pytest.approx(0.01)
    plausible = [r for r in rows if r["change"] == "plausible label sets → exact"]
    assert len(plausible) == 1 and plausible[0]["last"]["diff"][0] == pytest.approx(-0.03)
    assert not any(r["arm"][2][0].startswith("pixel") for r in rows)  # its controls are absent
    # a generator's own settings make other arms: guidance 1 is not pooled with guidance 2
    for seed in (0, 1):
        plant("pc", "rable", 0.40, seed, "copy")
        plant("p2", "rable", 0.38, seed, "pixel", PIXEL_GUIDANCE=2.0)
    plant("p1", "rable", 0.10, 1, "pixel", PIXEL_GUIDANCE=1.0)
    pixel = [r for r in comparison.paired_rows(results.load(tmp_path))
             if r["change"] == "pixel → copy"]
    assert [r["seeds"] for r in pixel] == [[1], [0, 1]]
    assert pixel[1]["last"]["diff"][0] == pytest.approx(-0.02)
    text = results.render(results.load(tmp_path))
    assert "| feature → feature-copy | 0, 1, 2 | 51.00 / 49.00 | +2.00 ± 2.48 |" in text


def test_dynamic_arms_are_paired_with_the_static_and_the_resampling_controls(tmp_path):
    from rable_nb.batch import comparison

    def plant(path, method, last, seed, topup=False):
        _plant(tmp_path, f"quick-cpu/{path}-s{seed}", method, last, seed=seed)
        if topup:
            f = tmp_path / f"quick-cpu/{path}-s{seed}/metrics-{method}.json"
            m = json.loads(f.read_text())
            m["params"]["synthetic"] = {"generator": "copy", "cond_labels": "pseudo"}
            m["n_synthetic"] = 100
            f.write_text(json.dumps(m))
    for seed in (0, 1, 2):
        plant("p", "proden", 0.40, seed)
        plant("pd", "proden+drs", 0.50 + 0.01 * seed, seed)
        plant("ad", "able+drs", 0.45, seed)
        plant("r", "rable", 0.44, seed, topup=True)
        plant("rd", "rable+drs", 0.47, seed, topup=True)
    by = {(r["arm"][1], r["change"]): r for r in comparison.paired_rows(results.load(tmp_path))}
    assert by[("proden+drs", "drs → none")]["last"]["diff"][0] == pytest.approx(0.11)
    assert by[("rable+drs", "drs → none")]["last"]["diff"][0] == pytest.approx(0.03)
    assert by[("rable+drs", "top-up → none (able)")]["last"]["diff"][0] == pytest.approx(0.02)
    assert ("able+drs", "drs → none") not in by          # no plain able run: no row
    assert by[("proden+drs", "drs → none")]["seeds"] == [0, 1, 2]
    # a record with its warm-up's pseudo_sha1 pairs with older records of the same top-up
    # (same cache key and conditioning labels) that predate that fingerprint — not with
    # another top-up
    for path, method, sha, cond in (("r", "rable", None, "c1"), ("rd", "rable+drs", "p1", "c1"),
                                    ("rx", "rable+drs", "p2", "c2")):
        for seed in (0, 1, 2):
            f = tmp_path / f"quick-cpu/{path}-s{seed}/metrics-{method}.json"
            m = json.loads(f.read_text()) if f.exists() else None
            if m is None:
                plant(path, method, 0.5, seed, topup=True)
                m = json.loads(f.read_text())
            warmup = {"cache": "w", "test_accuracy": 0.37, **({"pseudo_sha1": sha} if sha else {})}
            m["params"]["synthetic"].update(warmup=warmup, cond_sha1=cond)
            f.write_text(json.dumps(m))
    rows = [r for r in comparison.paired_rows(results.load(tmp_path))
            if r["change"] == "drs → none" and r["arm"][1] == "rable+drs"]
    assert len(rows) == 1 and rows[0]["last"]["diff"][0] == pytest.approx(0.03)
    # other settings of a piece (METHOD_PARAMS) make another arm and another row
    for seed in (0, 1):
        plant("ps", "proden+drs", 0.45, seed)
        f = tmp_path / f"quick-cpu/ps-s{seed}/metrics-proden+drs.json"
        m = json.loads(f.read_text())
        m["params"]["METHOD_PARAMS"] = {"drs": {"labels": "soft"}, "la": {"zeta": 2}}
        f.write_text(json.dumps(m))
    by = {(r["arm"][1], r["change"]): r for r in comparison.paired_rows(results.load(tmp_path))}
    assert by[("proden+drs", "drs → none")]["last"]["diff"][0] == pytest.approx(0.11)
    soft = by[("proden+drs {drs.labels=soft}", "drs → none")]
    assert soft["seeds"] == [0, 1] and soft["last"]["diff"][0] == pytest.approx(0.05)
    assert "| proden+drs {drs.labels=soft} |" in results.render(results.load(tmp_path))


def test_runs_of_another_budget_than_the_profiles_are_rows_of_their_own(tmp_path):
    from rable_nb.batch import comparison
    for path, epochs, last in (("q", 25, 0.33), ("main-job", 10, 0.29)):
        _plant(tmp_path, f"quick-cpu/{path}", "able", last, seed=0)
        f = tmp_path / f"quick-cpu/{path}/metrics-able.json"
        m = json.loads(f.read_text())
        m["params"].update(PROFILE="quick", EPOCHS=epochs)
        f.write_text(json.dumps(m))
    entries = results.load(tmp_path)
    assert sorted(results.row_label(m) for m in entries) == ["able", "able (10 epochs)"]
    assert len({comparison.arm(m) for m in entries}) == 2  # never paired as one arm's seeds
    text = results.render(entries)
    assert "| able | [33.00]" in text and "| able (10 epochs) | [29.00]" in text
    protocol_l = {"params": {"PROFILE": "paper", "PROTOCOL": "L", "EPOCHS": 800}}
    assert comparison.budget(protocol_l) == ""  # L's own 800 epochs are no other budget


def _plant_audit(root, path, generator, judged, fd, **settings):
    audit = dict(generator=generator, space="image", overall=dict(judge_accuracy=judged,
                 memorisation=0.1), judge=dict(arch="mini_cnn", test_accuracy=0.53),
                 per_class=[dict(label=c, judge_accuracy=judged, judge_accuracy_real=0.6,
                                 fd_judge=fd + c, fd_judge_real_train=0.1, diversity=0.5)
                            for c in (8, 9)])
    folder = root / path
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "synthetic-audit.json").write_text(json.dumps(audit))
    (folder / "synthetic-settings.json").write_text(json.dumps(dict(
        generator=generator, cond_labels="pseudo", plan=[0] * 8 + [10, 20], **settings)))


def test_audits_of_top_ups_get_a_row_each_naming_their_seed_copies(tmp_path):
    _plant(tmp_path, "quick-cpu/pixel", "rable", 0.31)
    _plant_audit(tmp_path, "quick-cpu/pixel", "pixel", 0.7, 2.0, PIXEL_GUIDANCE=2.0)
    _plant_audit(tmp_path, "quick-cpu/pixel-s1", "pixel", 0.7, 2.0, PIXEL_GUIDANCE=2.0)
    _plant_audit(tmp_path, "quick-cpu/pixel-g1", "pixel", 0.4, 1.0, PIXEL_GUIDANCE=1.0)
    audits = results.load_audits(tmp_path)
    assert sorted(len(a["folders"]) for a in audits) == [1, 2]
    text = results.render(results.load(tmp_path), audits)
    assert ("| pixel, pseudo labels, pixel guidance 2.0 + 30 | image | mini_cnn (53.00 on test) "
            "| 70.00 (60.00) | 10.50 (0.10) | 0.50 | 10.00 | "
            "[pixel](quick-cpu/pixel/synthetic-audit.json) · "
            "[pixel-s1](quick-cpu/pixel-s1/synthetic-audit.json) |") in text
    assert "| pixel, pseudo labels, pixel guidance 1.0 + 30 | image |" in text
    (tmp_path / "quick-cpu/pixel-g1/synthetic-audit.json").write_text('{"generator": "pixel"}')
    with pytest.raises(ValueError, match="pixel-g1/synthetic-audit.json is not an audit"):
        results.write_readme(tmp_path)
