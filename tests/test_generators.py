"""Generator backends and the shared top-up writer: plan, slot seeds, every backend end to
end (fit → top-up → exact counts → resume after an interruption), the SD path's errors,
the pixel fit's exact resume, the filter, the benchmarks and notebooks 02-03."""
import json
from collections import Counter

import numpy as np
import pytest

from rable_nb.commands import cli
from rable_nb import config, generators
from rable_nb.rundir import jsonl, runfiles
from rable_nb.stages import s03_rebalance as rebalance
from rable_nb.generators import pixel, sd, topup
from rable_nb.parts.tiny_models import ModelNotFoundError

CLASSES = ("cat", "dog", "frog")
COUNTS = [9, 6, 3]  # target 8 → 0, 2 and 5 synthetic images
LABELS = np.repeat(np.arange(3), COUNTS)
CAPTIONS = [{"index": i, "label": int(LABELS[i]), "caption": f"a {CLASSES[LABELS[i]]} number {i}"}
            for i in (0, 9, 10, 15)]
TARGET, PLANNED = 8, {1: 2, 2: 5}
# smoke settings made smaller still: every backend's TINY (the campaign's device check),
# e.g. a 2-level 8/16-channel UNet trained for 4 steps
FAST = dict(SEED=0, DEVICE="cpu", TARGET_PER_CLASS=TARGET,
            **{k: v for g in generators.GENERATORS.values() for k, v in g.TINY.items()})


class Stop(Exception):
    pass


def stop_after(k):
    seen = []

    def hook(row):
        seen.append(row)
        if len(seen) == k:
            raise Stop
    return hook


def make_run(run_dir):
    """A run directory with a 3-class dataset.npz and captions.jsonl (rows = images)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    ds = dict(indices=np.arange(len(LABELS)), labels=LABELS,
              candidates=np.eye(3, dtype=bool)[LABELS], class_counts=np.array(COUNTS))
    runfiles.save_dataset(run_dir, ds, {})
    jsonl.write(run_dir / "captions.jsonl", CAPTIONS)
    x = np.stack([np.full((32, 32, 3), 10 * i, np.uint8) for i in range(len(LABELS))])
    return x


def fitted(name, run_dir, **params):
    """(generator, settings): backend ``name`` fitted on the run's images, oracle labels."""
    x = make_run(run_dir)
    P = {**rebalance.PROFILE_DEFAULTS["smoke"], **FAST, "GENERATOR": name, **params}
    gen = generators.get(name)
    assert gen.fit(x, LABELS, COUNTS, P, run_dir)["done"]
    return gen, rebalance.topup_settings(gen, P, {"gen_labels": "oracle", "sha1": "test"})


def fit_and_top_up(run_dir, name, on_image=None, **params):
    gen, settings = fitted(name, run_dir, **params)
    plan = generators.topup_plan(COUNTS, TARGET)
    return generators.top_up(run_dir, gen, plan, CLASSES, settings, batch_size=3,
                             on_image=on_image)


def manifest(run_dir):
    return jsonl.read(run_dir / "synthetic" / "manifest.jsonl", repair=False)


def test_topup_plan_and_slots_are_deterministic():
    assert generators.topup_plan(COUNTS, 8) == {0: 0, 1: 2, 2: 5}
    assert generators.topup_plan(COUNTS) == {0: 0, 1: 3, 2: 6}  # default target n_max
    assert generators.REPORT_TOPUP == 37594
    assert generators.slot_seed(0, 2, 1) == generators.slot_seed(0, 2, 1)
    seeds = {generators.slot_seed(s, c, k, a) for s in (0, 1) for c in (0, 1) for k in (0, 1)
             for a in (0, 1)}
    assert len(seeds) == 16
    p = sd.slot_prompt("{caption}, a photo of a {class_name}", ["x", "y"], "frog", 7)
    assert p.endswith(", a photo of a frog") and p[0] in "xy"
    assert p == sd.slot_prompt("{caption}, a photo of a {class_name}", ["x", "y"], "frog", 7)
    with pytest.raises(ValueError, match="no caption"):
        sd.slot_prompt("{caption}", [], "frog", 0)
    with pytest.raises(ValueError, match="GENERATOR"):
        generators.get("vae")


