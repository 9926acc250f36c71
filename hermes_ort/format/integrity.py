"""Checking each file of a model against its manifest sha256 the first time a session loads it.

`hermes verify` hashes everything up front; a session cannot afford that before its first answer, but a
board's storage does rot (SD cards, interrupted copies), so every file is hashed once per session, by the
loading agent that first needs it. Reading a file to hash it also brings it into the page cache, which
the load that follows needs anyway.
"""
from __future__ import annotations

import threading
from pathlib import Path

from ..errors import StageError
from .manifest import StageSpec, sha256_of


class FirstLoadCheck:
    """The files of one model directory already found intact by this session."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.intact: set[str] = set()
        self.lock = threading.Lock()

    def stage(self, stage: StageSpec) -> None:
        """Raises StageError naming the stage and file when a file's bytes differ from the manifest's."""
        for file in stage.files:
            with self.lock:
                if file.path in self.intact:
                    continue
            path = self.directory / file.path
            try:
                digest = sha256_of(path, chunk=1 << 20)  # a small buffer: loaders run inside the budget
            except OSError as e:
                raise StageError(f"{stage.describe()}: cannot read {file.path}: {e}") from e
            if digest != file.sha256:
                raise StageError(f"{stage.describe()}: file {file.path} does not match its sha256 in the "
                                 f"manifest (altered or corrupt); `hermes verify` checks every file")
            with self.lock:
                self.intact.add(file.path)
