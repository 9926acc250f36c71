"""Saved packs: each quantized stage's packed weights written once to disk, so its session is created once
per process and its weight pages can leave memory between runs.

MatMulNBits is fast only on weights ORT has packed, and it packs them when a session is created (a SmolLM2
native block ~12 ms, TinyLlama's 30-36 ms), so a streamed quantized stage paid a fresh session at every
load. ORT saves its packed weights beside an optimized graph when asked
(`session.save_external_prepacked_constant_initializers`); a session opened on that graph reads them
through a private mapping of the saved data file, not from the heap. The pages a run faulted in can then
be dropped (persistent.py) and come back from the page cache, or the disk, at the next load.

A pack is only valid for the ORT build and CPU that made it (MLAS picks its layout by the CPU's
features): it lives under a directory named by both and by the stage's own bytes, and its pack.json
names them again with every saved file's sha256, checked the first time a process opens it. A pack that
fails that check, or that ORT refuses, is reported in one line naming the file and built again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from ..errors import StageError
from ..format.manifest import StageSpec
from ..format.onnx_proto import load_graph
from ..format.page_cache import recache, sha256_mapped
from .sessions import SessionConfig, check_session_io, session_options

FORMAT = 1
GRAPH, DATA, META = "stage.onnx", "stage.data", "pack.json"
INLINE_BELOW = 4096  # bytes: smaller initializers (shapes, axes) stay in the graph, where shape inference reads them
PACK_DIR_ENV = "HERMES_PACK_DIR"
PACKS_ENV = "HERMES_PERSISTENT_PACKS"  # "0": streamed quantized stages get a fresh session at each load


def cpu_features() -> str:
    """The CPU's feature flags, sorted (what MLAS dispatches on), or the machine's name where /proc has none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(set(line.split(":", 1)[1].split())))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """ORT's version, the architecture and a digest of the CPU's features: a pack made under another key is
    never opened (its layout may differ, or ORT would quietly pack again on the heap)."""
    digest = hashlib.sha256(cpu_features().encode()).hexdigest()[:12]
    return f"ort{ort.__version__}-{platform.machine()}-{digest}"


