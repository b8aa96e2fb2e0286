"""The top-up writer shared by every generator backend, and the readers of its output.

Class c receives ``max(0, T − n_c)`` samples (T = ``TARGET_PER_CLASS``, default n_max; n_c
counts the *conditioning* labels, see ``rable_nb.parts.conditioning``). Every sample has a fixed
slot (class, k) whose seed derives from (SEED, class, k), so the output does not depend on
batching or interruptions. ``synthetic/manifest.jsonl`` is the source of truth: the samples
of a batch are written atomically, then their manifest lines are appended and flushed
(``file``, ``label``, ``seed``, ``generator``, ``cond_labels``, ``model_id``, ``prompt`` + what
the backend adds). On resume a torn last line is dropped, files absent from the manifest
are deleted, and only the missing slots are drawn. ``synthetic/settings.json`` records what made the folder; a top-up
is never extended under other settings.

Optional filter (``SYNTH_FILTER``): ``accept(samples, label)`` keeps a sample or rejects
it; a rejected slot is redrawn with the seed of its next attempt, up to ``max_attempts``
draws; a slot still rejected then keeps its last draw, marked ``accepted: false``.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..rundir import artefacts, jsonl
from ..data import longtail
from ..config import write_atomic
from ..data.longtail import long_tail_counts
from ..rundir.runfiles import MANIFEST, MANIFEST_ROW, SETTINGS, SYNTH_DIR
from .base import slot_seed

# The report's top-up: n_max − n_c summed over CIFAR-10-LT at IF 0.01 (= 37,594).
REPORT_TOPUP = sum(5000 - n for n in long_tail_counts(5000, 10, 0.01))


def topup_plan(class_counts, target: int | None = None) -> dict[int, int]:
    """Synthetic samples per class: max(0, target − n_c), target default n_max."""
    goal = longtail.target_count(class_counts, target)
    return {c: max(0, goal - int(n)) for c, n in enumerate(class_counts)}


def slot_file(classes, label: int, k: int, suffix: str = ".png") -> str:
    """Manifest path of slot (label, k), relative to ``synthetic/``."""
    return f"{classes[label]}/{classes[label]}_{k:05d}{suffix}"


def recover(out_dir: Path) -> list[dict]:
    """Manifest rows after an interruption: torn line dropped, orphan files deleted.

    First every class folder and manifest file must lie inside ``out_dir`` (and it inside
    the run directory), links resolved (``artefacts.inside``): a folder linked elsewhere is
    refused before anything is deleted or written, so deletion never follows a link out."""
    artefacts.inside(out_dir.parent, out_dir.name, "the synthetic folder")
    for entry in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        artefacts.inside(out_dir, entry.name, "synthetic class folder" if entry.is_dir()
                         else "synthetic file")
    path = out_dir / MANIFEST
    rows = jsonl.read(path, schema=MANIFEST_ROW)
    for r in rows:
        artefacts.inside(out_dir, r["file"], f"synthetic sample of {path}")
    seen, kept = set(), []
    for r in rows:  # a row whose file vanished, or a repeated file, is not kept
        if r["file"] not in seen and (out_dir / r["file"]).is_file():
            seen.add(r["file"])
            kept.append(r)
    if len(kept) != len(rows):
        jsonl.write(path, kept)
    for f in [*out_dir.glob("*/*.png"), *out_dir.glob("*/*.npy")]:  # written, no line yet
        if f.relative_to(out_dir).as_posix() not in seen:
            f.unlink()
    for tmp in out_dir.glob("*/.*.tmp*"):
        tmp.unlink()
    return kept


def _planned(plan: dict, classes, suffix: str) -> dict[tuple[int, int], str]:
    return {(c, k): slot_file(classes, c, k, suffix) for c, n in plan.items() for k in range(n)}


def pending(run_dir, plan: dict, classes, settings: dict, suffix: str = ".png") -> int:
    """Slots still to draw; refuses (``ValueError``) a folder made under other settings or
    for a higher target. Repairs an interrupted folder first."""
    out = Path(run_dir) / SYNTH_DIR
    out.mkdir(parents=True, exist_ok=True)
    done = {r["file"] for r in recover(out)}
    if done:
        jsonl.check_settings(out / SETTINGS, settings, what=str(out))
    planned = _planned(plan, classes, suffix)
    extra = done - set(planned.values())
    if extra:
        raise ValueError(f"{out} holds {len(extra)} samples beyond the top-up plan "
                         f"(e.g. {sorted(extra)[0]}): it was made for a higher "
                         f"TARGET_PER_CLASS; use another RUN_DIR or delete {out}.")
    return len(set(planned.values()) - done)


def _save(sample: np.ndarray, path: Path) -> None:
    """An image H×W×C (C = 3, or 1: a greyscale PNG) or a feature vector (.npy)."""
    if sample.dtype == np.uint8 and sample.ndim == 3:
        img = sample[..., 0] if sample.shape[-1] == 1 else sample
        write_atomic(path, lambda t: Image.fromarray(img).save(t, format="PNG"))
    else:
        write_atomic(path, lambda t: np.save(t, sample))


def _draw(generator, label: int, slots: list[int], seed: int, accept, max_attempts: int):
    """{slot: (sample, row fields)}; rejected slots are redrawn (see module docstring)."""
    out, todo = {}, list(slots)
    for attempt in range(max_attempts if accept else 1):
        seeds = [slot_seed(seed, label, k, attempt) for k in todo]
        samples, extras = generator.generate(label, seeds)
        ok = accept(samples, label) if accept else np.ones(len(todo), bool)
        last = attempt == max_attempts - 1
        for k, s, x, e, good in zip(todo, seeds, samples, extras, ok):
            if good or last or not accept:
                fields = dict(e, seed=s)
                if accept:
                    fields.update(attempt=attempt, accepted=bool(good))
                out[k] = (x, fields)
        todo = [k for k, good in zip(todo, ok) if not good]
        if not todo:
            break
    return out


def top_up(run_dir, generator, plan: dict, classes, settings: dict, seed: int = 0,
           batch_size: int | None = None, accept=None, max_attempts: int = 1,
           on_image=None) -> dict:
    """Draw the missing samples of ``plan`` ({class: count}) into ``run_dir/synthetic``.

    ``generator`` is fitted already; ``settings`` (see ``rebalance.topup_settings``) must
    hold ``cond_labels``. ``on_image(row)`` is called after each manifest line (progress
    hooks, tests). ``batch_size`` defaults to the backend's. Returns counts, timing and,
    with a filter, the rejections per class.
    """
    out = Path(run_dir) / SYNTH_DIR
    batch_size = batch_size or generator.batch
    todo_n = pending(run_dir, plan, classes, settings, generator.suffix)
    planned = _planned(plan, classes, generator.suffix)
    rows_done = jsonl.read(out / MANIFEST)
    done = {r["file"] for r in rows_done}
    model_id = generator.model_id() if todo_n else None
    drawn_by = {r.get("model_id") for r in rows_done} - {None}
    if model_id and drawn_by and model_id not in drawn_by:  # compared where recorded
        raise ValueError(f"{out} was drawn by {sorted(drawn_by)[0]}, but the generator's "
                         f"weights are now {model_id} (same settings, other weights: replaced "
                         f"or damaged); delete {out} and run notebook 03 again to draw the "
                         "whole top-up with one model.")
    stats = dict(planned=sum(plan.values()), skipped=sum(plan.values()) - todo_n, generated=0,
                 seconds=0.0, generator=generator.name, model_id=model_id)
    if accept:
        stats.update(rejected_draws=Counter(), kept_unaccepted=Counter())
    by_class = defaultdict(list)
    for (c, k), name in planned.items():
        if name not in done:
            by_class[c].append(k)
    start = time.time()
    with tqdm(total=todo_n, desc=f"top-up ({generator.name})", unit="img",
              disable=not todo_n) as bar:
        for c, slots in by_class.items():
            for lo in range(0, len(slots), batch_size):
                drawn = _draw(generator, c, slots[lo:lo + batch_size], seed, accept, max_attempts)
                rows = []
                for k in slots[lo:lo + batch_size]:
                    sample, fields = drawn[k]
                    rows.append({**dict(file=planned[(c, k)], label=int(c),
                                        generator=generator.name, model_id=model_id,
                                        cond_labels=settings["cond_labels"], prompt=None),
                                 **fields})
                    _save(sample, out / rows[-1]["file"])
                jsonl.append(out / MANIFEST, rows)  # one flush per batch, after its files
                if stats["generated"] == 0:
                    jsonl.record_settings(out / SETTINGS, settings)
                stats["generated"] += len(rows)
                bar.update(len(rows))
                for row in rows:
                    if accept:
                        stats["rejected_draws"][c] += row["attempt"]
                        stats["kept_unaccepted"][c] += not row["accepted"]
                    if on_image:
                        on_image(row)
    if not stats["planned"] and not (out / SETTINGS).exists():
        jsonl.record_settings(out / SETTINGS, settings)  # an empty plan, recorded as such
    stats["seconds"] = round(time.time() - start, 2)
    stats["images_per_s"] = round(stats["generated"] / max(stats["seconds"], 1e-9), 3)
    return stats
