"""The demo's feedback file read back as partial-label data, every line checked: the images
people labelled in the demo (``rable_nb/stages/s07_demo.py`` writes ``feedback.jsonl`` and
``feedback/<sha256>.png``) for notebook 04's ``FEEDBACK`` and the demo's own summary. A
module of its own below both, so that training reads feedback without importing the demo.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from . import artefacts
from .. import config


class BadFeedback(ValueError):
    """A feedback line that cannot be used; the message says why."""


# one line of feedback.jsonl (artefacts.check_schema), as demo.append_feedback writes it
FEEDBACK_ROW = {"sha256": str, "image": str, "candidates": [str], "candidate_ids": [int]}
FEEDBACK_IMAGE = re.compile(r"feedback/([0-9a-f]{64})\.png")  # what append_feedback writes


def read_feedback(path, classes=None, num_classes: int = 10) -> tuple[list[dict], list[str]]:
    """Every line of a ``feedback.jsonl`` checked: ``(rows, refused)``.

    ``rows``: ``{"sha256", "image" (uint8 32×32×3), "candidate_ids", "where"}`` of the lines
    kept, where a later line for the same image replaces an earlier one (the demo's rule:
    the latest set counts); none when there is no file. ``refused``: ``"FILE line N:
    reason"`` for each line left out —
    damaged (not JSON, a field missing or of the wrong type, its image missing, unreadable
    or not a 32×32 RGB PNG) or foreign (labels that are not ``classes`` or out of range, an
    image that is not ``feedback/<its sha256>.png`` beside the file).
    """
    path = Path(path)
    num_classes = len(classes) if classes is not None else num_classes
    kept, refused = {}, []
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue
        where = f"{config.short_path(path)} line {n}"
        try:
            try:
                entry = json.loads(text)
            except json.JSONDecodeError:
                raise BadFeedback("damaged: not a JSON line") from None
            row = _feedback_row(entry, path.parent, classes, num_classes)
        except BadFeedback as err:
            refused.append(f"{where}: {err}")
            continue
        kept.pop(row["sha256"], None)
        kept[row["sha256"]] = {**row, "where": where}
    return list(kept.values()), refused


def _feedback_row(entry, folder: Path, classes, num_classes: int) -> dict:
    try:
        artefacts.check_schema(entry, FEEDBACK_ROW)
    except ValueError as err:
        raise BadFeedback(f"damaged: not a feedback record ({err})") from None
    ids = entry["candidate_ids"]
    if not ids or not all(config.is_int(c) and 0 <= c < num_classes for c in ids) or len(
            set(ids)) != len(ids):
        raise BadFeedback(f"foreign: candidate_ids {ids} are not distinct labels 0–{num_classes - 1}")
    if classes is not None and entry["candidates"] != [classes[c] for c in ids]:
        raise BadFeedback(f"foreign: candidates {entry['candidates']} are not the classes "
                          f"{ids} of this data set")
    name = FEEDBACK_IMAGE.fullmatch(entry["image"])
    if not name or name.group(1) != entry["sha256"]:
        raise BadFeedback(f"foreign: its image {entry['image']!r} is not "
                          "feedback/<its sha256>.png beside the file")
    try:
        target = artefacts.inside(folder, entry["image"], "feedback image")
    except artefacts.OutsideError as err:
        raise BadFeedback(f"foreign: {err}") from None
    try:
        with Image.open(target, formats=["PNG"]) as img:
            img.load()
            if img.size != (32, 32) or img.mode != "RGB":
                raise BadFeedback(f"damaged: its image {entry['image']} is {img.width}×"
                                  f"{img.height} {img.mode}, not 32×32 RGB")
            image = np.array(img, dtype=np.uint8)
    except BadFeedback:
        raise
    except FileNotFoundError:
        raise BadFeedback(f"damaged: its image {entry['image']} is missing") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadFeedback(f"damaged: its image {entry['image']} cannot be read ({err})") from None
    return dict(sha256=entry["sha256"], image=image, candidate_ids=[int(c) for c in ids])
