"""Reading back what the package wrote: one rule for damaged files.

Every resumable state, cache entry and final artefact is opened through :func:`load`, which
turns any decoding error of the libraries (a truncated or garbage safetensors, npz, npy,
JSON or image file) into one outcome:

- ``resumable=True`` (a training or fit state, a cache entry, a sweep's point record: things
  that can be made again): the file is moved aside to ``<name>.damaged`` with a printed
  notice naming it, and ``None`` is returned, so the caller recomputes it;
- otherwise (a final artefact another stage made): :class:`DamagedFileError`, naming the
  file and what to do (``fix``).

Never a bare library traceback, never a silent wrong result. An absent file is ``None``.
Contents count as decoding: a floating-point array holding NaN or inf (:func:`nonfinite`)
and a JSON file of another shape than its schema (:func:`check_schema`) are damaged too.

Paths under a run directory follow one rule, :func:`inside`: a path read from a file
(a manifest row, a feedback line) or joined under a folder (class folders, captions,
compared runs) is resolved, links included, and must stay inside its folder; otherwise
:class:`OutsideError` names it. Deletion under a folder checks the same first, so it never
follows a link out.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
import zlib
from pathlib import Path

DAMAGED_SUFFIX = ".damaged"
QUARANTINE_NOTICE = "moved aside to"  # in every quarantine notice; the runner repeats them


class DamagedFileError(RuntimeError):
    """A file the package wrote cannot be read back; the message names it and the fix."""


class OutsideError(DamagedFileError):
    """A path under a folder leads outside it (an absolute path, '..', or a link)."""


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str = "file") -> Path:
    """``root / path`` resolved (links followed, whether or not it exists yet); an
    :class:`OutsideError` naming it unless it lies inside ``root`` (itself resolved, so a
    run directory given through a link is fine)."""
    base = Path(root).resolve()
    given = Path(root) / path
    target = given.resolve()
    if target != base and base not in target.parents:
        raise OutsideError(f"{what} {given} leads outside {Path(root)} (to {target}); the "
                           f"package reads and writes only inside it: replace the link or "
                           f"path by a file inside {Path(root)}, or remove it.")
    return target


def os_error_line(err: OSError, what: str = "") -> str:
    """One line for a failed read or write of the operating system (disk full, read-only,
    permission, missing): the file, the reason and what to do."""
    import errno
    where = f" {err.filename}" if err.filename else ""
    todo = {errno.ENOSPC: "the disk is full: free space (or choose another --out on a disk "
                          "with room), then rerun with --resume",
            errno.EDQUOT: "the disk quota is used up: free space, then rerun with --resume",
            errno.EROFS: "the file system is read-only: choose a writable directory (--out)",
            errno.EACCES: "permission denied: make it writable for this user, or choose "
                          "another directory (--out)",
            errno.EPERM: "not permitted: make it writable for this user, or choose another "
                         "directory (--out)",
            errno.ENOENT: "it does not exist: check the path"}.get(
        err.errno, "see the reason; fix it and rerun (--resume continues a run)")
    reason = err.strerror or str(err)
    return f"{what or 'cannot use'}{where}: {reason}; {todo}."


def _decode_errors() -> tuple[type[BaseException], ...]:
    errors = [zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, IndexError,
              TypeError, OSError]  # json/unicode errors are ValueErrors; PIL's are OSErrors
    try:
        from safetensors import SafetensorError
        errors.append(SafetensorError)
    except ImportError:  # torch-free readers (runfiles, results) need no safetensors
        pass
    return tuple(errors)


def quarantine(path: str | os.PathLike, why: str = "", what: str = "file") -> Path:
    """Move a damaged file aside to ``<name>.damaged`` (replacing an older one), print a
    notice naming it; returns the new path."""
    path = Path(path)
    aside = path.with_name(path.name + DAMAGED_SUFFIX)
    os.replace(path, aside)
    print(f"warning: {what} {path} is damaged ({why}); {QUARANTINE_NOTICE} {aside.name} and "
          "made again.", file=sys.stderr, flush=True)
    return aside


def nonfinite(path: Path) -> str | None:
    """The name of the first floating-point array of a safetensors or npz file that holds
    NaN or inf (weights, states, backbones, caches: their contents, not only their
    decoding), else None. Only float arrays are read. (An array a reader returns, e.g. of
    an npy file, is checked by :func:`load` itself: no second read.)"""
    import numpy as np
    if path.suffix == ".safetensors":
        import torch
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if f.get_slice(key).get_dtype().startswith(("F", "BF")):
                    if not torch.isfinite(f.get_tensor(key)).all():
                        return key
    elif path.suffix == ".npz":
        with zipfile.ZipFile(path) as zf:
            floats = []
            for name in zf.namelist():
                with zf.open(name) as member:
                    version = np.lib.format.read_magic(member)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    if header(member)[2].kind in "fc":
                        floats.append(name.removesuffix(".npy"))
        if floats:
            with np.load(path) as arrays:
                return next((k for k in floats if not np.isfinite(arrays[k]).all()), None)
    return None


def fingerprint(*arrays, names: tuple[str, ...] = (), settings: dict | None = None) -> str:
    """SHA-1 of ``settings`` (as sorted JSON, when given), then of each array's shape, type
    and bytes, prefixed by its name when ``names`` are given: which data (and settings) a
    saved state or cache entry was made from — the engine's training state, a generator's
    fit, the warm-up and SSP caches — compared or looked up when it is used again."""
    import numpy as np
    h = hashlib.sha1(json.dumps(settings, sort_keys=True).encode() if settings is not None
                     else b"")
    for i, arr in enumerate(arrays):
        arr = np.ascontiguousarray(arr)
        h.update(f"{names[i] if names else ''}{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _is_nonfinite_array(value) -> bool:
    import numpy as np
    return (isinstance(value, np.ndarray) and value.dtype.kind in "fc"
            and not np.isfinite(value).all())


def load(path: str | os.PathLike, reader, *, what: str = "file", fix: str = "",
         resumable: bool = False):
    """``reader(path)``, or ``None`` when ``path`` does not exist. The floating-point
    arrays of a safetensors or npz file, and an array the reader returns, must be finite
    (:func:`nonfinite`).

    A decoding error of ``reader`` moves the file aside and returns ``None`` when
    ``resumable`` (see the module docstring), else raises :class:`DamagedFileError` naming
    ``what``, the path, the error and ``fix`` (what to do). Errors that are already
    :class:`DamagedFileError` pass through.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        bad = nonfinite(path)
        result = reader(path) if bad is None else None
        if bad is None and _is_nonfinite_array(result):
            bad = path.name
        if bad is not None:
            raise ValueError(f"{bad!r} holds NaN or inf values: the file decodes but its "
                             "contents are not numbers")
        return result
    except DamagedFileError:
        raise
    except _decode_errors() as err:
        why = f"{type(err).__name__}: {err}"[:300]
        if resumable:
            quarantine(path, why, what)
            return None
        raise DamagedFileError(f"{what} {path} is damaged and cannot be read ({why}). "
                               f"{fix or 'Delete it and rerun the stage that wrote it.'}"
                               ) from None


