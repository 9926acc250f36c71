"""hermes update DIR NEWDIR: deploying a new version of a model to a board without ever leaving a mix.

The new version is built beside DIR: files whose sha256 did not change are hard links to the old ones
(no bytes copied, no extra disk), the others are copied from NEWDIR and synced, manifest.json last.
Then one renameat2(RENAME_EXCHANGE) swaps it with DIR: before that call DIR is the old version, after
it the new one, whatever crashes when. The old version is moved aside and removed once no session
reads it (pinned.py); leftovers of a crashed update are swept by the next one.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import HermesError
from . import manifest as manifest_io
from .manifest import MANIFEST_NAME, Manifest, sha256_of
from .pinned import RETIRED, remove_if_unused

RENAME_EXCHANGE = 2
AT_FDCWD = -100
_SYSCALL = {"x86_64": 316, "aarch64": 276, "armv7l": 382, "armv6l": 382, "riscv64": 276}  # renameat2


class UpdateError(HermesError):
    """A model directory cannot be updated as asked."""


@dataclass(frozen=True)
class UpdateReport:
    copied: tuple[str, ...]  # files new or changed, copied from NEWDIR
    linked: tuple[str, ...]  # files with the same sha256, hard links to the old version's
    copied_bytes: int
    retired: Path | None  # the old version, kept while a session reads it (None: removed)


def update_model(target: str | os.PathLike, source: str | os.PathLike) -> UpdateReport:
    target, source = Path(target), Path(source)
    if target.resolve() == source.resolve():
        raise UpdateError(f"{target} and {source} are the same directory")
    new = manifest_io.load(source, deep=True)  # the new version must be whole before anything moves
    old = manifest_io.load(target)
    with update_lock(target):
        for leftover in hidden_versions(target):  # a crashed update's, or retired ones nobody reads now
            remove_if_unused(leftover)
        staging = target.parent / f".{target.name}.update-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            copied, linked, size = fill(staging, target, source, old, new)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        exchange(staging, target)  # the one step that changes what DIR is
        retired = target.parent / f".{target.name}{RETIRED}{time.time_ns()}"
        os.rename(staging, retired)
        sync_directory(target.parent)
        gone = remove_if_unused(retired)
    return UpdateReport(copied, linked, size, None if gone else retired)


def fill(staging: Path, target: Path, source: Path, old: Manifest, new: Manifest):
    """Every file of NEWDIR into staging: unchanged ones linked from DIR, the rest copied; the manifest last."""
    old_sha = {f.path: f.sha256 for f in files_of(old)}
    new_sha = {f.path: f.sha256 for f in files_of(new)}
    copied, linked, size = [], [], 0
    names = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    for name in [n for n in names if n != MANIFEST_NAME] + [MANIFEST_NAME]:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        sha = new_sha.get(name)
        if sha is not None and old_sha.get(name) == sha and (target / name).is_file() and (
                sha256_of(target / name) == sha):  # also true on disk: a rotten old copy is replaced
            os.link(target / name, staging / name)
            linked.append(name)
            continue
        shutil.copy2(source / name, staging / name)
        with open(staging / name, "rb") as f:
            os.fsync(f.fileno())
        copied.append(name)
        size += (staging / name).stat().st_size
    sync_directory(staging)
    return tuple(copied), tuple(linked), size


def files_of(manifest: Manifest):
    return [f for s in manifest.stages for f in s.files] + list(manifest.files)


def hidden_versions(target: Path) -> list[Path]:
    return [p for p in target.parent.glob(f".{target.name}.*") if p.is_dir() and (
        RETIRED in p.name or ".update-" in p.name)]


class update_lock:
    """One update of a directory at a time (a lock file beside it)."""

    def __init__(self, target: Path):
        self.path = target.parent / f".{target.name}.update.lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        os.close(self.fd)


def exchange(a: Path, b: Path) -> None:
    """Atomically swaps two directory entries (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        result = libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    elif platform.machine() in _SYSCALL:
        result = libc.syscall(_SYSCALL[platform.machine()], AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b),
                              RENAME_EXCHANGE)
    else:
        raise UpdateError(f"cannot swap {b} atomically here: renameat2 is not available on {platform.system()}")
    if result != 0:
        code = ctypes.get_errno()
        raise UpdateError(f"cannot swap {a} with {b}: {errno.errorcode.get(code, code)}: {os.strerror(code)}")


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
