"""What a loading agent does for one stage: read its bytes from disk ahead of use, then create its session.

ORT maps external data instead of reading it, so creating a session alone reads nothing: the disk read
would happen as page faults inside the first run(). readahead(2) pulls the files into the page cache
first, blocking, without copying them into the process (no RSS is spent on it).
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from .errors import StageError
from .manifest import StageSpec
from .sessions import SessionConfig, open_stage
from .templates import MappedWeights, OwnedStage, Templates, TemplateStage

_CHUNK = 1 << 26  # readahead caps one call's size on some kernels; 64 MiB per call


def _libc_readahead():
    try:
        fn = ctypes.CDLL("libc.so.6", use_errno=True).readahead
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_longlong, ctypes.c_size_t), ctypes.c_ssize_t
    return fn


_READAHEAD = _libc_readahead()


def read_ahead(path: Path) -> None:
    """Bring a whole file into the page cache and return when it is there."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if _READAHEAD is None:  # not Linux glibc: read through a small buffer instead
            buffer = bytearray(1 << 22)
            while f.readinto(buffer):
                pass
            return
        for offset in range(0, size, _CHUNK):
            _READAHEAD(f.fileno(), offset, min(_CHUNK, size - offset))


def prepare(directory: Path, stage: StageSpec, config: SessionConfig, templates: Templates | None = None):
    """A stage ready to run. Through a shared template (weights mapped and populated here) when another
    stage shares its graph and it is not prepacked; else its own session, files read ahead first (ORT
    releases the GIL while it creates it)."""
    form = templates.forms.get(stage.name) if templates is not None and not config.prepacking else None
    if form is None:
        for file in stage.weights:
            read_ahead(directory / file.path)
        return OwnedStage(stage, open_stage(directory, stage, config))
    try:
        weights = MappedWeights(directory, form.weights)
    except (OSError, ValueError) as e:  # a missing or truncated data file
        raise StageError(f"{stage.describe()}: cannot map its weights: {e}") from e
    return TemplateStage(stage, form, templates.session(form, config), weights)


def evict(directory: Path, stage: StageSpec) -> None:
    """Drop the stage's files from the page cache, for cold measurements."""
    for file in stage.files:
        fd = os.open(directory / file.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