def check_schema(value, schema, where: str = "") -> None:
    """``ValueError`` naming the first field of ``value`` that ``schema`` does not allow.

    A schema is a type or tuple of types (``bool`` is no number unless named), a dict
    ``{field: schema}`` (a field ending in ``?`` may be absent; other fields are free), or a
    one-item list ``[schema]`` (a list whose every item matches)."""
    def name(t):
        return " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))
    at = where or "the top level"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ValueError(f"{at} is {type(value).__name__}, not an object")
        for key, sub in schema.items():
            field = key.rstrip("?")
            if field not in value:
                if key.endswith("?"):
                    continue
                raise ValueError(f"field '{where + '.' if where else ''}{field}' is missing")
            check_schema(value[field], sub, f"{where + '.' if where else ''}{field}")
    elif isinstance(schema, list):
        if not isinstance(value, list):
            raise ValueError(f"field '{at}' is {type(value).__name__} {value!r:.60}, not a list")
        for i, item in enumerate(value):
            check_schema(item, schema[0], f"{where}[{i}]")
    else:
        types = schema if isinstance(schema, tuple) else (schema,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"field '{at}' is {type(value).__name__} {value!r:.60}, not "
                             f"{name(schema)}")


def read_json(path: str | os.PathLike, *, what: str = "file", fix: str = "",
              resumable: bool = False, schema: dict | None = None) -> dict | None:
    """The JSON object in ``path`` (``None`` when absent), through :func:`load`: a file that
    is not JSON, not an object, or not of its ``schema`` (:func:`check_schema`: the field
    is named) is damaged."""
    def reader(p: Path):
        obj = json.loads(p.read_text())
        if not isinstance(obj, dict):
            raise ValueError(f"a JSON object was expected, found {type(obj).__name__}")
        check_schema(obj, schema or {})
        return obj
    return load(path, reader, what=what, fix=fix, resumable=resumable)
