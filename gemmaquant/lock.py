"""One run per output directory: an OS file lock (`fcntl.flock`) on `out/.gemmaquant.lock`, held for the run.

A second `gemmaquant quantize` on the same directory fails at once (no waiting) with the first one's pid, which
the holder writes into the lock file. The kernel drops the lock when the holder exits, however it exits (kill -9
included), so a lock file left behind by a killed run locks nothing: the next run takes it.

The lock is re-entrant within one thread: `gemmaquant quantize` holds it around the library's `quantize()`, which
holds it too (so a library caller gets the same protection); another thread or process is refused.

The holder removes the file when it is done. Another process may have opened it just before and then lock the
removed file; so after locking, a process checks that the path still names the file it locked, and starts over
if not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path

from gemmaquant.errors import UsageError

LOCK_NAME = ".gemmaquant.lock"
_held = threading.local()  # .paths: the output directories this thread holds (re-entrant holds pass through)


class OutputLocked(UsageError):
    """Another process holds the output directory."""


@contextmanager
def hold(out: str | os.PathLike):
    """Hold the lock on `out` (created if missing) for the body; raise OutputLocked if another process holds it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    path = out / LOCK_NAME
    held = _held.__dict__.setdefault("paths", set())
    key = os.path.abspath(out)
    if key in held:  # this thread holds it already (the CLI around the library call)
        yield path
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, out)
    except OSError as e:
        raise UsageError(f"{out}: not writable ({e.strerror})") from None
    held.add(key)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        held.discard(key)
        path.unlink(missing_ok=True)  # while still locked: a waiter that opened it will see it is gone
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _pid(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UsageError(f"{path}: cannot lock ({e.strerror})") from None
            who = f"pid {pid}" if pid else "a process that has not written its pid yet"
            raise OutputLocked(f"{out}: another gemmaquant run is writing to this directory ({who}); wait for it "
                               f"to finish or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # we locked a file its holder had just removed: take the new one


def _pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
