"""Stage files in the page cache in huge pages: a file written tensor by tensor is cached in small pages;
recache (run on every published model and by `hermes warm`) brings it back in 2 MiB pages, which a
populated mapping then maps whole; bringing a file in holds at most one chunk of it mapped."""
import os
import re
from pathlib import Path

import numpy as np
import psutil
import pytest

from hermes_ort.__main__ import main as hermes
from hermes_ort.format import page_cache
from hermes_ort.format.page_cache import map_populated, recache

SIZE = 16 << 20


def file_system_of(path: Path) -> str:
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    best = max((m for m in mounts if str(path.resolve()).startswith(m[1])), key=lambda m: len(m[1]))
    return best[2]


def huge_page_cache_expected(path: Path) -> bool:
    """Large folios in a file's page cache: Linux with transparent huge pages, a disk file system."""
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return thp.is_file() and "[never]" not in thp.read_text() and file_system_of(path) in ("ext4", "xfs", "btrfs")


def mapped_in_huge_pages(address: int) -> int:
    """FilePmdMapped of the mapping holding `address`, in bytes."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if m := re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line):
            inside = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif inside and line.startswith("FilePmdMapped:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no mapping holds that address")


def written_tensor_by_tensor(path: Path) -> Path:
    data = np.random.default_rng(0).integers(0, 255, SIZE, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for k in range(0, SIZE, 64 << 10):
            f.write(data[k:k + (64 << 10)])
    return path


def huge_mapped_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        m = map_populated(fd, 0)
        view = np.frombuffer(m, np.uint8)
        try:
            return mapped_in_huge_pages(view.ctypes.data)
        finally:
            del view
            m.close()
    finally:
        os.close(fd)


def test_a_recached_file_maps_in_huge_pages(tmp_path):
    if not huge_page_cache_expected(tmp_path):
        pytest.skip(f"no huge pages in the page cache here ({file_system_of(tmp_path)}, or THP off)")
    path = written_tensor_by_tensor(tmp_path / "block.data")
    assert huge_mapped_bytes(path) < SIZE  # small writes leave small pages in the cache
    recache(path)
    assert huge_mapped_bytes(path) == SIZE


def test_a_populated_mapping_holds_every_page(tmp_path):
    path = written_tensor_by_tensor(tmp_path / "block.data")
    fd = os.open(path, os.O_RDONLY)
    before = psutil.Process().memory_info().rss
    m = map_populated(fd, 0)
    try:
        assert psutil.Process().memory_info().rss - before >= SIZE * 0.95  # present without touching a page
    finally:
        m.close()
        os.close(fd)


def test_bringing_a_file_in_maps_one_chunk_at_a_time(tmp_path, monkeypatch):
    path = written_tensor_by_tensor(tmp_path / "block.data")
    lengths = []
    original = page_cache.map_populated

    def recording(fileno, length, offset=0):
        lengths.append((offset, length))
        return original(fileno, length, offset)

    monkeypatch.setattr(page_cache, "map_populated", recording)
    recache(path)
    assert max(length for _, length in lengths) <= page_cache.CHUNK
    assert sum(length for _, length in lengths) == SIZE and all(o % page_cache.HUGE_PAGE == 0 for o, _ in lengths)


def test_hermes_warm_recaches_every_weight_file_and_keeps_the_token_table_small(exported, monkeypatch, capsys):
    directory = exported("tiny-gpt2").directory
    seen = {}
    monkeypatch.setattr(page_cache, "recache", lambda path, huge=True: seen.setdefault(path.name, huge))
    assert hermes(["warm", str(directory)]) == 0
    assert set(seen) == {p.name for p in directory.glob("*.data")}
    assert seen.pop("embeddings.data") is False  # wte: looked up by the embeddings (and read by the head)
    assert seen and all(seen.values())  # the blocks
    assert "in huge pages" in capsys.readouterr().out


def test_a_small_recache_leaves_small_pages(tmp_path):
    if not huge_page_cache_expected(tmp_path):
        pytest.skip(f"no huge pages in the page cache here ({file_system_of(tmp_path)}, or THP off)")
    path = written_tensor_by_tensor(tmp_path / "table.data")
    recache(path)
    recache(path, huge=False)
    assert huge_mapped_bytes(path) == 0