@pytest.mark.parametrize("name", ["copy", "pixel", "gan", "sd", "noise", "remix"])
def test_every_backend_tops_up_exactly_and_resumes_without_duplicates(tmp_path, name):
    run = tmp_path / "run"
    with pytest.raises(Stop):  # batches of 3: cat 0, dog [0, 1], frog [0, 1, 2] [3, 4]
        fit_and_top_up(run, name, on_image=stop_after(4))
    out = run / "synthetic"
    assert len(manifest(run)) == 5  # the stop came after the second batch was recorded
    # Worst case of a kill: a file written without its manifest line, and a torn last line.
    (out / "frog" / "frog_00004.png").write_bytes(b"half a png")
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"file": "frog/frog_00003.png", "lab')
    stats = fit_and_top_up(run, name)
    assert stats["generated"] == 2 and stats["skipped"] == 5
    rows = manifest(run)
    files = [r["file"] for r in rows]
    assert len(files) == len(set(files)) == 7
    assert Counter(r["label"] for r in rows) == PLANNED
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.png")) == sorted(files)
    assert all(r["generator"] == name and r["cond_labels"] == "oracle" for r in rows)
    assert {"file", "label", "seed", "model_id", "prompt"} <= set(rows[0])
    x, y, _ = runfiles.load_synthetic(run)
    assert x.shape == (7, 32, 32, 3) and x.dtype == np.uint8
    # Same slots and seeds as one uninterrupted run (copies: the same images too).
    fit_and_top_up(tmp_path / "fresh", name)
    key = lambda r: (r["file"], r["seed"], r.get("prompt"), r.get("source"))  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, manifest(tmp_path / "fresh")))
    if name == "copy":
        fresh, _, _ = runfiles.load_synthetic(tmp_path / "fresh")
        order = np.argsort(files)
        assert (x[order] == fresh[np.argsort([r["file"] for r in manifest(tmp_path / "fresh")])]).all()
        assert all(LABELS[r["source"]] == r["label"] for r in rows)  # copies of their class
    assert (runfiles.synthetic_counts(run, 3) + COUNTS)[1:].tolist() == [8, 8]


def test_noise_and_remix_borrow_from_the_data_and_name_their_source(tmp_path):
    """OPeN: about NOISE_SHARE of the draws are noise (no source), the rest copies; Remix:
    a class-c image mixed with a head image at a share below REMIX_TAU (x = 10·row, so the
    mix is readable from the pixel value)."""
    gen, _ = fitted("noise", tmp_path / "n", NOISE_SHARE=0.5)
    x, extras = gen.generate(2, range(400))
    noise = np.array([e.get("noise", False) for e in extras])
    assert 0.4 < noise.mean() < 0.6
    assert all(LABELS[e["source"]] == 2 for e in np.array(extras)[~noise])
    assert (x[noise].std(axis=(1, 2, 3)) > 0).all()            # noise, not flat copies
    gen, _ = fitted("remix", tmp_path / "r", REMIX_KAPPA=1.5, REMIX_TAU=0.5)
    x, extras = gen.generate(2, range(50))
    for img, e in zip(x, extras):
        assert LABELS[e["source"]] == 2 and COUNTS[LABELS[e["head"]]] >= 1.5 * COUNTS[2]
        lam = e["head_share"]
        assert 0 <= lam < 0.5
        assert abs(img[0, 0, 0] - ((1 - lam) * 10 * e["source"] + lam * 10 * e["head"])) <= 1
    gen, _ = fitted("remix", tmp_path / "h", REMIX_KAPPA=10)  # no class 10× as big: copies
    x, extras = gen.generate(1, range(5))
    assert all(set(e) == {"source"} for e in extras)
    with pytest.raises(ValueError, match="REMIX_TAU"):
        generators.validate({"REMIX_TAU": 2})
    with pytest.raises(ValueError, match="NOISE_SHARE"):
        generators.validate({"NOISE_SHARE": -0.1})