def pack_root() -> Path:
    """$HERMES_PACK_DIR, else the user's cache directory: model directories may be read-only or shared."""
    if os.environ.get(PACK_DIR_ENV):
        return Path(os.environ[PACK_DIR_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hermes-ort" / "packs"


def enabled() -> bool:
    """Packs need Linux's /proc and madvise; $HERMES_PERSISTENT_PACKS=0 turns them off."""
    return sys.platform.startswith("linux") and os.environ.get(PACKS_ENV, "1") != "0"


def source_digest(stage: StageSpec, config: SessionConfig) -> str:
    """The stage's files (by their manifest sha256) and the optimizations its saved graph went through."""
    parts = [stage.graph.sha256, *(w.sha256 for w in stage.weights), config.optimization, str(FORMAT)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Pack:
    """A saved pack's files; packed_bytes: what its packed weights take (the pages a run of it faults in)."""

    directory: Path
    packed_bytes: int
    heap_packed: bool = False  # a session on it packed its weights on the heap anyway (persistent.py)

    @property
    def graph(self) -> Path:
        return self.directory / GRAPH

    @property
    def data(self) -> Path:
        return self.directory / DATA

    @property
    def files(self) -> tuple[Path, Path]:
        return self.graph, self.data


class PackFiles:
    """Where packs live for this machine key, building and checking them. Thread-safe: loading agents ask
    for different stages at once; two processes building one pack each write their own and one wins."""

    def __init__(self, root: Path | None = None, key: str | None = None):
        self.root, self.key = root or pack_root(), key or machine_key()
        self.checked: dict[str, Pack] = {}  # by pack directory: found intact by this process
        self.lock = threading.Lock()
        self.building: dict[str, threading.Lock] = {}

    def place(self, stage: StageSpec, config: SessionConfig) -> Path:
        return self.root / self.key / source_digest(stage, config)

    def pack(self, model_dir: Path, stage: StageSpec, config: SessionConfig) -> Pack:
        """The stage's pack, built first when it is missing, made under another key, or corrupt."""
        where = self.place(stage, config)
        with self.lock:
            if str(where) in self.checked:
                return self.checked[str(where)]
            guard = self.building.setdefault(str(where), threading.Lock())
        with guard:
            with self.lock:
                if str(where) in self.checked:
                    return self.checked[str(where)]
            found = self.intact(where, stage, config)
            if found is None:
                found = build(model_dir, stage, config, where, self.meta(stage, config))
            with self.lock:
                self.checked[str(where)] = found
            return found

    def meta(self, stage: StageSpec, config: SessionConfig) -> dict:
        return {"format": FORMAT, "key": self.key, "source": source_digest(stage, config), "stage": stage.name}

    def intact(self, where: Path, stage: StageSpec, config: SessionConfig) -> Pack | None:
        """The pack at `where` if its pack.json names this key and source and every file has its sha256;
        else None, with one line saying what was wrong when something was there."""
        if not (where / META).is_file():
            return None
        try:
            meta = json.loads((where / META).read_text())
            if {k: meta.get(k) for k in ("format", "key", "source")} != {
                    k: v for k, v in self.meta(stage, config).items() if k != "stage"}:
                return stale(where / META, "was made by another ORT build, CPU or stage")
            for name, digest in meta["files"].items():
                if sha256_mapped(where / name) != digest:
                    return stale(where / name, "does not match its sha256 in pack.json (altered or corrupt)")
            return Pack(where, int(meta["packed_bytes"]), bool(meta.get("heap_packed")))
        except (OSError, ValueError, KeyError, TypeError) as e:
            return stale(where / META, f"cannot be read ({type(e).__name__}: {e})")

    def mark_heap_packed(self, pack: Pack) -> None:
        """Records in pack.json that ORT does not read this pack in place, so later processes open fresh
        sessions for the stage without trying a kept one first."""
        meta_file = pack.directory / META
        try:
            meta = json.loads(meta_file.read_text())
            meta_file.write_text(json.dumps({**meta, "heap_packed": True}, indent=1))
        except (OSError, ValueError):  # another process rebuilt it meanwhile: it finds out again
            return
        with self.lock:
            self.checked[str(pack.directory)] = dataclasses.replace(pack, heap_packed=True)

    def forget(self, pack: Pack, why: str) -> None:
        """A pack ORT refused or did not read from disk: one line, its files removed, built again next time."""
        stale(pack.directory / DATA, why)
        with self.lock:
            self.checked.pop(str(pack.directory), None)
        shutil.rmtree(pack.directory, ignore_errors=True)


def stale(path: Path, why: str) -> None:
    warnings.warn(f"saved pack {path} {why}: building it again", stacklevel=2)
    return None


def build(model_dir: Path, stage: StageSpec, config: SessionConfig, where: Path, meta: dict) -> Pack:
    """Creates the stage's session once with ORT saving its optimized graph and packed weights, in a
    private directory renamed into place when complete (a crash leaves no half pack behind)."""
    where.parent.mkdir(parents=True, exist_ok=True)
    tmp = where.with_name(f"{where.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        opts = session_options(dataclasses.replace(config, prepacking=True))
        opts.optimized_model_filepath = str(tmp / GRAPH)
        for key, value in (("session.optimized_model_external_initializers_file_name", DATA),
                           ("session.optimized_model_external_initializers_min_size_in_bytes", str(INLINE_BELOW)),
                           ("session.save_external_prepacked_constant_initializers", "1")):
            opts.add_session_config_entry(key, value)
        source = model_dir / stage.graph.path
        try:
            ort.InferenceSession(str(source), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's pybind errors
            raise StageError(f"{stage.describe()}: cannot save its pack to {tmp}: {e}") from e
        packed = packed_bytes(tmp / GRAPH)
        (tmp / DATA).touch()  # absent when every initializer was small enough to stay in the graph
        recache(tmp / DATA)  # ORT wrote it in small pages: read back in huge ones (page_cache.py)
        files = {name: sha256_mapped(tmp / name) for name in (GRAPH, DATA)}
        (tmp / META).write_text(json.dumps({**meta, "files": files, "packed_bytes": packed}, indent=1))
        if where.exists():
            shutil.rmtree(where, ignore_errors=True)
        try:
            os.rename(tmp, where)
        except OSError:  # another process put its pack there first: the same bytes
            shutil.rmtree(tmp, ignore_errors=True)
        return Pack(where, packed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def packed_bytes(graph: Path) -> int:
    """Bytes of the packed blobs a saved graph points at (its initializers' `prepacked_*` external-data
    entries: "kernel key|offset;length;alignment|..."); 0 when ORT saved none."""
    return sum(int(blob.split(";")[1]) for tensor in load_graph(graph).graph.initializers
               for key, value in tensor.external.items() if key.startswith("prepacked")
               for blob in value.split("|")[1:])


def open_pack(pack: Pack, stage: StageSpec, config: SessionConfig):
    """A session on the saved graph, nothing optimized again (the graph is already optimized and its
    packed weights are keyed to it)."""
    opts = session_options(dataclasses.replace(config, optimization="disable", prepacking=True))
    session = ort.InferenceSession(str(pack.graph), sess_options=opts, providers=["CPUExecutionProvider"])
    check_session_io(stage, session)
    return session
