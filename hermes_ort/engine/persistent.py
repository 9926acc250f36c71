"""Persistent quantized stages: one session per stage for the whole process, opened on its saved pack
(packs.py), whose weight pages leave RSS after each use and come back before the next.

ORT maps the pack's data file privately and reads the packed weights in place, so after a run the pages
are clean file pages: madvise(MADV_DONTNEED) drops them from the process, and the next run (or a loading
agent ahead of it, MADV_POPULATE_READ) maps them again from the page cache. The session itself stays:
a streamed load costs a populate, not a session. Where ORT did not read the pack from the file (it packs
on the heap when the pack does not fit its kernel), dropping pages frees nothing: that is detected after
the first run, warned once, and the stage goes back to a fresh session per load.
"""
from __future__ import annotations

import ctypes
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..format.manifest import StageSpec
from ..format.page_cache import MADV_POPULATE_READ
from .memory import give_back
from .packs import Pack, PackFiles, enabled, open_pack
from .sessions import SessionConfig, run_stage

MADV_WILLNEED, MADV_DONTNEED = 3, 4
FILE_BACKED_SHARE = 0.5  # of the packed bytes, mapped from the pack after a run: else ORT packed on the heap

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def mappings_of(path: Path) -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of the file, from /proc/self/maps."""
    real, found = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n") == real:
                start, end = parts[0].split("-")
                found.append((int(start, 16), int(end, 16)))
    return found


def resident_bytes(ranges: list[tuple[int, int]]) -> int:
    """Bytes of these mappings present in this process (smaps Rss), the OS's own count."""
    starts, total, current = {s for s, _ in ranges}, 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                current = int(head.split("-")[0], 16) in starts
            elif current and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def advise(ranges: list[tuple[int, int]], advice: int) -> bool:
    ok = True
    for start, end in ranges:
        ok &= _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice) == 0
    return ok


@dataclass
class Held:
    """One stage's persistent session: its pack's mapped ranges, and how many loads hold it now."""

    pack: Pack
    session: object
    ranges: list[tuple[int, int]] = field(default_factory=list)
    users: int = 0
    ran: bool = False
    checked: bool = False  # after its first run: are its packed weights read from the file?


class PersistentSessions:
    """The process's persistent sessions, by stage name; `close()` destroys them all."""

    def __init__(self, files: PackFiles | None = None):
        self.files = files or PackFiles()
        self.held: dict[str, Held] = {}
        self.heap_packed: set[str] = set()  # stages ORT packs on the heap anyway: fresh sessions for them
        self.lock = threading.Lock()

    @classmethod
    def if_enabled(cls) -> "PersistentSessions | None":
        return cls() if enabled() else None

    def acquire(self, model_dir: Path, stage: StageSpec, config: SessionConfig) -> "PersistentStage | None":
        """The stage ready to run (its pages brought back), or None where it runs through fresh sessions."""
        if stage.name in self.heap_packed:
            return None
        with self.lock:
            held = self.held.get(stage.name)
        if held is None:
            pack = self.files.pack(model_dir, stage, config)
            if pack.heap_packed or not pack.packed_bytes:  # a kept session would hold its packed weights
                with self.lock:  # on the heap, and its pack's pages and its source's too
                    self.heap_packed.add(stage.name)
                return None
            try:
                session = open_pack(pack, stage, config)
            except Exception as e:  # ORT refuses a pack whose blobs differ from what its kernel makes
                self.files.forget(pack, f"was refused by onnxruntime ({str(e).splitlines()[0][:160]})")
                pack = self.files.pack(model_dir, stage, config)
                session = open_pack(pack, stage, config)
            with self.lock:
                held = self.held.setdefault(stage.name, Held(pack, session))
        with self.lock:
            held.users += 1
            ranges = held.ranges if held.users == 1 else []
        if ranges and not advise(ranges, MADV_POPULATE_READ):  # Linux < 5.14: read ahead, the run maps them
            advise(ranges, MADV_WILLNEED)
        return PersistentStage(stage, held, self)

    def release(self, stage: StageSpec, held: Held) -> None:
        """After a use: the last holder drops the stage's pages (the session stays)."""
        first = False
        with self.lock:
            held.users -= 1
            if held.users > 0:
                return
            if held.session is None:  # closed meanwhile (the process's sessions went first): nothing to judge
                return
            if held.ran and not held.checked:
                held.checked, held.ranges = True, mappings_of(held.pack.data)
                if resident_bytes(held.ranges) < FILE_BACKED_SHARE * held.pack.packed_bytes:
                    self.heap_packed.add(stage.name)
                    self.held.pop(stage.name, None)
                    self.files.mark_heap_packed(held.pack)
                    warnings.warn(f"{stage.describe()}: onnxruntime packed its weights on the heap instead of "
                                  f"reading {held.pack.data}: it streams through a fresh session per load",
                                  stacklevel=2)
                    held.session = None
                    give_back()
                    return
                first = True
            ranges = held.ranges
        advise(ranges, MADV_DONTNEED)
        if first:  # creating the session packed the weights once more on the heap to check the pack: freed
            give_back()

    def evict(self, stage: StageSpec) -> None:
        """Drops the stage's pack files from the page cache (cold measurements, --cold-every-token)."""
        held = self.held.get(stage.name)
        for path in held.pack.files if held is not None else ():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def forget(self, name: str) -> None:
        """Destroys one stage's session (the profiler measures stages one at a time)."""
        with self.lock:
            held = self.held.pop(name, None)
        if held is not None:
            held.session = None
            give_back()

    def close(self) -> None:
        with self.lock:
            for held in self.held.values():
                held.session = None
            self.held.clear()
        give_back()


class PersistentStage:
    """A load of a persistent stage: runs through the kept session; `close()` lets its pages go."""

    persistent = True

    def __init__(self, stage: StageSpec, held: Held, sessions: PersistentSessions):
        self.stage, self.held, self.sessions = stage, held, sessions

    @property
    def session(self):
        return self.held.session

    def run(self, tensors: dict[str, np.ndarray], into: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        outputs = run_stage(self.stage, self.held.session, tensors, into)
        self.held.ran = True
        return outputs

    def close(self) -> None:
        if self.held is not None:
            held, self.held = self.held, None
            self.sessions.release(self.stage, held)
