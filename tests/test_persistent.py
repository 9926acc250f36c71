"""Persistent quantized stages (engine/persistent.py, engine/packs.py): one session per stage for the process,
its weight pages out of RSS between loads and the same outputs when they come back; saved packs keyed by ORT
build and CPU, checked, and rebuilt when stale or corrupt; plans count what the kept sessions hold."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import hermes_ort
from hermes_ort.convert import convert_gguf
from hermes_ort.engine import packs, persistent
from hermes_ort.engine.loading import prepare, quick_to_create
from hermes_ort.engine.persistent import PersistentSessions, mappings_of, resident_bytes
from hermes_ort.engine.prepared import OwnedStage
from hermes_ort.engine.sessions import SessionConfig
from hermes_ort.engine.templates import Templates
from hermes_ort.format import manifest as manifest_io
from hermes_ort.planning.planner import Plan

from budgets import least_generation_mib
from tiny_gguf import TinyConfig, write_tiny_gguf

CONFIG = SessionConfig(intra_op_threads=1, prepacking=True, spinning=False)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A native conversion whose blocks' matrices are large enough to span several pages."""
    root = tmp_path_factory.mktemp("persistent")
    write_tiny_gguf(root / "tiny.gguf", TinyConfig(layers=2, hidden=256, heads=4, kv_heads=2, ffn=512))
    return convert_gguf(root / "tiny.gguf", root / "model", "native", 0).directory


@pytest.fixture
def block(native):
    manifest = manifest_io.load(native)
    templates = Templates(native, manifest)
    stage = manifest.stage("block_00")
    rng = np.random.default_rng(0)
    feed = {}
    for t in stage.inputs:
        sizes = {"batch": 1, "sequence": 3, "group_sequence": 6, "total_sequence": 3, "past_sequence": 0}
        shape = [d if isinstance(d, int) else sizes[d] for d in t.shape]
        feed[t.name] = (np.ones(shape, bool) if t.dtype == "bool" else rng.standard_normal(shape).astype(t.dtype))
    yield native, stage, templates, feed
    templates.close()


def packs_in(tmp_path, key=None) -> PersistentSessions:
    return PersistentSessions(packs.PackFiles(tmp_path / "packs", key))


def test_weight_pages_leave_rss_after_a_run_and_come_back_to_the_same_outputs(block, tmp_path):
    directory, stage, templates, feed = block
    fresh = prepare(directory, stage, CONFIG, templates)
    assert isinstance(fresh, OwnedStage)
    want = fresh.run(feed)
    fresh.close()
    kept = packs_in(tmp_path)
    try:
        for _ in range(4):
            loaded = prepare(directory, stage, CONFIG, templates, persistent=kept)
            assert getattr(loaded, "persistent", False)
            got = loaded.run(feed)
            held = kept.held[stage.name]
            ranges = mappings_of(held.pack.data)
            assert resident_bytes(ranges) >= held.pack.packed_bytes * 0.9  # the run read the pack from its file
            loaded.close()
            assert resident_bytes(mappings_of(held.pack.data)) == 0  # smaps: nothing of it left in RSS
            assert all(np.array_equal(got[k], want[k]) for k in want)  # bit for bit, pages dropped and back
        assert len(kept.held) == 1 and held.session is kept.held[stage.name].session  # one session throughout
    finally:
        kept.close()


def test_a_pack_of_another_ort_build_or_cpu_is_rebuilt_not_used(block, tmp_path, monkeypatch):
    directory, stage, templates, _ = block
    config = quick_to_create(CONFIG, stage, templates)
    built = []
    original = packs.build
    monkeypatch.setattr(packs, "build", lambda *a: built.append(a[3]) or original(*a))
    first = packs.PackFiles(tmp_path, "ort9.9-x86_64-aaaa").pack(directory, stage, config)
    other = packs.PackFiles(tmp_path, "ort9.9-x86_64-bbbb").pack(directory, stage, config)
    assert len(built) == 2 and first.directory != other.directory  # another key never finds the first pack
    meta = json.loads((other.directory / packs.META).read_text())
    (other.directory / packs.META).write_text(json.dumps({**meta, "key": "ort9.9-x86_64-aaaa"}))  # moved there
    with pytest.warns(UserWarning, match=r"pack\.json was made by another ORT build"):
        packs.PackFiles(tmp_path, "ort9.9-x86_64-bbbb").pack(directory, stage, config)
    assert len(built) == 3


