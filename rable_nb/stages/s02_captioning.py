"""Stage 02: BLIP-2 captions of the long-tailed training images.

The report captions every long-tailed image with ``Salesforce/blip2-opt-2.7b`` (fp16,
no text prompt); the captions later become Stable Diffusion prompts for their class.
Captions are appended to ``captions.jsonl`` ({index, label, caption}; ``index`` is the
position in the class-sorted CIFAR-10 training set, as in ``dataset.npz``) batch by batch,
so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import os
import time

import numpy as np
from tqdm.auto import tqdm

from ..rundir import artefacts, jsonl, runfiles
from .. import config
from ..data import longtail
from ..engine.networks import pick_device
from ..parts.tiny_models import TINY, load_pretrained, resolve_model_id

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b"
WHICH = ("all", "below_target")
# A top-up beyond this many images per class is a typo (1000000 x 10 classes = ten million)
MAX_TARGET_PER_CLASS = 50_000
SETTINGS = "captions.json"

PROFILE_DEFAULTS = {
    # smoke: tiny random BLIP-2, only the classes that will be topped up (few images).
    "smoke": dict(CAPTION_MODEL_ID=TINY, CAPTION_WHICH="below_target", CAPTION_BATCH=32,
                  CAPTION_MAX_TOKENS=12, CAPTION_RESCALE=False, TARGET_PER_CLASS=16),
    "quick": dict(CAPTION_MODEL_ID=DEFAULT_MODEL, CAPTION_WHICH="below_target", CAPTION_BATCH=16,
                  CAPTION_MAX_TOKENS=30, CAPTION_RESCALE=False),
    # paper: the report's settings (every long-tailed image, per-image min-max rescale).
    "paper": dict(CAPTION_MODEL_ID=DEFAULT_MODEL, CAPTION_WHICH="all", CAPTION_BATCH=64,
                  CAPTION_MAX_TOKENS=30, CAPTION_RESCALE=True),
}


def validate(params: dict) -> None:
    """Clear ``ValueError`` for bad captioning parameters."""
    config.check(params, {
        "CAPTION_MODEL_ID": config.PATH, "CAPTION_WHICH": config.one_of(WHICH),
        "CAPTION_PROMPT": config.TEXT, "CAPTION_BATCH": config.integer(1),
        "CAPTION_MAX_TOKENS": config.integer(1), "CAPTION_RESCALE": config.BOOLEAN,
        "TARGET_PER_CLASS": (lambda v: config.is_int(v) and 1 <= v <= MAX_TARGET_PER_CLASS,
                             f"a positive integer up to {MAX_TARGET_PER_CLASS} (ten times "
                             "CIFAR-10's 5000 images per class; None = the most frequent "
                             "class's count)"),
    })



def select_rows(labels: np.ndarray, class_counts, which: str, target: int | None) -> np.ndarray:
    """Dataset rows to caption: all, or those of classes with fewer than the target images."""
    validate({"CAPTION_WHICH": which})
    if which == "all":
        return np.arange(len(labels))
    short = np.flatnonzero(np.asarray(class_counts) < longtail.target_count(class_counts, target))
    return np.flatnonzero(np.isin(labels, short))


def minmax_rescale(images: np.ndarray) -> np.ndarray:
    """Per-image min-max rescale to the full 0–255 range (the report's preprocessing)."""
    x = images.astype(np.float32)
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return np.round((x - lo) / np.maximum(hi - lo, 1e-6) * 255).astype(np.uint8)


def load_blip2(model_id: str, device: str = "auto"):
    """(processor, model, device): fp16 on CUDA, fp32 on CPU; ``model_id`` may be 'tiny'."""
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    path = resolve_model_id(model_id, "CAPTION_MODEL_ID")
    dev = pick_device(device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    processor = load_pretrained(Blip2Processor.from_pretrained, path, "CAPTION_MODEL_ID")
    model = load_pretrained(Blip2ForConditionalGeneration.from_pretrained, path,
                            "CAPTION_MODEL_ID", dtype=dtype)
    return processor, model.to(dev).eval(), dev


def caption_batch(processor, model, images: np.ndarray, prompt: str = "",
                  max_new_tokens: int = 30) -> list[str]:
    """Greedy BLIP-2 captions of uint8 images; with a prompt, only the continuation."""
    import torch

    kwargs = dict(images=list(images), return_tensors="pt")
    if prompt:
        kwargs["text"] = [prompt] * len(images)
    inputs = processor(**kwargs).to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    n_in = inputs["input_ids"].shape[1] if prompt else model.config.num_query_tokens + 1
    if out.shape[1] > n_in and bool((out[:, 0] == model.config.image_token_index).all()):
        out = out[:, n_in:]  # generate() returned the image tokens (+ prompt) first
    return [c.strip() for c in processor.batch_decode(out, skip_special_tokens=True)]


def caption_images(run_dir: str | os.PathLike, images: np.ndarray, labels: np.ndarray,
                   indices: np.ndarray, model_id: str = DEFAULT_MODEL, device: str = "auto",
                   batch_size: int = 64, prompt: str = "", max_new_tokens: int = 30,
                   rescale: bool = False) -> dict:
    """Caption ``images`` (rows ``indices`` of the training set) into ``run_dir/captions.jsonl``.

    Indices already in the file are skipped. Returns counts and timing of this call.
    """
    path = artefacts.inside(run_dir, runfiles.CAPTIONS, "captions file")
    artefacts.inside(run_dir, SETTINGS, "captions settings")
    settings = dict(model_id=model_id, prompt=prompt, max_new_tokens=max_new_tokens,
                    rescale=rescale)
    done = {r["index"] for r in jsonl.read(path, schema=runfiles.CAPTION_ROW)}
    if done:
        jsonl.check_settings(path.with_name(SETTINGS), settings, what=str(path))
    todo = [i for i, idx in enumerate(indices) if int(idx) not in done]
    stats = dict(requested=len(indices), skipped=len(indices) - len(todo), captioned=0,
                 seconds=0.0, model_id=model_id)
    if not todo:
        return stats
    processor, model, dev = load_blip2(model_id, device)
    stats["device"] = str(dev)
    start = time.time()
    with tqdm(total=len(todo), desc="captioning", unit="img") as bar:
        for lo in range(0, len(todo), batch_size):
            rows = todo[lo:lo + batch_size]
            batch = images[rows]
            captions = caption_batch(processor, model, minmax_rescale(batch) if rescale else batch,
                                     prompt, max_new_tokens)
            jsonl.append(path, [dict(index=int(indices[r]), label=int(labels[r]), caption=c)
                                for r, c in zip(rows, captions)])
            if lo == 0:
                jsonl.record_settings(path.with_name(SETTINGS), settings)
            bar.update(len(rows))
    stats.update(captioned=len(todo), seconds=round(time.time() - start, 2))
    stats["images_per_s"] = round(len(todo) / max(stats["seconds"], 1e-9), 2)
    return stats



def caption_examples(rows: list[dict], images: np.ndarray, indices: np.ndarray, classes,
                     per_class: int = 4, seed: int = 0, width: int = 24
                     ) -> tuple[np.ndarray, list[str]]:
    """Notebook 02's grid: per class up to ``per_class`` seeded captions next to their images
    (``images[k]`` is the training image ``indices[k]``), titled with the class in capitals
    and the caption wrapped at ``width`` characters. One row per class."""
    import textwrap

    from ..data.longtail import examples_per_class, take
    position = {int(i): k for k, i in enumerate(indices)}
    slots = examples_per_class([r["label"] for r in rows], per_class, seed)
    picked = [rows[s] if s >= 0 else None for s in slots]
    pics = take(images, np.array([position[int(r["index"])] if r else -1 for r in picked]))
    titles = ["" if r is None else
              f"{classes[r['label']].upper()}\n{textwrap.fill(r['caption'], width)}"
              for r in picked]
    return pics, titles


STOPWORDS = frozenset("a an the of in on with and is are to at it its this that there".split())


def caption_stats(rows: list[dict], classes, top: int = 5):
    """Per-class table: captions, mean length in words, most frequent non-stop words."""
    import re
    from collections import Counter

    import pandas as pd

    table = []
    for c, name in enumerate(classes):
        caps = [r["caption"] for r in rows if r["label"] == c]
        words = [w for cap in caps for w in re.findall(r"[a-z']+", cap.lower())]
        common = Counter(w for w in words if w not in STOPWORDS).most_common(top)
        table.append({"class": name, "captions": len(caps),
                      "mean words": np.mean([len(cap.split()) for cap in caps]) if caps else 0.0,
                      "most frequent words": ", ".join(f"{w} ({n})" for w, n in common)})
    return pd.DataFrame(table)
