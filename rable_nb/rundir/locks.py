"""One writer per directory: an exclusive lock file that names its holder.

``with DirLock(run_dir, "run"):`` holds ``run_dir/.rable_nb.lock`` for the duration. The
file records the holder's pid, host, start time and command; a second process asking for
the same directory is refused at once with :class:`LockedError` naming them. The lock
itself is an OS advisory lock (``fcntl.flock``) on that file, which the kernel releases
when its holder dies however it dies (``kill -9`` included). A lock file left behind by a
dead holder is therefore stale: it is taken over with a notice on stderr. On a shared
file system whose locks do not reach other hosts, a lock file naming another host is
never taken over (its holder cannot be checked from here); the message says how to
remove it.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

LOCK_FILE = ".rable_nb.lock"


class LockedError(RuntimeError):
    """Another process writes into the directory; the message names it."""


def _holder(text: str) -> dict:
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"unreadable": text[:200]}


def _describe(h: dict) -> str:
    return (f"pid {h.get('pid')} on host {h.get('host')} since {h.get('since')} "
            f"({h.get('command', '?')})")


class DirLock:
    """Context manager: exclusive writer lock on ``directory`` (created if needed).

    ``what`` names the holder's job in messages (e.g. 'run', 'sweep').
    """

    def __init__(self, directory: str | os.PathLike, what: str = "run"):
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self.fd: int | None = None

    def __enter__(self) -> "DirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
                os.close(fd)
                raise LockedError(
                    f"{self.path.parent} is in use by another {held.get('what', 'process')}: "
                    f"{_describe(held)}. Wait for it to finish, or write into another "
                    "directory.") from None
            if self._same_file(fd):  # not a file its previous holder just removed
                break
            os.close(fd)
        old = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        if old.get("host") not in (None, socket.gethostname()):
            os.close(fd)
            raise LockedError(
                f"{self.path.parent} is locked by {_describe(old)}, which cannot be checked "
                f"from this host. If that process has ended, delete {self.path}.")
        if old:
            print(f"notice: taking over the stale lock of {self.path.parent} left by "
                  f"{_describe(old)}, which is no longer running.", file=sys.stderr)
        me = dict(what=self.what, pid=os.getpid(), host=socket.gethostname(),
                  since=dt.datetime.now().isoformat(timespec="seconds"),
                  command=" ".join(sys.argv)[:300])
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file, then drop the lock (so no one sees a stale file)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