def test_a_corrupt_pack_is_named_in_one_line_then_rebuilt(block, tmp_path):
    directory, stage, templates, feed = block
    want = prepare(directory, stage, CONFIG, templates).run(feed)
    kept = packs_in(tmp_path)
    kept.acquire(directory, stage, quick_to_create(CONFIG, stage, templates)).close()
    data = kept.held[stage.name].pack.data
    kept.close()
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    again = packs_in(tmp_path)  # a new process: checks each pack once before opening it
    with pytest.warns(UserWarning) as caught:
        loaded = prepare(directory, stage, CONFIG, templates, persistent=again)
    lines = [str(w.message) for w in caught]
    assert len(lines) == 1 and str(data) in lines[0] and "sha256" in lines[0] and "\n" not in lines[0]
    try:
        got = loaded.run(feed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
        loaded.close()
    finally:
        again.close()


def test_weights_ort_packed_on_the_heap_fall_back_to_fresh_sessions_with_a_warning(block, tmp_path, monkeypatch):
    directory, stage, templates, feed = block
    kept = packs_in(tmp_path)
    monkeypatch.setattr(persistent, "resident_bytes", lambda ranges: 0)  # nothing read from the pack's file
    try:
        loaded = prepare(directory, stage, CONFIG, templates, persistent=kept)
        want = loaded.run(feed)
        with pytest.warns(UserWarning, match="packed its weights on the heap"):
            loaded.close()
        assert stage.name not in kept.held
        fallback = prepare(directory, stage, CONFIG, templates, persistent=kept)
        assert isinstance(fallback, OwnedStage)
        got = fallback.run(feed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
        later = packs_in(tmp_path)  # another process: the verdict is in pack.json, no kept session is tried
        assert isinstance(prepare(directory, stage, CONFIG, templates, persistent=later), OwnedStage)
        assert later.held == {} and stage.name in later.heap_packed
    finally:
        kept.close()


def test_a_stage_closed_after_its_session_records_no_heap_verdict(block, tmp_path):
    """Sessions closed before the stages using them (a process ending): no smaps check of a gone mapping."""
    directory, stage, templates, feed = block
    kept = packs_in(tmp_path)
    loaded = prepare(directory, stage, CONFIG, templates, persistent=kept)
    loaded.run(feed)
    kept.close()
    loaded.close()
    again = packs_in(tmp_path)
    try:
        assert getattr(prepare(directory, stage, CONFIG, templates, persistent=again), "persistent", False)
        assert not kept.heap_packed
    finally:
        again.close()


def plan_of(names, resident=()) -> Plan:
    return Plan(budget=0, loaders=1, window=2, resident=tuple(resident), prepacked=tuple(names), compute_threads=1,
                predicted_first_s=0, predicted_steady_s=0, predicted_peak_bytes=0)


def test_streamed_decoding_through_persistent_stages_gives_the_same_ids(native, monkeypatch):
    manifest = manifest_io.load(native)
    names = [s.name for s in manifest.stages]
    ids = np.array([[5, 17, 260, 99]])
    monkeypatch.setenv(packs.PACKS_ENV, "0")
    with hermes_ort.InferenceSession(native, plan_override=plan_of(names)) as session:
        assert session._resident.persistent is None
        want = hermes_ort.generate(session, ids, max_new_tokens=6)
    monkeypatch.setenv(packs.PACKS_ENV, "1")
    with hermes_ort.InferenceSession(native, plan_override=plan_of(names)) as session:
        got = hermes_ort.generate(session, ids, max_new_tokens=6)
        kept = session._resident.persistent
        quantized = {n for n in names if session._resident.templates.canonical[n].quantized}
        assert quantized and set(kept.held) == quantized  # every quantized stage opened once, streamed
    np.testing.assert_array_equal(got, want)


PEAK_OF_GENERATION = """
import json, sys
import numpy as np
import hermes_ort
from hermes_ort.engine.memory import peak_rss
with hermes_ort.InferenceSession(sys.argv[1], memory_budget=int(sys.argv[2])) as s:
    hermes_ort.generate(s, np.array([[5, 17, 260, 99]]), max_new_tokens=12)
    plan = s.last_generation_plan
    kept = len(s._resident.persistent.held) if s._resident.persistent else 0
print(json.dumps({"peak": peak_rss(), "streamed": len(s.manifest.stages) - len(plan.resident), "kept": kept}))
"""


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Blocks of ~4 MiB each: a budget near the minimum streams most of them."""
    root = tmp_path_factory.mktemp("wide")
    write_tiny_gguf(root / "wide.gguf", TinyConfig(layers=4, hidden=1024, heads=8, kv_heads=2, ffn=2816))
    return convert_gguf(root / "wide.gguf", root / "model", "native", 0).directory


def test_a_plan_with_persistent_sessions_stays_within_its_budget(wide):
    """OS peak of a fresh process, decoding at the smallest budget that plans, and a little above it."""
    native = wide
    out = subprocess.run([sys.executable, "-m", "hermes_ort", "profile", str(native), "--decode", "--max-length",
                          "32"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    least = int(least_generation_mib(native, "--ids", "5,17", "--max-new-tokens", "1") * (1 << 20)) + (1 << 20)
    for budget in (least, least + (4 << 20)):
        run = subprocess.run([sys.executable, "-c", PEAK_OF_GENERATION, str(native), str(budget)], capture_output=True,
                             text=True)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["streamed"] > 0 and result["kept"] > 0  # persistent sessions streamed
        assert result["peak"] <= budget, f"peak {result['peak'] / 2**20:.1f} MiB over budget {budget / 2**20:.1f} MiB"


def test_hermes_warm_saves_every_quantized_stages_pack_so_a_session_builds_none(native, tmp_path, monkeypatch):
    monkeypatch.setenv(packs.PACK_DIR_ENV, str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "hermes_ort", "warm", str(native)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    manifest = manifest_io.load(native)
    templates = Templates(native, manifest)
    quantized = [s for s in manifest.stages if templates.canonical[s.name].quantized]
    assert f"{len(quantized)} quantized stages' packs" in out.stdout
    monkeypatch.setattr(packs, "build", lambda *a: pytest.fail("a pack hermes warm saved was built again"))
    kept = PersistentSessions(packs.PackFiles(tmp_path))
    try:
        for stage in quantized:
            prepare(native, stage, CONFIG, templates, persistent=kept).close()
        assert set(kept.held) == {s.name for s in quantized}
    finally:
        kept.close()
        templates.close()


def test_parked_bytes_sum_to_what_closing_the_kept_sessions_gave_back(monkeypatch):
    """One stage's delta misses what the kept sessions hold together; the profile scales them to the RSS
    that closing them all frees, in each stage's measured proportion."""
    from hermes_ort.planning import profiler
    from hermes_ort.planning.profiles import StageCost, StageProfile

    readings = iter([100 << 20, 70 << 20])  # before closing, after
    monkeypatch.setattr(profiler, "rss", lambda: next(readings))
    cost = lambda parked: StageCost(0, 0, 0, 1, parked_bytes=parked)
    stages = [StageProfile("a", 1, cost(0), cost(1 << 20)), StageProfile("b", 1, cost(0), cost(2 << 20)),
              StageProfile("c", 1, cost(0), cost(0))]

    class Kept:
        closed = False

        def close(self):
            self.closed = True

    kept = Kept()
    scaled = profiler.parked_as_freed(stages, kept)
    assert kept.closed
    assert [s.prepacked.parked_bytes for s in scaled] == [10 << 20, 20 << 20, 0]
    assert [s.plain for s in scaled] == [s.plain for s in stages]