def test_sd_prompts_come_from_the_captions_of_the_class_and_the_model_loads_lazily(
        tmp_path, monkeypatch):
    fit_and_top_up(tmp_path, "sd")
    for r in manifest(tmp_path):
        assert r["prompt"] in {c["caption"] for c in CAPTIONS if c["label"] == r["label"]}
        assert r["model_id"] == "tiny"
    monkeypatch.setattr(sd, "load_sd", lambda *a, **k: pytest.fail("model loaded"))
    assert fit_and_top_up(tmp_path, "sd")["generated"] == 0


def test_changed_settings_are_refused(tmp_path):
    gen, settings = fitted("sd", tmp_path)
    generators.top_up(tmp_path, gen, generators.topup_plan(COUNTS, 6), CLASSES, settings)
    other = {**settings, "SD_STEPS": 3}
    with pytest.raises(ValueError, match="other settings"):
        generators.top_up(tmp_path, gen, generators.topup_plan(COUNTS, 6), CLASSES, other)
    with pytest.raises(ValueError, match="beyond the top-up"):  # target lowered
        generators.top_up(tmp_path, gen, generators.topup_plan(COUNTS, 5), CLASSES, settings)
    with pytest.raises(ValueError, match="other settings"):  # other conditioning labels
        generators.pending(tmp_path, generators.topup_plan(COUNTS, 6), CLASSES,
                           {**settings, "cond_labels": "pseudo"})
    assert len(manifest(tmp_path)) == 3  # nothing was touched


def test_unknown_sd_model_id_gives_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        fit_and_top_up(tmp_path, "sd", SD_MODEL_ID="nobody/no-such-sd")
    assert "nobody/no-such-sd" in str(err.value) and "SD_MODEL_ID=" in str(err.value)
    assert not list((tmp_path / "synthetic").glob("*/*.png"))
    assert not (tmp_path / "synthetic" / "settings.json").exists()


def test_validate_rejects_bad_parameters():
    for name, bad in [("SD_SCHEDULER", "fastest"), ("SD_FILTER", "blur"), ("SD_SIZE", 30),
                      ("SD_PROMPT_TEMPLATE", "{nope}"), ("GENERATOR", "vae"),
                      ("GEN_LABELS", "true"), ("WARMUP_EPOCHS", 0), ("PIXEL_SAMPLER", "dpm++"),
                      ("PIXEL_CHANNELS", [8]), ("PIXEL_CHANNELS", [16, 30]),
                      ("PIXEL_BALANCE", 2), ("SYNTH_FILTER", "yes"), ("AUDIT_PER_CLASS", -1),
                      ("GAN_CHANNELS", []), ("GAN_AE", "vae"), ("GAN_BATCH", 1),
                      ("GAN_STEPS", -1), ("GAN_GP", True), ("COMPARE_RUNS", "runs/x")]:
        with pytest.raises(ValueError, match=name):
            rebalance.validate({name: bad})
    with pytest.raises(ValueError, match="PIXEL_ATTENTION"):
        generators.validate({"PIXEL_CHANNELS": [8, 16], "PIXEL_ATTENTION": [2]})


def test_pixel_fit_split_by_a_step_budget_equals_an_uninterrupted_fit(tmp_path):
    x = make_run(tmp_path)
    P = {**rebalance.PROFILE_DEFAULTS["smoke"], **FAST}
    whole = generators.get("pixel")
    assert whole.fit(x, LABELS, COUNTS, P, tmp_path / "a")["done"]
    part = generators.get("pixel")
    first = part.fit(x, LABELS, COUNTS, {**P, "GEN_STOP_AFTER": 2}, tmp_path / "b")
    assert not first["done"] and first["steps"] == 2
    rest = part.fit(x, LABELS, COUNTS, P, tmp_path / "b")
    assert rest["done"] and rest["resumed"] and rest["steps_this_call"] == 2
    a, b = whole.model.state_dict(), part.model.state_dict()
    assert all((a[k] == b[k]).all() for k in a)
    assert [r["loss"] for r in first["log"]] == [r["loss"] for r in rest["log"][:1]]
    again = generators.get("pixel")  # a finished fit is loaded, not retrained
    assert again.fit(x, LABELS, COUNTS, P, tmp_path / "a")["loaded"]
    samples = again.sample(1, 3, seed=0)
    assert samples.shape == (3, 32, 32, 3) and samples.dtype == np.uint8
    assert (samples == whole.sample(1, 3, seed=0)).all()


