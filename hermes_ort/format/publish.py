"""Building a model directory beside its target and swapping it into place only when complete.

Whatever dies when (an exception, a kill, a power cut), the target is the old model or the new one: the
new one is built in a hidden sibling (.NAME.partial-PID, locked while it is being built) and swapped in
with one renameat2(RENAME_EXCHANGE). The old version moves aside (.NAME.retired-NS) and is removed once no
session reads it (pinned.py). Leftovers of a killed build or update are swept by the next one.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Iterator

from ..errors import HermesError
from .manifest import MANIFEST_NAME
from . import manifest as manifest_io
from .warm import warm
from .pinned import RETIRED, lock, remove_if_unused

RENAME_EXCHANGE = 2
AT_FDCWD = -100
_SYSCALL = {"x86_64": 316, "aarch64": 276, "armv7l": 382, "armv6l": 382, "riscv64": 276}  # renameat2
HIDDEN_KINDS = (".partial-", ".update-", RETIRED)


@contextlib.contextmanager
def building(out: str | os.PathLike) -> Iterator[Path]:
    """Yields a hidden temporary directory; on success it replaces `out`, on any error it is removed.

    A failed or interrupted build therefore leaves nothing at `out` that looks like a model. Its weight
    files are synced and cached again in huge pages, as streaming maps them fastest (page_cache.py).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise HermesError(f"{out} exists and is not a model directory: refusing to replace it")
    with staging(out, ".partial-") as tmp:
        yield tmp
        if (tmp / MANIFEST_NAME).is_file():  # its files were written tensor by tensor: in small pages
            warm(tmp, manifest_io.load(tmp))
        swap_in(tmp, out)


@contextlib.contextmanager
def staging(target: Path, kind: str) -> Iterator[Path]:
    """A fresh hidden sibling of target, locked while this process fills it; removed if filling fails.
    Sweeps what killed builds and updates left, and old versions no session reads any more."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in hidden_versions(target):
        remove_if_unused(leftover)
    tmp = target.parent / f".{target.name}{kind}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    lock(fd, fcntl.LOCK_EX)  # another build's sweep leaves it alone
    try:
        yield tmp
    except BaseException:
        os.close(fd)
        fd = None
        remove_if_unused(tmp)  # ours; or, if it failed after the swap, the old version, kept while read
        raise
    finally:
        if fd is not None:
            os.close(fd)


def hidden_versions(target: Path) -> list[Path]:
    return [p for p in target.parent.glob(f".{target.name}.*") if p.is_dir() and any(
        kind in p.name for kind in HIDDEN_KINDS)]


def swap_in(new: Path, target: Path) -> Path | None:
    """`new` becomes `target` in one step. Returns where the old version waits for the sessions still
    reading it, or None when it is gone (or there was none)."""
    sync_directory(new)
    if not target.exists():
        os.rename(new, target)
        sync_directory(target.parent)
        return None
    exchange(new, target)  # the one step that changes what target is
    retired = target.parent / f".{target.name}{RETIRED}{time.time_ns()}"
    os.rename(new, retired)
    sync_directory(target.parent)
    return None if remove_if_unused(retired) else retired


def exchange(a: Path, b: Path) -> None:
    """Atomically swaps two directory entries (Linux renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        result = libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    elif platform.machine() in _SYSCALL:
        result = libc.syscall(_SYSCALL[platform.machine()], AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b),
                              RENAME_EXCHANGE)
    else:
        raise HermesError(f"cannot swap {b} atomically here: renameat2 is not available on {platform.system()}")
    if result != 0:
        code = ctypes.get_errno()
        raise HermesError(f"cannot swap {a} with {b}: {errno.errorcode.get(code, code)}: {os.strerror(code)}")


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
