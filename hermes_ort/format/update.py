"""hermes update DIR NEWDIR: deploying a new version of a model to a board without ever leaving a mix.

The new version is built beside DIR: files whose sha256 did not change are hard links to the old ones
(no bytes copied, no extra disk), the others are copied from NEWDIR and synced, manifest.json last;
copied weight files are cached again in huge pages, as every published model's are (page_cache.py: a
plain copy leaves them in small pages, whose mapping costs a streamed load 50x more).
Then it is swapped in as every publish is (publish.py): before that one call DIR is the old version,
after it the new one, whatever crashes when.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import HermesError
from . import manifest as manifest_io
from .manifest import MANIFEST_NAME, Manifest, sha256_of
from .page_cache import looked_up_files, recache
from .publish import staging, swap_in, sync_directory


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
    with update_lock(target), staging(target, ".update-") as new_version:
        copied, linked, size = fill(new_version, target, source, old, new)
        retired = swap_in(new_version, target)
    return UpdateReport(copied, linked, size, retired)


def fill(new_version: Path, target: Path, source: Path, old: Manifest, new: Manifest):
    """Every file of NEWDIR into the new version: unchanged ones linked from DIR, the rest copied; the manifest last."""
    old_sha = {f.path: f.sha256 for f in files_of(old)}
    new_sha = {f.path: f.sha256 for f in files_of(new)}
    copied, linked, size = [], [], 0
    weights, tables = {f.path for s in new.stages for f in s.weights}, looked_up_files(source, new)
    names = sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())
    for name in [n for n in names if n != MANIFEST_NAME] + [MANIFEST_NAME]:
        (new_version / name).parent.mkdir(parents=True, exist_ok=True)
        if unchanged(name, target, source, old_sha, new_sha):
            os.link(target / name, new_version / name)
            linked.append(name)
            continue
        shutil.copy2(source / name, new_version / name)
        if name in weights:
            recache(new_version / name, huge=name not in tables)  # synced there
        else:
            with open(new_version / name, "rb") as f:
                os.fsync(f.fileno())
        copied.append(name)
        size += (new_version / name).stat().st_size
    sync_directory(new_version)
    return tuple(copied), tuple(linked), size


def unchanged(name: str, target: Path, source: Path, old_sha: dict, new_sha: dict) -> bool:
    """The old version's file has the bytes the new one needs: the same sha256 in both manifests (or, for a
    file no manifest lists, in both directories), checked on disk, so that a rotten old copy is replaced."""
    if name == MANIFEST_NAME or not (target / name).is_file():
        return False
    sha = new_sha.get(name) or sha256_of(source / name)
    return old_sha.get(name, sha) == sha and sha256_of(target / name) == sha


def files_of(manifest: Manifest):
    return [f for s in manifest.stages for f in s.files] + list(manifest.files)


class update_lock:
    """One update of a directory at a time (a lock file beside it)."""

    def __init__(self, target: Path):
        self.path = target.parent / f".{target.name}.update.lock"

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        os.close(self.fd)
