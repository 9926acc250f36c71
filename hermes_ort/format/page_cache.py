"""Mapping a stage's file with every page present, as cheaply as the kernel allows: huge pages.

Streaming a stage from a warm page cache moves no bytes; what costs is the page tables: mapping a 48 MB
GPT-2 medium block 4 KiB at a time took 3.9 ms and unmapping it 1.4 ms (kernel 6.18, ext4), the
loader's CPU taken from a 2-core machine's compute at every load. When the page cache holds the file in
2 MiB folios, the same mapping is 24 PMD entries: 0.08 ms to map, 0.02 ms to unmap.

The page cache keeps whatever folios a file was read into. A cold read through a mapping marked
MADV_HUGEPAGE makes 2 MiB folios; read(2), plain MAP_POPULATE and small writes (an exporter writing
tensor by tensor) make small ones, which stay until the file leaves the cache: `recache` does that, for
every model directory hermes publishes (publish.building) and for `hermes warm DIR`.

Files holding a table that a stage looks rows up in (token embeddings) stay in small pages: a fault maps
the whole folio around it, so from 2 MiB folios each row looked up costs 2 MiB of RSS (SmolLM2's tied
table grew a resident embeddings stage by 27 MiB over a generation, over its budget).
Without MADV_POPULATE_READ (Linux < 5.14) or huge pages, this is MAP_POPULATE as before.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

from .manifest import Manifest
from .onnx_proto import Graph, load_graph

_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
HUGE_PAGE = 2 << 20
CHUNK = 8 << 20  # a mapping counts in RSS while it exists: bring files in 8 MiB at a time
_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
MADV_POPULATE_READ = 22  # Linux 5.14; Python's mmap module names it from 3.13 on


def map_populated(fileno: int, length: int, offset: int = 0, huge: bool = True) -> mmap.mmap:
    """A read-only shared mapping of [offset, offset + length) with every page present on return; what
    it reads from disk lands in huge pages unless `huge` is False (a file holding a lookup table)."""
    m = mmap.mmap(fileno, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset)
    try:
        if _HUGEPAGE is not None and huge:
            m.madvise(_HUGEPAGE)
        m.madvise(MADV_POPULATE_READ)
        return m
    except OSError:  # an older kernel, or no transparent huge pages: populate 4 KiB pages at mmap time
        m.close()
        return mmap.mmap(fileno, length, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ, offset=offset)


def bring_in(fileno: int, start: int, length: int, huge: bool = True) -> None:
    """Bytes [start, start + length) of the file into the page cache (chunks on huge-page boundaries);
    returns when they are there. Adds at most CHUNK to the process's peak RSS."""
    aligned, end = start - start % HUGE_PAGE, start + length
    for chunk in range(aligned, end, CHUNK):
        map_populated(fileno, min(CHUNK, end - chunk), chunk, huge).close()


def sha256_mapped(path: Path, huge: bool = True) -> str:
    """The file's sha256, read through populated mappings a chunk at a time: a file hashed from a cold
    cache (the first load after a boot) then sits in huge pages, where read(2) would leave small ones."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        for chunk in range(0, size, CHUNK):
            with map_populated(fd, min(CHUNK, size - chunk), chunk, huge) as m:
                digest.update(m)
    finally:
        os.close(fd)
    return digest.hexdigest()


def recache(path: Path, huge: bool = True) -> None:
    """Drops the file from the page cache and reads it back, in huge pages (through map_populated) or in
    small ones (read(2)). Costs one read of the file from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return
        os.fsync(fd)  # dirty pages (a file just written) would stay in the cache
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if huge:
            bring_in(fd, 0, size)
            return
        while os.read(fd, CHUNK):
            pass
    finally:
        os.close(fd)


LOOKUPS = ("Gather", "GatherBlockQuantized")


def looked_up_files(directory: Path, manifest: Manifest) -> set[str]:
    """Data files holding a tensor some stage uses as the table of a row lookup."""
    return {name for stage in manifest.stages for name in lookup_files(load_graph(directory / stage.graph.path).graph)}


def lookup_files(graph: Graph) -> frozenset[str]:
    """Data files holding a tensor the graph uses as the table of a row lookup."""
    tables = {n.inputs[0] for n in graph.nodes if n.op_type in LOOKUPS and n.inputs}
    return frozenset(t.external["location"] for t in graph.initializers
                     if t.name in tables and "location" in t.external)
