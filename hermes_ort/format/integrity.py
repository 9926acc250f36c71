"""Checking each file of a model against its manifest sha256 the first time it is loaded after a boot.

`hermes verify` hashes everything up front; a session cannot afford that before its first answer, but a
board's storage does rot (SD cards, interrupted copies), so every file is hashed by the loading agent that
first needs it (reading it also brings it into the page cache, which that load needs anyway). Hashing costs
~0.8 ms per MB here, a second for BERT-large in every fresh process, so a file found intact is stamped for
the rest of the boot in the user's runtime directory (tmpfs): the stamp names the boot, the file's device,
inode, size and mtime and the sha256 expected, so any rewrite of the file, or a reboot, has it hashed again.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

from ..errors import StageError
from .manifest import FileSpec, StageSpec
from .page_cache import sha256_mapped


class BootStamps:
    """Files found intact since this boot: an empty file per (boot, file identity, expected sha256)."""

    def __init__(self, root: Path):
        self.root = root
        self.boot = boot_id()

    def key(self, path: Path, sha256: str) -> Path:
        st = os.stat(path)
        identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{sha256}"
        return self.root / f"{self.boot}-{hashlib.sha256(identity.encode()).hexdigest()[:32]}"

    def intact(self, path: Path, sha256: str) -> bool:
        """Stamped this boot, in a directory this user owns (another user's could vouch for anything)."""
        try:
            return self.root.stat().st_uid == os.getuid() and self.key(path, sha256).is_file()
        except FileNotFoundError:
            return False

    def stamp(self, path: Path, sha256: str) -> None:
        try:
            if not self.root.is_dir():
                self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
                for old in self.root.iterdir():  # another boot's stamps mean nothing now
                    if not old.name.startswith(self.boot):
                        old.unlink(missing_ok=True)
            self.key(path, sha256).touch()
        except OSError:  # a read-only or full cache: hashed again next time, nothing worse
            pass


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:16]
    except OSError:
        return "process" + str(os.getpid())  # no boot id: stamps last this process only


def default_stamps() -> BootStamps:
    """In the user's runtime directory (tmpfs, emptied at boot), else /dev/shm, else the temp directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    return BootStamps(Path(runtime) / f"hermes-ort-verified-{os.getuid()}")


class FirstLoadCheck:
    """The files of one model directory already found intact by this session (or since this boot)."""

    def __init__(self, directory: Path, stamps: BootStamps | None = None, small_pages: frozenset[str] = frozenset()):
        self.directory = directory
        self.small_pages = small_pages  # files of lookup tables: read from disk into small pages (page_cache.py)
        self.stamps = stamps or default_stamps()
        self.intact: set[str] = set()
        self.lock = threading.Lock()

    def stage(self, stage: StageSpec, files: tuple[FileSpec, ...] | None = None, where: str = "the manifest") -> None:
        """Raises StageError naming the stage and file when a file's bytes differ from the manifest's (or
        those of `files`, the stage's other files: its batched layout's, from `where`)."""
        for file in stage.files if files is None else files:
            with self.lock:
                if file.path in self.intact:
                    continue
            path = self.directory / file.path
            try:
                if not self.stamps.intact(path, file.sha256):
                    self.hash(stage, file.path, path, file.sha256, where)
            except OSError as e:
                raise StageError(f"{stage.describe()}: cannot read {file.path}: {e}") from e
            with self.lock:
                self.intact.add(file.path)

    def hash(self, stage: StageSpec, name: str, path: Path, sha256: str, where: str = "the manifest") -> None:
        if sha256_mapped(path, huge=name not in self.small_pages) != sha256:  # 8 MiB mapped at a time
            raise StageError(f"{stage.describe()}: file {name} does not match its sha256 in {where} "
                             f"(altered or corrupt); `hermes verify` checks every file")
        self.stamps.stamp(path, sha256)
