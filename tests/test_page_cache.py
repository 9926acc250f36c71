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
    """How much of the file maps in huge pages, i.e. sits in the page cache in 2 MiB folios (the mapping
    itself asks for none, so it brings what is not cached in small pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        m = map_populated(fd, 0, 0, huge=False)
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

    def recording(fileno, length, offset=0, huge=True):
        lengths.append((offset, length))
        return original(fileno, length, offset, huge)

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


def test_hermes_warm_recaches_the_batched_layout_too(exported, tmp_path, monkeypatch):
    """Batched plans map the layout's files every step: they must come back in huge pages as well."""
    import shutil

    directory = tmp_path / "tiny"
    shutil.copytree(exported("tiny-gpt2").directory, directory)
    assert hermes(["batched", str(directory)]) == 0
    seen = {}
    monkeypatch.setattr(page_cache, "recache", lambda path, huge=True: seen.setdefault(path.relative_to(directory), huge))
    assert hermes(["warm", str(directory)]) == 0
    layout = {p.relative_to(directory) for p in (directory / "batched").glob("*.data")}
    assert layout and all(seen.get(p) is True for p in layout)
    assert {p.relative_to(directory) for p in directory.glob("*.data")} <= set(seen)


def test_a_small_recache_leaves_small_pages(tmp_path):
    if not huge_page_cache_expected(tmp_path):
        pytest.skip(f"no huge pages in the page cache here ({file_system_of(tmp_path)}, or THP off)")
    path = written_tensor_by_tensor(tmp_path / "table.data")
    recache(path)
    recache(path, huge=False)
    assert huge_mapped_bytes(path) == 0


def evict_all(directory: Path) -> None:
    for path in directory.glob("*.data"):  # a cold cache, as after a reboot
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)  # dirty pages (a fresh copy's) would stay
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def test_streaming_from_a_cold_cache_reads_the_token_table_into_small_pages(exported, tmp_path):
    """Head parts read rows of wte ahead of use; wte is also the embeddings' lookup table, so it must come
    back from disk in small pages (from huge ones, 16 token ids took a run 28 MiB over its budget). Both
    readers from a cold cache: the first load's sha256 check, and (files checked this boot, then evicted)
    the loading agents."""
    import shutil

    import hermes_ort
    from hermes_ort.engine.feeds import synthetic_feed
    from hermes_ort.planning.planner import Plan

    directory = shutil.copytree(exported("small-gpt2").directory, tmp_path / "m")
    if not huge_page_cache_expected(directory):
        pytest.skip(f"no huge pages in the page cache here ({file_system_of(directory)}, or THP off)")
    streams_everything = Plan(budget=0, loaders=1, window=2, resident=(), prepacked=(), compute_threads=1,
                              predicted_first_s=0, predicted_steady_s=0, predicted_peak_bytes=0)
    for reader in ("first-load check", "loading agents"):
        evict_all(directory)
        with hermes_ort.InferenceSession(directory, plan_override=streams_everything) as session:
            session.run(["logits"], synthetic_feed(session.manifest, {"sequence": 16}))
        assert huge_mapped_bytes(directory / "embeddings.data") == 0, reader
        assert huge_mapped_bytes(directory / "block_03.data") > 0, reader  # the blocks came back in huge pages


def test_loading_agents_read_a_token_table_ahead_in_small_pages(exported, monkeypatch):
    """Head parts read rows of wte ahead: in small pages, as the embeddings look rows up in it."""
    from hermes_ort.engine import loading
    from hermes_ort.engine.sessions import SessionConfig
    from hermes_ort.engine.templates import Templates
    from hermes_ort.format import manifest as manifest_io

    directory = exported("small-gpt2").directory
    manifest = manifest_io.load(directory)
    reads = []
    monkeypatch.setattr(loading, "read_ahead", lambda path, start=0, length=None, huge=True: reads.append(
        (path.name, huge)))
    templates = Templates(directory, manifest)
    for stage in manifest.stages:
        if stage.kind == "head":
            loading.prepare(directory, stage, SessionConfig(intra_op_threads=1), templates).close()
    assert ("embeddings.data", False) in reads and ("embeddings.data", True) not in reads
    assert all(huge for name, huge in reads if name != "embeddings.data")  # the head's own file (ln_f)


def test_read_ahead_brings_a_cold_file_in_huge_or_small_pages(tmp_path):
    from hermes_ort.engine.loading import read_ahead

    if not huge_page_cache_expected(tmp_path):
        pytest.skip(f"no huge pages in the page cache here ({file_system_of(tmp_path)}, or THP off)")
    path = written_tensor_by_tensor(tmp_path / "w.data")
    for huge in (False, True):
        evict_all(tmp_path)
        read_ahead(path, huge=huge)
        assert (huge_mapped_bytes(path) == SIZE) is huge


@pytest.mark.parametrize("size", [0, 1, 4097, page_cache.CHUNK + 3])
def test_hashing_through_mappings_gives_the_files_sha256(tmp_path, size):
    from hermes_ort.format.manifest import sha256_of

    path = tmp_path / "f.data"
    path.write_bytes(np.random.default_rng(size).integers(0, 255, size, dtype=np.uint8).tobytes())
    assert page_cache.sha256_mapped(path) == page_cache.sha256_mapped(path, huge=False) == sha256_of(path)


def test_a_prepacked_load_from_a_cold_cache_brings_a_block_back_in_huge_pages(exported, tmp_path):
    """Its own session's read-ahead spans the file once: read weight by weight, the small tensors came in
    through 4 KiB folios and took the file's huge pages with them (GPT-2 medium: 4 of 48 MiB left)."""
    import shutil

    from hermes_ort.engine import loading
    from hermes_ort.engine.sessions import SessionConfig
    from hermes_ort.engine.templates import Templates
    from hermes_ort.format import manifest as manifest_io

    directory = tmp_path / "m"
    shutil.copytree(exported("small-gpt2").directory, directory)
    if not huge_page_cache_expected(directory):
        pytest.skip(f"no huge pages in the page cache here ({file_system_of(directory)}, or THP off)")
    manifest = manifest_io.load(directory)
    stage = manifest.stage("block_03")
    checked = Templates(directory, manifest)
    assert [w for w in checked.canonical["block_03"].weights if w.length < 64 << 10], "small tensors in its file"
    checked.integrity.stage(stage)  # checked this boot (stamped): the first-load check reads it no more
    evict_all(directory)
    loading.prepare(directory, stage, SessionConfig(intra_op_threads=1, prepacking=True),
                    Templates(directory, manifest)).close()
    assert huge_mapped_bytes(directory / "block_03.data") >= (directory / "block_03.data").stat().st_size // 2
