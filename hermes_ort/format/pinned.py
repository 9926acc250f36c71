"""An open session's hold on the version of a model directory it opened.

`hermes update` swaps a new version in with one atomic directory exchange and moves the old one aside.
A session reads its files through a descriptor of the directory it opened (/proc/self/fd/N on Linux),
so it keeps serving that version after an update, and holds a shared lock on it, so the update removes
the old version only once no session reads it (or, later, the session that closes last does).
"""
from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from ..errors import HermesError, ManifestError

RETIRED = ".retired-"  # .NAME.retired-<ns>: an old version moved aside by hermes update


class PinnedDirectory:
    """path: what the user named (for messages); root: where this session reads the version it opened."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        for attempt in range(3):  # an update may swap the directory between our open and our lock: again
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError) as e:
                raise ManifestError(f"{self.path} is not a model directory: {e.strerror}") from e
            lock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # held exclusively only by its builder (a self-check),
            if attempt == 2 or os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:  # which keeps it anyway
                break
            os.close(self.fd)
        proc = Path(f"/proc/self/fd/{self.fd}")
        self.root = proc if proc.is_dir() else self.path  # elsewhere than Linux a session sees an update

    def readable(self, error: HermesError) -> HermesError:
        """The error with this session's /proc path replaced by the directory's name."""
        text = str(error)
        if self.root == self.path or str(self.root) not in text:
            return error
        clear = type(error)(text.replace(str(self.root), str(self.path)))
        clear.__cause__ = error.__cause__
        return clear

    def __del__(self):  # a session dropped without close(): its descriptor (and lock) must not outlive it
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        """Lets go of the version; removes it if an update retired it and no other session reads it."""
        if self.fd is None:
            return
        where = Path(os.readlink(self.root)) if self.root != self.path else self.path
        os.close(self.fd)  # also releases the lock
        self.fd = None
        if RETIRED in where.name:
            remove_if_unused(where)


def lock(fd: int, how: int) -> bool:
    """flock, best effort: a filesystem without locks (some network ones) is not an error, only unguarded."""
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def remove_if_unused(directory: Path) -> bool:
    """Removes a retired or half-built version unless a session holds it; True when it is gone."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return True
    try:
        if not lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
            return False
        shutil.rmtree(directory)
        return True
    finally:
        os.close(fd)
