"""Append-only JSON-lines files that survive interruption (captions, synthetic manifest).

Each line is written with a trailing newline and flushed to disk before the next one, so
an interrupted run leaves at most one torn last line; :func:`read` drops it (rewriting
the file atomically) and the resumed run redoes that item.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .artefacts import DamagedFileError, check_schema, read_json
from ..config import write_atomic, write_json


def read(path: str | os.PathLike, repair: bool = True, schema: dict | None = None
         ) -> list[dict]:
    """Rows of a JSON-lines file ([] when absent); a torn last line is dropped. With
    ``schema`` (``artefacts.check_schema``) a row of another shape is an
    ``artefacts.DamagedFileError`` naming the file, the line and the field."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path} line {i + 1} is corrupt (not the last line, so not "
                                 f"an interrupted write); fix or delete the file.") from None
    if schema is not None:
        for i, row in enumerate(rows, 1):
            try:
                check_schema(row, schema)
            except ValueError as err:
                raise DamagedFileError(f"{path} row {i} is not of its kind: {err}. Fix or "
                                       "delete that line (or the file) and rerun the stage "
                                       "that wrote it.") from None
    complete = len(rows) == sum(1 for x in lines if x.strip())
    torn = bool(text) and (not text.endswith("\n") or not complete)
    if torn and repair:
        write(path, rows)
    return rows


def write(path: str | os.PathLike, rows: list[dict]) -> None:
    """Replace the file with ``rows`` atomically."""
    write_atomic(path, lambda t: t.write_text("".join(json.dumps(r) + "\n" for r in rows)))


def append(path: str | os.PathLike, rows: list[dict]) -> None:
    """Append ``rows`` (one line each) and flush them to disk."""
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_settings(path: str | os.PathLike, settings: dict, what: str) -> None:
    """Refuse to extend an existing output (``what``) under other recorded settings."""
    path = Path(path)
    old = read_json(path, what=f"the settings of {what}",
                    fix=f"Delete {what} and {path.name} to start over.") or settings
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
        raise ValueError(f"{what} was made with other settings {diff} (old, new): use another "
                         f"RUN_DIR, or delete {what} and {path.name} to start over.")


def record_settings(path: str | os.PathLike, settings: dict) -> None:
    """Write the settings of an output atomically (after its first rows exist)."""
    write_json(path, settings)
