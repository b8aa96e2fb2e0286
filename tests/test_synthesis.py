"""Synthesis stage: top-up plan, interrupted + resumed generation, errors, benchmark."""
import json
from collections import Counter

import numpy as np
import pytest

from rable_nb import synthesis
from rable_nb.tiny_models import ModelNotFoundError

CLASSES = ("cat", "dog", "frog")
COUNTS = [9, 6, 3]  # target 8 → 0, 2 and 5 synthetic images
CAPTIONS = [{"index": i, "label": c, "caption": f"a {CLASSES[c]} number {i}"}
            for i, c in enumerate([0, 1, 1, 2])]
FAST = dict(target=8, model_id="tiny", device="cpu", size=32, steps=2, batch_size=3)


class Stop(Exception):
    pass


def stop_after(k):
    seen = []

    def hook(row):
        seen.append(row)
        if len(seen) == k:
            raise Stop
    return hook


def manifest(run_dir):
    lines = (run_dir / "synthetic" / "manifest.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def test_topup_plan_and_slots_are_deterministic():
    assert synthesis.topup_plan(COUNTS, 8) == {0: 0, 1: 2, 2: 5}
    assert synthesis.topup_plan(COUNTS) == {0: 0, 1: 3, 2: 6}  # default target n_max
    assert synthesis.REPORT_TOPUP == 37594
    assert synthesis.slot_seed(0, 2, 1) == synthesis.slot_seed(0, 2, 1)
    assert len({synthesis.slot_seed(s, c, k) for s in (0, 1) for c in (0, 1) for k in (0, 1)}) == 8
    p = synthesis.slot_prompt("{caption}, a photo of a {class_name}", ["x", "y"], "frog", 0, 2, 1)
    assert p.endswith(", a photo of a frog") and p[0] in "xy"
    with pytest.raises(ValueError, match="no caption"):
        synthesis.slot_prompt("{caption}", [], "frog", 0, 2, 0)


def test_interrupted_synthesis_resumes_to_exact_counts_without_duplicates(tmp_path, monkeypatch):
    with pytest.raises(Stop):
        synthesis.synthesize(tmp_path, COUNTS, CLASSES, CAPTIONS, on_image=stop_after(4), **FAST)
    out = tmp_path / "synthetic"
    assert len(manifest(tmp_path)) == 4
    # Worst case of a kill: a PNG written without its manifest line, and a torn last line.
    (out / "frog" / "frog_00004.png").write_bytes(b"half a png")
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"file": "frog/frog_00003.png", "lab')
    stats = synthesis.synthesize(tmp_path, COUNTS, CLASSES, CAPTIONS, **FAST)
    assert stats["generated"] == 3 and stats["skipped"] == 4
    rows = manifest(tmp_path)
    files = [r["file"] for r in rows]
    assert len(files) == len(set(files)) == 7
    assert Counter(r["label"] for r in rows) == {1: 2, 2: 5}
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.png")) == sorted(files)
    assert all(set(r) == {"file", "label", "prompt", "seed", "model_id"} for r in rows)
    assert all(r["prompt"] in {c["caption"] for c in CAPTIONS if c["label"] == r["label"]}
               for r in rows)
    x, y, _ = synthesis.load_synthetic(tmp_path)
    assert x.shape == (7, 32, 32, 3) and x.dtype == np.uint8
    # Same slots, seeds and prompts as one uninterrupted run.
    synthesis.synthesize(tmp_path / "fresh", COUNTS, CLASSES, CAPTIONS, **FAST)
    key = lambda r: (r["file"], r["seed"], r["prompt"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, manifest(tmp_path / "fresh")))
    # Nothing left to do: the model is not even loaded.
    monkeypatch.setattr(synthesis, "load_sd", lambda *a, **k: pytest.fail("model loaded"))
    again = synthesis.synthesize(tmp_path, COUNTS, CLASSES, CAPTIONS, **FAST)
    assert again["generated"] == 0
    assert (synthesis.synthetic_counts(tmp_path, 3) + COUNTS)[1:].tolist() == [8, 8]


def test_changed_settings_are_refused(tmp_path):
    synthesis.synthesize(tmp_path, COUNTS, CLASSES, CAPTIONS, **{**FAST, "target": 6})
    with pytest.raises(ValueError, match="other settings"):
        synthesis.synthesize(tmp_path, COUNTS, CLASSES, CAPTIONS, **{**FAST, "steps": 3})
    with pytest.raises(ValueError, match="beyond the top-up"):  # target lowered
        synthesis.synthesize(tmp_path, COUNTS, CLASSES, CAPTIONS, **{**FAST, "target": 5})
    assert len(manifest(tmp_path)) == 3  # nothing was touched


def test_unknown_model_id_gives_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        synthesis.synthesize(tmp_path, COUNTS, CLASSES, CAPTIONS,
                             **{**FAST, "model_id": "nobody/no-such-sd"})
    assert "nobody/no-such-sd" in str(err.value) and "SD_MODEL_ID=" in str(err.value)
    assert not list((tmp_path / "synthetic").glob("*/*.png"))
    assert not (tmp_path / "synthetic" / "settings.json").exists()


def test_validate_rejects_bad_parameters():
    for name, bad in [("SD_SCHEDULER", "fastest"), ("SD_FILTER", "blur"), ("SD_SIZE", 30),
                      ("SD_PROMPT_TEMPLATE", "{nope}")]:
        with pytest.raises(ValueError, match=name):
            synthesis.validate({name: bad})


def test_bench_synth_on_cpu_reports_throughput_and_projection():
    r = synthesis.bench("smoke", "cpu", [1])
    assert r["device"] == "cpu" and r["topup_images"] == 37594
    row = r["results"][0]
    assert row["batch_size"] == 1
    assert row["pipeline_images_per_s"] > 0 and row["unet_images_per_s"] > 0
    hours = 37594 / r["best_images_per_s"] / 3600
    assert r["projected_topup_hours"] == pytest.approx(hours, rel=1e-2)


@pytest.mark.notebook
def test_notebooks_02_03_caption_and_top_up_to_the_target(run_notebooks, smoke_dataset_run,
                                                           tmp_path):
    import shutil

    from rable_nb import captioning, dataset, jsonl
    for name in ("dataset.npz", "dataset.json"):
        shutil.copy(smoke_dataset_run / name, tmp_path / name)
    run_notebooks("02,03", tmp_path)
    ds = dataset.load_dataset(tmp_path)
    target = captioning.PROFILE_DEFAULTS["smoke"]["TARGET_PER_CLASS"]
    caps = jsonl.read(tmp_path / "captions.jsonl", repair=False)
    wanted = ds["indices"][captioning.select_rows(ds["labels"], ds["class_counts"],
                                                  "below_target", target)]
    assert sorted(r["index"] for r in caps) == sorted(wanted.tolist())  # one line per image
    synth = synthesis.synthetic_counts(tmp_path, len(ds["class_counts"]))
    short = ds["class_counts"] < target
    assert short.any() and (ds["class_counts"][short] + synth[short] == target).all()
    assert (synth[~short] == 0).all()
    assert len(list((tmp_path / "synthetic").glob("*/*.png"))) == synth.sum()
    assert (tmp_path / "fig-rebalanced.png").stat().st_size > 0


def test_killed_process_resumes_to_exact_counts(tmp_path):
    """A real SIGKILL mid-run (not an exception): the rerun completes exactly the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (f"import time; from rable_nb import synthesis; synthesis.synthesize("
            f"{str(tmp_path)!r}, {COUNTS}, {CLASSES}, {CAPTIONS}, "
            f"on_image=lambda row: time.sleep(0.3), **{ {**FAST, 'batch_size': 1} })")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path, deadline = tmp_path / "synthetic" / "manifest.jsonl", time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(synthesis.recover(tmp_path / "synthetic"))
    assert 2 <= done_before < 7, "the kill should land mid-run"
    stats = synthesis.synthesize(tmp_path, COUNTS, CLASSES, CAPTIONS, **FAST)
    rows = manifest(tmp_path)
    assert stats["generated"] == 7 - done_before
    assert len({r["file"] for r in rows}) == len(rows) == 7
    assert Counter(r["label"] for r in rows) == {1: 2, 2: 5}
