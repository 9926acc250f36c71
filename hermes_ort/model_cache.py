"""Model directories split on first use from `.onnx` files (or model bytes), kept in a cache.

An entry is named by the source's identity: format version, size, mtime and the sha256 of the graph file
(of the bytes, for bytes). One process builds it under a file lock while others wait, with `hermes split`'s
own code path, published atomically; a marker written last says which source it holds. An entry without
a matching marker, from another format version, or with a file missing or of the wrong size is rebuilt,
never trusted. Building an entry removes older entries of the same source path (the file changed).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .format import manifest as manifest_io
from .errors import ManifestError
from .format.manifest import VERSION, sha256_of
from .format.pinned import remove_if_unused

CACHE_ENV = "HERMES_ORT_CACHE"
MARKER = "hermes-cache.json"


def cache_root() -> Path:
    """$HERMES_ORT_CACHE, else the platform's user cache directory + hermes-ort."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hermes-ort"


@dataclass(frozen=True)
class Entry:
    """One cached model directory and the source it was split from."""

    key: str
    source: str
    directory: Path

    @property
    def bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())


def file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{VERSION}:{stat.st_size}:{stat.st_mtime_ns}:{sha256_of(path)}".encode()).hexdigest()[:32]


def bytes_key(data: bytes) -> str:
    return hashlib.sha256(f"{VERSION}:bytes:".encode() + data).hexdigest()[:32]


def model_directory(source: str | os.PathLike | bytes) -> Path:
    """The model directory for a model directory (as is), an .onnx file or model bytes (cached)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return cached(bytes(source))
    path = Path(source)
    if path.is_dir() or not path.exists():
        return path  # a model directory, or a missing path: manifest loading names the problem
    return cached(path.resolve())


def cached(source: Path | bytes) -> Path:
    key = bytes_key(source) if isinstance(source, bytes) else file_key(source)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / key
    with locked(root / f".{key}.lock"):
        if not usable(entry, key):
            build(source, entry, key, root)
    return entry


def usable(entry: Path, key: str) -> bool:
    try:
        marker = json.loads((entry / MARKER).read_text())
        manifest_io.load(entry)  # format version, every file present at its stated size
    except (OSError, ValueError, ManifestError):
        return False
    return marker.get("key") == key and marker.get("version") == VERSION


def build(source: Path | bytes, entry: Path, key: str, root: Path) -> None:
    from .graphs.split import split_model  # the `onnx` package: only a process that splits a model loads it

    shutil.rmtree(entry, ignore_errors=True)  # a broken entry is rebuilt, not repaired
    if isinstance(source, bytes):
        scratch = root / f".{key}.source.onnx"
        scratch.write_bytes(source)
        try:
            split_model(scratch, entry)
        finally:
            scratch.unlink(missing_ok=True)
        name = "<model bytes>"
    else:
        split_model(source, entry)
        name = str(source)
        for old in entries(root):
            if old.source == name and old.key != key:  # the file's earlier version, unless a session reads it
                remove_if_unused(old.directory)
    (entry / MARKER).write_text(json.dumps({"key": key, "version": VERSION, "source": name}))


def entries(root: Path | None = None) -> list[Entry]:
    root = root or cache_root()
    found = []
    for marker in sorted(root.glob(f"*/{MARKER}")) if root.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            found.append(Entry(marker.parent.name, json.loads(marker.read_text()).get("source", "?"), marker.parent))
    return found


def clear(root: Path | None = None) -> tuple[int, int]:
    """Removes every entry no open session reads (and leftovers of interrupted builds); returns the bytes
    freed and how many entries were kept because a session still reads them."""
    root = root or cache_root()
    if not root.is_dir():
        return 0, 0
    freed, kept = 0, 0
    for child in root.iterdir():
        size = sum(p.stat().st_size for p in child.rglob("*") if p.is_file()) if child.is_dir() else (
            child.stat().st_size)
        if child.is_dir() and not remove_if_unused(child):
            kept += 1
            continue
        if not child.is_dir():
            child.unlink(missing_ok=True)
        freed += size
    return freed, kept


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (POSIX flock; elsewhere, none: the build is still atomic)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