def test_filter_redraws_rejected_samples_and_records_the_cap(tmp_path):
    gen, settings = fitted("copy", tmp_path, SYNTH_FILTER=True, SYNTH_FILTER_ATTEMPTS=3)
    even = lambda samples, label: samples[:, 0, 0, 0] % 20 == 0  # noqa: E731  (even rows)
    stats = generators.top_up(tmp_path, gen, generators.topup_plan(COUNTS, TARGET), CLASSES,
                              settings, accept=even, max_attempts=3)
    rows = manifest(tmp_path)
    assert Counter(r["label"] for r in rows) == PLANNED  # counts exact despite the filter
    for r in rows:
        assert r["accepted"] == (r["source"] % 2 == 0)
        assert r["accepted"] or r["attempt"] == 2  # only the cap keeps a rejected draw
    assert sum(stats["rejected_draws"].values()) == sum(r["attempt"] for r in rows)
    assert sum(stats["kept_unaccepted"].values()) == sum(not r["accepted"] for r in rows)


@pytest.mark.parametrize("name, rates", [("pixel", ["train_images_per_s"]),
                                         ("gan", ["ae_images_per_s", "gan_images_per_s"])])
def test_bench_gen_cli_prints_json(capsys, name, rates):
    assert cli.main(["bench", "gen", "--generator", name, "--device", "cpu",
                     "--batch-size", "4"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["generator"] == name and r["parameters"] > 0
    assert all(r[k] > 0 for k in rates) and r["sample_images_per_s"] > 0
    assert r["projected_topup_s"] == pytest.approx(37594 / r["sample_images_per_s"], rel=1e-2)
    assert cli.main(["bench", "gen", "--generator", "copy", "--device", "cpu"]) == 1


def test_bench_synth_on_cpu_reports_throughput_and_projection():
    r = sd.SD.bench("smoke", "cpu", [1])
    assert r["device"] == "cpu" and r["topup_images"] == 37594
    row = r["results"][0]
    assert row["batch_size"] == 1
    assert row["pipeline_images_per_s"] > 0 and row["unet_images_per_s"] > 0
    hours = 37594 / r["best_images_per_s"] / 3600
    assert r["projected_topup_hours"] == pytest.approx(hours, rel=1e-2)


@pytest.mark.notebook
def test_notebooks_02_03_caption_and_top_up_with_sd(run_notebooks, smoke_dataset_run, tmp_path):
    import shutil

    from rable_nb.stages import s02_captioning as captioning
    for name in ("dataset.npz", "dataset.json"):
        shutil.copy(smoke_dataset_run / name, tmp_path / name)
    run_notebooks("02,03", tmp_path, GENERATOR="sd", GEN_LABELS="oracle")
    ds = runfiles.load_dataset(tmp_path)
    target = captioning.PROFILE_DEFAULTS["smoke"]["TARGET_PER_CLASS"]
    caps = jsonl.read(tmp_path / "captions.jsonl", repair=False)
    wanted = ds["indices"][captioning.select_rows(ds["labels"], ds["class_counts"],
                                                  "below_target", target)]
    assert sorted(r["index"] for r in caps) == sorted(wanted.tolist())  # one line per image
    synth = runfiles.synthetic_counts(tmp_path, len(ds["class_counts"]))
    short = ds["class_counts"] < target
    assert short.any() and (ds["class_counts"][short] + synth[short] == target).all()
    assert (synth[~short] == 0).all()
    assert len(list((tmp_path / "synthetic").glob("*/*.png"))) == synth.sum()
    assert {r["generator"] for r in manifest(tmp_path)} == {"sd"}
    for fig in ("fig-rebalanced.png", "fig-audit.png", "fig-audit-closest.png"):
        assert (tmp_path / fig).stat().st_size > 0


@pytest.mark.notebook  # starts a process to kill
def test_killed_process_resumes_to_exact_counts(tmp_path):
    """A real SIGKILL mid-run (not an exception): the rerun completes exactly the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    code = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_generators as t; from pathlib import Path; "
            f"t.fit_and_top_up(Path({str(tmp_path)!r}), 'copy', "
            f"on_image=lambda row: time.sleep(0.3))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path, deadline = tmp_path / "synthetic" / "manifest.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(topup.recover(tmp_path / "synthetic"))
    assert 2 <= done_before < 7, "the kill should land mid-run"
    stats = fit_and_top_up(tmp_path, "copy")
    rows = manifest(tmp_path)
    assert stats["generated"] == 7 - done_before
    assert len({r["file"] for r in rows}) == len(rows) == 7
    assert Counter(r["label"] for r in rows) == PLANNED


@pytest.mark.notebook
@pytest.mark.parametrize("generator, gen_labels", [("pixel", "pseudo"), ("copy", "oracle")])
def test_notebooks_03_04_rebalance_audit_and_record_the_generator(
        run_notebooks, smoke_dataset_run, tmp_path, generator, gen_labels):
    import shutil
    for name in ("dataset.npz", "dataset.json"):
        shutil.copy(smoke_dataset_run / name, tmp_path / name)
    methods = ["rable"] if generator == "pixel" else ["rable+records"]
    run_notebooks("03,04", tmp_path, GENERATOR=generator, GEN_LABELS=gen_labels, METHODS=methods)
    settings = runfiles.read_settings(tmp_path)
    assert settings["generator"] == generator and settings["cond_labels"] == gen_labels
    assert 0 <= settings["accuracy"]["overall"] <= 1
    result = json.loads((tmp_path / "synthetic" / "audit.json").read_text())
    assert result["generator"] == generator and result["per_class"]
    assert sum(r["n_synthetic"] for r in result["per_class"]) == len(manifest(tmp_path))
    if generator == "copy":
        assert all(r["memorisation"] == 1.0 for r in result["per_class"])
    for fig in ("fig-audit.png", "fig-audit-closest.png", "fig-rebalanced.png"):
        assert (tmp_path / fig).stat().st_size > 10_000
    m = json.loads((tmp_path / f"metrics-{methods[0]}.json").read_text())
    assert m["params"]["GENERATOR"] == generator and m["params"]["GEN_LABELS"] == gen_labels
    assert m["params"]["synthetic"]["cond_sha1"] == settings["cond_sha1"]
    assert m["n_synthetic"] == len(manifest(tmp_path)) > 0


class Shade(generators.Generator):
    """A backend written as a user would add one: grey images of one shade per class."""

    name = "shade"
    PARAMS = ("SHADE_LEVEL",)
    PROFILE_DEFAULTS = {"smoke": {"SHADE_LEVEL": 128}, "quick": {"SHADE_LEVEL": 64},
                        "paper": {"SHADE_LEVEL": 32}}
    CONTROL, TINY = "copy", {"SHADE_LEVEL": 100}

    @staticmethod
    def bench(profile="smoke", device="auto", batch_sizes=None):
        return {"generator": "shade", "profile": profile, "device": device,
                "results": [{"batch_size": b, "images_per_s": 1e6} for b in batch_sizes or [1]]}

    @staticmethod
    def validate(params):
        config.check(params, {"SHADE_LEVEL": (lambda v: config.is_int(v) and 0 <= v <= 255,
                                              "an integer from 0 to 255")})

    def fit(self, images, cond_labels, class_counts, params, run_dir):
        self.level, self.shape = params["SHADE_LEVEL"], np.asarray(images).shape[1:]
        return dict(done=True)

    def generate(self, label, seeds):
        return (np.full((len(seeds), *self.shape), self.level + label, np.uint8),
                [{} for _ in seeds])


def test_a_new_generator_is_one_class_and_one_registry_line(small_long_tail, tmp_path,
                                                             monkeypatch):
    monkeypatch.setitem(generators.GENERATORS, "shade", Shade)
    given = dict(PROFILE="smoke", RUN_DIR=str(tmp_path), GENERATOR="shade", GEN_LABELS="oracle",
                 TARGET_PER_CLASS=12, DEVICE="cpu", SEED=0)
    with pytest.raises(ValueError, match="SHADE_LEVEL=300 is invalid"):  # its rule is checked
        config.resolve("rebalance", create=False, **given, SHADE_LEVEL=300)
    P = config.resolve("rebalance", **given)
    assert P["SHADE_LEVEL"] == 128                                       # its default applies
    cifar, ds, _ = small_long_tail
    result = rebalance.run(P, cifar, ds)                                 # the whole stage
    assert result["complete"] and result["audit"] is not None
    x, y, rows = runfiles.load_synthetic(tmp_path)
    assert Counter(y.tolist()) == {c: n for c, n in result["plan"].items() if n}
    assert all((x[y == c] == 128 + c).all() for c in set(y.tolist()))
    assert {r["generator"] for r in rows} == {"shade"}
    assert json.loads((tmp_path / "synthetic" / "settings.json").read_text())["SHADE_LEVEL"] == 128
    rebalance.rebalanced(result, P, cifar.classes)                      # the stage's figure
    assert (tmp_path / "fig-rebalanced.png").stat().st_size > 10_000
    assert (result["counts"] + result["synth_counts"]).min() >= 12


def _shade_metrics(generator: str, seed: int, last: float) -> dict:
    return {"method": "rable", "n_synthetic": 40, "accuracy": {"last": last, "few": last / 2},
            "params": {"PROFILE": "smoke", "SEED": seed, "dataset": {"IMBALANCE_FACTOR": 0.01,
                                                                     "Q": 0.3},
                       "synthetic": {"generator": generator, "cond_labels": "pseudo"}}}


def test_a_new_generator_passes_the_runner_the_campaign_bench_and_the_comparisons(
        tmp_path, monkeypatch, capsys):
    """Nothing outside the backend's class lists it: the runner and the sweep take its
    parameter (notebook 03's cell does not list it), the campaign checks and times it,
    ``bench gen`` runs its benchmark and the results pair it with its control."""
    from rable_nb.commands import bench, campaign_stages
    from rable_nb.batch import comparison, runner
    from rable_nb.stages import s08_sweep as sweep
    monkeypatch.setitem(generators.GENERATORS, "shade", Shade)
    nb03 = runner.select("03", runner.list_notebooks())
    assert "SHADE_LEVEL" not in runner.parameter_cell(nb03[0])
    base = {"PROFILE": "smoke", "RUN_DIR": str(tmp_path / "run")}
    injected = runner.check_parameters({"GENERATOR": "shade", "SHADE_LEVEL": 7}, nb03, base)
    assert injected[nb03[0]]["SHADE_LEVEL"] == 7
    assert cli.main(["run", "--profile", "smoke", "--only", "03", "--out", base["RUN_DIR"],
                     "-p", "GENERATOR", "shade", "-p", "SHADE_LEVEL", "300"]) == 1
    assert "SHADE_LEVEL=300 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()                          # refused before writing
    grid = tmp_path / "grid.yaml"
    grid.write_text("notebooks: '03'\nfixed: {GENERATOR: shade}\ngrid: {SHADE_LEVEL: [1, 300]}\n")
    with pytest.raises(ValueError, match="SHADE_LEVEL=300 is invalid"):
        sweep.check_points(sweep.load_grid(grid), tmp_path / "sweep")
    # the campaign: its device check (TINY settings) and its benchmark in the speed stage
    checks = [w for w in campaign_stages.generator_checks("cpu", tmp_path / "camp")
              if w[0] == "generator:shade"]
    records, status = campaign_stages.items(float("inf"), checks)
    assert status == "ok" and records["generator:shade"]["samples"] == [6, 32, 32, 3]
    assert (generators.get("shade").TINY == {"SHADE_LEVEL": 100})
    benches = dict((k, fn) for k, _, fn in campaign_stages.generator_benches("cpu", "smoke", [2]))
    assert benches["gen_shade"]()["results"] == [{"batch_size": 2, "images_per_s": 1e6}]
    assert "shade" in bench.benched_generators() and "copy" not in bench.benched_generators()
    assert cli.main(["bench", "gen", "--generator", "shade", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["generator"] == "shade"
    # the paired comparison: shade against its CONTROL at the same seeds
    runs = [_shade_metrics(g, seed, last) for seed in (0, 1, 2)
            for g, last in (("shade", 0.5 + seed / 100), ("copy", 0.4))]
    rows = [r for r in comparison.paired_rows(runs) if r["change"] == "shade → copy"]
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1, 2]
    assert rows[0]["last"]["diff"][0] == pytest.approx(0.11)

